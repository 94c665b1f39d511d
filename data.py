"""EPIC-KITCHENS-100 data: annotations, action ids, clips, toy kitchens and the training tasks.

Everything that knows about files on disk lives here; models, losses and metrics do not. The story:
annotation CSVs -> Segments and an ActionVocab (action ids as the community numbers them) -> clips decoded
with decord -> task samples (MQA, prior actions, temporal detection, ...) -> a torch Dataset and collate.
`python data.py toy --out toy` writes a small EPIC-shaped data set that every other file can run on.
"""
import argparse
import ast
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# prompts (the paper's appendix C) and special tokens

VIDEO_TOKEN = "<video>"
ACTION_TOKEN = "<action>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EGO_PROMPT = ("You are seeing this video from egocentric view and you are the person. Your hands are sometimes "
              "interacting with objects. What action are you doing?")
ALLO_PROMPT = ("The video is taken from egocentric view. The person's hands are sometimes interacting with objects. "
               "What action is the person doing?")
PRIOR_PROMPT = ("{t2:.2f} seconds ago, you started an action {a2}. {t1:.2f} seconds ago, you started an action {a1}. "
                "What action are you currently performing? Here are the options of actions you can select:")
TEMPORAL_PROMPT = ("The provided video contains an action {action} that lasts {duration:.2f} seconds. What is the "
                   "relative start and end time of the action in seconds? Format it as 'start_timestamp: "
                   "end_timestamp' and round to 2 decimal places.")
DIRECT_PROMPT = "What action are you performing? Give a short sentence such as 'move knife'."
CAPTION_PROMPT = "Describe in details what you see from the video frames. Try to focus on what you are doing."
TIME_PROMPT = "The provided video lasts for {duration:.3f} seconds, and {frames} frames are uniformly sampled from it."

SPLIT_FILES = {"train": "EPIC_100_train.csv", "validation": "EPIC_100_validation.csv"}
VERB_FILE, NOUN_FILE, ACTIONS_FILE = "EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv", "actions.csv"
SEGMENT_COLUMNS = ("video_id", "start_timestamp", "stop_timestamp", "narration", "verb_class", "noun_class")
VIDEO_SUFFIXES = (".MP4", ".mp4")
CHUNK_SECONDS = 15.0  # AVION's chunked layout: {root}/{video_id}.MP4/{chunk_start}.MP4

# -----------------------------------------------------------------------------
# annotations and action ids


@dataclass
class Segment:
    id: str
    video_id: str
    participant: str
    start: float
    end: float
    narration: str
    verb_class: int
    noun_class: int
    action_class: int = -1


@dataclass
class ActionVocab:
    verbs: list[str]
    nouns: list[str]
    pairs: np.ndarray  # (A, 2) verb_class, noun_class of each action id
    labels: list[str]
    index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.index = {(int(v), int(n)): i for i, (v, n) in enumerate(self.pairs)}

    def __len__(self):
        return len(self.pairs)


@dataclass
class Annotations:
    root: Path
    vocab: ActionVocab
    splits: dict[str, list[Segment]]
    narrations: dict[int, list[str]]

    def segments(self, split):
        if split not in self.splits:
            raise FileNotFoundError(f"no {split} annotations in {self.root}: expected {self.root / SPLIT_FILES.get(split, split + '.csv')}")
        return self.splits[split]


def parse_time(value):
    """Seconds from 'HH:MM:SS.ff' (EPIC) or a plain number of seconds (the generic CSV)."""
    parts = str(value).strip().split(":")
    if len(parts) > 3 or not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        raise ValueError(f"cannot read time {value!r}: expected HH:MM:SS.ff or seconds")
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))


def label_text(verb_key, noun_key):
    """'put-down', 'maker:coffee' -> 'put-down coffee maker': noun parts reversed, verb hyphen kept."""
    return f"{verb_key} {' '.join(reversed(noun_key.split(':')))}"


def read_class_keys(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"id", "key"} <= rows[0].keys():
        raise ValueError(f"{path}: expected EPIC class columns 'id,key,...'")
    keys = {int(r["id"]): r["key"] for r in rows}
    if sorted(keys) != list(range(len(keys))):
        raise ValueError(f"{path}: class ids must be 0..{len(keys) - 1} without gaps")
    return [keys[i] for i in range(len(keys))]


def read_segments(path):
    """The official EPIC CSV unchanged, or the minimal generic one of DESIGN.md (ids made from the row)."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SEGMENT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the CSV needs {list(SEGMENT_COLUMNS)}")
        segments = []
        for row_number, row in enumerate(reader, start=2):
            try:
                video_id = row["video_id"]
                segments.append(Segment(
                    id=row.get("narration_id") or f"{video_id}_{row_number - 2}", video_id=video_id,
                    participant=row.get("participant_id") or video_id.split("_")[0],
                    start=parse_time(row["start_timestamp"]), end=parse_time(row["stop_timestamp"]),
                    narration=row["narration"], verb_class=int(row["verb_class"]), noun_class=int(row["noun_class"])))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {row_number}: {e}") from None
            if segments[-1].end < segments[-1].start:
                raise ValueError(f"{path}, line {row_number}: stop_timestamp is before start_timestamp")
    return segments


def build_action_vocab(pairs, verbs, nouns):
    """Action ids as TIM, AVION and RULSTM number them: distinct 'verb:noun' strings sorted as strings."""
    keys = sorted({f"{v}:{n}" for v, n in pairs})
    arr = np.array([[int(x) for x in k.split(":")] for k in keys], dtype=np.int64).reshape(-1, 2)
    return ActionVocab(verbs, nouns, arr, [label_text(verbs[v], nouns[n]) for v, n in arr])


def write_actions_csv(path, vocab):
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "verb_class", "noun_class", "label"])
        w.writerows([i, v, n, vocab.labels[i]] for i, (v, n) in enumerate(vocab.pairs))
    os.replace(tmp, path)


def read_actions_csv(path, verbs, nouns):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if [int(r["id"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: ids must be 0..{len(rows) - 1} in order")
    pairs = np.array([[int(r["verb_class"]), int(r["noun_class"])] for r in rows], dtype=np.int64).reshape(-1, 2)
    return ActionVocab(verbs, nouns, pairs, [label_text(verbs[v], nouns[n]) for v, n in pairs])


def load_annotations(root, splits=("train", "validation")):
    """Load the splits that exist under root; action ids from root/actions.csv, written on first use."""
    root = Path(root)
    verbs, nouns = read_class_keys(root / VERB_FILE), read_class_keys(root / NOUN_FILE)
    loaded = {s: read_segments(root / SPLIT_FILES[s]) for s in splits if (root / SPLIT_FILES[s]).exists()}
    if not loaded:
        raise FileNotFoundError(f"no annotation CSV in {root}: expected {[SPLIT_FILES[s] for s in splits]}")
    if (root / ACTIONS_FILE).exists():
        vocab = read_actions_csv(root / ACTIONS_FILE, verbs, nouns)
    else:
        vocab = build_action_vocab([(s.verb_class, s.noun_class) for segs in loaded.values() for s in segs], verbs, nouns)
        write_actions_csv(root / ACTIONS_FILE, vocab)
    narrations = {}
    for split, segs in loaded.items():
        for s in segs:
            s.action_class = vocab.index.get((s.verb_class, s.noun_class), -1)
            if s.action_class < 0:
                raise ValueError(f"{root / SPLIT_FILES[split]}: segment {s.id} has verb {s.verb_class} and noun "
                                 f"{s.noun_class}, an action not in {root / ACTIONS_FILE}; delete that file to "
                                 "rebuild it from the CSVs, or fix the row")
            narrations.setdefault(s.action_class, set()).add(s.narration)
    return Annotations(root, vocab, loaded, {a: sorted(t) for a, t in narrations.items()})


# -----------------------------------------------------------------------------
# clips


def find_video(video_root, video_id):
    """[(file, start offset in s)] for the original, flat or AVION-chunked layout; clear error if none."""
    root = Path(video_root)
    for suffix in VIDEO_SUFFIXES:
        chunk_dir = root / f"{video_id}{suffix}"
        if chunk_dir.is_dir():
            chunks = sorted(chunk_dir.glob("*.[mM][pP]4"), key=lambda p: float(p.stem))
            return [(p, float(p.stem)) for p in chunks]
        for path in (root / f"{video_id}{suffix}", root / video_id.split("_")[0] / "videos" / f"{video_id}{suffix}"):
            if path.is_file():
                return [(path, 0.0)]
    raise FileNotFoundError(f"video {video_id} not found under {root}: expected {root}/{video_id}.MP4 (flat), "
                            f"{root}/{video_id.split('_')[0]}/videos/{video_id}.MP4 or {root}/{video_id}.MP4/0.MP4 (chunked)")


def frame_times(start, end, n, jitter=False, rng=None):
    """Centres of n equal segments of [start, end]; with jitter, a uniform point of each segment instead."""
    offsets = (rng or np.random).uniform(size=n) if jitter else np.full(n, 0.5)
    return start + (np.arange(n) + offsets) * (end - start) / n


def load_clip(video_root, video_id, start, end, n_frames, jitter=False, rng=None, size=None):
    """(T, H, W, 3) uint8 frames and how many sample times fell past the video's end (clamped to its last frame).

    Frame indices come from the decoded file's own fps: the CSV's start_frame is at the original 59.94/50 fps.
    `size` (h, w) lets the decoder resize, much cheaper than resizing 1080p frames afterwards.
    """
    import decord  # imported here so that annotation-only tools do not need it

    times = frame_times(start, end, n_frames, jitter, rng)
    files = find_video(video_root, video_id)
    starts = np.array([s for _, s in files])
    which = np.clip(np.searchsorted(starts, times, side="right") - 1, 0, len(files) - 1)
    frames, clamped = [None] * n_frames, 0
    for f in np.unique(which):
        path, offset = files[f]
        try:
            kwargs = {"height": size[0], "width": size[1]} if size else {}
            reader = decord.VideoReader(str(path), num_threads=1, **kwargs)
        except Exception as e:
            raise RuntimeError(f"cannot read {path} (for {video_id}): {e}; re-encode it to H.264 mp4 or "
                               "pass --skip-bad") from None
        picks = np.flatnonzero(which == f)
        index = np.round((times[picks] - offset) * reader.get_avg_fps()).astype(np.int64)
        last = len(reader) - 1
        clamped += int((index > last).sum()) if f == len(files) - 1 else 0
        batch = reader.get_batch(np.clip(index, 0, last).tolist()).asnumpy()
        for i, frame in zip(picks, batch):
            frames[i] = frame
    return np.stack(frames), clamped


# -----------------------------------------------------------------------------
# sample files


def mqa_question(options, prompt=EGO_PROMPT):
    return prompt + "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def write_jsonl_atomic(path, rows):
    """Write the whole file or nothing: a crash never leaves half a JSONL behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_number}: not JSON ({e})") from None
    return rows


# -----------------------------------------------------------------------------
# toy kitchens: EPIC-shaped data whose actions a tiny model can see (noun = colour and shape, verb = motion)

TOY_VERBS = ["take", "put", "wash", "open", "close", "cut"]
TOY_NOUNS = ["plate", "knife", "cup", "pan", "bowl", "lid", "spoon", "maker:coffee"]
TOY_COLOURS = np.array([[240, 240, 240], [40, 200, 230], [230, 40, 40], [250, 200, 30],
                        [60, 200, 60], [170, 90, 230], [250, 130, 200], [150, 90, 40]], dtype=np.uint8)
TOY_SHAPES = ["circle", "hbar", "square", "ring", "diamond", "vbar", "cross", "triangle"]
TOY_NARRATIONS = ["{v} {n}", "{v} the {n}", "{v} {n} on counter", "{v} {n} now"]
TOY_RECOGNIZERS = {  # truth bonus, bonus for sharing the verb, for sharing the noun, noise std
    "tim": (3.0, 1.6, 1.0, 1.0),
    "avion": (2.6, 0.9, 1.8, 1.0),
}


def toy_object_mask(shape, dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    return {"circle": dx ** 2 + dy ** 2 < r ** 2, "square": np.maximum(ax, ay) < r, "diamond": ax + ay < r * 1.3,
            "ring": np.abs(np.hypot(dx, dy) - r * 0.75) < r * 0.3, "hbar": (ax < r * 1.2) & (ay < r * 0.4),
            "vbar": (ax < r * 0.4) & (ay < r * 1.2), "cross": ((ax < r * 0.35) | (ay < r * 0.35)) & (np.maximum(ax, ay) < r),
            "triangle": (dy < r) & (dy > -r) & (ax < (dy + r) * 0.55)}[shape]


def toy_motion(verb, u):
    """Object centre (x, y in [0, 1]) and radius scale at progress u in [0, 1] of the action."""
    cx, cy, s = 0.5, 0.5, 1.0
    if verb == "take": cy = 0.75 - 0.5 * u
    elif verb == "put": cy = 0.25 + 0.5 * u
    elif verb == "wash": cx = 0.5 + 0.25 * math.sin(4 * math.pi * u)
    elif verb == "open": s = 0.5 + 1.0 * u
    elif verb == "close": s = 1.5 - 1.0 * u
    elif verb == "cut": cx = 0.2 + 0.6 * u
    return cx, cy, s


def render_toy_video(path, segments, duration, fps, size, rng):
    import av

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = (rng.integers(20, 60, size=(h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1))
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "18", "preset": "ultrafast"}
    seg_index = 0
    for i in range(int(round(duration * fps))):
        t, frame = i / fps, background.copy()
        while seg_index < len(segments) and segments[seg_index][1] < t:
            seg_index += 1
        if seg_index < len(segments) and segments[seg_index][0] <= t:
            start, end, verb, noun = segments[seg_index]
            cx, cy, s = toy_motion(TOY_VERBS[verb], (t - start) / (end - start))
            mask = toy_object_mask(TOY_SHAPES[noun], xx - cx * w, yy - cy * h, s * h / 6)
            frame[mask] = TOY_COLOURS[noun]
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def fmt_time(seconds):
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:05.2f}"


def simulate_recognizer(segments, vocab, name, rng):
    """Scores over all actions that confuse the truth mostly with actions sharing its verb or noun."""
    truth_bonus, verb_bonus, noun_bonus, noise = TOY_RECOGNIZERS[name]
    truth = vocab.pairs[[s.action_class for s in segments]]  # (N, 2)
    scores = noise * rng.standard_normal((len(segments), len(vocab))).astype(np.float32)
    scores += verb_bonus * (truth[:, None, 0] == vocab.pairs[None, :, 0])
    scores += noun_bonus * (truth[:, None, 1] == vocab.pairs[None, :, 1])
    scores[np.arange(len(segments)), [s.action_class for s in segments]] += truth_bonus
    return scores


def make_toy(out, videos_per_split=(4, 2), segments_per_video=60, n_actions=30, fps=15, size=(64, 96), seed=0):
    """A toy kitchen in EPIC's layout: CSVs, class files, mp4 videos and two recognizers' scores."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    all_pairs = [(v, n) for v in range(len(TOY_VERBS)) for n in range(len(TOY_NOUNS))]
    chosen = [all_pairs[i] for i in sorted(rng.choice(len(all_pairs), n_actions, replace=False))]
    popularity = rng.dirichlet(np.full(n_actions, 0.7))  # a long tail, as in EPIC
    for name, keys in ((VERB_FILE, TOY_VERBS), (NOUN_FILE, TOY_NOUNS)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "key", "instances", "category"])
            w.writerows([i, k, str([k]), "toy"] for i, k in enumerate(keys))
    columns = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
               "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class",
               "all_nouns", "all_noun_classes"]
    video_number = 0
    for split, n_videos in zip(("train", "validation"), videos_per_split):
        rows = []
        for _ in range(n_videos):
            video_number += 1
            video_id = f"P{video_number:02d}_01"
            t, spans = 0.5, []
            for k in range(segments_per_video):
                v, n = chosen[rng.choice(n_actions, p=popularity)]
                length = rng.uniform(1.2, 3.0)
                spans.append((t, t + length, v, n))
                noun_words = " ".join(reversed(TOY_NOUNS[n].split(":")))
                narration = TOY_NARRATIONS[rng.integers(len(TOY_NARRATIONS))].format(v=TOY_VERBS[v], n=noun_words)
                rows.append([f"{video_id}_{k}", video_id.split("_")[0], video_id, fmt_time(t), fmt_time(t),
                             fmt_time(t + length), int(t * 59.94) + 1, int((t + length) * 59.94) + 1, narration,
                             TOY_VERBS[v], v, TOY_NOUNS[n], n, str([TOY_NOUNS[n]]), str([n])])
                t += length + rng.uniform(0.2, 1.0)
            render_toy_video(out / "videos" / f"{video_id}.mp4", spans, t + 0.5, fps, size, rng)
        with open(out / SPLIT_FILES[split], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(rows)
    if (out / ACTIONS_FILE).exists():
        os.remove(out / ACTIONS_FILE)
    ann = load_annotations(out)
    train = ann.segments("train")
    for name, head, classes, n_tail in (("EPIC_100_tail_verbs.csv", "verb", [s.verb_class for s in train], 2),
                                        ("EPIC_100_tail_nouns.csv", "noun", [s.noun_class for s in train], 3)):
        tail = np.argsort(np.bincount(classes, minlength=max(classes) + 1), kind="stable")[:n_tail]
        (out / name).write_text(head + "\n" + "".join(f"{i}\n" for i in sorted(tail)))
    for name in TOY_RECOGNIZERS:
        for split in ("train", "validation"):
            segs = ann.segments(split)
            np.savez(out / "scores" / f"{name}_{split}.npz", ids=np.array([s.id for s in segs]),
                     scores=simulate_recognizer(segs, ann.vocab, name, rng))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["toy"], help="toy: write the toy-kitchen data set")
    parser.add_argument("--out", default="toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segments-per-video", type=int, default=60)
    args = parser.parse_args()
    root = make_toy(args.out, segments_per_video=args.segments_per_video, seed=args.seed)
    ann = load_annotations(root)
    print(f"toy kitchen in {root}: {len(ann.segments('train'))} train and {len(ann.segments('validation'))} "
          f"validation segments, {len(ann.vocab)} actions, videos in {root / 'videos'}, scores in {root / 'scores'}")
