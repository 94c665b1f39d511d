"""evaluate.py on a toy kitchen with the random-init tiny model (--base tiny): what the CLI writes must equal
what independent forwards give, survive a kill, agree across ranks, and count what it skips."""
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import mine
import structured
from model import load_model, preprocess_frames

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 4


@pytest.fixture(scope="module")
def kitchen(toy_root, tmp_path_factory):
    """A writable copy of the toy kitchen with mined 5-option benchmarks: validation (1 video, 30 segments, the
    default name) and train (2 videos, for SAP across videos)."""
    root = tmp_path_factory.mktemp("evaluate") / "toy"
    shutil.copytree(toy_root, root)
    ann = data.load_annotations(root)
    for split, name in (("validation", "ek100_mqa_tim_k5.jsonl"), ("train", "train_mqa.jsonl")):
        scores = mine.read_scores(root / "scores" / f"tim_{split}.npz", ann, split)
        data.write_jsonl_atomic(root / name, mine.mine(ann, split, scores, k=5))
    return root


@pytest.fixture(scope="module")
def tiny(kitchen):
    """The model --base tiny builds (seeded random init), for independent reference computations."""
    vocab = data.load_annotations(kitchen).vocab
    return load_model("tiny", len(vocab.verbs), len(vocab.nouns), len(vocab), n_action_tokens=0).eval()


def run_cli(kitchen, out, *argv, model=("--base", "tiny")):
    """`python evaluate.py ...` in this process (runpy: no new interpreter); returns metrics.json."""
    old = sys.argv
    sys.argv = ["evaluate.py", *map(str, model), "--annotations", str(kitchen), "--out", str(out),
                "--frames", str(FRAMES), "--num-workers", "0", *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    finally:
        sys.argv = old
    return json.loads((Path(out) / "metrics.json").read_text())


def predictions(out, frames=FRAMES):
    return data.read_jsonl(Path(out) / f"frames{frames}" / "predictions.jsonl")


def prompt_inputs(model, video_root, row, question):
    """One unpadded prompt, built here from data.py's pieces: (input_ids (1, L), pixel_values_videos)."""
    size = (model.spec.size, model.spec.size)  # decoded at the tower's size, as TaskDataset does
    frames, _ = data.load_clip(video_root, row["video_id"], row["start"], row["end"], FRAMES, size=size)
    ids, _ = data.encode_conversation(model.tokenizer, question, None, model.spec.video_tokens(FRAMES),
                                      model.n_action_tokens)
    return torch.tensor([ids]), preprocess_frames(frames, model.spec)[None]


def test_mqa_matches_independent_forwards(kitchen, tiny, tmp_path):
    out = tmp_path / "mqa"
    metrics = run_cli(kitchen, out, "--frames", 2, FRAMES)
    assert set(metrics) == {"2", str(FRAMES)}  # one entry per --frames setting
    args = json.loads((out / "args.json").read_text())
    assert args["video_root"] == str(kitchen / "videos") and args["frames"] == [2, FRAMES]
    rows, preds = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl"), predictions(out)
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    letters = tiny.tokenizer.convert_tokens_to_ids(list("ABCDE"))
    for row, pred in zip(rows, preds):  # a plain HF forward per sample, full logits, no padding, no batching
        ids, pixels = prompt_inputs(tiny, kitchen / "videos", row, row["question"])
        with torch.no_grad():
            logits = tiny.llava(input_ids=ids, pixel_values_videos=pixels).logits[0, -1]
        assert pred["choice"] == int(logits[letters].argmax()), row["id"]
        assert pred["pred_action"] == row["option_actions"][pred["choice"]]
        assert pred["pred_text"] == row["options"][pred["choice"]]
    m, n = metrics[str(FRAMES)], len(rows)
    correct = np.array([p["choice"] == r["answer_index"] for p, r in zip(preds, rows)])
    assert m["n"] == n and m["accuracy"] == pytest.approx(correct.mean())
    assert m["action_top1"] == pytest.approx(correct.mean())  # options are distinct actions
    assert abs(m["accuracy"] - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n)  # a random model is at chance (1 in 5)
    # train.py's in-training check gives the same accuracy
    res = evaluate.evaluate_mqa(tiny, rows, kitchen / "videos", FRAMES, batch_size=8)
    assert res["n"] == n and res["accuracy"] == pytest.approx(m["accuracy"])


@pytest.mark.parametrize("sap", [False, True], ids=["rows", "sap"])
def test_kill_and_resume_gives_the_same(kitchen, tmp_path, monkeypatch, sap):
    bench = kitchen / ("train_mqa.jsonl" if sap else "ek100_mqa_tim_k5.jsonl")
    flags = ["--batch-size", 4, "--benchmark", bench] + (["--sap"] if sap else [])
    full = run_cli(kitchen, tmp_path / "full", *flags)
    calls, real = [], structured.score_options

    def dies_on_third_batch(model, batch, n):
        calls.append(len(batch["input_ids"]))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(model, batch, n)

    monkeypatch.setattr(structured, "score_options", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_cli(kitchen, tmp_path / "resumed", *flags)
    shard = tmp_path / "resumed" / f"frames{FRAMES}" / "predictions.rank0.jsonl"
    written = sum(calls[:2])
    assert len(data.read_jsonl(shard)) == written  # line by line before the kill (SAP: 2 videos, batches of 2)
    with open(shard, "a") as f:
        f.write('{"id": "P0')  # a line cut short by the kill
    calls.clear()
    monkeypatch.setattr(structured, "score_options", lambda *a: calls.append(len(a[1]["input_ids"])) or real(*a))
    resumed = run_cli(kitchen, tmp_path / "resumed", *flags)
    assert sum(calls) == len(data.read_jsonl(bench)) - written  # only the unfinished samples were scored
    assert resumed == full
    assert predictions(tmp_path / "resumed") == predictions(tmp_path / "full")  # SAP: the same priors too
    assert not shard.exists()  # merged into predictions.jsonl


def test_resume_refuses_other_flags(kitchen, tmp_path):
    run_cli(kitchen, tmp_path, "--limit", 2)
    with pytest.raises(SystemExit):
        run_cli(kitchen, tmp_path, "--limit", 2, "--time-prompt")


def test_sap_prompts_hold_own_predictions(kitchen, tmp_path, monkeypatch):
    seen, real = [], structured.score_options

    def record(model, batch, n):
        seen.append((batch["index"].tolist(), model.tokenizer.batch_decode(batch["input_ids"])))
        return real(model, batch, n)

    monkeypatch.setattr(structured, "score_options", record)
    run_cli(kitchen, tmp_path, "--sap", "--benchmark", kitchen / "train_mqa.jsonl")
    rows, preds = data.read_jsonl(kitchen / "train_mqa.jsonl"), predictions(tmp_path)
    by_id, prompt = {p["id"]: p for p in preds}, {}
    for index, texts in seen:
        assert len({rows[i]["video_id"] for i in index}) == len(index) == 2  # one segment from each video
        prompt.update((rows[i]["id"], t) for i, t in zip(index, texts))
    differs = 0
    for vid in {r["video_id"] for r in rows}:
        segs = sorted((r for r in rows if r["video_id"] == vid), key=lambda r: r["start"])
        for k, r in enumerate(segs):
            p = by_id[r["id"]]
            if k < 2:
                assert "priors" not in p and "seconds ago" not in prompt[r["id"]]
                continue
            before = [by_id[s["id"]] for s in segs[k - 2:k]]
            assert p["priors"] == [[pytest.approx(r["start"] - b["start"], abs=1e-3), b["pred_text"]] for b in before]
            for (t, text) in p["priors"]:
                assert f"{t:.2f} seconds ago, you started an action {text}." in prompt[r["id"]]
            differs += any(b["pred_text"] != s["options"][s["answer_index"]] for b, s in zip(before, segs[k - 2:k]))
    assert differs > 0  # the priors are predictions, not the true actions


def test_two_stage_predicts_within_top_k(kitchen, tmp_path):
    m = run_cli(kitchen, tmp_path, "--mode", "two_stage", "--topk", 20)[str(FRAMES)]
    ann = data.load_annotations(kitchen)
    scores = mine.read_scores(kitchen / "scores" / "tim_validation.npz", ann, "validation")
    top, truth = mine.ranked_top(scores, 20), np.array([s.action_class for s in ann.segments("validation")])
    preds = predictions(tmp_path)
    assert len(preds) == len(truth)
    for p, t in zip(preds, top):
        assert p["pred_action"] == t[p["choice"]] and len(p["scores"]) == 20
        assert p["pred_text"] == ann.vocab.labels[p["pred_action"]]  # --text label
        assert tuple(ann.vocab.pairs[p["pred_action"]]) == (p["pred_verb"], p["pred_noun"])
    assert m["accuracy"] == m["action_top1"] == pytest.approx(np.mean([p["pred_action"] for p in preds] == truth))
    assert m["recognizer_top1"] == pytest.approx(np.mean(top[:, 0] == truth))
    assert m["topk_recall"] == pytest.approx(np.mean((top == truth[:, None]).any(1))) and m["topk"] == 20


def test_multi_round_picks_the_most_likely_label(kitchen, tiny, tmp_path):
    run_cli(kitchen, tmp_path, "--mode", "multi_round", "--limit", 2)
    ann = data.load_annotations(kitchen)
    candidates = structured.candidate_token_ids(tiny.tokenizer, ann.vocab.labels)
    for seg, pred in zip(ann.segments("validation"), predictions(tmp_path)):
        ids, pixels = prompt_inputs(tiny, kitchen / "videos", vars(seg), data.DIRECT_PROMPT)
        means = []
        for cand in candidates:  # a full forward per label: mean log-prob of its tokens, <|im_end|> included
            with torch.no_grad():
                logits = tiny.llava(input_ids=torch.cat([ids, torch.tensor([cand[:-1]])], 1),
                                    pixel_values_videos=pixels).logits[0, ids.shape[1] - 1:]
            means.append(logits.log_softmax(-1)[torch.arange(len(cand)), cand].mean().item())
        assert pred["pred_action"] == int(np.argmax(means))
        assert pred["score"] == pytest.approx(max(means), abs=1e-5) and "choice" not in pred
        assert pred["correct"] == (pred["pred_action"] == seg.action_class)


def test_metrics_counts_add_up(kitchen):
    ann = data.load_annotations(kitchen)
    tails = evaluate.read_tail_classes(kitchen)
    rng = np.random.default_rng(0)
    preds = []
    for s in ann.segments("train"):
        a = int(rng.integers(len(ann.vocab))) if rng.random() < 0.6 else s.action_class
        v, n = ann.vocab.pairs[a]
        preds.append(dict(id=s.id, pred_action=a, pred_verb=int(v), pred_noun=int(n), verb_class=s.verb_class,
                          noun_class=s.noun_class, action_class=s.action_class, correct=a == s.action_class,
                          clamped=0))
    preds += [dict(id="gone_1", bad=True), dict(id="gone_2", bad=True)]
    ratings = {p["id"]: ("easy" if i % 3 else "hard") for i, p in enumerate(preds[:40])}
    m = evaluate.compute_metrics(preds, ann.vocab, tails, ratings)
    good = preds[:-2]
    n = len(good)
    assert m["n"] == n and m["skipped_bad"] == 2
    tail_v = np.array([p["verb_class"] in tails[0] for p in good])
    tail_n = np.array([p["noun_class"] in tails[1] for p in good])
    for key, tail in (("verb", tail_v), ("noun", tail_n), ("action", tail_v | tail_n)):
        ht = m["head_tail"][key]
        assert ht["head"]["n"] + ht["tail"]["n"] == n and ht["tail"]["n"] == tail.sum()
        assert ht["head"]["correct"] + ht["tail"]["correct"] == round(m[f"{key}_top1"] * n)
    for key, keys in (("verb", ann.vocab.verbs), ("noun", ann.vocab.nouns)):
        per = m[f"per_{key}"]
        assert sum(c["n"] for c in per.values()) == n
        assert sum(c["correct"] for c in per.values()) == round(m[f"{key}_top1"] * n)
        for name, c in per.items():
            cls = keys.index(name)
            assert c["n"] == sum(p[f"{key}_class"] == cls for p in good)
    (kitchen / "ratings.csv").write_text("narration_id,level\n" + "".join(f"{k},{v}\n" for k, v in ratings.items()))
    (kitchen / "ratings.json").write_text(json.dumps(ratings))
    assert evaluate.read_ratings(kitchen / "ratings.csv") == evaluate.read_ratings(kitchen / "ratings.json") == ratings
    levels = m["by_difficulty"]
    assert sum(c["n"] for c in levels.values()) == n and levels["unrated"]["n"] == n - 40
    assert sum(c["correct"] for c in levels.values()) == round(m["accuracy"] * n)


def test_skip_bad_counts_a_missing_video(kitchen, tmp_path):
    rows = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")[:10]
    for r in rows[3:6]:
        r["video_id"] = "P99_01"
    data.write_jsonl_atomic(tmp_path / "bench.jsonl", rows)
    with pytest.raises(FileNotFoundError, match=r"P99_01 not found under .*videos.*--skip-bad"):
        run_cli(kitchen, tmp_path / "strict", "--benchmark", tmp_path / "bench.jsonl")
    m = run_cli(kitchen, tmp_path / "skip", "--benchmark", tmp_path / "bench.jsonl", "--skip-bad")[str(FRAMES)]
    assert m["n"] == 7 and m["skipped_bad"] == 3
    assert [p.get("bad", False) for p in predictions(tmp_path / "skip")] == [False] * 3 + [True] * 3 + [False] * 4


def test_bad_checkpoint_and_score_file(kitchen, tmp_path):
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_ckpt holds no LLaVA weights"):
        run_cli(kitchen, tmp_path / "a", model=("--ckpt", empty))
    with pytest.raises(ValueError, match="scores of split 'train'"):
        run_cli(kitchen, tmp_path / "b", "--mode", "two_stage", "--scores", kitchen / "scores" / "tim_train.npz")


def test_trained_checkpoint_with_heads_loads(kitchen, tmp_path):
    vocab = data.load_annotations(kitchen).vocab
    load_model("tiny", len(vocab.verbs), len(vocab.nouns), len(vocab), n_action_tokens=1).save(tmp_path / "ckpt")
    m = run_cli(kitchen, tmp_path / "out", "--limit", 4, model=("--ckpt", tmp_path / "ckpt"))[str(FRAMES)]
    assert m["n"] == 4


def test_a_smaller_limit_keeps_earlier_predictions(kitchen, tmp_path):
    assert run_cli(kitchen, tmp_path, "--limit", 6)[str(FRAMES)]["n"] == 6
    assert run_cli(kitchen, tmp_path, "--limit", 3)[str(FRAMES)]["n"] == 3
    ids = [r["id"] for r in data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")[:6]]
    assert [p["id"] for p in predictions(tmp_path)] == ids


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--sap", "--benchmark", "train_mqa.jsonl"]], ids=["rows", "sap_videos"])
def test_two_ranks_match_one(kitchen, tmp_path, extra):
    extra = [str(kitchen / e) if e.endswith(".jsonl") else e for e in extra]
    one = run_cli(kitchen, tmp_path / "one", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), "--base", "tiny", "--annotations", str(kitchen), "--out", str(tmp_path / "two"),
           "--frames", str(FRAMES), "--num-workers", "0", *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    p1, p2 = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert [p["id"] for p in p1] == [p["id"] for p in p2]
    for a, b in zip(p1, p2):  # batches differ across ranks, so padding does too: scores agree to rounding
        assert a["choice"] == b["choice"] and a.get("priors") == b.get("priors")
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)
    assert two == one
    assert not list((tmp_path / "two" / f"frames{FRAMES}").glob("predictions.rank*"))
