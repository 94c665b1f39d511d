"""Training tasks, token layout, loss masks, the Dataset and collate (data.py, second part)."""
import functools
import re

import numpy as np
import pytest
import torch

import data
import model

N_FRAMES = 4


@pytest.fixture(scope="module")
def tok():
    return model.build_tokenizer_tiny()


@pytest.fixture(scope="module")
def spec():
    return model.VisionSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), tokens_per_frame=4)


@pytest.fixture(scope="module")
def ann(toy_root):
    return data.load_annotations(toy_root)


def mqa_rows(segments):
    """MQA rows as mine.py writes them, built by hand: the truth and two other narrations."""
    rows = []
    for k, s in enumerate(segments):
        options = [f"other action {k}", s.narration, f"another action {k}"]
        rows.append({"id": s.id, "video_id": s.video_id, "start": s.start, "end": s.end, "task": "mqa",
                     "question": data.mqa_question(options), "options": options, "answer": f"B. {s.narration}",
                     "answer_index": 1, "verb_class": s.verb_class, "noun_class": s.noun_class,
                     "action_class": s.action_class, "option_actions": [0, s.action_class, 1]})
    return rows


def supervised_text(tok, ids, labels):
    return tok.decode([i for i, l in zip(ids, labels) if l != -100])


def test_encode_conversation_supervises_the_answer_only(tok):
    ids, labels = data.encode_conversation(tok, "What action?", "B. take the plate", 9, 1)
    prompt, prompt_labels = data.encode_conversation(tok, "What action?", None, 9, 1)
    assert ids[:len(prompt)] == prompt and set(prompt_labels) == {-100}
    assert all(l == -100 for l in labels[:len(prompt)]) and labels[len(prompt):] == ids[len(prompt):]
    assert supervised_text(tok, ids, labels) == "B. take the plate<|im_end|>"
    assert tok.decode(prompt).endswith("What action?<|im_end|>\n<|im_start|>assistant\n")
    # multi-turn: every answer and its <|im_end|>, never the newline or the next user turn
    ids, labels = data.encode_conversation(tok, "Q one?", "first", 0, 1, turns=[["Q two?", "second"]])
    runs = re.findall(r"\d+(?:,\d+)*", ",".join(str(i) if l != -100 else "|" for i, l in zip(ids, labels)))
    assert [tok.decode([int(i) for i in r.split(",")]) for r in runs] == ["first<|im_end|>", "second<|im_end|>"]
    assert tok.decode(ids) == ("<|im_start|>user\n<action>\nQ one?<|im_end|>\n<|im_start|>assistant\nfirst<|im_end|>"
                               "\n<|im_start|>user\nQ two?<|im_end|>\n<|im_start|>assistant\nsecond<|im_end|>")


def test_video_placeholders_then_action_token(toy_root, ann, tok, spec):
    rows = mqa_rows(ann.segments("train")[:1])
    item = data.TaskDataset(rows, toy_root / "videos", tok, spec, N_FRAMES)[0]
    ids = item["input_ids"].tolist()
    video, action, start = tok.convert_tokens_to_ids([data.VIDEO_TOKEN, data.ACTION_TOKEN, data.IM_START])
    where = [i for i, t in enumerate(ids) if t == video]
    assert len(where) == spec.video_tokens(N_FRAMES) == N_FRAMES * 4 + 1
    assert where == list(range(where[0], where[-1] + 1)) and ids[where[-1] + 1] == action and ids.count(action) == 1
    assert ids[:where[0]] == [start] + tok("user\n", add_special_tokens=False)["input_ids"]
    pixels = item["pixel_values_videos"]
    assert pixels.shape == (N_FRAMES, 3, 32, 32) and pixels.dtype == torch.float32
    assert supervised_text(tok, ids, item["labels"].tolist()) == rows[0]["answer"] + "<|im_end|>"
    s = ann.segments("train")[0]
    assert item["action_labels"].tolist() == [s.verb_class, s.noun_class, s.action_class] and not item["bad"]


def test_prior_mqa_names_the_two_previous_actions(ann):
    assert data.prior_mqa_question(["x", "y"], [(5.0, "open tap"), (2.25, "wash cup")]) == (
        "5.00 seconds ago, you started an action open tap. 2.25 seconds ago, you started an action wash cup. What "
        "action are you currently performing? Here are the options of actions you can select:\nA. x\nB. y")
    segments = ann.segments("train")
    rows = data.build_training_samples(ann, "train", mqa_rows(segments), np.random.default_rng(0), prior_ratio=1.0,
                                       temporal=False, direct=False)
    by_video = {}
    for s in sorted(segments, key=lambda s: s.start):
        by_video.setdefault(s.video_id, []).append(s)
    for row in rows:
        video = by_video[row["video_id"]]
        k = [s.id for s in video].index(row["id"])
        assert row["task"] == ("prior_mqa" if k >= 2 else "mqa")
        if k >= 2:
            p2, p1, now = video[k - 2], video[k - 1], video[k]
            assert (f"{now.start - p2.start:.2f} seconds ago, you started an action {p2.narration}. "
                    f"{now.start - p1.start:.2f} seconds ago, you started an action {p1.narration}.") in row["question"]
            assert f"\nB. {now.narration}\nC. " in row["question"] and row["prior_ids"] == [p2.id, p1.id]
    some = data.build_training_samples(ann, "train", mqa_rows(segments), np.random.default_rng(0), temporal=False,
                                       direct=False)
    assert 0.1 < np.mean([r["task"] == "prior_mqa" for r in some]) < 0.5  # prior_ratio 0.3 of 60
    allo = data.build_training_samples(ann, "train", mqa_rows(segments[:3]), np.random.default_rng(0), prior_ratio=0,
                                       temporal=False, direct=False, prompt=data.ALLO_PROMPT)
    assert all(r["question"].startswith(data.ALLO_PROMPT + "\nA. ") for r in allo)


@pytest.mark.parametrize("pad", [3.0, 5.0])
def test_temporal_answer_parses_back_to_the_true_times(ann, pad):
    rows = data.build_training_samples(ann, "train", [], np.random.default_rng(1), pad_seconds=pad, direct=False)
    segments = {s.id: s for s in ann.segments("train")}
    assert len(rows) == len(segments) and {r["task"] for r in rows} == {"temporal"}
    for row in rows:
        s = segments[row["id"]]
        a, b = map(float, re.fullmatch(r"(\d+\.\d\d): (\d+\.\d\d)", row["answer"]).groups())
        assert 0 <= a < b <= row["end"] - row["start"]
        assert abs(row["start"] + a - s.start) < 0.01 and abs(row["start"] + b - s.end) < 0.01
        assert (row["action_start"], row["action_end"]) == pytest.approx((s.start - row["start"], s.end - row["start"]))
        assert row["start"] == 0 or row["end"] - row["start"] == pytest.approx(s.end - s.start + pad)
        assert f"action {s.narration} that lasts {s.end - s.start:.2f} seconds" in row["question"]
        assert row["action_class"] == s.action_class


def test_direct_captions_open_qa_and_replay_mix(toy_root, ann):
    segments = ann.segments("train")
    rows = data.build_training_samples(ann, "train", mqa_rows(segments[:10]), np.random.default_rng(0),
                                       temporal=False, captions=toy_root / "captions.json",
                                       replay=toy_root / "replay.json", replay_ratio=0.5)
    tasks = [r["task"] for r in rows]
    n_tasks = 10 + 3 * len(segments)
    assert tasks.count("direct") == tasks.count("caption") == tasks.count("open_qa") == len(segments)
    assert tasks.count("replay") == round(0.5 * n_tasks)
    direct = next(r for r in rows if r["task"] == "direct")
    assert direct["question"] == data.DIRECT_PROMPT and direct["answer"] == segments[0].narration
    qa = next(r for r in rows if r["task"] == "open_qa")
    assert qa["turns"] and qa["action_class"] == segments[0].action_class
    replay = data.read_replay(toy_root / "replay.json")
    video = next(r for r in replay if "video_id" in r)
    assert video["end"] is None and video["video_root"] == str(toy_root) and "<image>" not in video["question"]
    assert len(video["turns"]) == 1 and any("video_id" not in r for r in replay)


def test_replay_whole_video_multi_turn(toy_root, tok, spec):
    replay = data.read_replay(toy_root / "replay.json")
    row = next(r for r in replay if "video_id" in r)
    item = data.TaskDataset([row], None, tok, spec, N_FRAMES, time_prompt=True)[0]
    text = tok.decode(item["input_ids"])
    duration = data.video_duration(toy_root, row["video_id"])
    assert f"The provided video lasts for {duration:.3f} seconds, and {N_FRAMES} frames" in text and duration > 20
    assert item["pixel_values_videos"].shape[0] == N_FRAMES and item["clamped"] == 0
    assert supervised_text(tok, item["input_ids"].tolist(), item["labels"].tolist()) == (
        row["answer"] + "<|im_end|>" + row["turns"][0][1] + "<|im_end|>")
    assert item["action_labels"].tolist() == [-100, -100, -100]


def test_collate_mixes_video_text_only_and_label_free(toy_root, ann, tok, spec):
    s = ann.segments("train")[3]
    caption = {k: v for k, v in data.segment_row(s, "caption", data.CAPTION_PROMPT, "I take it.").items()
               if not k.endswith("_class")}
    text_only = next(r for r in data.read_replay(toy_root / "replay.json") if "video_id" not in r)
    rows = [mqa_rows([s])[0], text_only, caption]
    ds = data.TaskDataset(rows, toy_root / "videos", tok, spec, N_FRAMES, train=True)
    items = [ds[i] for i in range(3)]
    batch = data.collate(items, tok.pad_token_id)
    lengths = [len(x["input_ids"]) for x in items]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values_videos"].shape == (2, N_FRAMES, 3, 32, 32)  # one per video sample, in batch order
    assert torch.equal(batch["pixel_values_videos"][1], items[2]["pixel_values_videos"])
    assert batch["action_labels"].tolist()[1:] == [[-100] * 3] * 2 and batch["index"].tolist() == [0, 1, 2]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all() and batch["bad"] == 0
    assert tok.convert_tokens_to_ids(data.VIDEO_TOKEN) not in items[1]["input_ids"]
    no_video = data.collate(items[1:2], tok.pad_token_id)
    assert "pixel_values_videos" not in no_video
    # the tiny model takes the mixed batch and the text-only one
    net = model.load_model("tiny", len(ann.vocab.verbs), len(ann.vocab.nouns), len(ann.vocab))
    for b in (batch, no_video):
        out = net({k: v for k, v in b.items() if k not in ("index", "clamped", "bad")})
        assert torch.isfinite(out["loss"]) and out["lm_tokens"] == (b["labels"] != -100).sum()


def test_dataloader_workers_give_the_same_batches(toy_root, ann, tok, spec):
    rows = data.build_training_samples(ann, "train", mqa_rows(ann.segments("train")[:4]), np.random.default_rng(0),
                                       captions=toy_root / "captions.json")[::9][:6]
    ds = data.TaskDataset(rows, toy_root / "videos", tok, spec, N_FRAMES, train=True, seed=3)
    collate = functools.partial(data.collate, pad_id=tok.pad_token_id)

    def batches(workers):
        return list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate))

    for a, b in zip(batches(0), batches(2), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    first = ds[0]["pixel_values_videos"]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["pixel_values_videos"])  # new jitter each epoch
    ds.set_epoch(0)
    assert torch.equal(first, ds[0]["pixel_values_videos"])


def test_missing_video_raises_or_is_skipped(toy_root, ann, tok, spec):
    row = dict(mqa_rows(ann.segments("train")[:1])[0], video_id="P77_01")
    with pytest.raises(FileNotFoundError, match=r"P77_01.*videos/P77_01\.MP4.*--skip-bad"):
        data.TaskDataset([row], toy_root / "videos", tok, spec, N_FRAMES)[0]
    item = data.TaskDataset([row], toy_root / "videos", tok, spec, N_FRAMES, skip_bad=True)[0]
    assert item["bad"] and item["pixel_values_videos"] is None
    assert (item["labels"] == -100).all() and (item["action_labels"] == -100).all()
    assert tok.convert_tokens_to_ids(data.VIDEO_TOKEN) not in item["input_ids"]
    assert data.collate([item], tok.pad_token_id)["bad"] == 1


def test_damaged_video_raises_or_is_skipped(toy_root, ann, tok, spec, tmp_path):
    """A file that opens but fails to decode past some point (decord's own error type) is skipped too."""
    segs = [s for s in ann.segments("train") if s.video_id == ann.segments("train")[0].video_id]
    seg = segs[len(segs) // 2]  # mid-video: inside the damaged middle third
    damaged = bytearray((toy_root / "videos" / f"{seg.video_id}.mp4").read_bytes())
    third = len(damaged) // 3
    damaged[third:2 * third] = bytes(third)  # the frames' data; the index at the end stays
    (tmp_path / f"{seg.video_id}.mp4").write_bytes(damaged)
    row = mqa_rows([seg])[0]
    with pytest.raises(RuntimeError, match=rf"cannot decode .*{seg.video_id}\.mp4.*--skip-bad"):
        data.TaskDataset([row], tmp_path, tok, spec, N_FRAMES)[0]
    assert data.TaskDataset([row], tmp_path, tok, spec, N_FRAMES, skip_bad=True)[0]["bad"]


def test_bad_training_inputs(toy_root, ann, tmp_path):
    row = dict(mqa_rows(ann.segments("train")[:1])[0], id="P99_99_0")
    with pytest.raises(ValueError, match="P99_99_0.*train"):
        data.build_training_samples(ann, "train", [row], np.random.default_rng(0))
    (tmp_path / "r.json").write_text('[{"image": "a.jpg", "conversations": []}]')
    with pytest.raises(ValueError, match=r"r\.json, item 0"):
        data.read_replay(tmp_path / "r.json")
