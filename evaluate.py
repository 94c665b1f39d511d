"""Evaluation CLI: EK100-MQA, two-stage recognition, multi-round appending, and sequential action prediction.

    python evaluate.py --mode mqa --ckpt runs/toy --frames 8 16
    python evaluate.py --mode two_stage --topk 20 --ckpt runs/toy
    python evaluate.py --mode multi_round --ckpt runs/toy
    python evaluate.py --mode mqa --sap --ckpt runs/toy
    torchrun --nproc_per_node 8 evaluate.py --mode two_stage --base llava-video-7b

mqa scores the lettered options of a mined benchmark (mine.py); two_stage asks the same question over the
recognizer's top-K actions (truth not added) and maps the chosen letter back to an action; multi_round scores
every action label as the answer to DIRECT_PROMPT (structured.score_candidates). --sap replaces the question
with the prior-action prompt filled with the model's OWN two previous predictions in that video (the first two
segments of a video keep the plain question); videos are processed in time order, batches across videos.

Each rank appends finished samples to {out}/frames{T}/predictions.rank{r}.jsonl, so a killed run resumes and
skips what is done; rank 0 then merges them into {out}/frames{T}/predictions.jsonl and writes {out}/metrics.json
(one entry per --frames setting) atomically, with the resolved flags in {out}/args.json.
"""
import argparse
import csv
import json
import os
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import mine
import structured
from model import load_model

MODES = ("mqa", "two_stage", "multi_round")
N_PRIORS = 2  # the prior-action prompt names the two previous actions
# flags that change what a prediction is: a resumed run must agree on them with the predictions already written
RESUME_KEYS = ("mode", "ckpt", "base", "random_init", "annotations", "split", "benchmark", "scores", "topk", "text",
               "sap", "time_prompt")
MQA_FIELDS = ("id", "video_id", "start", "end", "question", "options", "answer_index", "option_actions",
              "verb_class", "noun_class", "action_class")

# -----------------------------------------------------------------------------
# distributed setup (a plain `python evaluate.py` is rank 0 of 1)


def init_distributed():
    """(rank, world, device). Long timeout: with SAP the ranks' shares of videos can finish far apart."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=6))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def barrier():
    if dist.is_initialized():
        dist.barrier()

# -----------------------------------------------------------------------------
# samples to evaluate, one dict per segment (DESIGN.md's sample rows)


def benchmark_rows(path):
    """EK100-MQA rows as mine.py writes them; the option actions map a letter back to verb and noun."""
    if not Path(path).exists():
        raise FileNotFoundError(f"benchmark {path} does not exist; mine it first, e.g. python mine.py --model tim "
                                f"--annotations toy --split validation --k 5 --out {path}")
    rows = data.read_jsonl(path)
    for r in rows:
        missing = [k for k in MQA_FIELDS if k not in r]
        if missing:
            raise ValueError(f"{path}: row {r.get('id')} lacks {missing}; expected mine.py's MQA rows")
    if len({len(r["options"]) for r in rows}) > 1:
        raise ValueError(f"{path}: rows have different numbers of options; a benchmark uses one K")
    return rows


def two_stage_rows(ann, split, scores_path, topk, text):
    """Stage one: the recognizer's top-K actions in rank order, the truth NOT added (mine.py --topk --no-truth)."""
    return mine.mine(ann, split, mine.read_scores(scores_path, ann, split), topk=topk, text=text)


def multi_round_rows(ann, split):
    return [{"id": s.id, "video_id": s.video_id, "start": s.start, "end": s.end, "question": data.DIRECT_PROMPT,
             "verb_class": s.verb_class, "noun_class": s.noun_class, "action_class": s.action_class}
            for s in ann.segments(split)]


def previous_rows(rows):
    """For SAP: video id -> its row indices in time order, and row index -> the N_PRIORS rows just before it."""
    videos = defaultdict(list)
    for i, r in enumerate(rows):
        videos[r["video_id"]].append(i)
    before = {}
    for idx in videos.values():
        idx.sort(key=lambda i: (rows[i]["start"], rows[i]["end"]))
        before.update((i, idx[k - N_PRIORS:k]) for k, i in enumerate(idx) if k >= N_PRIORS)
    return videos, before

# -----------------------------------------------------------------------------
# prediction files: append line by line, resume, merge


def read_predictions(folder):
    """id -> prediction from the merged file and every rank's shard; a line cut short by a kill is dropped."""
    done = {}
    for path in sorted(Path(folder).glob("predictions*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                p = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[p["id"]] = p
    return done


def open_shard(path):
    """Append mode, after cutting off a partial last line a kill may have left."""
    if path.exists():
        text = path.read_bytes()
        cut = text.rfind(b"\n") + 1
        if cut < len(text):
            with open(path, "r+b") as f:
                f.truncate(cut)
    return open(path, "a")


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


def write_json_atomic(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# batches and scoring


def plan_batches(rows, done, rank, world, batch_size, sap):
    """This rank's batches (lists of row indices) over the unfinished rows. Plain: rows dealt round-robin. SAP:
    whole videos dealt round-robin, and wave t (each video's t-th unfinished segment, in time order) is cut into
    batches, so a video never has two segments in one batch and its earlier predictions exist when needed."""
    todo = [i for i, r in enumerate(rows) if r["id"] not in done]
    if not sap:
        share = todo[rank::world]
        return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    videos, _ = previous_rows(rows)
    waves = defaultdict(list)
    for vid in sorted(videos)[rank::world]:
        for t, i in enumerate(i for i in videos[vid] if rows[i]["id"] not in done):
            waves[t].append(i)
    return [w[i:i + batch_size] for t, w in sorted(waves.items()) for i in range(0, len(w), batch_size)]


def sap_prompt(model, item, row, priors, frames, time_prompt):
    """Re-tokenise a decoded item with the prior-action question (the workers ran ahead of the predictions)."""
    question = data.prior_mqa_question(row["options"], priors)
    if item["pixel_values_videos"] is not None and time_prompt:  # as TaskDataset does
        question = data.TIME_PROMPT.format(duration=row["end"] - row["start"], frames=frames) + "\n" + question
    n_video = model.spec.video_tokens(frames) if item["pixel_values_videos"] is not None else 0
    ids, _ = data.encode_conversation(model.tokenizer, question, None, n_video, model.n_action_tokens)
    return dict(item, input_ids=torch.tensor(ids), labels=torch.full((len(ids),), -100))


def predict(model, rows, batches, mode, frames, video_root, vocab=None, num_workers=0, skip_bad=False,
            time_prompt=False, sap=False, done=None, chunk=256):
    """Yield one prediction dict per row of `batches`, in order. Workers decode clips (TaskDataset); each batch
    of clips is one scoring forward. With sap, `done` (id -> prediction) supplies and collects the priors."""
    dataset = data.TaskDataset(rows, video_root, model.tokenizer, model.spec, frames, model.n_action_tokens,
                               time_prompt=time_prompt, skip_bad=skip_bad, with_answer=False)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=list,
                        prefetch_factor=4 if num_workers else None)
    before = previous_rows(rows)[1] if sap else {}
    if mode == "multi_round":
        candidates = structured.candidate_token_ids(model.tokenizer, vocab.labels)
    for items in loader:
        priors = []
        for b, item in enumerate(items):
            row, prev = rows[item["index"]], [done.get(rows[j]["id"]) for j in before.get(item["index"], [])]
            ok = len(prev) == N_PRIORS and all(p and not p.get("bad") for p in prev)
            priors.append([(round(row["start"] - p["start"], 3), p["pred_text"]) for p in prev] if ok else None)
            if ok:
                items[b] = sap_prompt(model, item, row, priors[-1], frames, time_prompt)
        batch = data.collate(items, model.tokenizer.pad_token_id)
        if mode == "multi_round":  # candidates are all labels in id order: the best one is the action id
            scores = structured.score_candidates(model, batch, candidates, chunk=chunk).cpu()
            choice = action = structured.choose(scores)
        else:
            scores = structured.score_options(model, batch, len(rows[items[0]["index"]]["options"])).cpu()
            choice = structured.choose(scores)
            action = structured.map_choice_to_action(choice, [rows[x["index"]]["option_actions"] for x in items])
        for b, item in enumerate(items):
            pred = prediction_row(rows[item["index"]], frames, item, int(choice[b]), int(action[b]),
                                  scores[b], vocab, mode, priors[b])
            if done is not None:
                done[pred["id"]] = pred
            yield pred


def prediction_row(row, frames, item, choice, action, scores, vocab, mode, priors):
    """What was asked, what came out, the truth: enough to recompute every metric from the file alone."""
    pred = {"id": row["id"], "video_id": row["video_id"], "start": row["start"], "frames": frames}
    if item["bad"]:
        return dict(pred, bad=True)
    if mode == "multi_round":
        pred.update(pred_action=action, pred_text=vocab.labels[action], score=round(float(scores[action]), 5))
    else:
        pred.update(choice=choice, pred_action=action, pred_text=row["options"][choice],
                    scores=[round(s, 5) for s in scores.tolist()], answer_index=row["answer_index"])
    if vocab is not None:
        pred.update(pred_verb=int(vocab.pairs[action, 0]), pred_noun=int(vocab.pairs[action, 1]))
    pred.update(verb_class=row["verb_class"], noun_class=row["noun_class"], action_class=row["action_class"],
                clamped=item["clamped"],
                correct=choice == row["answer_index"] if mode == "mqa" else action == row["action_class"])
    if mode == "two_stage":
        pred["recognizer_top1"] = row["option_actions"][0]
    if priors is not None:
        pred["priors"] = priors
    return pred

# -----------------------------------------------------------------------------
# metrics


def read_tail_classes(root):
    """EPIC-100's tail verb and noun ids (a header line, then one id a line); None when the files are absent."""
    paths = [Path(root) / "EPIC_100_tail_verbs.csv", Path(root) / "EPIC_100_tail_nouns.csv"]
    if not all(p.exists() for p in paths):
        return None
    return [{int(line.split(",")[0]) for line in p.read_text().splitlines()[1:] if line.strip()} for p in paths]


def read_ratings(path):
    """Difficulty level by narration id (paper table 8): JSON {id: level}, or a CSV with an id column
    (narration_id or id) and a level column (level or difficulty)."""
    if Path(path).suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(Path(path).read_text()).items()}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        id_col = next((c for c in ("narration_id", "id") if c in reader.fieldnames), None)
        level_col = next((c for c in ("level", "difficulty") if c in reader.fieldnames), None)
        if not id_col or not level_col:
            raise ValueError(f"{path}: expected columns narration_id (or id) and level (or difficulty)")
        return {r[id_col]: r[level_col] for r in reader}


def grouped(keys, correct):
    """{key: {n, correct, accuracy}} in sorted key order."""
    out = {}
    for k in sorted(set(keys)):
        hit = correct[keys == k]
        out[str(k)] = {"n": len(hit), "correct": int(hit.sum()), "accuracy": float(hit.mean())}
    return out


def compute_metrics(preds, vocab, tails=None, ratings=None):
    """Accuracy (the mode's: chosen letter for mqa, action top-1 otherwise); verb, noun and action top-1; head/tail
    with EPIC's tail classes (verb and noun by their own class; an action is head when its verb AND its noun are
    head, tail otherwise); per-verb and per-noun accuracy (figure 8); by difficulty level (table 8)."""
    good = [p for p in preds if not p.get("bad")]
    m = {"n": len(good), "skipped_bad": len(preds) - len(good)}
    if not good:
        return m
    col = {k: np.array([p[k] for p in good]) for k in ("correct", "pred_verb", "pred_noun", "pred_action",
                                                        "verb_class", "noun_class", "action_class")}
    hit = {k: col[f"pred_{k}"] == col[f"{k}_class"] for k in ("verb", "noun", "action")}
    m.update(accuracy=float(col["correct"].mean()), verb_top1=float(hit["verb"].mean()),
             noun_top1=float(hit["noun"].mean()), action_top1=float(hit["action"].mean()))
    if "recognizer_top1" in good[0]:
        m["recognizer_top1"] = float(np.mean([p["recognizer_top1"] == p["action_class"] for p in good]))
        m["topk_recall"] = float(np.mean([p["answer_index"] >= 0 for p in good]))
        m["topk"] = len(good[0]["scores"])
    m["clamped_frames"] = int(sum(p["clamped"] for p in good))
    if tails is not None:
        tail_verb = np.isin(col["verb_class"], list(tails[0]))
        tail_noun = np.isin(col["noun_class"], list(tails[1]))
        split = {"verb": tail_verb, "noun": tail_noun, "action": tail_verb | tail_noun}
        m["head_tail"] = {k: grouped(np.where(split[k], "tail", "head"), hit[k]) for k in split}
    m["per_verb"] = {vocab.verbs[int(k)]: v for k, v in grouped(col["verb_class"], hit["verb"]).items()}
    m["per_noun"] = {vocab.nouns[int(k)]: v for k, v in grouped(col["noun_class"], hit["noun"]).items()}
    if ratings is not None:
        levels = np.array([ratings.get(p["id"], "unrated") for p in good])
        m["by_difficulty"] = grouped(levels, col["correct"])
    return m

# -----------------------------------------------------------------------------
# one --frames setting end to end, and train.py's in-training check


def evaluate_setting(model, rows, folder, mode, frames, video_root, vocab, rank=0, world=1, batch_size=8,
                     num_workers=0, skip_bad=False, time_prompt=False, sap=False, chunk=256):
    """Predict what is not yet in `folder`, this rank's share, appending line by line; rank 0 merges the shards
    and returns the predictions (other ranks None)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = read_predictions(folder)
    barrier()  # every rank has read the shards before any rank appends to its own
    batches = plan_batches(rows, done, rank, world, batch_size, sap)
    total = sum(map(len, batches))
    with open_shard(folder / f"predictions.rank{rank}.jsonl") as f:
        for pred in tqdm(predict(model, rows, batches, mode, frames, video_root, vocab, num_workers, skip_bad,
                                 time_prompt, sap, done, chunk), total=total, disable=rank != 0,
                         desc=f"{mode} frames={frames}"):
            f.write(json.dumps(pred) + "\n")
            f.flush()
    barrier()
    preds = merge_predictions(folder, rows) if rank == 0 else None
    barrier()  # nobody starts the next setting while rank 0 still merges this one
    return preds


@torch.no_grad()
def evaluate_mqa(model, rows, video_root, frames, batch_size=8, num_workers=0, skip_bad=False, time_prompt=False):
    """MQA accuracy without files, for train.py. Inside torchrun each rank scores rows[rank::world], padded with
    repeats (not counted) to the same number of batches so FSDP's per-forward collectives line up; the counts
    are summed over ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = list(range(rank, len(rows), world))
    padded = share + [i % len(rows) for i in range(-(-len(rows) // world) - len(share))]
    batches = [padded[i:i + batch_size] for i in range(0, len(padded), batch_size)]
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=model.llava.device)  # correct, n, bad
    for k, pred in enumerate(predict(model, rows, batches, "mqa", frames, video_root, num_workers=num_workers,
                                     skip_bad=skip_bad, time_prompt=time_prompt)):
        if k < len(share):
            counts += torch.tensor([pred.get("correct", 0), not pred.get("bad"), bool(pred.get("bad"))],
                                   dtype=torch.float64, device=counts.device)
    model.train(was_training)
    if dist.is_initialized():
        dist.all_reduce(counts)
    correct, n, bad = counts.tolist()
    return dict(accuracy=correct / max(n, 1), n=int(n), skipped_bad=int(bad))

# -----------------------------------------------------------------------------
# model loading


def load_for_eval(ckpt, base, random_init, vocab, device):
    """A trained checkpoint (its heads are not used here), or with --base a base model with no action token:
    zero-shot. bf16 on GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    sizes = (len(vocab.verbs), len(vocab.nouns), len(vocab))
    if base:
        model = load_model(base, *sizes, n_action_tokens=0, random_init=random_init, dtype=dtype, device=device)
    else:
        if not (Path(ckpt) / "config.json").exists():
            raise FileNotFoundError(f"checkpoint {ckpt} holds no LLaVA weights (no {Path(ckpt) / 'config.json'}); "
                                    "train one with train.py, or evaluate a base model zero-shot with --base")
        has_heads = (Path(ckpt) / "action.json").exists()  # a plain LLaVA directory gets no action token
        model = load_model(ckpt, *((None,) * 3 if has_heads else sizes), n_action_tokens=0, dtype=dtype)
    return model.to(device).eval()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="mqa")
    p.add_argument("--ckpt", default="runs/toy", help="checkpoint directory written by train.py")
    p.add_argument("--base", default=None, help="evaluate this base model zero-shot instead (alias or path)")
    p.add_argument("--random-init", action="store_true", help="with --base: random weights of the real shapes")
    p.add_argument("--annotations", default="toy", help="annotation root: EPIC CSVs, actions.csv, tail lists")
    p.add_argument("--split", default="validation", help="two_stage, multi_round: the split to evaluate")
    p.add_argument("--video-root", default=None, help="default {annotations}/videos")
    p.add_argument("--benchmark", default=None, help="mqa: MQA JSONL; default {annotations}/ek100_mqa_tim_k5.jsonl")
    p.add_argument("--scores", default=None, help="two_stage: recognizer scores; default "
                                                  "{annotations}/scores/tim_{split}.npz")
    p.add_argument("--topk", type=int, default=20, help="two_stage: candidates (lettered A.., 20 = A-T)")
    p.add_argument("--text", choices=mine.TEXTS, default="label",
                   help="two_stage option texts: class labels, or a narration drawn per class (the truth's own "
                        "narration when it is among them, as mine.py does)")
    p.add_argument("--frames", type=int, nargs="+", default=[8], help="one evaluation per value")
    p.add_argument("--sap", action="store_true", help="mqa, two_stage: prior-action prompt with the model's own "
                                                      "two previous predictions of the video")
    p.add_argument("--time-prompt", action="store_true", help="prefix LLaVA-Video's time instruction")
    p.add_argument("--batch-size", type=int, default=8, help="clips per forward")
    p.add_argument("--num-workers", type=int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers decoding clips (default: cores / (4 x ranks on the node), at most 4)")
    p.add_argument("--chunk", type=int, default=256, help="multi_round: candidates per pass")
    p.add_argument("--ratings", default=None, help="difficulty levels by narration id (CSV or JSON): per-level "
                                                   "accuracy")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) samples whose video cannot be read")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--out", default=None, help="default {ckpt}/eval_{mode}[_sap] ({base} under runs/ with --base)")
    args = p.parse_args()

    if args.sap and args.mode == "multi_round":
        p.error("--sap needs options to fill the prior-action prompt: use it with --mode mqa or two_stage")
    root = Path(args.annotations)
    args.video_root = args.video_root or str(root / "videos")
    args.benchmark = args.benchmark or str(root / "ek100_mqa_tim_k5.jsonl")
    args.scores = args.scores or str(root / "scores" / f"tim_{args.split}.npz")
    owner = Path("runs") / Path(args.base).name if args.base else Path(args.ckpt)
    args.out = args.out or str(owner / f"eval_{args.mode}{'_sap' if args.sap else ''}")
    out = Path(args.out)
    rank, world, device = init_distributed()

    saved = json.loads((out / "args.json").read_text()) if (out / "args.json").exists() else None
    changed = [k for k in RESUME_KEYS if saved and saved.get(k) != vars(args)[k]]
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {vars(args)[k]})" for k in changed)
        p.error(f"{out} holds predictions made with {was}; pass another --out or delete {out}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "args.json", vars(args))
        ann = data.load_annotations(root)  # rank 0 first: it may write actions.csv
    barrier()
    if rank != 0:
        ann = data.load_annotations(root)
    if args.mode == "mqa":
        rows = benchmark_rows(args.benchmark)
    elif args.mode == "two_stage":
        rows = two_stage_rows(ann, args.split, args.scores, args.topk, args.text)
    else:
        rows = multi_round_rows(ann, args.split)
    rows = rows[:args.limit]
    model = load_for_eval(args.ckpt, args.base, args.random_init, ann.vocab, device)
    tails = read_tail_classes(root)
    ratings = read_ratings(args.ratings) if args.ratings else None

    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    for frames in args.frames:
        preds = evaluate_setting(model, rows, out / f"frames{frames}", args.mode, frames, args.video_root, ann.vocab,
                                 rank, world, args.batch_size, args.num_workers, args.skip_bad, args.time_prompt,
                                 args.sap, args.chunk)
        if rank == 0:
            m = metrics[str(frames)] = compute_metrics(preds, ann.vocab, tails, ratings)
            extra = (f", recognizer top-1 {m['recognizer_top1']:.4f}, top-{m['topk']} recall {m['topk_recall']:.4f}"
                     if "topk" in m else "")
            print(f"{args.mode}{' sap' if args.sap else ''} frames={frames}: accuracy {m.get('accuracy', 0):.4f} "
                  f"on {m['n']} samples ({m['skipped_bad']} skipped); verb {m.get('verb_top1', 0):.4f}, noun "
                  f"{m.get('noun_top1', 0):.4f}, action {m.get('action_top1', 0):.4f}{extra}")
            write_json_atomic(out / "metrics.json", metrics)
    if rank == 0:
        print(f"predictions and metrics in {out}")
    if dist.is_initialized():
        dist.destroy_process_group()
