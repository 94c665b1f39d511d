"""Evaluation CLI: EK100-MQA, two-stage recognition, multi-round appending, sequential action prediction, plots.

    python evaluate.py --mode mqa --ckpt runs/toy --frames 8 16
    python evaluate.py --mode mqa --score text                   # options scored by their text, not their letter
    python evaluate.py --mode two_stage --topk 20 --ckpt llavaction-7b --annotations EPIC --video-root VIDEOS
    python evaluate.py --mode multi_round --ckpt runs/toy
    python evaluate.py --mode mqa --sap --ckpt runs/toy
    python evaluate.py --plot runs/toy/eval_mqa/metrics.json     # per-verb / per-noun / difficulty PNGs
    torchrun --nproc_per_node 8 evaluate.py --mode two_stage --ckpt MLAdaptiveIntelligence/LLaVAction-7B ...

mqa asks the lettered options of a mined benchmark (mine.py); two_stage asks them over the recognizer's top-K actions
(truth not added, shuffled with --seed) and maps the answer back to an action; multi_round scores every action label as
the answer to the direct-prediction question. --score reads the options by letter (the next-token logits of the K
letters, the paper's protocol), text (each option's text as the whole answer, its mean token log-likelihood: over the
recognizer's top-K, multi-round appending restricted to those K) or generate (greedy decoding, the first letter found,
as the authors evaluate). --sap asks the prior-action form with the model's OWN two previous predictions in that video.
Questions are rebuilt in the checkpoint's prompt style and perspective, with its time instruction.

Each rank appends finished samples to {out}/frames{T}/predictions.rank{r}.jsonl, so a killed run resumes; rank 0
merges them into {out}/frames{T}/predictions.jsonl and merges {out}/metrics.json (one entry per --frames setting),
with the resolved flags in {out}/args.json. One run at a time owns {out} (an OS lock).
"""
import argparse
import csv
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import mine
import model as model_lib
import structured

MODES, SCORES = ("mqa", "two_stage", "multi_round"), ("letter", "text", "generate")
TOPK = 20  # two-stage candidates unless --topk or --candidates says otherwise (lettered A-T)
# flags a prediction depends on, in every mode and in each: a resume must match them, and only them (mqa: not --seed)
RESUME_KEYS = ("mode", "ckpt", "weights", "samples", "random_init", "annotations", "prompt_style", "perspective",
               "time_prompt")
CHANGED = {"weights": "the checkpoint's weights as they were then", "samples": "other samples (an input file changed)"}
MODE_KEYS = {"mqa": ("benchmark", "score", "reduce", "sap"), "multi_round": ("split", "reduce"),
             "two_stage": ("split", "scores", "candidates", "topk", "text", "seed", "score", "reduce", "sap")}
MQA_FIELDS = ("id", "video_id", "start", "end", "options", "answer_index", "option_actions", "verb_class",
              "noun_class", "action_class")
PLOTS = {"per_verb": "accuracy per verb", "per_noun": "accuracy per noun",
         "by_difficulty": "accuracy by difficulty level"}  # metrics.json keys (figure 8, table 8)
PLOT_WIDTH, PLOT_ROW, PLOT_HEADER = 800, 16, 28  # metric plots: height = PLOT_HEADER + PLOT_ROW * bars + 8


# samples to evaluate, one dict per segment -----------------------------------
def benchmark_rows(path, root, mine_flags=f"--split validation --k {mine.K}"):
    """EK100-MQA rows as mine.py writes them, or its --topk candidates (`mine_flags`: how to write the file)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist; write it first: python mine.py --model tim "
                                f"--annotations {root} {mine_flags} --out {path}")
    rows = data.read_jsonl(path)
    for r in rows:
        if missing := [k for k in MQA_FIELDS if k not in r]:
            raise ValueError(f"{path}: row {r.get('id')} lacks {missing}; expected mine.py's MQA rows")
    if len({len(r["options"]) for r in rows}) > 1:
        raise ValueError(f"{path}: rows have different numbers of options; a benchmark uses one K")
    if repeated := [i for i, n in Counter(r["id"] for r in rows).items() if n > 1]:
        raise ValueError(f"{path}: {len(repeated)} ids repeat (first {repeated[0]}; a training file drawn several "
                         "times?): a benchmark asks each segment once")
    return rows


def two_stage_rows(ann, args):
    """Stage one: the recognizer's top-K actions (its scores, or mine.py --topk's candidate file), the truth NOT added,
    shuffled with --seed before lettering (in rank order the truth is option A on about half the rows: answering A would
    score like the recognizer's top-1); option_ranks keeps each one's rank."""
    if args.candidates:
        rows = benchmark_rows(args.candidates, ann.root, f"--split {args.split} --topk {TOPK}")
        ids, n = {s.id for s in ann.segments(args.split)}, len(rows[0]["options"])
        if any(r["id"] not in ids or r.get("task") != "candidates" for r in rows):
            raise ValueError(f"{args.candidates}: expected mine.py --topk's candidate rows (task 'candidates': the top "
                             f"N in rank order, the truth not added) of {args.split} segments of {ann.root}")
        if args.topk not in (None, n):
            raise ValueError(f"{args.candidates} holds each row's top {n}, not --topk {args.topk}: drop --topk")
        args.topk = n  # recorded in args.json as what was evaluated
    else:
        args.topk = args.topk or TOPK
        scores = mine.read_scores(args.scores, ann, args.split, args.trust_pickle)
        rows = mine.mine(ann, args.split, scores, topk=args.topk, text=args.text, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    for r in rows:
        order = rng.permutation(len(r["options"])).tolist()
        r.update(options=[r["options"][j] for j in order], option_actions=[r["option_actions"][j] for j in order],
                 option_ranks=order, answer_index=order.index(r["answer_index"]) if r["answer_index"] >= 0 else -1)
    return rows


def multi_round_rows(ann, args):
    return [{k: v for k, v in vars(s).items() if k in MQA_FIELDS} for s in ann.segments(args.split)]


def ask(rows, args):
    """The question of every row in the run's prompt style (a benchmark's stored question is not used)."""
    for r in rows:
        r["question"] = (data.direct_question(args.prompt_style, args.perspective) if args.mode == "multi_round"
                         else data.mqa_question(r["options"], args.prompt_style, args.perspective))
    return rows


# prediction files: append line by line, resume, merge ------------------------
def read_predictions(folder):
    """id -> prediction from the merged file and every rank's shard; a line cut short by a kill is dropped, and a
    skipped sample's old row never hides the prediction a rerun made for it on another rank."""
    done = {}
    for path in sorted(Path(folder).glob("predictions*.jsonl")):
        for p in map(json.loads, path.read_text().split("\n")[:-1]):  # an unterminated line is cut off, made again
            if not (p.get("bad") and p["id"] in done):
                done[p["id"]] = p
    return done


def merge_predictions(folder, rows):
    """The shards -> predictions.jsonl in row order (atomic), then the shards go. Predictions of rows outside
    this run (an earlier run without --limit) are kept after them; the returned list is this run's rows only."""
    done = read_predictions(folder)
    missing = [r["id"] for r in rows if r["id"] not in done]
    assert not missing, f"no prediction for {len(missing)} samples, first {missing[:3]}"
    preds = [done.pop(r["id"]) for r in rows]
    data.write_jsonl_atomic(Path(folder) / "predictions.jsonl", preds + list(done.values()))
    for path in Path(folder).glob("predictions.rank*.jsonl"):
        path.unlink()
    return preds


# batches and scoring ---------------------------------------------------------
def plan_batches(rows, done, rank, world, batch_size, sap, style):
    """This rank's batches (lists of row indices) over the rows without a prediction (skipped ones retried). Plain: rows
    dealt round-robin. SAP: whole videos dealt round-robin, and wave t (each video's t-th unfinished segment, in time
    order) cut into batches, so a video's earlier predictions exist when needed."""
    if not sap:
        share = [i for i, r in enumerate(rows) if r["id"] not in done][rank::world]
        return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    videos, _ = data.previous_actions(rows, style)
    waves = defaultdict(list)
    for vid in sorted(videos)[rank::world]:
        for t, i in enumerate(i for i in videos[vid] if rows[i]["id"] not in done):
            waves[t].append(i)
    return [w[i:i + batch_size] for t, w in sorted(waves.items()) for i in range(0, len(w), batch_size)]


def sap_item(model, item, row, priors, args, frames):
    """Re-tokenise a decoded item with the prior-action question (the workers ran ahead of the predictions)."""
    question = data.mqa_question(row["options"], args.prompt_style, args.perspective, priors)
    if item["pixel_values_videos"] is not None and args.time_prompt:  # as TaskDataset does
        question = data.TIME_PROMPT.format(duration=row["end"] - row["start"], frames=frames) + question
    n_video = model.spec.video_tokens(frames) if item["pixel_values_videos"] is not None else 0
    ids, _ = data.encode_conversation(model.tokenizer, question, None, n_video, model.cfg.action_tokens)
    return dict(item, input_ids=torch.tensor(ids), labels=torch.full((len(ids),), -100))


def predict(model, rows, batches, frames, vocab, args, done):
    """Yield one prediction dict per row of `batches`, in order. Workers decode clips (TaskDataset); each batch
    of clips is one scoring pass. With --sap, `done` (id -> prediction) supplies and collects the priors."""
    dataset = data.TaskDataset(rows, args.video_root, model.tokenizer, model.spec, frames, model.cfg.action_tokens,
                               time_prompt=args.time_prompt, skip_bad=args.skip_bad, with_answer=False)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=list,
                        prefetch_factor=4 if args.num_workers else None)
    before = data.previous_actions(rows, args.prompt_style)[1] if args.sap else {}
    candidates = structured.candidate_token_ids(model.tokenizer, vocab.labels) if args.mode == "multi_round" else None
    for items in loader:
        priors = []
        for b, item in enumerate(items):
            row, prev = rows[item["index"]], [done.get(rows[j]["id"]) for j in before.get(item["index"], [])]
            ok = len(prev) == 2 and all(p and p.get("pred_text") for p in prev)
            priors.append([(round(row["start"] - p["start"], 3), p["pred_text"]) for p in prev] if ok else None)
            if ok:
                items[b] = sap_item(model, item, row, priors[-1], args, frames)
        batch, batch_rows = data.collate(items, model.tokenizer.pad_token_id), [rows[x["index"]] for x in items]
        generated = scores = [None] * len(items)  # each branch below fills one of them
        if args.mode == "multi_round":  # candidates are all labels in id order: the best one is the action id
            scores = structured.score_candidates(model, batch, candidates, args.chunk, args.reduce).cpu()
        elif args.score == "text":
            scores = structured.score_option_texts(model, batch, [r["options"] for r in batch_rows], args.chunk,
                                                   args.reduce).cpu()
        elif args.score == "generate":
            generated = structured.generate_answer(model, batch)
        else:
            scores = structured.score_options(model, batch, len(batch_rows[0]["options"])).cpu()
        for b, (item, row) in enumerate(zip(items, batch_rows)):
            pred = prediction_row(row, item, frames, scores[b], generated[b], vocab, args.mode, priors[b])
            done[pred["id"]] = pred
            yield pred


def prediction_row(row, item, frames, scores, generated, vocab, mode, priors):
    """What was asked, what came out, the truth: enough to recompute every metric, ensemble or calibrate from
    the file alone. MQA / two-stage: option_scores over the K options (letter: log-probs normalised over the K
    letters; text: mean token log-likelihoods), or the generated text; multi-round: the top 5 actions."""
    pred = {"id": row["id"], "video_id": row["video_id"], "start": row["start"], "frames": frames}
    if item["bad"]:
        return dict(pred, bad=item["bad"])
    if mode == "multi_round":
        top = scores.topk(min(5, len(scores)))
        action = choice = int(top.indices[0])
        pred.update(pred_action=action, pred_text=vocab.labels[action],
                    top5=[[int(a), round(float(s), 5)] for a, s in zip(top.indices, top.values)])
    else:
        choice = int(scores.argmax()) if generated is None else structured.parse_letter(generated, len(row["options"]))
        action, text = (row["option_actions"][choice], row["options"][choice]) if choice >= 0 else (-1, None)
        pred.update(choice=choice, pred_action=action, pred_text=text, answer_index=row["answer_index"])
        pred.update({"generated": generated} if generated is not None else
                    {"option_scores": [round(s, 5) for s in scores.tolist()]})
        if mode == "two_stage":
            pred.update(option_ranks=row["option_ranks"],
                        recognizer_top1=row["option_actions"][row["option_ranks"].index(0)])
    verb, noun = (int(x) for x in vocab.pairs[action]) if action >= 0 else (-1, -1)
    pred.update(pred_verb=verb, pred_noun=noun, verb_class=row["verb_class"], noun_class=row["noun_class"],
                action_class=row["action_class"], clamped=item["clamped"],
                correct=choice == row["answer_index"] >= 0 if mode == "mqa" else action == row["action_class"])
    return pred if priors is None else dict(pred, priors=priors)


# metrics and their plots -----------------------------------------------------
def read_tail_classes(root):
    """EPIC-100's tail verb and noun ids (a header line, then one id a line); None when the files are absent."""
    paths = [Path(root) / name for name in data.TAIL_FILES]
    if all(p.exists() for p in paths):
        return [{int(line.split(",")[0]) for line in p.read_text().splitlines()[1:] if line.strip()} for p in paths]


def read_ratings(path):
    """Difficulty level by narration id (table 8): JSON {id: level} or CSV columns narration_id|id, level|difficulty."""
    if Path(path).suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(Path(path).read_text()).items()}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first column's name
        reader = csv.DictReader(f)
        id_col = next((c for c in ("narration_id", "id") if c in (reader.fieldnames or [])), None)
        level_col = next((c for c in ("level", "difficulty") if c in (reader.fieldnames or [])), None)
        if not id_col or not level_col:
            raise ValueError(f"{path}: expected columns narration_id (or id) and level (or difficulty)")
        return {r[id_col]: r[level_col] for r in reader}


def grouped(keys, correct):
    """{key: {n, correct, accuracy}} in sorted key order."""
    hits = {str(k): correct[keys == k] for k in sorted(set(keys))}
    return {k: {"n": len(hit), "correct": int(hit.sum()), "accuracy": float(hit.mean())} for k, hit in hits.items()}


def compute_metrics(preds, vocab, tails=None, ratings=None):
    """Accuracy (mqa: of the chosen letter, else action top-1); verb, noun and action top-1; head/tail by EPIC's tail
    classes (an action is head when its verb AND noun are); per-verb and per-noun accuracy (figure 8); by difficulty
    (table 8); skipped samples by reason, clamped frames, unparsed answers (--score generate)."""
    good = [p for p in preds if not p.get("bad")]
    reasons = Counter("past the video's end" if data.PAST_END in p["bad"] else "unreadable"
                      for p in preds if p.get("bad"))
    m = {"n": len(good), "skipped_bad": len(preds) - len(good), "skipped_by_reason": dict(reasons)}
    if not good:
        return m
    col = {k: np.array([p[k] for p in good]) for k in ("correct", "verb_class", "noun_class")}
    hit = {k: np.array([p[f"pred_{k}"] == p[f"{k}_class"] for p in good]) for k in ("verb", "noun", "action")}
    m.update(accuracy=float(col["correct"].mean()), **{f"{k}_top1": float(hit[k].mean()) for k in hit},
             clamped_frames=int(sum(p["clamped"] for p in good)))
    if "choice" in good[0]:
        m["unparsed"] = sum(p["choice"] < 0 for p in good)
    if "recognizer_top1" in good[0]:
        m["recognizer_top1"] = float(np.mean([p["recognizer_top1"] == p["action_class"] for p in good]))
        m["topk_recall"] = float(np.mean([p["answer_index"] >= 0 for p in good]))
    if tails is not None:
        tail_verb, tail_noun = np.isin(col["verb_class"], list(tails[0])), np.isin(col["noun_class"], list(tails[1]))
        split = {"verb": tail_verb, "noun": tail_noun, "action": tail_verb | tail_noun}
        m["head_tail"] = {k: grouped(np.where(split[k], "tail", "head"), hit[k]) for k in split}
    m["per_verb"] = {vocab.verbs[int(k)]: v for k, v in grouped(col["verb_class"], hit["verb"]).items()}
    m["per_noun"] = {vocab.nouns[int(k)]: v for k, v in grouped(col["noun_class"], hit["noun"]).items()}
    if ratings is not None:
        m["by_difficulty"] = grouped(np.array([ratings.get(p["id"], "unrated") for p in good]), col["correct"])
    return m


def bar_chart(title, bars, path):
    """Horizontal bars, one per (label, accuracy in [0, 1], count); PLOT_WIDTH x (PLOT_HEADER + PLOT_ROW * n + 8)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (PLOT_WIDTH, PLOT_HEADER + PLOT_ROW * len(bars) + 8), "white")
    draw, left, right = ImageDraw.Draw(image), 260, PLOT_WIDTH - 60
    draw.text((8, 6), title, fill="black")
    for i, (label, acc, count) in enumerate(bars):
        y = PLOT_HEADER + PLOT_ROW * i
        draw.text((8, y), f"{label} (n={count})"[:40], fill="black")
        draw.rectangle([left, y + 2, left + max(1, round(acc * (right - left))), y + PLOT_ROW - 3], fill=(70, 110, 180))
        draw.text((right + 6, y), f"{100 * acc:.1f}", fill="black")
    image.save(path)


def plot_metrics(metrics_path, out):
    """{key}_frames{T}.png for key per_verb, per_noun (classes by count, most frequent first) and by_difficulty,
    for each frames setting of a metrics.json ({"8": {key: {name: {"n", "correct", "accuracy"}}}}; a single
    setting's dict without the frames level gives {key}.png); missing keys are skipped with a note."""
    metrics, out = json.loads(Path(metrics_path).read_text()), Path(out)
    settings = {"": metrics} if any(key in metrics for key in PLOTS) else metrics
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for frames, m in settings.items():
        for key, title in PLOTS.items():
            if not m.get(key):
                print(f"{metrics_path}{f' frames {frames}' if frames else ''} has no {key!r}: no plot")
                continue
            bars = [(name, v["accuracy"], v["n"]) for name, v in m[key].items()]
            bars = bars if key == "by_difficulty" else sorted(bars, key=lambda bar: -bar[2])
            path = out / f"{key}{f'_frames{frames}' if frames else ''}.png"
            bar_chart(f"{title}{f', {frames} frames' if frames else ''} ({metrics_path})", bars, path)
            written.append(path)
    return written


# one --frames setting end to end ---------------------------------------------
def evaluate_setting(model, rows, folder, frames, vocab, args, rank=0, world=1):
    """Predict this rank's share of what `folder` lacks (skipped again); rank 0 returns all predictions, others None."""
    folder.mkdir(parents=True, exist_ok=True)
    found = read_predictions(folder)
    done = {i: p for i, p in found.items() if not p.get("bad")}
    dist.barrier()  # every rank has read the shards before any rank appends to its own
    ids = {r["id"] for r in rows}
    if rank == 0 and found:
        retried = sum(1 for i, p in found.items() if p.get("bad") and i in ids)
        print(f"{folder}: {sum(i in ids for i in done)} predictions found, {len(ids - done.keys())} to go"
              + (f" ({retried} skipped before, retried)" if retried else ""))
    batches = plan_batches(rows, done, rank, world, args.batch_size, args.sap, args.prompt_style)
    shard = folder / f"predictions.rank{rank}.jsonl"
    if shard.exists():  # appended to, after cutting off a partial last line a kill may have left
        os.truncate(shard, shard.read_bytes().rfind(b"\n") + 1)
    with open(shard, "a") as f:
        for pred in tqdm(predict(model, rows, batches, frames, vocab, args, done), total=sum(map(len, batches)),
                         disable=rank != 0, desc=f"{args.mode} frames={frames}"):
            print(json.dumps(pred), file=f, flush=True)
    dist.barrier()
    preds = merge_predictions(folder, rows) if rank == 0 else None
    dist.barrier()  # nobody starts the next setting while rank 0 still merges this one
    return preds


def summary(args, frames, m):
    extra = (f", recognizer top-1 {m['recognizer_top1']:.4f}, top-{m['options']} recall {m['topk_recall']:.4f}"
             if "recognizer_top1" in m else "")
    how = f"multi-round ({args.reduce})" if args.mode == "multi_round" else f"{args.score} scoring"
    reasons = ", ".join(f"{n} {why}" for why, n in m["skipped_by_reason"].items())
    return (f"{args.mode}{' sap' if args.sap else ''} frames={frames}, {how}: accuracy {m.get('accuracy', 0):.4f} on "
            f"{m['n']} samples; verb {m.get('verb_top1', 0):.4f}, noun {m.get('noun_top1', 0):.4f}, action "
            f"{m.get('action_top1', 0):.4f}{extra}; {m['skipped_bad']} skipped{f' ({reasons})' if reasons else ''}, "
            f"{m.get('clamped_frames', 0)} frames clamped at a video's end"
            + (f"; {m['unparsed']} answers without a letter" if m.get("unparsed") else ""))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="mqa")
    p.add_argument("--ckpt", default="runs/toy", help="what to evaluate: a train.py run, an alias (model.py), a "
                   "native or LLaVA-NeXT folder, or a hub id; a base without heads is evaluated zero-shot")
    model_lib.add_load_flags(p)
    p.add_argument("--annotations", default="toy", help="annotation root: EPIC CSVs, actions.csv, tail lists")
    p.add_argument("--split", default="validation", help="two_stage, multi_round: the split to evaluate")
    p.add_argument("--video-root", help="default {annotations}/videos")
    p.add_argument("--benchmark", help=f"mqa: MQA JSONL; default {{annotations}}/{data.BENCHMARK}")
    p.add_argument("--scores", help="two_stage: recognizer scores; default {annotations}/scores/tim_{split}.npz")
    p.add_argument("--candidates", help="two_stage: mine.py --topk's candidate file instead of --scores")
    p.add_argument("--trust-pickle", action="store_true", help="two_stage: allow .pkl scores (a pickle runs code)")
    p.add_argument("--topk", type=int, help=f"two_stage: candidates, lettered A.. (default {TOPK}; --candidates: N)")
    p.add_argument("--text", choices=mine.TEXTS, help="two_stage option texts: class labels (default), or a "
                   "narration drawn per class (the truth's own when it is among them, a small leak)")
    p.add_argument("--seed", type=int, default=0, help="two_stage: options' shuffle (and --text narration's draw)")
    p.add_argument("--frames", type=int, nargs="+", default=[8], help="one evaluation per value")
    p.add_argument("--score", choices=SCORES, default="letter", help="mqa, two_stage: how an option is chosen")
    p.add_argument("--reduce", choices=["mean", "sum"], default="mean", help="multi_round and --score text: mean "
                   "(the paper's lowest mean cross-entropy) or summed token log-likelihood of a candidate")
    p.add_argument("--sap", action="store_true", help="mqa, two_stage: prior-action prompt with the model's own "
                   "two previous predictions in that video")
    p.add_argument("--prompt-style", choices=data.STYLES, help="default: the checkpoint's")
    p.add_argument("--perspective", choices=list(data.PERSPECTIVES), help="default: the checkpoint's")
    p.add_argument("--time-prompt", action=argparse.BooleanOptionalAction,
                   help="the time instruction before the question (default: as the checkpoint was trained)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward")
    p.add_argument("--num-workers", type=int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers decoding clips (default: cores / (4 x ranks), at most 4)")
    p.add_argument("--chunk", type=int, default=256, help="multi_round, --score text: candidates per pass")
    p.add_argument("--ratings", help="difficulty levels by narration id (CSV or JSON)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable clips; a rerun retries them")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--out", help="default {ckpt}/eval_{mode}[_{score}][_sap], the score named unless letter "
                   "(runs/{name}/... for an alias)")
    p.add_argument("--plot", metavar="METRICS_JSON", help="only plot a metrics.json (into plots/ beside it, or --out)")
    return p


def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot:
        for path in plot_metrics(args.plot, args.out or Path(args.plot).parent / "plots"):
            print(f"wrote {path}")
        return
    if args.candidates and (args.scores or args.text):
        parser.error("--candidates already holds the recognizer's top-K and their texts (mine.py --topk --text): "
                     "pass it, or --scores and --text, not both")
    if args.sap and args.mode == "multi_round":
        parser.error("--sap needs options to fill the prior-action prompt: use it with --mode mqa or two_stage")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: nothing to evaluate")
    root = Path(args.annotations)
    args.video_root = args.video_root or str(root / "videos")
    args.benchmark = args.benchmark or str(root / data.BENCHMARK)
    if not args.candidates:  # else both stay None in args.json: the file decided them
        args.scores = args.scores or str(root / "scores" / f"tim_{args.split}.npz")
        args.text = args.text or mine.CANDIDATE_TEXT
    scoring = "" if args.score == "letter" or args.mode == "multi_round" else f"_{args.score}"
    args.out = args.out or str(model_lib.results_folder(args.ckpt) / f"eval_{args.mode}{scoring}{'_sap' * args.sap}")
    rank, world, device = model_lib.init_distributed(timeout_minutes=360)  # SAP: ranks can finish far apart
    ann = data.load_annotations(root)  # inputs first: nothing is written until they are all good
    rows = {"mqa": lambda: benchmark_rows(args.benchmark, root), "two_stage": lambda: two_stage_rows(ann, args),
            "multi_round": lambda: multi_round_rows(ann, args)}[args.mode]()
    args.samples = hashlib.sha1(json.dumps(rows).encode()).hexdigest()  # every row, whatever --limit takes of them
    if not (rows := rows[:args.limit]):
        parser.error(f"no samples to evaluate in {args.benchmark if args.mode == 'mqa' else root}")
    if rank == 0 and not args.random_init:
        model_lib.resolve(args.ckpt, args.cache)  # rank 0 first: it may download the checkpoint or convert it
    dist.barrier()
    ckpt = args.ckpt if args.random_init else model_lib.resolve(args.ckpt, args.cache)  # a Path: a folder here
    model = model_lib.load_for_eval(ckpt, device, args.random_init, args.tokenizer, args.cache)
    args.weights = model_lib.weights_fingerprint(ckpt) if isinstance(ckpt, Path) else None  # a re-export is new
    tails, ratings = read_tail_classes(root), read_ratings(args.ratings) if args.ratings else None
    args.prompt_style = args.prompt_style or model.cfg.prompt_style
    args.perspective = args.perspective or model.cfg.perspective
    args.time_prompt = model.cfg.time_instruction if args.time_prompt is None else args.time_prompt
    ask(rows, args)
    out = Path(args.out)
    if rank == 0:
        data.lock_folder(out)
        saved = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else {}
        changed = [k for k in RESUME_KEYS + MODE_KEYS[args.mode] if saved.get(k, vars(args)[k]) != vars(args)[k]]
        if changed and list(out.glob("frames*/predictions*.jsonl")):
            was = ", ".join(CHANGED.get(k) or f"--{k.replace('_', '-')} {saved.get(k)} (now {vars(args)[k]})"
                            for k in changed)
            parser.error(f"{out} holds predictions made with {was}; pass another --out or delete {out}")
        data.write_json_atomic(out / "args.json", vars(args))
    dist.barrier()
    for frames in args.frames:
        preds = evaluate_setting(model, rows, out / f"frames{frames}", frames, ann.vocab, args, rank, world)
        if rank == 0:
            m = compute_metrics(preds, ann.vocab, tails, ratings)
            m.update(scoring=f"multi_round {args.reduce}" if args.mode == "multi_round" else args.score,
                     options=len(rows[0].get("options", ann.vocab.labels)), prompt_style=args.prompt_style,
                     time_prompt=args.time_prompt)
            print(summary(args, frames, m))
            path = out / "metrics.json"  # merged: other frames settings already there stay
            data.write_json_atomic(path, {**(json.loads(path.read_text()) if path.exists() else {}), str(frames): m})
    if rank == 0:
        print(f"predictions and metrics in {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
