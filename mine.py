"""Hard-example mining from recognizer scores (LLaVAction, Qi et al. 2025, eq. 2 and 3).

Turns EPIC-style annotations plus a recognizer's N x A action scores (TIM, AVION, ...) into multiple-choice files:
the EK100-MQA benchmark (eq. 3: the truth and the recognizer's top K-1 other classes), training files (--pool: K-1
distractors drawn from a larger top pool), random-distractor files (eq. 2, --model random) and two-stage candidate
files (--topk N: the top N in rank order, the truth not added). `compare A B` prints the appendix-D statistics of
two recognizers: top-1 agreement, top-k overlap and the Jensen-Shannon divergence of their softmaxed scores.

    python mine.py --model tim --annotations toy --split validation --k 5 --out toy/ek100_mqa_tim_k5.jsonl
    python mine.py compare toy/scores/tim_validation.npz toy/scores/avion_validation.npz
"""
import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np

import data

TEXTS = ("narration", "label")    # option texts: a narration of the class, or its label
CANDIDATE_TEXT = "label"          # two-stage's default texts: a narration would be the truth's own
JS_CHUNK = 1024                   # rows per chunk in compare, so (N, A) float64 temporaries stay small
K = 5                             # EK100-MQA's options: the truth and 4 distractors
TOY_DRAWS = 8                     # the toy's training MQA: drawn 8 times from AVION's top 2(K-1)
TOY_TRAIN = f"train_mqa_avion_k{K}_pool{2 * (K - 1)}_x{TOY_DRAWS}.jsonl"


# score files: .npz / .pt / ranked JSON / .pkl -> (ids, scores), then aligned to a split's segments ---
def load_score_file(path, ann=None, split=None, trust_pickle=False):
    """Read (ids, scores (M, A) float32) from any supported form; the ranked JSON needs the split to name rows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        if ann is None:
            raise ValueError(f"{path}: a ranked JSON's rows are positions in a split CSV; pass --annotations, --split")
        return ranked_json_scores(path, ann, split)
    if suffix == ".npz":
        try:
            with np.load(path) as z:
                obj = {key: z[key] for key in z.files}
        except ValueError as e:  # object arrays need pickle
            raise ValueError(f"{path}: {e}; save ids as a string array (np.array(ids, dtype=str))") from None
    elif suffix == ".pt":
        import torch  # imported here: torch takes seconds to import and only .pt needs it
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".pkl":
        if not trust_pickle:
            raise ValueError(f"{path}: loading a pickle runs code from the file; pass --trust-pickle if you trust it")
        obj = pickle.loads(path.read_bytes())
    else:
        raise ValueError(f"{path}: unknown score format {suffix!r} (use .npz, .pt, ranked .json or .pkl)")
    if not isinstance(obj, dict) or "ids" not in obj or "scores" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected 'ids' (narration ids) and 'scores' (N x A), found {found}")
    scores = obj["scores"]
    scores = np.asarray(scores.float().numpy() if hasattr(scores, "numpy") else scores, dtype=np.float32)
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(obj["ids"]).tolist()]
    if scores.ndim != 2 or scores.shape[0] != len(ids):
        raise ValueError(f"{path}: scores have shape {scores.shape} for {len(ids)} ids; expected ({len(ids)}, A)")
    return ids, scores


def ranked_json_scores(path, ann, split):
    """The authors' form {"<row>": {"predictions": ["v:n", ...], "target": "v:n"}}: score = -rank, unlisted -inf."""
    segs, ranked = ann.segments(split), json.loads(Path(path).read_text())
    scores = np.full((len(ranked), len(ann.vocab)), -np.inf, dtype=np.float32)
    for r, (row, entry) in enumerate(ranked.items()):
        if not (row.isdigit() and int(row) < len(segs)):
            raise ValueError(f"{path}: row {row!r} is not a position in split {split!r} ({len(segs)} segments)")
        seg = segs[int(row)]
        if entry["target"] != f"{seg.verb_class}:{seg.noun_class}":
            raise ValueError(f"{path}: row {row} has target {entry['target']} but segment {seg.id} of split {split!r} "
                             f"is {seg.verb_class}:{seg.noun_class}; rows must follow the split CSV's order")
        for rank, pred in enumerate(entry["predictions"]):
            verb, noun = (int(x) for x in pred.split(":"))
            if (verb, noun) not in ann.vocab.index:
                raise ValueError(f"{path}: row {row} predicts {pred}, which is not an action id of actions.csv")
            scores[r, ann.vocab.index[(verb, noun)]] = -rank
    return [segs[int(row)].id for row in ranked], scores


def read_scores(path, ann, split, trust_pickle=False):
    """(N, A) float32 scores aligned to ann.segments(split): the file may hold a superset of its rows, in any order."""
    ids, scores = load_score_file(path, ann, split, trust_pickle)
    if scores.shape[1] != len(ann.vocab):
        fix = (f" (only {'/'.join(ann.splits)} annotations in {ann.root}: add the other split's CSV and delete "
               f"{data.ACTIONS_FILE} to number EPIC's train + validation actions)"
               if len(ann.splits) < len(data.SPLIT_FILES) else "")  # one split's ids miss the other's actions
        raise ValueError(f"{path} scores {scores.shape[1]} classes but {Path(ann.root) / data.ACTIONS_FILE} defines "
                         f"{len(ann.vocab)} action ids; scores must be over its ids{fix}")
    segs, where = ann.segments(split), {i: r for r, i in enumerate(ids)}
    rows = np.array([where.get(s.id, -1) for s in segs], dtype=np.int64)
    if missing := [s.id for s, r in zip(segs, rows) if r < 0]:
        other = [name for name, ss in ann.splits.items() if name != split and set(ids) <= {s.id for s in ss}]
        fix = (f"these are scores of split {other[0]!r}: pass the {split} scores with --scores" if other else
               f"pass --scores with a file that scores every segment of {split!r}")
        raise ValueError(f"{path} has no scores for {len(missing)} of the {len(segs)} segments of split {split!r} "
                         f"(first: {', '.join(missing[:5])}); {fix}")
    out = scores[rows]
    if np.isnan(out).any():
        raise ValueError(f"{path} holds NaN scores")
    return out


# mining core: arrays in, arrays out ------------------------------------------
def ranked_top(scores, m):
    """(N, m) action ids of the m highest scores, best first (ties: lower id first). argpartition: O(A) per row."""
    n_classes = scores.shape[1]
    if m > n_classes:
        raise ValueError(f"asked for the top {m} of only {n_classes} action classes; lower --k/--pool/--topk")
    top = np.argpartition(scores, n_classes - m, axis=1)[:, n_classes - m:]
    vals = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -vals), axis=1)
    top, last = np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order[:, -1:], axis=1)
    cut_ties = (scores == last).sum(axis=1) > (vals == last).sum(axis=1)  # argpartition split a tie at the cut
    top[cut_ties] = np.argsort(-scores[cut_ties], axis=1, kind="stable")[:, :m]  # rare (e.g. -inf of ranked JSON)
    return top


def top_distractor_classes(scores, truth, n, pool=None, rng=None):
    """Eq. 3: the n top-scoring classes other than the truth, best first. With pool > n (training files) the n
    are drawn at random from the top `pool` non-truth classes, kept in rank order, which varies the negatives."""
    pool = pool or n
    if pool < n:
        raise ValueError(f"--pool {pool} is smaller than the {n} distractors it must supply")
    top = ranked_top(scores, pool + 1)
    keep = top != truth[:, None]
    keep[keep.all(axis=1), -1] = False          # truth not in the top pool+1: drop the last one instead
    cand = top[keep].reshape(len(top), pool)
    if pool == n:
        return cand
    pick = np.sort(np.argsort(rng.random(cand.shape), axis=1)[:, :n], axis=1)
    return np.take_along_axis(cand, pick, axis=1)


# option texts and rows -------------------------------------------------------
def option_texts(ann, segs, options, truth, text, rng):
    """Texts of the (N, K) option classes: a narration drawn uniformly from the class (its label when it has
    none) or the label; the truth's text is the segment's own narration. Repeated strings are replaced."""
    labels = np.array(ann.vocab.labels, dtype=object)
    if text == "label":
        texts = labels[options]
    else:
        narr = [ann.narrations.get(a, []) for a in range(len(ann.vocab))]
        counts = np.array([len(x) for x in narr], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat = np.array([t for x in narr for t in x] + [""], dtype=object)
        c = counts[options]
        drawn = flat[starts[options] + (rng.random(options.shape) * c).astype(np.int64)]
        texts = np.where(c > 0, drawn, labels[options])
        own = np.array([s.narration for s in segs], dtype=object)
        texts = np.where(options == truth[:, None], own[:, None], texts)
    rows = texts.tolist()
    for row, acts, t in zip(rows, options.tolist(), truth.tolist()):
        if len(set(row)) < len(row):  # rare: most rows need no pass
            distinct_texts(row, acts, t, ann)
    return rows


def distinct_texts(row, acts, truth, ann):
    """Replace a repeated option text in place, deterministically: the class's next narration, else its label."""
    used = {row[j] for j, a in enumerate(acts) if a == truth}
    for j, a in enumerate(acts):
        if a != truth and row[j] in used:
            narr = ann.narrations.get(a, [])
            start = narr.index(row[j]) + 1 if row[j] in narr else 0
            spare = [t for t in narr[start:] + narr[:start] + [ann.vocab.labels[a]] if t not in used]
            if not spare:
                raise ValueError(f"no distinct text for action {a} ({ann.vocab.labels[a]}) among options {row}")
            row[j] = spare[0]
        used.add(row[j])


def make_rows(segs, options, truth, texts, task):
    """JSONL sample rows (README, Data layout); answer_index is the truth's position, -1 (and no answer) when absent."""
    is_truth = options == truth[:, None]
    answer_index = np.where(is_truth.any(axis=1), is_truth.argmax(axis=1), -1).tolist()
    return [{"id": s.id, "video_id": s.video_id, "start": s.start, "end": s.end, "task": task,
             "question": data.mqa_question(opts), "options": opts,
             **({"answer": f"{data.LETTERS[i]}. {opts[i]}"} if i >= 0 else {}), "answer_index": i,
             "verb_class": s.verb_class, "noun_class": s.noun_class, "action_class": s.action_class,
             "option_actions": acts} for s, acts, opts, i in zip(segs, options.tolist(), texts, answer_index)]


def mine(ann, split, scores=None, k=K, pool=None, topk=None, text="narration", seed=0):
    """MQA rows (truth + K-1 distractors, shuffled) or, with topk, two-stage candidate rows (top-N in rank
    order, truth not added). scores=None is eq. 2 (random distractors). One Generator: same seed, same rows."""
    segs = ann.segments(split)
    if text not in TEXTS:
        raise ValueError(f"--text must be one of {TEXTS}, not {text!r}")
    if not 2 <= (topk or k) <= len(data.LETTERS):
        raise ValueError(f"need 2 to {len(data.LETTERS)} options (lettered A-Z), got {topk or k}")
    truth = np.array([s.action_class for s in segs], dtype=np.int64)
    rng = np.random.default_rng(seed)
    if scores is None:  # eq. 2 as uniform random scores: the top classes are a uniform draw among the others
        scores = rng.random((len(segs), len(ann.vocab)), dtype=np.float32)
        if text == "narration":  # only classes that have narrations take part
            scores[:, [a for a in range(len(ann.vocab)) if not ann.narrations.get(a)]] = -np.inf
    if topk:
        options = ranked_top(scores, topk)
    else:
        options = np.concatenate([truth[:, None], top_distractor_classes(scores, truth, k - 1, pool, rng)], axis=1)
        options = np.take_along_axis(options, np.argsort(rng.random(options.shape), axis=1), axis=1)  # shuffled
    texts = option_texts(ann, segs, options, truth, text, rng)
    return make_rows(segs, options, truth, texts, "candidates" if topk else "mqa")


def mine_toy(root):
    """The toy's mined files, written when missing (always the same; train.py's --seed orders batches): TOY_TRAIN
    (each draw shuffled anew: no letters to memorise) and TIM's benchmark (eq. 3): another recognizer's errors."""
    root, ann = Path(root), data.load_annotations(root)
    if not (root / TOY_TRAIN).exists():
        scores = read_scores(root / "scores" / "avion_train.npz", ann, "train")
        data.write_jsonl_atomic(root / TOY_TRAIN, [row for draw in range(TOY_DRAWS) for row in mine(
            ann, "train", scores, k=K, pool=2 * (K - 1), seed=draw)])
    if not (root / data.BENCHMARK).exists():
        scores = read_scores(root / "scores" / "tim_validation.npz", ann, "validation")
        data.write_jsonl_atomic(root / data.BENCHMARK, mine(ann, "validation", scores, k=K))


# compare two recognizers (appendix D) ----------------------------------------
def probabilities(scores):
    """Softmax over classes (float64), unless the rows already are probabilities (nonnegative, summing to 1)."""
    scores = scores.astype(np.float64)
    if not ((scores >= 0).all() and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)):
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True)


def js_divergence(a, b):
    """Per-row Jensen-Shannon divergence (natural log, nats; in [0, ln 2]) of the two score rows' distributions."""
    out = np.empty(len(a))
    for i in range(0, len(a), JS_CHUNK):
        p, q = probabilities(a[i:i + JS_CHUNK]), probabilities(b[i:i + JS_CHUNK])
        m = 0.5 * (p + q)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0: masked by the where
            out[i:i + JS_CHUNK] = sum(0.5 * np.where(x > 0, x * np.log(x / m), 0.0).sum(axis=1) for x in (p, q))
    return np.clip(out, 0.0, np.log(2))


def compare_scores(a, b, k=5):
    """Top-1 agreement, mean top-k overlap |topk(A) & topk(B)| / k, and JS divergence with two 95% intervals."""
    top_a, top_b = ranked_top(a, k), ranked_top(b, k)
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(axis=2).sum(axis=1) / k
    js = js_divergence(a, b)
    mean, std = float(js.mean()), float(js.std(ddof=1)) if len(js) > 1 else 0.0
    half = 1.96 * std / np.sqrt(len(js))
    return {"segments": len(a), "k": k, "top1_agreement": float((top_a[:, 0] == top_b[:, 0]).mean()),
            "topk_overlap": float(overlap.mean()), "js_mean": mean, "js_std": std, "js_log": "natural (nats)",
            "js_ci95_mean": [mean - half, mean + half],
            "js_percentile_2.5_97.5": [float(x) for x in np.percentile(js, [2.5, 97.5])]}


def compare_files(path_a, path_b, ann=None, split=None, k=5, trust_pickle=False):
    """Load two score files and compare them on A's segments (B may hold a superset, in any order)."""
    (ids_a, a), (ids_b, b) = (load_score_file(path, ann, split, trust_pickle) for path in (path_a, path_b))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{path_a} scores {a.shape[1]} classes but {path_b} scores {b.shape[1]}")
    where = {i: r for r, i in enumerate(ids_b)}
    if missing := [i for i in ids_a if i not in where]:
        raise ValueError(f"{path_b} has no scores for {len(missing)} of the {len(ids_a)} ids of {path_a} "
                         f"(first: {', '.join(missing[:5])}); compare files of the same split")
    return compare_scores(a, b[[where[i] for i in ids_a]], k)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="*", help="empty to mine; or: compare A B (two score files)")
    p.add_argument("--annotations", default="toy", help="annotation root (EPIC CSVs, actions.csv, scores/)")
    p.add_argument("--split", default="validation")
    p.add_argument("--model", default="tim", help="recognizer name (tim, avion, ...), or random for eq. 2")
    p.add_argument("--scores", default=None, help="score file; default {annotations}/scores/{model}_{split}.npz")
    p.add_argument("--k", type=int, default=K, help="options per question (also the k of compare's top-k)")
    p.add_argument("--pool", type=int, default=None, help="draw the K-1 distractors from the top N (default K-1)")
    p.add_argument("--topk", type=int, default=None, help="two-stage candidates: the top N, the truth not added")
    p.add_argument("--text", choices=TEXTS, help="option texts: narrations or class labels (default: narration for "
                   "MQA; label with --topk, as evaluate.py two_stage reads scores: no truth's own narration leaks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-pickle", action="store_true", help="allow .pkl score files (a pickle runs code)")
    p.add_argument("--out", default=None, help="JSONL to write; default {annotations}/ek100_mqa_{model}_k{K}.jsonl "
                   "(validation), {split}_mqa_{model}_k{K}.jsonl or {split}_top{N}_{model}.jsonl there")
    p.add_argument("--json", default=None, help="compare: also write the statistics to this JSON file")
    args = p.parse_args(argv)
    if args.topk and args.pool:
        p.error("--pool draws MQA distractors; --topk writes the top N as they rank: pass one of them")
    args.text = args.text or (CANDIDATE_TEXT if args.topk else "narration")
    if args.command:
        if args.command[0] != "compare" or len(args.command) != 3:
            p.error(f"unknown command {' '.join(args.command)!r}; use: python mine.py compare A.npz B.npz")
        _, path_a, path_b = args.command
        ranked = ".json" in (Path(path_a).suffix.lower(), Path(path_b).suffix.lower())  # rows named by position
        ann = data.load_annotations(args.annotations) if ranked else None
        res = compare_files(path_a, path_b, ann, args.split, args.k, args.trust_pickle)
        print(f"A = {path_a}\nB = {path_b}")
        print(f"{'segments':<38}{res['segments']}")
        print(f"{'top-1 agreement':<38}{res['top1_agreement']:.4f}")
        print(f"{'top-%d overlap (mean |A&B|/%d)' % (res['k'], res['k']):<38}{res['topk_overlap']:.4f}")
        print(f"{'JS divergence, nats (mean ± std)':<38}{res['js_mean']:.4f} ± {res['js_std']:.4f}")
        ci, (lo, hi) = res["js_ci95_mean"], res["js_percentile_2.5_97.5"]
        print(f"{'  95% CI of the mean (±1.96 sd/√N)':<38}[{ci[0]:.4f}, {ci[1]:.4f}]")
        print(f"{'  2.5 / 97.5 percentiles':<38}[{lo:.4f}, {hi:.4f}]  (spread of per-segment values)")
        if args.json:
            data.write_json_atomic(args.json, res)
        return
    ann, scores = data.load_annotations(args.annotations), None
    if args.model != "random":  # eq. 2: no score file
        path = Path(args.scores or Path(args.annotations) / "scores" / f"{args.model}_{args.split}.npz")
        if not path.exists():
            p.error(f"no score file {path}" + ("" if args.scores else f" (the default for --model {args.model} "
                    f"--split {args.split})") + "; pass --scores PATH (.npz, .pt, ranked .json) or --model random")
        scores = read_scores(path, ann, args.split, args.trust_pickle)
        args.scores = str(path)
    rows = mine(ann, args.split, scores, args.k, args.pool, args.topk, args.text, args.seed)
    prefix = "ek100" if args.split == "validation" else args.split  # the benchmark's name, as evaluate.py expects
    name = f"{args.split}_top{args.topk}_{args.model}" if args.topk else f"{prefix}_mqa_{args.model}_k{args.k}"
    args.out = args.out or str(Path(args.annotations) / f"{name}.jsonl")
    data.write_jsonl_atomic(args.out, rows)
    data.write_json_atomic(f"{args.out}.args.json", vars(args))
    found = np.mean([r["answer_index"] >= 0 for r in rows])
    print(f"wrote {len(rows)} {rows[0]['task']} rows to {args.out}"
          + (f" (truth among the top {args.topk}: {found:.1%})" if args.topk else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
