"""Training tasks, prompts in both styles, token layout, loss masks, the Dataset and collate (data.py, second part)."""
import functools
import re

import numpy as np
import pytest
import torch

import data
import model

N_FRAMES = 4
# The authors' strings, written out here as their code builds them (spaces included)
EGO = ("You are seeing this video from egocentric view and you are the person. Your hands are sometimes interacting "
       "with objects. What action are you doing? ")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    return model.build_tokenizer_tiny()


@pytest.fixture(scope="module", params=["grid", "hf"])
def spec(request):
    return model.VisionSpec(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), grid=2, layout=request.param)


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


def test_official_prompts_verbatim():
    options = ["open fridge", "open drawer", "close drawer", "open door", "close cupboard"]
    assert data.mqa_question(options) == (
        EGO + "Given multiple choices, format your answer briefly such as 'A. move knife'. \nHere are the options of "
        "actions you are selecting:\nA. open fridge, B. open drawer, C. close drawer, D. open door, E. close cupboard")
    assert data.mqa_question(["x", "y"], priors=[(5.0, "open tap"), (2.25, "wash cup")]) == (
        EGO + "\n5.0 seconds ago, you started an action open tap. 2.25 seconds ago, you started an action wash cup. "
        "What action are you currently performing? Here are the options of actions you can select:\nA. x, B. y")
    assert data.direct_question() == EGO + (" What action are you performing? Give a short sentence such as "
                                            "'move knife'.")
    assert data.caption_question() == EGO + (" Describe in details what you see from the video frames. You must talk "
                                             "in the first person perspective. Try to focus on what you are doing. ")
    assert data.mqa_question(["x"], perspective="allo") == (
        "The video is taken from egocentric view. The person's hands are sometimes interacting with objects. What "
        "action is the person doing?Given multiple choices, format your answer briefly such as 'A. move knife'. \n"
        "Here are the options of actions you are selecting:\nA. x")


def test_paper_prompts():
    assert data.mqa_question(["x", "y"], "paper") == EGO.rstrip() + "\nA. x\nB. y"
    assert data.mqa_question(["x", "y"], "paper", priors=[(5.0, "open tap"), (2.25, "wash cup")]) == (
        "5.00 seconds ago, you started an action open tap. 2.25 seconds ago, you started an action wash cup. What "
        "action are you currently performing? Here are the options of actions you can select:\nA. x\nB. y")
    assert data.direct_question("paper") == ("What action are you performing? Give a short sentence such as "
                                             "'move knife'.")
    assert data.caption_question("paper") == ("Describe in details what you see from the video frames. Try to focus "
                                              "on what you are doing.")


def test_official_samples_token_for_token(tok):
    """MQA (with the time instruction), prior-action, direct, caption and temporal samples as the authors' Qwen
    template lays them out: the decoded sequence equals the string written out here, and the ids equal the
    tokenizer's ids of that whole string (pieces tokenised apart change nothing)."""
    s = data.Segment("P01_01_7", "P01_01", "P01", 10.0, 12.5, "cut onion", 3, 4, 5)
    spec = model.VisionSpec(32, (0.5,) * 3, (0.5,) * 3, 2, "grid")
    video = "<video>" * spec.video_tokens(8) + "<action>"
    time = "The provided video lasts for 4.000 seconds, and 8 frames are uniformly sampled from it."
    opts = ["open fridge", "open drawer", "close drawer", "open door", "close cupboard"]
    temporal = data.temporal_row(s, np.random.default_rng(0), "official")
    pad_before = s.start - temporal["start"]
    cases = [  # (question, answer, expected user text)
        (time + data.mqa_question(opts), "A. open fridge", time + EGO + "Given multiple choices, format your answer "
         "briefly such as 'A. move knife'. \nHere are the options of actions you are selecting:\nA. open fridge, "
         "B. open drawer, C. close drawer, D. open door, E. close cupboard"),
        (data.mqa_question(opts[:2], priors=[(3.5, "take knife"), (1.25, "take onion")]), "B. open drawer",
         EGO + "\n3.5 seconds ago, you started an action take knife. 1.25 seconds ago, you started an action take "
         "onion. What action are you currently performing? Here are the options of actions you can select:\n"
         "A. open fridge, B. open drawer"),
        (data.direct_question(), "cut onion", EGO + " What action are you performing? Give a short sentence such as "
         "'move knife'."),
        (data.caption_question(), "I cut the onion.", EGO + " Describe in details what you see from the video "
         "frames. You must talk in the first person perspective. Try to focus on what you are doing. "),
        (temporal["question"], temporal["answer"], "The provided video contains an action 'cut onion' that lasts 2.5 "
         "seconds. What is the relative start and end time of the action in seconds? Format it as "
         "'start_timestamp: end_timestamp' and round to 2 decimal places."),
    ]
    assert temporal["answer"] == f"{round(pad_before, 2)}, {round(pad_before + 2.5, 2)}"
    assert temporal["end"] - temporal["start"] == pytest.approx(2.5 + 5)
    for question, answer, user in cases:
        ids, labels = data.encode_conversation(tok, question, answer, spec.video_tokens(8), 1, supervise="answers")
        expected = SYSTEM + video + "\n" + user + ASSISTANT + answer + "<|im_end|>\n"
        assert tok.decode(ids) == expected
        assert ids == tok(expected, add_special_tokens=False).input_ids
        assert supervised_text(tok, ids, labels) == answer + "<|im_end|>"


def test_encode_conversation_supervises_the_answer_only(tok):
    ids, labels = data.encode_conversation(tok, "What action?", "B. take the plate", 9, 1, supervise="answers")
    prompt, prompt_labels = data.encode_conversation(tok, "What action?", None, 9, 1)
    assert ids[:len(prompt)] == prompt and set(prompt_labels) == {-100}
    assert all(t == -100 for t in labels[:len(prompt)]) and labels[len(prompt):-1] == ids[len(prompt):-1]
    assert supervised_text(tok, ids, labels) == "B. take the plate<|im_end|>"
    assert tok.decode(prompt).endswith("What action?<|im_end|>\n<|im_start|>assistant\n")
    # multi-turn: every answer and its <|im_end|>, never the newline or the next user turn
    ids, labels = data.encode_conversation(tok, "Q one?", "first", 0, 1, turns=[["Q two?", "second"]],
                                           supervise="answers")
    runs = re.findall(r"\d+(?:,\d+)*", ",".join(str(i) if l != -100 else "|" for i, l in zip(ids, labels)))
    assert [tok.decode([int(i) for i in r.split(",")]) for r in runs] == ["first<|im_end|>", "second<|im_end|>"]
    assert tok.decode(ids) == (SYSTEM + "<action>\nQ one?" + ASSISTANT + "first<|im_end|>"
                               "\n<|im_start|>user\nQ two?" + ASSISTANT + "second<|im_end|>\n")


def release_targets(tok, messages):
    """The authors' preprocess_qwen, rebuilt from its description: each message is tokenised whole as
    <|im_start|>{role}\\n{content}<|im_end|>\\n, an assistant message is all targets, the rest none; then every
    <|im_start|>, <|im_end|> and lone-newline token becomes a target wherever it is."""
    ids, labels = [], []
    for role, content in messages:
        piece = tok(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False).input_ids
        ids += piece
        labels += piece if role == "assistant" else [-100] * len(piece)
    marks = {*tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]), *tok("\n", add_special_tokens=False).input_ids}
    return ids, [i if i in marks else l for i, l in zip(ids, labels)]


def test_official_supervision_is_the_releases(tok):
    question = data.mqa_question(["open fridge", "open drawer"])
    ids, labels = data.encode_conversation(tok, question, "A. open fridge", 6, 1, turns=[["And then?", "B. two"]])
    ref_ids, ref_labels = release_targets(tok, [("system", data.SYSTEM_PROMPT),
                                                ("user", "<video>" * 6 + "<action>\n" + question),
                                                ("assistant", "A. open fridge"), ("user", "And then?"),
                                                ("assistant", "B. two")])
    assert ids == ref_ids and labels[1:] == ref_labels[1:] and labels[0] == -100  # the first token has no context
    assert "\n" in supervised_text(tok, ids[:len(ids) // 2], labels[:len(ids) // 2])  # newlines of the prompt too
    assert set(data.encode_conversation(tok, question, None, 6, 1)[1]) == {-100}  # a prompt alone trains nothing


def test_video_placeholders_then_action_token(toy_root, ann, tok, spec):
    rows = mqa_rows(ann.segments("train")[:1])
    item = data.TaskDataset(rows, toy_root / "videos", tok, spec, N_FRAMES, supervise="answers")[0]
    ids = item["input_ids"].tolist()
    video, action = tok.convert_tokens_to_ids([data.VIDEO_TOKEN, data.ACTION_TOKEN])
    where = [i for i, t in enumerate(ids) if t == video]
    per_frame = 6 if spec.layout == "grid" else 4  # 2 x (2 + 1) with row newlines, or 2 x 2
    assert len(where) == spec.video_tokens(N_FRAMES) == N_FRAMES * per_frame + (spec.layout == "hf")
    assert where == list(range(where[0], where[-1] + 1)) and ids[where[-1] + 1] == action and ids.count(action) == 1
    assert tok.decode(ids[:where[0]]) == SYSTEM
    pixels = item["pixel_values_videos"]
    assert pixels.shape == (N_FRAMES, 3, 32, 32) and pixels.dtype == torch.float32
    assert supervised_text(tok, ids, item["labels"].tolist()) == rows[0]["answer"] + "<|im_end|>"
    official = data.TaskDataset(rows, toy_root / "videos", tok, spec, N_FRAMES)[0]  # the default: the release's
    assert official["labels"].tolist() == data.encode_conversation(tok, rows[0]["question"], rows[0]["answer"],
                                                                   spec.video_tokens(N_FRAMES), 1)[1]
    s = ann.segments("train")[0]
    assert item["action_labels"].tolist() == [s.verb_class, s.noun_class, s.action_class] and item["bad"] is None


def test_prior_actions_follow_the_release_rule(ann):
    """official: segments by end time, priors only where both gaps are at most 3 s; offsets str(round(x, 2))."""
    rows = [dict(video_id="v", start=s, end=e) for s, e in ((0, 2), (2.5, 4), (4.5, 6), (12, 13), (13.5, 14), (14, 15))]
    rows.append(dict(video_id="w", start=0, end=10))
    videos, before = data.previous_actions(rows)
    assert videos["v"] == [0, 1, 2, 3, 4, 5] and before == {2: [0, 1], 5: [3, 4]}  # 3 and 4: a 6 s gap before 3
    _, paper = data.previous_actions(rows, "paper")
    assert paper == {2: [0, 1], 3: [1, 2], 4: [2, 3], 5: [3, 4]}
    overlapping = [dict(video_id="v", start=0, end=9), dict(video_id="v", start=1, end=2),
                   dict(video_id="v", start=3, end=4)]
    assert data.previous_actions(overlapping)[0]["v"] == [1, 2, 0]  # end-time order
    segments = ann.segments("train")
    rows = data.build_training_samples(ann, "train", mqa_rows(segments), np.random.default_rng(0), prior_ratio=1.0,
                                       temporal=None, direct=False)
    _, eligible = data.previous_actions([vars(s) for s in segments])
    by_id = {s.id: k for k, s in enumerate(segments)}
    assert sum(r["task"] == "prior_mqa" for r in rows) == len(eligible) > 0
    for row in rows:
        k = by_id[row["id"]]
        assert row["task"] == ("prior_mqa" if k in eligible else "mqa")
        if k in eligible:
            p2, p1 = (segments[j] for j in eligible[k])
            now = segments[k]
            said = (f"{round(now.start - p2.start, 2)} seconds ago, you started an action {p2.narration}. "
                    f"{round(now.start - p1.start, 2)} seconds ago, you started an action {p1.narration}.")
            assert said in row["question"]
            assert row["question"].startswith(EGO + "\n") and f"B. {now.narration}, C. " in row["question"]
            assert row["prior_ids"] == [p2.id, p1.id]
    some = data.build_training_samples(ann, "train", mqa_rows(segments), np.random.default_rng(0), temporal=None,
                                       direct=False, style="paper")
    assert 0.1 < np.mean([r["task"] == "prior_mqa" for r in some]) < 0.5  # prior_ratio 0.3 of 60
    allo = data.build_training_samples(ann, "train", mqa_rows(segments[:3]), np.random.default_rng(0), prior_ratio=0,
                                       temporal=None, direct=False, perspective="allo")
    assert all(r["question"].startswith(data.PERSPECTIVES["allo"] + data.MQA_INSTRUCTION) for r in allo)


@pytest.mark.parametrize("form", ["paper", "official"])
def test_temporal_answer_parses_back_to_the_true_times(ann, form):
    rows = data.build_training_samples(ann, "train", [], np.random.default_rng(1), temporal=form, direct=False)
    segments = {s.id: s for s in ann.segments("train")}
    pad, sep = {"paper": (3.0, ": "), "official": (5.0, ", ")}[form]
    assert len(rows) == len(segments) and {r["task"] for r in rows} == {"temporal"}
    for row in rows:
        s = segments[row["id"]]
        a, b = map(float, row["answer"].split(sep))
        if form == "paper":
            assert re.fullmatch(r"\d+\.\d\d: \d+\.\d\d", row["answer"])
        assert 0 <= a < b <= row["end"] - row["start"] + 0.01
        assert abs(row["start"] + a - s.start) < 0.01 and abs(row["start"] + b - s.end) < 0.01
        assert row["start"] == 0 or row["end"] - row["start"] == pytest.approx(s.end - s.start + pad)
        assert f"action '{s.narration}' that lasts" in row["question"] and row["action_class"] == s.action_class


def test_direct_captions_open_qa_and_replay_mix(toy_root, ann):
    segments = ann.segments("train")
    rows = data.build_training_samples(ann, "train", mqa_rows(segments[:10]), np.random.default_rng(0),
                                       temporal=None, captions=toy_root / "captions.json",
                                       replay=toy_root / "replay.json", replay_ratio=0.5)
    tasks = [r["task"] for r in rows]
    n_tasks = 10 + 3 * len(segments)
    assert tasks.count("direct") == tasks.count("caption") == tasks.count("open_qa") == len(segments)
    assert tasks.count("replay") == round(0.5 * n_tasks)
    direct = next(r for r in rows if r["task"] == "direct")
    assert direct["question"] == data.direct_question() and direct["answer"] == segments[0].narration
    caption = next(r for r in rows if r["task"] == "caption")
    assert caption["question"] == data.caption_question()
    qa = next(r for r in rows if r["task"] == "open_qa")
    assert qa["turns"] and qa["action_class"] == segments[0].action_class
    replay = data.read_replay(toy_root / "replay.json")
    video = next(r for r in replay if "video_id" in r)
    assert video["end"] is None and video["video_root"] == str(toy_root) and "<image>" not in video["question"]
    assert len(video["turns"]) == 1 and any("video_id" not in r for r in replay)


def test_replay_whole_video_multi_turn_with_the_time_instruction(toy_root, tok, spec):
    replay = data.read_replay(toy_root / "replay.json")
    row = next(r for r in replay if "video_id" in r)
    item = data.TaskDataset([row], None, tok, spec, N_FRAMES, time_prompt=True, supervise="answers")[0]
    text = tok.decode(item["input_ids"])
    duration = data.video_duration(toy_root, row["video_id"])
    assert f"<action>\nThe provided video lasts for {duration:.3f} seconds, and {N_FRAMES} frames are uniformly " \
           f"sampled from it.{row['question']}<|im_end|>" in text and duration > 20
    assert item["pixel_values_videos"].shape[0] == N_FRAMES and item["clamped"] == 0
    assert supervised_text(tok, item["input_ids"].tolist(), item["labels"].tolist()) == (
        row["answer"] + "<|im_end|>" + row["turns"][0][1] + "<|im_end|>")
    assert item["action_labels"].tolist() == [-100, -100, -100]


def test_collate_mixes_video_text_only_and_label_free(toy_root, ann, tok, spec):
    s = ann.segments("train")[3]
    caption = {k: v for k, v in data.segment_row(s, "caption", data.caption_question(), "I take it.").items()
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
    net = model.load_model("tiny", action_tokens=1, n_verbs=len(ann.vocab.verbs), n_nouns=len(ann.vocab.nouns),
                           n_actions=len(ann.vocab), video_layout=spec.layout)
    for b in (batch, no_video):  # the tiny model takes the mixed batch and the text-only one
        out = net(b)
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


def test_missing_video_raises_or_is_skipped_with_its_reason(toy_root, ann, tok, spec):
    row = dict(mqa_rows(ann.segments("train")[:1])[0], video_id="P77_01")
    with pytest.raises(FileNotFoundError, match=r"P77_01.*videos/P77_01\.MP4.*--skip-bad"):
        data.TaskDataset([row], toy_root / "videos", tok, spec, N_FRAMES)[0]
    item = data.TaskDataset([row], toy_root / "videos", tok, spec, N_FRAMES, skip_bad=True)[0]
    assert item["bad"].startswith("FileNotFoundError: video P77_01 not found") and item["pixel_values_videos"] is None
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
    assert "cannot decode" in data.TaskDataset([row], tmp_path, tok, spec, N_FRAMES, skip_bad=True)[0]["bad"]


def test_bad_training_inputs(toy_root, ann, tmp_path):
    row = dict(mqa_rows(ann.segments("train")[:1])[0], id="P99_99_0")
    with pytest.raises(ValueError, match="P99_99_0.*train"):
        data.build_training_samples(ann, "train", [row], np.random.default_rng(0))
    (tmp_path / "r.json").write_text('[{"image": "a.jpg", "conversations": []}]')
    with pytest.raises(ValueError, match=r"r\.json, item 0"):
        data.read_replay(tmp_path / "r.json")
