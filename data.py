"""EPIC-KITCHENS-100 data: annotations, action ids, clips, the training tasks and their prompts, model inputs.

All file handling (no model import; torch only where tensors are made): annotation CSVs -> Segments and an
ActionVocab -> clips decoded with decord -> task samples (MQA, prior actions, temporal detection, ...) -> token ids,
a torch Dataset and collate -> the toy kitchen, an EPIC-shaped data set every other file runs on (`python data.py toy`).

Prompts come in two styles: `official` (the default) is what the authors' code feeds the model, so what their
released checkpoints and the LLaVA-Video base saw; `paper` is the wording of the paper's appendix C.
"""
import argparse
import csv
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

# tokens and prompts, verbatim (spaces included) from the authors' code for the official style ---
VIDEO_TOKEN, IMAGE_TOKEN, ACTION_TOKEN = "<video>", "<image>", "<action>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turn markers of the Qwen2 tokenizer
SYSTEM_PROMPT = "You are a helpful assistant."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("official", "paper")
SUPERVISION = ("official", "answers")  # the targets of a training conversation: see encode_conversation
PERSPECTIVES = {"ego": "You are seeing this video from egocentric view and you are the person. Your hands are "
                       "sometimes interacting with objects. What action are you doing? ",
                "allo": "The video is taken from egocentric view. The person's hands are sometimes interacting with "
                        "objects. What action is the person doing?"}  # ego ends with a space, allo not (as released)
MQA_INSTRUCTION = "Given multiple choices, format your answer briefly such as 'A. move knife'. "
MQA_OPTIONS = "Here are the options of actions you are selecting:\n"
PRIOR_PROMPT = ("{t2} seconds ago, you started an action {a2}. {t1} seconds ago, you started an action {a1}. "
                "What action are you currently performing? Here are the options of actions you can select:")
DIRECT_PROMPT = "What action are you performing? Give a short sentence such as 'move knife'."
CAPTION_PROMPT = {"official": " Describe in details what you see from the video frames. You must talk in the first "
                              "person perspective. Try to focus on what you are doing. ",
                  "paper": "Describe in details what you see from the video frames. Try to focus on what you are "
                           "doing."}
TEMPORAL_PROMPT = ("The provided video contains an action '{action}' that lasts {duration} seconds. What is the "
                   "relative start and end time of the action in seconds? Format it as 'start_timestamp: "
                   "end_timestamp' and round to 2 decimal places.")
TEMPORAL_FORMS = {"paper": 3.0, "official": 5.0}  # seconds of padding around the action
TIME_PROMPT = "The provided video lasts for {duration:.3f} seconds, and {frames} frames are uniformly sampled from it."
PRIOR_MAX_GAP = 3.0  # official: a segment has prior actions only where each gap to the next is at most this

SPLIT_FILES = {"train": "EPIC_100_train.csv", "validation": "EPIC_100_validation.csv"}
VERB_FILE, NOUN_FILE, ACTIONS_FILE = "EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv", "actions.csv"
TAIL_FILES = ("EPIC_100_tail_verbs.csv", "EPIC_100_tail_nouns.csv")  # optional: EPIC's tail verb and noun ids
BENCHMARK = "ek100_mqa_tim_k5.jsonl"  # EK100-MQA (mine.py --model tim --k 5), where evaluate.py looks by default
SEGMENT_COLUMNS = ("video_id", "start_timestamp", "stop_timestamp", "narration", "verb_class", "noun_class")
PAST_END = "starts after the video ends"  # load_clip's reason for a clip outside its video
MAX_READERS = 4  # open decord readers per process
_READERS = {}  # (pid, path, size) -> decord reader: opening and seeking a long video costs more than a clip's decode
_WARNED = set()  # files whose first frame is not stamped 0: warned once per process
_LOCKS = {}  # folder -> its open lock file (lock_folder): held until the process ends
# A decord reader keeps two threads busy while decoding (its caller waits actively): more decoding processes than
# cores/2 starve each other (two on 2 cores: 2.3 -> 36 ms a clip). So DataLoader workers per rank (0: main process):
DEFAULT_WORKERS = min(4, (os.cpu_count() or 1) // (4 * int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


# annotations and action ids --------------------------------------------------
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
    labels: list[str] = field(init=False)  # label_text of each action id
    index: dict = field(init=False)        # (verb_class, noun_class) -> action id

    def __post_init__(self):
        self.labels = [label_text(self.verbs[v], self.nouns[n]) for v, n in self.pairs]
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
            raise FileNotFoundError(f"no {split} annotations in {self.root}: expected "
                                    f"{self.root / SPLIT_FILES.get(split, split + '.csv')}")
        return self.splits[split]


def parse_time(value):
    """Seconds from 'HH:MM:SS.ff' (EPIC) or a plain number of seconds (the generic CSV)."""
    parts = str(value).strip().split(":")
    if len(parts) > 3 or not all(re.fullmatch(r"\d+(\.\d*)?", p) for p in parts):
        raise ValueError(f"cannot read time {value!r}: expected HH:MM:SS.ff or seconds")
    return sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts)))


def label_text(verb_key, noun_key):
    """'put-down', 'machine:sous:vide' -> 'put-down sous vide machine', as the authors build labels."""
    parts = noun_key.split(":")
    return f"{verb_key} {' '.join(parts[1:] + parts[:1])}"


def read_csv_rows(path, columns):
    """[(line number where the row ends, row)] of a CSV that must have `columns` (a UTF-8 BOM is allowed)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows, fieldnames = [(reader.line_num, row) for row in reader], reader.fieldnames
    if not fieldnames:
        raise ValueError(f"{path} is empty; expected a CSV with columns {list(columns)}")
    if missing := [c for c in columns if c not in fieldnames]:
        raise ValueError(f"{path}: missing column(s) {missing}; the CSV needs {list(columns)}")
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return rows


def read_class_keys(path):
    keys = {int(r["id"]): r["key"] for _, r in read_csv_rows(path, ("id", "key"))}
    if sorted(keys) != list(range(len(keys))):
        raise ValueError(f"{path}: class ids must be 0..{len(keys) - 1} without gaps")
    return [keys[i] for i in range(len(keys))]


def read_segments(path):
    """The official EPIC CSV unchanged, or the minimal generic one (ids made from the row)."""
    segments = []
    for k, (line, row) in enumerate(read_csv_rows(path, SEGMENT_COLUMNS)):
        try:
            video_id = row["video_id"]
            segments.append(Segment(
                id=row.get("narration_id") or f"{video_id}_{k}", video_id=video_id,
                participant=row.get("participant_id") or video_id.split("_")[0],
                start=parse_time(row["start_timestamp"]), end=parse_time(row["stop_timestamp"]),
                narration=row["narration"], verb_class=int(row["verb_class"]), noun_class=int(row["noun_class"])))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}, line {line}: {e}") from None
        if segments[-1].end < segments[-1].start:
            raise ValueError(f"{path}, line {line}: stop_timestamp is before start_timestamp")
    return segments


def load_annotations(root, splits=("train", "validation")):
    """Load the splits that exist under root; action ids from root/actions.csv, written on first use."""
    root = Path(root)
    verbs, nouns = read_class_keys(root / VERB_FILE), read_class_keys(root / NOUN_FILE)
    loaded = {s: read_segments(root / SPLIT_FILES[s]) for s in splits if (root / SPLIT_FILES[s]).exists()}
    if not loaded:
        raise FileNotFoundError(f"no annotation CSV in {root}: expected {[SPLIT_FILES[s] for s in splits]}")
    for split, segs in loaded.items():
        for s in segs:
            if not (0 <= s.verb_class < len(verbs) and 0 <= s.noun_class < len(nouns)):
                raise ValueError(f"{root / SPLIT_FILES[split]}: segment {s.id} has verb {s.verb_class} / noun "
                                 f"{s.noun_class}, outside {VERB_FILE} ({len(verbs)}) / {NOUN_FILE} ({len(nouns)})")
    if (root / ACTIONS_FILE).exists():
        rows = [r for _, r in read_csv_rows(root / ACTIONS_FILE, ("id", "verb_class", "noun_class"))]
        if [int(r["id"]) for r in rows] != list(range(len(rows))):
            raise ValueError(f"{root / ACTIONS_FILE}: ids must be 0..{len(rows) - 1} in order")
        pairs = [[int(r["verb_class"]), int(r["noun_class"])] for r in rows]
        vocab = ActionVocab(verbs, nouns, np.array(pairs, dtype=np.int64))
    else:  # action ids as TIM, AVION and RULSTM number them: distinct 'verb:noun' strings sorted as strings
        keys = sorted({f"{s.verb_class}:{s.noun_class}" for ss in loaded.values() for s in ss})
        vocab = ActionVocab(verbs, nouns, np.array([[int(x) for x in k.split(":")] for k in keys], dtype=np.int64))
        if len(loaded) < len(SPLIT_FILES):
            warnings.warn(f"{root}: action ids numbered over {'/'.join(loaded)} alone ({len(vocab)} actions); a "
                          f"recognizer's scores are over those of train + validation: add the missing CSV (and "
                          f"delete {ACTIONS_FILE}) before mining with real scores", stacklevel=2)
        try:
            write_atomic(root / ACTIONS_FILE, "id,verb_class,noun_class,label\n" + "".join(
                f"{i},{v},{n},{vocab.labels[i]}\n" for i, (v, n) in enumerate(vocab.pairs)))
        except OSError as e:  # a read-only annotation folder: the same ids are made again on every load
            warnings.warn(f"cannot write {root / ACTIONS_FILE} ({e}); action ids are rebuilt on every load",
                          stacklevel=2)
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


# clips -----------------------------------------------------------------------
def find_video(video_root, video_id):
    """[(file, start offset in s)] of a video in the original, flat or AVION-chunked layout, or a relative path."""
    root = Path(video_root)
    if (root / video_id).is_file():  # a path relative to the root, as replay data (LLaVA JSON) names its videos
        return [(root / video_id, 0.0)]
    for suffix in (".MP4", ".mp4"):
        flat = root / f"{video_id}{suffix}"
        if flat.is_dir():  # AVION's chunks, named by their start second
            return [(p, float(p.stem)) for p in sorted(flat.glob("*.[mM][pP]4"), key=lambda p: float(p.stem))]
        for path in (flat, root / video_id.split("_")[0] / "videos" / f"{video_id}{suffix}"):
            if path.is_file():
                return [(path, 0.0)]
    raise FileNotFoundError(f"video {video_id} not found under {root}: expected {root}/{video_id}.MP4 (flat), {root}/"
                            f"{video_id.split('_')[0]}/videos/{video_id}.MP4 or {root}/{video_id}.MP4/0.MP4 (chunked)")


def frame_times(start, end, n, jitter=False, rng=None):
    """Centres of n equal segments of [start, end]; with jitter, a uniform point of each segment instead."""
    offsets = (rng or np.random).uniform(size=n) if jitter else np.full(n, 0.5)
    return start + (np.arange(n) + offsets) * (end - start) / n


def open_video(path, video_id, size=None):
    """This process's cached reader (the pid in the key: forked DataLoader workers must not touch inherited ones)."""
    import decord  # imported here so that annotation-only tools do not need it
    key = (os.getpid(), str(path), tuple(size) if size else None)
    if key not in _READERS:
        try:
            resize = {"height": size[0], "width": size[1]} if size else {}
            reader = decord.VideoReader(str(path), num_threads=1, **resize)
        except Exception as e:
            raise RuntimeError(f"cannot read {path} (for {video_id}): {e}; re-encode it to H.264 mp4 or "
                               "pass --skip-bad") from None
        first = float(reader.get_frame_timestamp(0)[0]) if len(reader) else 0.0
        if abs(first) > 1e-3 and str(path) not in _WARNED:  # e.g. MPEG-1 streams starting at 0.54 s
            _WARNED.add(str(path))
            warnings.warn(f"{path}: its first frame is stamped {first:.3g} s, not 0: decord seeks such files "
                          "inexactly and can return other frames than asked for; re-encode it to H.264 mp4 "
                          "(ffmpeg -i IN -c:v libx264 OUT.mp4)", stacklevel=2)
        if len(mine := [k for k in _READERS if k[0] == key[0]]) >= MAX_READERS:
            del _READERS[mine[0]]
        _READERS[key] = reader
    return _READERS[key]


def video_duration(video_root, video_id):
    """Seconds of the whole video (all its chunks): replay samples use whole files (end None)."""
    path, offset = find_video(video_root, video_id)[-1]
    reader = open_video(path, video_id)
    return offset + len(reader) / reader.get_avg_fps()


def load_clip(video_root, video_id, start, end, n_frames, jitter=False, rng=None, size=None):
    """(T, H, W, 3) uint8 frames and how many sample times fell past the video's end (clamped to its last frame);
    a clip starting at or after the end is an error. Frame indices use the decoded file's fps (the CSV's start_frame
    is at the original 59.94/50 fps); `size` (h, w) lets the decoder resize, far cheaper than resizing afterwards."""
    times = frame_times(start, end, n_frames, jitter, rng)
    files = find_video(video_root, video_id)
    which = np.clip(np.searchsorted([s for _, s in files], times, side="right") - 1, 0, len(files) - 1)
    frames, clamped = {}, 0
    for f in np.unique(which):
        path, offset = files[f]
        reader = open_video(path, video_id, size)
        picks = np.flatnonzero(which == f)
        index = np.round((times[picks] - offset) * reader.get_avg_fps()).astype(np.int64)
        last = len(reader) - 1
        if f == len(files) - 1:
            video_end = offset + len(reader) / reader.get_avg_fps()
            if start >= video_end:
                raise RuntimeError(f"clip {start:.2f}-{end:.2f} s of {video_id} {PAST_END} ({video_end:.2f} s in "
                                   f"{path}); fix the row's times or pass --skip-bad")
            clamped += int((index > last).sum())
        try:
            batch = reader.get_batch(np.clip(index, 0, last).tolist()).asnumpy()
        except Exception as e:  # decord's DECORDError on a damaged file; the reader stays usable
            raise RuntimeError(f"cannot decode frames {index.tolist()} of {path} (for {video_id}): "
                               f"{str(e).splitlines()[0][:200]}; re-encode it or pass --skip-bad") from None
        frames.update(zip(picks.tolist(), batch))
    return np.stack([frames[i] for i in range(n_frames)]), clamped


def preprocess_frames(frames, size, mean, std):
    """uint8 (T,H,W,3) -> float32 (T,3,S,S) in plain torch (transformers' processors need torchvision, which does
    not run beside the CPU torch of CI): bicubic resize with antialias, /255, normalised with the tower's mean/std."""
    import torch
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 255) / 255  # bicubic overshoots; the HF processors resize in uint8 and so clip too
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# files: atomic writes, JSONL, one process per output folder ------------------
def write_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not JSON ({e})") from None
    return rows


def lock_folder(folder):
    """Make `folder` and hold an OS lock on folder/.lock while this process lives (never stale): one run per folder."""
    import fcntl
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() in _LOCKS:  # this process holds it already (a second run from Python)
        return
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise RuntimeError(f"{folder} is in use by another run ({f.read().strip() or 'pid unknown'}); wait for it "
                           "to end or pass another --out") from None
    f.truncate(0)
    print(f"pid {os.getpid()}: {' '.join(sys.argv)}", file=f, flush=True)
    _LOCKS[folder.resolve()] = f


# training tasks (paper section 3.3) in either prompt style -------------------
# captions (the authors' GPT-4o annotations): {"<narration_id>": {"caption": str, "qa": [[question, answer], ...]}}
def mqa_question(options, style="official", perspective="ego", priors=None):
    """A multiple-choice question over `options` ('A. text', on one line in official, one a line in paper); with
    priors [(seconds ago, text)] x 2, oldest first, the prior-action form (texts, so SAP can pass its predictions)."""
    prefix, lettered = PERSPECTIVES[perspective], [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    if priors:
        (t2, a2), (t1, a1) = [(str(round(t, 2)) if style == "official" else f"{t:.2f}", a) for t, a in priors]
        text = PRIOR_PROMPT.format(t2=t2, a2=a2, t1=t1, a1=a1)
        return f"{prefix}\n{text}\n" + ", ".join(lettered) if style == "official" else text + "\n" + "\n".join(lettered)
    if style == "official":
        return prefix + MQA_INSTRUCTION + "\n" + MQA_OPTIONS + ", ".join(lettered)
    return prefix.rstrip() + "\n" + "\n".join(lettered)


def direct_question(style="official", perspective="ego"):
    return f"{PERSPECTIVES[perspective]} {DIRECT_PROMPT}" if style == "official" else DIRECT_PROMPT


def caption_question(style="official", perspective="ego"):
    return PERSPECTIVES[perspective] + CAPTION_PROMPT[style] if style == "official" else CAPTION_PROMPT[style]


def previous_actions(rows, style="official"):
    """(video id -> its row indices in time order, row index -> the indices of its two prior actions); rows are
    dicts with video_id, start, end. official (the authors' rule): a video's segments by end time, with priors only
    where both gaps (one segment's end to the next one's start) are at most PRIOR_MAX_GAP; paper: by start, any two."""
    videos, before = {}, {}
    for i, r in enumerate(rows):
        videos.setdefault(r["video_id"], []).append(i)
    first, then = ("end", "start") if style == "official" else ("start", "end")
    for idx in videos.values():
        idx.sort(key=lambda i: (rows[i][first], rows[i][then]))
        for k in range(2, len(idx)):
            a, b, c = (rows[j] for j in idx[k - 2:k + 1])
            if style != "official" or max(b["start"] - a["end"], c["start"] - b["end"]) <= PRIOR_MAX_GAP:
                before[idx[k]] = idx[k - 2:k]
    return videos, before


def segment_row(s, task, question, answer, **extra):
    """A sample row of one segment; its classes are the action heads' labels."""
    return {"id": s.id, "video_id": s.video_id, "start": s.start, "end": s.end, "task": task, "question": question,
            "answer": answer, **extra, "verb_class": s.verb_class, "noun_class": s.noun_class,
            "action_class": s.action_class}


def temporal_row(s, rng, form="paper"):
    """Temporal detection: the clip is the action padded by TEMPORAL_FORMS[form] seconds, alpha ~ U(0, 1) of it
    before and the rest after (clipped at 0); the answer is where the action lies in the clip, in `form`'s format."""
    pad, alpha = TEMPORAL_FORMS[form], rng.uniform()
    start, end = max(0.0, s.start - alpha * pad), s.end + (1 - alpha) * pad  # the clip's
    a, b, length = s.start - start, s.end - start, s.end - s.start
    official = form == "official"  # the authors' code: 'start, end' as str(round(x, 2)); paper: 'start: end'
    answer = f"{round(a, 2)}, {round(b, 2)}" if official else f"{a:.2f}: {b:.2f}"
    question = TEMPORAL_PROMPT.format(action=s.narration, duration=round(length, 2) if official else f"{length:.2f}")
    return dict(segment_row(s, "temporal", question, answer, action_start=a, action_end=b), start=start, end=end)


def read_replay(path, video_root=None):
    """LLaVA conversation JSON (LLaVA-Video-178K, ...) -> replay rows: the whole video (end None) or text only,
    every gpt turn supervised. Videos are paths relative to video_root (default: the JSON's folder)."""
    path, rows = Path(path), []
    for i, item in enumerate(json.loads(path.read_text())):
        turns = item.get("conversations", [])
        if "image" in item or not turns or [t["from"] for t in turns] != ["human", "gpt"] * (len(turns) // 2):
            raise ValueError(f"{path}, item {i}: expected a video or text sample whose conversations alternate "
                             "human, gpt (image samples are not supported)")
        questions = [re.sub(r"<(image|video)>\n?", "", q["value"]).strip() for q in turns[::2]]
        pairs = [[q, a["value"]] for q, a in zip(questions, turns[1::2])]
        row = {"id": str(item.get("id", f"{path.stem}_{i}")), "task": "replay", "question": pairs[0][0],
               "answer": pairs[0][1], "turns": pairs[1:]}
        if "video" in item:
            row.update(video_root=str(video_root or path.parent), video_id=item["video"], start=0.0, end=None)
        rows.append(row)
    return rows


def build_training_samples(ann, split, mqa_rows, rng, style="official", perspective="ego", prior_ratio=0.3,
                           temporal="paper", direct=True, captions=None, replay=None, replay_ratio=0.0):
    """The training mix of one split, every question in `style`. MQA rows (mined, hard distractors) are re-asked
    from their options; prior_ratio of those whose segment has two priors (previous_actions) become prior-action MQA.
    Each segment adds a temporal row (form `temporal`, None: none), a direct row, and caption and open-QA rows where
    `captions` (dict or JSON path) has them. Replay rows (a list or JSON path) are drawn to replay_ratio x the rest."""
    segments = ann.segments(split)
    by_id, (_, before) = {s.id: k for k, s in enumerate(segments)}, previous_actions([vars(s) for s in segments], style)
    rows = []
    for m in mqa_rows:
        if m["id"] not in by_id or "answer" not in m:
            raise ValueError(f"MQA row {m['id']}: not a {split} segment of {ann.root}, or without an answer "
                             "(a candidates file?)")
        k, row = by_id[m["id"]], dict(m, task="mqa", question=mqa_question(m["options"], style, perspective))
        if rng.uniform() < prior_ratio and k in before:
            priors = [segments[j] for j in before[k]]
            row.update(task="prior_mqa", prior_ids=[p.id for p in priors], question=mqa_question(
                m["options"], style, perspective, [(segments[k].start - p.start, p.narration) for p in priors]))
        rows.append(row)
    captions = json.loads(Path(captions).read_text()) if isinstance(captions, (str, Path)) else captions or {}
    for s in segments:
        if temporal:
            rows.append(temporal_row(s, rng, temporal))
        if direct:
            rows.append(segment_row(s, "direct", direct_question(style, perspective), s.narration))
        extra = captions.get(s.id, {})
        if extra.get("caption"):
            rows.append(segment_row(s, "caption", caption_question(style, perspective), extra["caption"]))
        if extra.get("qa"):
            (q, a), *turns = extra["qa"]
            rows.append(segment_row(s, "open_qa", q, a, turns=turns))
    replay = read_replay(replay) if isinstance(replay, (str, Path)) else replay
    if replay:
        n = round(replay_ratio * len(rows))
        rows += [replay[i] for i in rng.choice(len(replay), n, replace=n > len(replay))]
    return rows


# model inputs: token ids with loss masks, a Dataset that decodes clips in DataLoader workers, and collate ---
def encode_conversation(tokenizer, question, answer, n_video_tokens, n_action_tokens, turns=(), supervise="official"):
    """ChatML ids and labels, as the authors' Qwen template lays them out:
        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
        <video> x V <action> x A \\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    Pieces are tokenised apart: placeholders go in as ids; the prompt's ids do not depend on the answer. answer None:
    the prompt up to the answer's start, no targets. turns: further [question, answer] pairs. Targets with supervise
    "answers": each answer and its <|im_end|>; "official" (the authors', so the released models'): each whole assistant
    turn (header, final newline) and every <|im_start|>, <|im_end|> and lone "\\n" token (not " \\n" or ".\\n")."""
    def tok(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert supervise in SUPERVISION
    im_start, im_end, video, action = tokenizer.convert_tokens_to_ids([IM_START, IM_END, VIDEO_TOKEN, ACTION_TOKEN])
    placeholders = [video] * n_video_tokens + [action] * n_action_tokens
    newline, official = tok("\n"), supervise == "official"
    ids = [im_start, *tok("system\n" + SYSTEM_PROMPT), im_end, *newline]
    labels = [-100] * len(ids)
    for k, (q, a) in enumerate([(question, answer), *turns] if answer is not None else [(question, None)]):
        head = placeholders if k == 0 else []
        user = (newline if k else []) + [im_start, *tok("user\n"), *head, *tok(("\n" if head else "") + q), im_end,
                                         *newline]
        header = [im_start, *tok("assistant\n")]
        reply = [] if a is None else tok(a) + [im_end]
        ids += user + header + reply
        labels += [-100] * len(user) + (header if official and reply else [-100] * len(header)) + reply
    if answer is not None:
        ids, labels = ids + newline, labels + (newline if official else [-100] * len(newline))
        if official:
            marks = {im_start, im_end, *(newline if len(newline) == 1 else ())}
            labels = [-100] + [i if i in marks else label for i, label in zip(ids[1:], labels[1:])]  # 0: no context
    return ids, labels


class TaskDataset:
    """Rows -> model inputs for torch's DataLoader (a plain class, so `import data` needs no torch). `spec`: the model's
    vision spec (size, mean, std, video_tokens(n_frames)). time_prompt: video questions open with the time prompt, glued
    on as the authors do. Randomness comes from (seed, epoch, index): any number of workers, the same batches."""

    def __init__(self, rows, video_root, tokenizer, spec, n_frames, n_action_tokens=1, train=False,
                 time_prompt=False, skip_bad=False, with_answer=True, seed=0, supervise="official"):
        self.rows, self.video_root, self.tokenizer, self.spec = rows, video_root, tokenizer, spec
        self.n_frames, self.n_action_tokens, self.train = n_frames, n_action_tokens, train
        self.time_prompt, self.skip_bad, self.with_answer = time_prompt, skip_bad, with_answer
        self.seed, self.epoch, self.supervise = seed, 0, supervise

    def set_epoch(self, epoch):  # before the epoch's iterator is made: persistent workers would keep the old epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        import torch
        row, rng = self.rows[i], np.random.default_rng((self.seed, self.epoch, i))
        question, pixels, clamped, bad = row["question"], None, 0, None
        if "video_id" in row:
            root = row.get("video_root", self.video_root)
            try:
                end = row["end"] if row["end"] is not None else video_duration(root, row["video_id"])
                frames, clamped = load_clip(root, row["video_id"], row["start"], end, self.n_frames,
                                            jitter=self.train, rng=rng, size=(self.spec.size, self.spec.size))
                pixels = preprocess_frames(frames, self.spec.size, self.spec.mean, self.spec.std)
            except (OSError, RuntimeError) as e:
                if not self.skip_bad:
                    hint = "" if "--skip-bad" in str(e) else "; pass --skip-bad to go on without such clips"
                    raise type(e)(f"sample {row['id']}: {e}{hint}") from None
                bad = f"{type(e).__name__}: {e}"  # kept as a loss-free text sample, counted in the batch's "bad"
        if pixels is not None and self.time_prompt:
            question = TIME_PROMPT.format(duration=end - row["start"], frames=self.n_frames) + question
        n_video = self.spec.video_tokens(self.n_frames) if pixels is not None else 0
        ids, labels = encode_conversation(self.tokenizer, question, row["answer"] if self.with_answer else None,
                                          n_video, self.n_action_tokens, row.get("turns", ()), self.supervise)
        classes = [-100 if bad else row.get(k, -100) for k in ("verb_class", "noun_class", "action_class")]
        return dict(index=i, input_ids=torch.tensor(ids), labels=torch.tensor([-100] * len(ids) if bad else labels),
                    pixel_values_videos=pixels, action_labels=torch.tensor(classes), clamped=clamped, bad=bad)


def collate(items, pad_id):
    """Right-pad to the longest row. pixel_values_videos stacks the samples that have video, in batch order
    (absent when none has): video, text-only and label-free samples mix in one batch."""
    import torch
    ids = torch.full((len(items), max(len(x["input_ids"]) for x in items)), pad_id, dtype=torch.long)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = x["input_ids"], x["labels"], 1
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, index=torch.tensor([x["index"] for x in items]),
                 action_labels=torch.stack([x["action_labels"] for x in items]),
                 clamped=sum(x["clamped"] for x in items), bad=sum(x["bad"] is not None for x in items))
    if videos := [x["pixel_values_videos"] for x in items if x["pixel_values_videos"] is not None]:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch


# toy kitchens: EPIC-shaped data whose actions a tiny model can see (noun = colour and shape, verb = motion) ---
TOY_VERBS = ["take", "put", "wash", "open", "close", "cut"]
TOY_NOUNS = ["plate", "knife", "cup", "pan", "bowl", "lid", "spoon", "maker:coffee"]
TOY_COLOURS = np.array([[240, 240, 240], [40, 200, 230], [230, 40, 40], [250, 200, 30],
                        [60, 200, 60], [170, 90, 230], [250, 130, 200], [150, 90, 40]], dtype=np.uint8)
TOY_COLOUR_NAMES = ["white", "cyan", "red", "yellow", "green", "purple", "pink", "brown"]
TOY_SHAPES = ["circle", "hbar", "square", "ring", "diamond", "vbar", "cross", "triangle"]
TOY_MOVES = {"take": "moves up", "put": "moves down", "wash": "moves left and right", "open": "grows",
             "close": "shrinks", "cut": "moves from left to right"}  # what toy_motion draws, for toy captions
TOY_NARRATIONS = ["{v} {n}", "{v} the {n}", "{v} {n} on counter", "{v} {n} now"]
# truth bonus, bonus for sharing the verb, for sharing the noun, noise std. About as right as the real ones on
# EK100 (action top-1 near 0.5, top-5 near 0.85), so the two-stage options are not simply sorted by truth.
TOY_RECOGNIZERS = {"tim": (1.0, 1.6, 1.0, 1.5), "avion": (1.3, 0.9, 1.8, 1.5)}


def toy_object_mask(shape, dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    return {"circle": dx ** 2 + dy ** 2 < r ** 2, "square": np.maximum(ax, ay) < r, "diamond": ax + ay < r * 1.3,
            "ring": np.abs(np.hypot(dx, dy) - r * 0.75) < r * 0.3, "hbar": (ax < r * 1.2) & (ay < r * 0.4),
            "vbar": (ax < r * 0.4) & (ay < r * 1.2), "triangle": (dy < r) & (dy > -r) & (ax < (dy + r) * 0.55),
            "cross": ((ax < r * 0.35) | (ay < r * 0.35)) & (np.maximum(ax, ay) < r)}[shape]


def toy_motion(verb, u):
    """Object centre (x, y in [0, 1]) and radius scale at progress u in [0, 1] of the action."""
    return {"take": (0.5, 0.75 - 0.5 * u, 1.0), "put": (0.5, 0.25 + 0.5 * u, 1.0),
            "wash": (0.5 + 0.25 * math.sin(4 * math.pi * u), 0.5, 1.0), "open": (0.5, 0.5, 0.5 + 1.0 * u),
            "close": (0.5, 0.5, 1.5 - 1.0 * u), "cut": (0.2 + 0.6 * u, 0.5, 1.0)}.get(verb, (0.5, 0.5, 1.0))


def render_toy_video(path, segments, duration, fps, size, rng):
    import av
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = (rng.integers(20, 60, size=(h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "g": "5"}  # frequent keyframes: training seeks at random
        for i in range(int(round(duration * fps))):
            t, frame = i / fps, background.copy()
            for start, end, verb, noun in segments:  # they do not overlap: one at most is on screen
                if start <= t <= end:
                    cx, cy, s = toy_motion(TOY_VERBS[verb], (t - start) / (end - start))
                    frame[toy_object_mask(TOY_SHAPES[noun], xx - cx * w, yy - cy * h, s * h / 6)] = TOY_COLOURS[noun]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def fmt_time(seconds):
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{seconds % 60:05.2f}"


def simulate_recognizer(segments, vocab, name, rng):
    """Scores over all actions that confuse the truth mostly with actions sharing its verb or noun."""
    truth_bonus, verb_bonus, noun_bonus, noise = TOY_RECOGNIZERS[name]
    truth = vocab.pairs[[s.action_class for s in segments]]  # (N, 2)
    scores = noise * rng.standard_normal((len(segments), len(vocab))).astype(np.float32)
    scores += verb_bonus * (truth[:, None, 0] == vocab.pairs[None, :, 0])
    scores += noun_bonus * (truth[:, None, 1] == vocab.pairs[None, :, 1])
    scores[np.arange(len(segments)), [s.action_class for s in segments]] += truth_bonus
    return scores


def toy_caption(verb, noun):
    """A GPT-4o-style caption and open QA (captions.json) of what the toy video shows for one action."""
    words, colour, move = label_text("", TOY_NOUNS[noun]).strip(), TOY_COLOUR_NAMES[noun], TOY_MOVES[TOY_VERBS[verb]]
    return {"caption": f"A {colour} {TOY_SHAPES[noun]}, the {words}, {move}: I {TOY_VERBS[verb]} the {words}.",
            "qa": [[f"What colour is the {words}?", colour], ["How does the object move?", move]]}


def make_toy(out, videos_per_split=(12, 2), segments_per_video=60, n_actions=30, fps=15, size=(64, 96), seed=0):
    """A toy kitchen in EPIC's layout: CSVs, class files, mp4 videos and two recognizers' scores, plus
    captions.json (captions and open QA by narration id) and replay.json (LLaVA conversations, videos and text)."""
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    all_pairs = [(v, n) for v in range(len(TOY_VERBS)) for n in range(len(TOY_NOUNS))]
    chosen = [all_pairs[i] for i in sorted(rng.choice(len(all_pairs), n_actions, replace=False))]
    popularity = rng.dirichlet(np.full(n_actions, 0.7))  # a long tail, as in EPIC
    for name, keys in ((VERB_FILE, TOY_VERBS), (NOUN_FILE, TOY_NOUNS)):
        write_atomic(out / name, "id,key,instances,category\n" + "".join(
            f"{i},{k},\"['{k}']\",toy\n" for i, k in enumerate(keys)))
    columns = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
               "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class",
               "all_nouns", "all_noun_classes"]
    video_number, captions, replay = 0, {}, []
    for split, n_videos in zip(("train", "validation"), videos_per_split):
        rows = []
        for _ in tqdm(range(n_videos), desc=f"toy {split} videos", leave=False):
            video_number += 1
            video_id = f"P{video_number:02d}_01"
            t, spans = 0.5, []
            for k in range(segments_per_video):
                v, n = chosen[rng.choice(n_actions, p=popularity)]
                length = rng.uniform(1.2, 3.0)
                spans.append((t, t + length, v, n))
                noun_words = label_text("", TOY_NOUNS[n]).strip()
                narration = TOY_NARRATIONS[rng.integers(len(TOY_NARRATIONS))].format(v=TOY_VERBS[v], n=noun_words)
                rows.append([f"{video_id}_{k}", video_id.split("_")[0], video_id, fmt_time(t), fmt_time(t),
                             fmt_time(t + length), int(t * 59.94) + 1, int((t + length) * 59.94) + 1, narration,
                             TOY_VERBS[v], v, TOY_NOUNS[n], n, str([TOY_NOUNS[n]]), str([n])])
                captions[rows[-1][0]] = toy_caption(v, n)
                t += length + rng.uniform(0.2, 1.0)
            render_toy_video(out / "videos" / f"{video_id}.mp4", spans, t + 0.5, fps, size, rng)
            first, last = rows[-segments_per_video][8], rows[-1][8]
            replay.append({"id": f"toy_replay_{video_id}", "video": f"videos/{video_id}.mp4", "conversations": [
                {"from": "human", "value": "<image>\nWhat is the first action in the video?"},
                {"from": "gpt", "value": first},
                {"from": "human", "value": "And the last one?"}, {"from": "gpt", "value": last}]})
        with open(out / SPLIT_FILES[split], "w", newline="") as f:
            csv.writer(f).writerows([columns] + rows)
    replay += [{"id": f"toy_text_{i}", "conversations": [
        {"from": "human", "value": f"What colour is a toy {label_text('', noun).strip()}?"},
        {"from": "gpt", "value": TOY_COLOUR_NAMES[i]}]} for i, noun in enumerate(TOY_NOUNS)]
    write_json_atomic(out / "captions.json", captions)
    write_json_atomic(out / "replay.json", replay)
    (out / ACTIONS_FILE).unlink(missing_ok=True)
    ann = load_annotations(out)
    for name, head, n_tail in zip(TAIL_FILES, ("verb", "noun"), (2, 3)):
        classes = [getattr(s, f"{head}_class") for s in ann.segments("train")]
        tail = np.argsort(np.bincount(classes), kind="stable")[:n_tail]
        write_atomic(out / name, head + "\n" + "".join(f"{i}\n" for i in sorted(tail)))
    for name in TOY_RECOGNIZERS:
        for split in ("train", "validation"):
            segs = ann.segments(split)
            np.savez(out / "scores" / f"{name}_{split}.npz", ids=np.array([s.id for s in segs]),
                     scores=simulate_recognizer(segs, ann.vocab, name, rng))
    return out


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["toy"], help="toy: write the toy-kitchen data set")
    parser.add_argument("--out", default="toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segments-per-video", type=int, default=60)
    args = parser.parse_args(argv)
    root = make_toy(args.out, segments_per_video=args.segments_per_video, seed=args.seed)
    ann = load_annotations(root)
    print(f"toy kitchen in {root}: {len(ann.segments('train'))} train and {len(ann.segments('validation'))} "
          f"validation segments, {len(ann.vocab)} actions, videos in {root / 'videos'}, scores in {root / 'scores'}")


if __name__ == "__main__":
    main(sys.argv[1:])
