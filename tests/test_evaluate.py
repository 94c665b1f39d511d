"""evaluate.py on a toy kitchen with the random-init tiny model (--ckpt tiny): what the CLI writes must equal what
independent forwards give, survive a kill, a second process and bad inputs, agree across ranks, and count what
it skips."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import mine
import model as model_lib
import structured

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
def tiny():
    """The model --ckpt tiny builds (seeded random init, no action token), for independent references."""
    return model_lib.load_for_eval("tiny", torch.device("cpu"))


def run_cli(kitchen, out, *argv, ckpt="tiny"):
    """`python evaluate.py ...` in this process; returns metrics.json."""
    evaluate.main(["--ckpt", str(ckpt), "--annotations", str(kitchen), "--out", str(out), "--frames", str(FRAMES),
                   "--num-workers", "0", *map(str, argv)])
    return json.loads((Path(out) / "metrics.json").read_text())


def predictions(out, frames=FRAMES):
    return data.read_jsonl(Path(out) / f"frames{frames}" / "predictions.jsonl")


def prompt_logprobs(model, video_root, row, question, continuation=()):
    """One unpadded prompt (plus a continuation) built here from data.py's pieces, fp32 log-probs at each position."""
    size = (model.spec.size, model.spec.size)  # decoded at the tower's size, as TaskDataset does
    frames, _ = data.load_clip(video_root, row["video_id"], row["start"], row["end"], FRAMES, size=size)
    ids, _ = data.encode_conversation(model.tokenizer, question, None, model.spec.video_tokens(FRAMES),
                                      model.cfg.action_tokens)
    ids = torch.tensor([ids + list(continuation)])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=data.preprocess_frames(
        frames, model.spec.size, model.spec.mean, model.spec.std)[None])
    with torch.no_grad():
        h = model.llava.model(**model.lm_inputs(batch)).last_hidden_state
        return model.llava.lm_head(h)[0].float().log_softmax(-1), len(ids[0]) - len(continuation)


def test_mqa_matches_independent_forwards(kitchen, tiny, tmp_path):
    out = tmp_path / "mqa"
    metrics = run_cli(kitchen, out, "--frames", 2, FRAMES)
    assert set(metrics) == {"2", str(FRAMES)}  # one entry per --frames setting
    args = json.loads((out / "args.json").read_text())
    assert args["video_root"] == str(kitchen / "videos") and args["frames"] == [2, FRAMES]
    assert args["prompt_style"] == "official" and args["time_prompt"] is False  # tiny's own
    rows, preds = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl"), predictions(out)
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    letters = tiny.tokenizer.convert_tokens_to_ids(list("ABCDE"))
    for row, pred in zip(rows, preds):  # a forward per sample, no padding, no batching, the official question
        lp, n = prompt_logprobs(tiny, kitchen / "videos", row, data.mqa_question(row["options"]))
        reference = lp[n - 1, letters].log_softmax(-1)
        assert pred["choice"] == int(reference.argmax()), row["id"]
        np.testing.assert_allclose(pred["option_scores"], reference.numpy(), atol=1e-4)
        assert pred["pred_action"] == row["option_actions"][pred["choice"]]
        assert pred["pred_text"] == row["options"][pred["choice"]]
    m, n = metrics[str(FRAMES)], len(rows)
    correct = np.array([p["choice"] == r["answer_index"] for p, r in zip(preds, rows)])
    assert m["n"] == n and m["accuracy"] == pytest.approx(correct.mean()) and m["scoring"] == "letter"
    assert m["action_top1"] == pytest.approx(correct.mean())  # options are distinct actions
    assert abs(m["accuracy"] - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n)  # a random model is at chance (1 in 5)


def test_questions_are_asked_as_the_checkpoint_was_trained(kitchen, tmp_path):
    """Prompt style and perspective come from the checkpoint's action.json unless a flag says otherwise."""
    ann = data.load_annotations(kitchen)
    trained = model_lib.load_model("tiny", action_tokens=1, n_verbs=len(ann.vocab.verbs), n_nouns=len(ann.vocab.nouns),
                                   n_actions=len(ann.vocab), prompt_style="paper", perspective="allo")
    trained.save(tmp_path / "ckpt")
    run_cli(kitchen, tmp_path / "out", "--limit", 2, ckpt=tmp_path / "ckpt")
    args = json.loads((tmp_path / "out" / "args.json").read_text())
    assert (args["prompt_style"], args["perspective"]) == ("paper", "allo")
    letters = trained.tokenizer.convert_tokens_to_ids(list("ABCDE"))
    for row, pred in zip(data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl"), predictions(tmp_path / "out")):
        question = data.mqa_question(row["options"], "paper", "allo")
        lp, n = prompt_logprobs(trained.eval(), kitchen / "videos", row, question)
        np.testing.assert_allclose(pred["option_scores"], lp[n - 1, letters].log_softmax(-1).numpy(), atol=1e-4)
    run_cli(kitchen, tmp_path / "ego", "--limit", 1, "--perspective", "ego", ckpt=tmp_path / "ckpt")
    assert json.loads((tmp_path / "ego" / "args.json").read_text())["perspective"] == "ego"


def test_text_scoring_picks_the_likeliest_option_text(kitchen, tiny, tmp_path):
    run_cli(kitchen, tmp_path, "--score", "text", "--limit", 4)
    rows = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")[:4]
    for row, pred in zip(rows, predictions(tmp_path)):
        means = []
        for text in row["options"]:  # a full forward per option: mean log-prob of its tokens and <|im_end|>
            c = structured.candidate_token_ids(tiny.tokenizer, [text])[0]
            lp, n = prompt_logprobs(tiny, kitchen / "videos", row, data.mqa_question(row["options"]), c[:-1])
            means.append(lp[n - 1 + torch.arange(len(c)), c].mean().item())
        assert pred["choice"] == int(np.argmax(means))
        np.testing.assert_allclose(pred["option_scores"], means, atol=1e-4)
    assert json.loads((tmp_path / "metrics.json").read_text())[str(FRAMES)]["scoring"] == "text"


def test_generate_counts_answers_without_a_letter(kitchen, tmp_path):
    m = run_cli(kitchen, tmp_path, "--score", "generate", "--limit", 6)[str(FRAMES)]
    preds = predictions(tmp_path)
    assert all("generated" in p and "option_scores" not in p for p in preds)
    assert [p["choice"] for p in preds] == [structured.parse_letter(p["generated"], 5) for p in preds]
    assert m["unparsed"] == sum(p["choice"] < 0 for p in preds) and m["n"] == 6
    assert all(p["pred_action"] == -1 and not p["correct"] for p in preds if p["choice"] < 0)


def test_an_unparsed_answer_is_wrong_when_the_truth_is_not_an_option(kitchen):
    """mine.py --topk rows asked as MQA: the truth may be outside the options (answer_index -1), like no letter."""
    ann = data.load_annotations(kitchen)
    scores = mine.read_scores(kitchen / "scores" / "tim_validation.npz", ann, "validation")
    row = next(r for r in mine.mine(ann, "validation", scores, topk=2, text="label") if r["answer_index"] < 0)
    pred = evaluate.prediction_row(row, dict(bad=None, clamped=0), FRAMES, None, "no letter", ann.vocab, "mqa", None)
    assert pred["choice"] == -1 and pred["correct"] is False


@pytest.mark.parametrize("sap", [False, True], ids=["rows", "sap"])
def test_kill_and_resume_gives_the_same(kitchen, tmp_path, monkeypatch, sap, capsys):
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
    done = {p["id"] for p in data.read_jsonl(shard)}
    with open(shard, "a") as f:  # a kill between a prediction and its newline: it is cut off and made again
        f.write(json.dumps(next(p for p in predictions(tmp_path / "full") if p["id"] not in done)))
    calls.clear()
    monkeypatch.setattr(structured, "score_options", lambda *a: calls.append(len(a[1]["input_ids"])) or real(*a))
    capsys.readouterr()
    resumed = run_cli(kitchen, tmp_path / "resumed", *flags)
    n_rows = len(data.read_jsonl(bench))
    assert sum(calls) == n_rows - written  # only the unfinished samples were scored
    assert f"{written} predictions found, {n_rows - written} to go" in capsys.readouterr().out
    assert resumed == full
    assert predictions(tmp_path / "resumed") == predictions(tmp_path / "full")  # SAP: the same priors too
    assert not shard.exists()  # merged into predictions.jsonl


def test_resume_refuses_other_flags(kitchen, tmp_path, capsys):
    run_cli(kitchen, tmp_path, "--limit", 2)
    with pytest.raises(SystemExit) as e:
        run_cli(kitchen, tmp_path, "--limit", 2, "--time-prompt")
    assert e.value.code == 2
    assert f"{tmp_path} holds predictions made with --time-prompt False (now True)" in capsys.readouterr().err
    run_cli(kitchen, tmp_path, "--limit", 3, "--seed", 7)  # a flag mqa does not read: resumed, one more row
    assert len(predictions(tmp_path)) == 3
    with pytest.raises(SystemExit):
        run_cli(kitchen, tmp_path, "--limit", 3, "--score", "text")
    assert "--score letter (now text)" in capsys.readouterr().err
    bench = tmp_path / "bench.jsonl"  # a benchmark mined again at the same path: the same flags, other samples
    shutil.copy(kitchen / data.BENCHMARK, bench)
    run_cli(kitchen, tmp_path / "b", "--limit", 2, "--benchmark", bench)
    ann = data.load_annotations(kitchen)
    scores = mine.read_scores(kitchen / "scores" / "tim_validation.npz", ann, "validation")
    data.write_jsonl_atomic(bench, mine.mine(ann, "validation", scores, k=5, seed=1))
    with pytest.raises(SystemExit):
        run_cli(kitchen, tmp_path / "b", "--limit", 2, "--benchmark", bench)
    assert "holds predictions made with other samples (an input file changed)" in capsys.readouterr().err


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
    _, before = data.previous_actions(rows)
    differs = 0
    for k, r in enumerate(rows):
        p = by_id[r["id"]]
        if k not in before:
            assert "priors" not in p and "seconds ago" not in prompt[r["id"]]
            continue
        prior_rows = [rows[j] for j in before[k]]
        assert p["priors"] == [[pytest.approx(r["start"] - b["start"], abs=1e-3), by_id[b["id"]]["pred_text"]]
                               for b in prior_rows]
        for t, text in p["priors"]:
            assert f"{round(t, 2)} seconds ago, you started an action {text}." in prompt[r["id"]]
        differs += any(by_id[b["id"]]["pred_text"] != b["options"][b["answer_index"]] for b in prior_rows)
    assert differs > 0 and len(before) > 40  # the priors are predictions, not the true actions


def test_two_stage_predicts_within_top_k_from_shuffled_options(kitchen, tmp_path):
    m = run_cli(kitchen, tmp_path, "--mode", "two_stage", "--topk", 20)[str(FRAMES)]
    ann = data.load_annotations(kitchen)
    scores = mine.read_scores(kitchen / "scores" / "tim_validation.npz", ann, "validation")
    top, truth = mine.ranked_top(scores, 20), np.array([s.action_class for s in ann.segments("validation")])
    preds = predictions(tmp_path)
    assert len(preds) == len(truth)
    for p, t in zip(preds, top):
        ranks = p["option_ranks"]
        assert sorted(ranks) == list(range(20)) and ranks != list(range(20))  # shuffled before lettering
        assert p["pred_action"] == t[ranks[p["choice"]]] and len(p["option_scores"]) == 20
        assert p["pred_text"] == ann.vocab.labels[p["pred_action"]]  # --text label
        assert tuple(ann.vocab.pairs[p["pred_action"]]) == (p["pred_verb"], p["pred_noun"])
        assert p["recognizer_top1"] == t[0]
    assert m["accuracy"] == m["action_top1"] == pytest.approx(np.mean([p["pred_action"] for p in preds] == truth))
    assert m["recognizer_top1"] == pytest.approx(np.mean(top[:, 0] == truth))
    assert m["topk_recall"] == pytest.approx(np.mean((top == truth[:, None]).any(1))) and m["options"] == 20
    candidates = tmp_path / "candidates.jsonl"  # mine.py --topk's file, by default, gives the same rows and predictions
    mine.main(["--model", "tim", "--annotations", str(kitchen), "--topk", "20", "--out", str(candidates)])
    got = run_cli(kitchen, tmp_path / "c", "--mode", "two_stage", "--candidates", candidates)
    assert got[str(FRAMES)]["accuracy"] == m["accuracy"]
    assert predictions(tmp_path / "c") == preds


def test_an_always_a_model_scores_one_in_k_not_the_recognizers_top1(kitchen, tmp_path, monkeypatch):
    """In rank order the truth would be option A about half the time; shuffled, the letters share it evenly."""
    many = tmp_path / "many"
    many.mkdir()
    for name in (data.VERB_FILE, data.NOUN_FILE, data.SPLIT_FILES["train"]):
        shutil.copy(kitchen / name, many / name)
    head, *lines = (kitchen / "EPIC_100_validation.csv").read_text().splitlines()
    rows = [line.replace("P03_01_", f"P03_{r:02d}_", 1).replace(",P03_01,", f",P03_{r:02d},", 1)
            for r in range(70) for line in lines]
    (many / "EPIC_100_validation.csv").write_text("\n".join([head, *rows]) + "\n")
    ann = data.load_annotations(many)
    segs = ann.segments("validation")
    scores = data.simulate_recognizer(segs, ann.vocab, "tim", np.random.default_rng(0))
    np.savez(many / "tim.npz", ids=np.array([s.id for s in segs]), scores=scores)
    args = Namespace(candidates=None, split="validation", scores=many / "tim.npz", topk=20, text="label", seed=0,
                     trust_pickle=False)
    shuffled = evaluate.two_stage_rows(ann, args)
    found = [r["answer_index"] for r in shuffled if r["answer_index"] >= 0]
    assert len(found) >= 1000 and max(np.bincount(found, minlength=20)) <= 1.5 / 20 * len(found)
    in_rank_order = mine.mine(ann, "validation", scores, topk=20, text="label")
    top1 = np.mean([r["answer_index"] == 0 for r in in_rank_order])
    always_a = np.mean([r["answer_index"] == 0 for r in shuffled])
    assert top1 > 0.3 and abs(always_a - len(found) / len(shuffled) / 20) < 0.02  # about recall / K
    narrated = [[sorted(r["options"]) for r in evaluate.two_stage_rows(ann, Namespace(**{
        **vars(args), "text": "narration", "seed": seed}))] for seed in (0, 0, 1)]
    assert narrated[0] == narrated[1] and narrated[0] != narrated[2]  # --seed draws the narrations, not only the order
    monkeypatch.setattr(structured, "score_options", lambda model, batch, n: torch.tensor([[0.0] + [-9.0] * (n - 1)]
                                                                                          * len(batch["input_ids"])))
    m = run_cli(kitchen, tmp_path / "cli", "--mode", "two_stage", "--topk", 20)[str(FRAMES)]
    preds = predictions(tmp_path / "cli")
    assert all(p["choice"] == 0 for p in preds)
    assert m["accuracy"] == pytest.approx(np.mean([p["answer_index"] == 0 for p in preds]))
    assert m["accuracy"] < m["recognizer_top1"]


def test_multi_round_picks_the_most_likely_label(kitchen, tiny, tmp_path):
    run_cli(kitchen, tmp_path, "--mode", "multi_round", "--limit", 2)
    ann = data.load_annotations(kitchen)
    candidates = structured.candidate_token_ids(tiny.tokenizer, ann.vocab.labels)
    for seg, pred in zip(ann.segments("validation"), predictions(tmp_path)):
        means = []
        for cand in candidates:  # a full forward per label: mean log-prob of its tokens, <|im_end|> included
            lp, n = prompt_logprobs(tiny, kitchen / "videos", vars(seg), data.direct_question(), cand[:-1])
            means.append(lp[n - 1 + torch.arange(len(cand)), cand].mean().item())
        best = np.argsort(means)[::-1][:5]
        assert pred["pred_action"] == best[0] and [a for a, _ in pred["top5"]] == best.tolist()
        np.testing.assert_allclose([s for _, s in pred["top5"]], np.array(means)[best], atol=1e-4)
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
    preds += [dict(id="gone_1", bad="FileNotFoundError: video gone"),
              dict(id="gone_2", bad=f"RuntimeError: clip 9.00-10.00 s of P01 {data.PAST_END} (8.00 s)")]
    ratings = {p["id"]: ("easy" if i % 3 else "hard") for i, p in enumerate(preds[:40])}
    m = evaluate.compute_metrics(preds, ann.vocab, tails, ratings)
    good = preds[:-2]
    n = len(good)
    assert m["n"] == n and m["skipped_bad"] == 2
    assert m["skipped_by_reason"] == {"unreadable": 1, "past the video's end": 1}
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
            assert c["n"] == sum(p[f"{key}_class"] == keys.index(name) for p in good)
    (kitchen / "ratings.csv").write_text("narration_id,level\n" + "".join(f"{k},{v}\n" for k, v in ratings.items()))
    (kitchen / "ratings.json").write_text(json.dumps(ratings))
    assert evaluate.read_ratings(kitchen / "ratings.csv") == evaluate.read_ratings(kitchen / "ratings.json") == ratings
    levels = m["by_difficulty"]
    assert sum(c["n"] for c in levels.values()) == n and levels["unrated"]["n"] == n - 40
    assert sum(c["correct"] for c in levels.values()) == round(m["accuracy"] * n)


def test_skipped_videos_are_retried_once_restored(kitchen, tmp_path, capsys):
    """--skip-bad records why; the same command after the video is back completes the evaluation."""
    videos = shutil.copytree(kitchen / "videos", tmp_path / "videos")
    flags = ["--video-root", videos, "--limit", 10]
    with pytest.raises(FileNotFoundError, match=r"P03_01 not found under .*videos.*--skip-bad"):
        (videos / "P03_01.mp4").rename(tmp_path / "away.mp4")
        run_cli(kitchen, tmp_path / "strict", *flags)
    assert not (tmp_path / "strict" / "metrics.json").exists()
    m = run_cli(kitchen, tmp_path / "skip", *flags, "--skip-bad")[str(FRAMES)]
    assert m["n"] == 0 and m["skipped_bad"] == 10 and m["skipped_by_reason"] == {"unreadable": 10}
    assert all(p["bad"].startswith("FileNotFoundError: video P03_01 not found") for p in predictions(tmp_path / "skip"))
    (tmp_path / "away.mp4").rename(videos / "P03_01.mp4")
    capsys.readouterr()
    fixed = run_cli(kitchen, tmp_path / "skip", *flags, "--skip-bad")
    assert "0 predictions found, 10 to go (10 skipped before, retried)" in capsys.readouterr().out
    clean = run_cli(kitchen, tmp_path / "clean", *flags)
    assert fixed == clean and predictions(tmp_path / "skip") == predictions(tmp_path / "clean")


def test_a_clip_past_the_end_is_a_bad_sample_with_its_reason(kitchen, tmp_path, capsys):
    rows = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")[:4]
    rows[1].update(start=900.0, end=902.0)  # the video is about 60 s long
    rows[2]["end"] += 400.0  # a partial overrun: clamped and counted
    data.write_jsonl_atomic(tmp_path / "bench.jsonl", rows)
    with pytest.raises(RuntimeError, match=r"clip 900\.00-902\.00 s of P03_01 starts after the video ends"):
        run_cli(kitchen, tmp_path / "strict", "--benchmark", tmp_path / "bench.jsonl")
    capsys.readouterr()
    m = run_cli(kitchen, tmp_path / "skip", "--benchmark", tmp_path / "bench.jsonl", "--skip-bad")[str(FRAMES)]
    assert m["n"] == 3 and m["skipped_by_reason"] == {"past the video's end": 1} and m["clamped_frames"] >= 3
    assert f"1 skipped (1 past the video's end), {m['clamped_frames']} frames clamped" in capsys.readouterr().out


def test_bad_inputs_write_nothing_and_the_corrected_run_runs(kitchen, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"missing_ckpt: no such folder, and not an alias"):
        run_cli(kitchen, out, ckpt=tmp_path / "missing_ckpt")
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_ckpt holds no config.json"):
        run_cli(kitchen, out, ckpt=empty)
    with pytest.raises(ValueError, match="scores of split 'train'"):
        run_cli(kitchen, out, "--mode", "two_stage", "--scores", kitchen / "scores" / "tim_train.npz")
    with pytest.raises(ValueError, match="need 2 to 26 options"):
        run_cli(kitchen, out, "--mode", "two_stage", "--topk", 999)
    with pytest.raises(SystemExit):
        run_cli(kitchen, out, "--limit", 0)
    with pytest.raises(SystemExit):  # a flag that would be ignored is refused
        run_cli(kitchen, out, "--mode", "two_stage", "--candidates", kitchen / "c.jsonl", "--scores", kitchen / "s.npz")
    assert "pass it, or --scores and --text, not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the file's texts are what is scored
        run_cli(kitchen, out, "--mode", "two_stage", "--candidates", kitchen / "c.jsonl", "--text", "narration")
    assert "their texts (mine.py --topk --text)" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no_ratings.csv"):
        run_cli(kitchen, out, "--ratings", tmp_path / "no_ratings.csv")
    with pytest.raises(ValueError, match=r"expected mine\.py --topk's candidate rows"):  # the benchmark: truth added
        run_cli(kitchen, out, "--mode", "two_stage", "--candidates", kitchen / data.BENCHMARK)
    top5 = tmp_path / "top5.jsonl"
    mine.main(["--annotations", str(kitchen), "--topk", "5", "--out", str(top5)])
    with pytest.raises(ValueError, match=r"top5\.jsonl holds each row's top 5, not --topk 20"):
        run_cli(kitchen, out, "--mode", "two_stage", "--candidates", top5, "--topk", 20)
    with pytest.raises(FileNotFoundError, match=r"no_top\.jsonl does not exist; write it first: .* --topk 20"):
        run_cli(kitchen, out, "--mode", "two_stage", "--candidates", tmp_path / "no_top.jsonl")
    pickled = tmp_path / "tim.pkl"  # the authors' score format: refused unless trusted, then read
    pickled.write_bytes(pickle.dumps(dict(np.load(kitchen / "scores" / "tim_validation.npz"))))
    with pytest.raises(ValueError, match="pass --trust-pickle"):
        run_cli(kitchen, out, "--mode", "two_stage", "--scores", pickled)
    drawn_twice = tmp_path / "drawn_twice.jsonl"  # a training file mined twice: the same segments again
    data.write_jsonl_atomic(drawn_twice, data.read_jsonl(kitchen / data.BENCHMARK)[:3] * 2)
    with pytest.raises(ValueError, match=r"drawn_twice\.jsonl: 3 ids repeat"):
        run_cli(kitchen, out, "--benchmark", drawn_twice)
    assert not out.exists() and not (tmp_path / "missing_ckpt").exists()  # nothing written, nothing to block
    m = run_cli(kitchen, out, "--mode", "two_stage", "--topk", 5)[str(FRAMES)]  # the corrected command
    assert m["n"] == 30 and m["options"] == 5
    run_cli(kitchen, tmp_path / "c5", "--mode", "two_stage", "--candidates", top5)  # N from the file, as recorded
    saved = json.loads((tmp_path / "c5" / "args.json").read_text())
    assert saved["topk"] == 5 and saved["scores"] is None and saved["text"] is None  # the file decided them
    pm = run_cli(kitchen, tmp_path / "p5", "--mode", "two_stage", "--topk", 5, "--scores", pickled, "--trust-pickle")
    assert pm[str(FRAMES)]["accuracy"] == m["accuracy"]  # the same scores, read from a pickle


def test_an_empty_split_stops_before_writing(kitchen, tmp_path):
    root = shutil.copytree(kitchen, tmp_path / "toy", ignore=shutil.ignore_patterns("videos"))
    header = (root / "EPIC_100_validation.csv").read_text().splitlines()[0]
    (root / "EPIC_100_validation.csv").write_text(header + "\n")
    with pytest.raises(ValueError, match="EPIC_100_validation.csv has a header but no rows"):
        run_cli(root, tmp_path / "out", "--mode", "multi_round")
    assert not (tmp_path / "out").exists()


def test_frames_settings_one_after_another_both_stay(kitchen, tmp_path):
    run_cli(kitchen, tmp_path, "--limit", 3, "--frames", 2)
    assert set(run_cli(kitchen, tmp_path, "--limit", 3)) == {"2", str(FRAMES)}


def test_a_second_process_is_refused_while_the_first_completes(kitchen, tmp_path):
    """Synchronised on files, not on sleeps: the first run holds its scoring until the test releases it."""
    out, go = tmp_path / "out", tmp_path / "go"
    script = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import evaluate, structured
real = structured.score_options
def held(*a):
    while not __import__("os").path.exists({str(go)!r}):
        time.sleep(0.05)
    return real(*a)
structured.score_options = held
evaluate.main(["--ckpt", "tiny", "--annotations", {str(kitchen)!r}, "--out", {str(out)!r}, "--frames", "{FRAMES}",
               "--num-workers", "0"])
"""
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for _ in range(1200):  # the lock file names its holder once it is held
            if (out / ".lock").exists() and f"pid {first.pid}" in (out / ".lock").read_text():
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {first.pid}: "):
            run_cli(kitchen, out, "--limit", 24)
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert len(predictions(out)) == 30 and json.loads((out / "metrics.json").read_text())[str(FRAMES)]["n"] == 30


def test_trained_checkpoint_keeps_its_action_token(kitchen, tmp_path, capsys):
    """A checkpoint with heads is evaluated with its action token in the prompt, as it was trained."""
    vocab = data.load_annotations(kitchen).vocab
    trained = model_lib.load_model("tiny", action_tokens=1, n_verbs=len(vocab.verbs), n_nouns=len(vocab.nouns),
                                   n_actions=len(vocab))
    with torch.no_grad():
        trained.action_embeds.normal_(0, 3)
    trained.save(tmp_path / "ckpt")
    run_cli(kitchen, tmp_path / "out", "--limit", 4, ckpt=tmp_path / "ckpt")
    loaded = model_lib.load_for_eval(tmp_path / "ckpt", torch.device("cpu"))
    rows = data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")
    assert loaded.cfg.action_tokens == 1
    letters = loaded.tokenizer.convert_tokens_to_ids(list("ABCDE"))
    for row, pred in zip(rows, predictions(tmp_path / "out")):
        lp, n = prompt_logprobs(loaded, kitchen / "videos", row, data.mqa_question(row["options"]))
        np.testing.assert_allclose(pred["option_scores"], lp[n - 1, letters].log_softmax(-1).numpy(), atol=1e-4)
    trained.save(tmp_path / "ckpt")  # re-exported (a resumed training): the old predictions are not its own
    with pytest.raises(SystemExit) as e:
        run_cli(kitchen, tmp_path / "out", "--limit", 4, ckpt=tmp_path / "ckpt")
    assert e.value.code == 2 and len(predictions(tmp_path / "out")) == 4
    assert "holds predictions made with the checkpoint's weights as they were then" in capsys.readouterr().err


def test_a_stale_skipped_row_never_hides_a_prediction(tmp_path):
    """A multi-rank run killed before merging left a skipped row in one shard; the rerun predicted the sample on
    another rank: whatever the file order, the prediction counts."""
    good, bad = {"id": "a", "choice": 1}, {"id": "a", "bad": "RuntimeError: cannot read"}
    for first, second in (("rank0", "rank1"), ("rank1", "rank0"), ("rank10", "rank2")):
        folder = tmp_path / first
        data.write_jsonl_atomic(folder / f"predictions.{first}.jsonl", [good])
        data.write_jsonl_atomic(folder / f"predictions.{second}.jsonl", [bad])
        assert evaluate.read_predictions(folder) == {"a": good}


def test_a_smaller_limit_keeps_earlier_predictions(kitchen, tmp_path):
    assert run_cli(kitchen, tmp_path, "--limit", 6)[str(FRAMES)]["n"] == 6
    assert run_cli(kitchen, tmp_path, "--limit", 3)[str(FRAMES)]["n"] == 3
    ids = [r["id"] for r in data.read_jsonl(kitchen / "ek100_mqa_tim_k5.jsonl")[:6]]
    assert [p["id"] for p in predictions(tmp_path)] == ids


def plot_height(bars):
    return evaluate.PLOT_HEADER + evaluate.PLOT_ROW * bars + 8


def test_plot_writes_pngs_of_the_expected_size(tmp_path, capsys):
    """evaluate.py's layout: one entry per --frames setting, classes as {name: {n, correct, accuracy}}."""
    setting = {"accuracy": 0.5,
               "per_verb": {"take": {"n": 10, "correct": 8, "accuracy": 0.8}, "cut": {"n": 4, "correct": 1,
                            "accuracy": 0.25}, "wash": {"n": 1, "correct": 0, "accuracy": 0.0}},
               "per_noun": {"plate": {"n": 2, "correct": 2, "accuracy": 1.0}},
               "by_difficulty": {"1": {"n": 5, "correct": 4, "accuracy": 0.8}, "2": {"n": 5, "correct": 1,
                                 "accuracy": 0.2}}}
    (tmp_path / "metrics.json").write_text(json.dumps({"8": setting, "16": {"accuracy": 0.4}}))
    evaluate.main(["--plot", str(tmp_path / "metrics.json")])
    log = capsys.readouterr().out
    assert "frames 16 has no 'per_verb'" in log  # missing keys tolerated
    written = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in written] == ["by_difficulty_frames8.png", "per_noun_frames8.png", "per_verb_frames8.png"]
    for path, bars in zip(written, (2, 1, 3)):
        assert Image.open(path).size == (evaluate.PLOT_WIDTH, plot_height(bars))
    del setting["by_difficulty"]  # a single setting without the frames level, as compute_metrics returns it
    (tmp_path / "one.json").write_text(json.dumps(setting))
    written = evaluate.plot_metrics(tmp_path / "one.json", tmp_path / "one")
    assert [p.name for p in written] == ["per_verb.png", "per_noun.png"]


def test_plot_reads_what_evaluate_writes(tmp_path):
    vocab = data.ActionVocab(["take", "cut"], ["plate", "cup", "pan"], np.array([[0, 0], [1, 1], [1, 2]]))
    assert vocab.labels == ["take plate", "cut cup", "cut pan"]
    preds = [dict(id=str(i), correct=i % 2 == 0, pred_verb=v, pred_noun=n, pred_action=0, verb_class=v,
                  noun_class=n if i % 3 else 0, action_class=0, clamped=0)
             for i, (v, n) in enumerate([(0, 0), (1, 1), (1, 2), (0, 0), (1, 2)])]
    ratings = {"0": "1", "1": "1", "2": "3", "3": "3", "4": "5"}
    (tmp_path / "metrics.json").write_text(json.dumps({"8": evaluate.compute_metrics(preds, vocab, ratings=ratings)}))
    written = evaluate.plot_metrics(tmp_path / "metrics.json", tmp_path)
    assert [Image.open(p).size[1] for p in written] == [plot_height(2), plot_height(3), plot_height(3)]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--sap", "--benchmark", "train_mqa.jsonl"]], ids=["rows", "sap_videos"])
def test_two_ranks_match_one(kitchen, tmp_path, extra):
    extra = [str(kitchen / e) if e.endswith(".jsonl") else e for e in extra]
    one = run_cli(kitchen, tmp_path / "one", *extra)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "evaluate.py"), "--ckpt", "tiny", "--annotations", str(kitchen), "--out", str(tmp_path / "two"),
           "--frames", str(FRAMES), "--num-workers", "0", *extra]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    p1, p2 = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert [p["id"] for p in p1] == [p["id"] for p in p2]
    for a, b in zip(p1, p2):  # batches differ across ranks, so padding does too: scores agree to rounding
        assert a["choice"] == b["choice"] and a.get("priors") == b.get("priors")
        np.testing.assert_allclose(a["option_scores"], b["option_scores"], atol=1e-4)
    assert two == one
    assert not list((tmp_path / "two" / f"frames{FRAMES}").glob("predictions.rank*"))
