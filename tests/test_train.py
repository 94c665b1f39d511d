"""train.py end to end on a small toy kitchen: it learns, ranks agree, and --resume continues exactly."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate
import train
from model import load_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
# a small config: 4 frames, micro-batches of 4, every step logged, no DataLoader workers
SMALL = ["--data", "toy", "--frames", "4", "--batch-size", "8", "--grad-accum", "2", "--num-workers", "0",
         "--log-every", "1", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def toy(toy_root, tmp_path_factory):
    """A writable copy of the session's toy kitchen: train.py mines its MQA files into it."""
    return shutil.copytree(toy_root, tmp_path_factory.mktemp("train") / "toy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*flags, nproc=None, check=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(free_port())] if nproc else [sys.executable])
    p = subprocess.run([*launcher, str(ROOT / "train.py"), *map(str, flags)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in log(run_dir) if "loss" in r}


def final_weights(run_dir):
    """The exported model, loaded as evaluate.py does."""
    return load_model(run_dir).state_dict()

# -----------------------------------------------------------------------------
# config, batches and schedule (in-process, fast)


def test_flags_win_over_the_resumed_run_over_the_preset_over_the_defaults(tmp_path):
    args, preset = train.resolve_args(["--data", "toy", "--annotations", str(tmp_path), "--lr", "1e-5"])
    assert args.lr == 1e-5 and "lr" not in preset and args.lr_vision == preset["lr_vision"] != 2e-6
    assert args.base == "tiny" and args.video_root == str(tmp_path / "videos") and args.frames == 8
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps(dict(vars(args), frames=4, lr_vision=7e-4, out="elsewhere")))
    resumed, preset = train.resolve_args(["--resume", str(run), "--lr-vision", "3e-4"])
    assert (resumed.frames, resumed.lr_vision, resumed.lr, resumed.out) == (4, 3e-4, 1e-5, str(run))
    assert "frames" not in preset and preset["batch_size"] == 16
    given = ["--train-file", "mine.jsonl"]  # a given file replaces the preset's and the resumed run's, never adds
    assert train.resolve_args(["--data", "toy", "--annotations", str(tmp_path), *given])[0].train_file == given[1:]
    assert train.resolve_args(["--resume", str(run), *given])[0].train_file == given[1:]
    assert resumed.train_file == args.train_file  # none given: the resumed run's
    args, _ = train.resolve_args(["--annotations", "A", "--train-file", "x.jsonl,y.jsonl", "--train-file", "z.jsonl"])
    assert args.train_file == ["x.jsonl", "y.jsonl", "z.jsonl"] and args.lr == 1e-5 and args.batch_size == 64
    assert args.prompt_style is None and args.temporal == "paper"  # the base's own style; the paper's temporal form
    assert args.supervise == "official"  # the release's LM targets, except in the toy preset
    old = {k: v for k, v in vars(args).items() if k != "supervise"}  # a run saved before --supervise existed
    (run / "args.json").write_text(json.dumps(old))
    assert train.resolve_args(["--resume", str(run)])[0].supervise == "answers"  # resumed as it was trained


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    args, _ = train.resolve_args(["--annotations", "A", "--train-file", "x", "--batch-size", "8", "--grad-accum", "2"])
    one = train.epoch_batches(50, 3, 6, args, 0, 1, 0)
    two = [train.epoch_batches(50, 3, 6, args, r, 2, 0) for r in range(2)]
    assert len(one) == 12 and all(len(b) == 4 for b in one) and all(len(b) == 2 for b in two[0] + two[1])

    def step_samples(micro_batches, step, accum=2):
        return sum(micro_batches[accum * step:accum * (step + 1)], [])

    for step in range(6):  # each step's global batch is the same set of samples, wherever it lands
        assert sorted(step_samples(one, step)) == sorted(step_samples(two[0], step) + step_samples(two[1], step))
    assert train.epoch_batches(50, 3, 6, args, 0, 1, 4) == one[8:]  # resume: exactly the next micro-batches
    assert train.epoch_batches(50, 4, 6, args, 0, 1, 0) != one  # a new permutation each epoch


def test_schedule_warms_up_then_decays_to_zero_at_the_planned_end():
    lr = [train.lr_scale(s, 100, 10) for s in range(100)]
    assert lr[0] < lr[5] < lr[10] == 1.0 and all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] < 1e-3 and train.lr_scale(100, 100, 10) == 0.0

# -----------------------------------------------------------------------------
# end to end


def test_toy_run_learns(toy, tmp_path):
    """Loss falls and the heads beat chance on the training batches; MQA is evaluated before and after training
    on the whole benchmark, by letter and by option text, and the exported model is what evaluate.py loads and
    scores the same. (The tiny model needs far more steps than a test affords to beat chance on the letters.)"""
    out = tmp_path / "run"
    p = run(*SMALL, "--annotations", toy, "--out", out, "--max-steps", 40, "--eval-every", 40, "--lr", "3e-3")
    records = log(out)
    steps = [r for r in records if "loss" in r]
    evals = {r["step"]: r for r in records if "mqa_letter" in r}
    first, last = np.mean([r["loss"] for r in steps[:5]]), np.mean([r["loss"] for r in steps[-5:]])
    assert last < 0.5 * first, (first, last)
    assert np.mean([r["verb_acc"] for r in steps[-10:]]) > 2 / 6
    assert np.mean([r["noun_acc"] for r in steps[-10:]]) > 2 / 8
    n_questions = len((Path(toy) / "ek100_mqa_tim_k5.jsonl").read_text().splitlines())
    assert sorted(evals) == [0, 40] and all(e["eval_n"] == n_questions for e in evals.values())
    assert "by option text" in p.stdout and "expect the option texts well above chance" in p.stdout
    assert (out / "step_40" / "train_state.json").exists()
    for score in ("letter", "text"):  # evaluate.py on the export agrees with the in-training check
        evaluate.main(["--ckpt", str(out), "--annotations", str(toy), "--frames", "4", "--num-workers", "0",
                       "--score", score, "--out", str(tmp_path / score)])
        m = json.loads((tmp_path / score / "metrics.json").read_text())["4"]
        assert m["accuracy"] == pytest.approx(evals[40][f"mqa_{score}"]) and m["prompt_style"] == "official"
    assert all(k in steps[-1] for k in ("lm_loss", "verb_loss", "noun_loss", "action_loss", "lr", "lr_vision",
                                        "tokens_per_s", "samples_per_s", "bad_videos", "clamped_frames"))
    assert json.loads((out / "args.json").read_text())["frames"] == 4
    trained = final_weights(out)  # the export holds the trained weights, not the initial ones
    initial = load_model("tiny", action_tokens=1, n_verbs=6, n_nouns=8,
                         n_actions=len(trained["action_head.weight"])).state_dict()
    assert trained.keys() == initial.keys()
    assert not torch.equal(trained["llava.lm_head.weight"], initial["llava.lm_head.weight"])


def test_resume_continues_with_the_same_losses(toy, tmp_path):
    flags = [*SMALL, "--annotations", toy, "--max-steps", 6, "--lr", "3e-3"]
    run(*flags, "--out", tmp_path / "straight")
    p = run(*flags, "--out", tmp_path / "split", "--stop-after", 3)
    assert "--resume" in p.stdout and not (tmp_path / "split" / "config.json").exists()
    state = json.loads((tmp_path / "split" / "step_3" / "train_state.json").read_text())
    assert state["step"] == 3 and state["step_in_epoch"] == 3
    p = run(*flags, "--out", tmp_path / "split", check=False)  # a fresh run would strand step_3
    assert p.returncode != 0 and "--resume" in p.stderr and "step_3" in p.stderr
    p = run("--resume", tmp_path / "split", "--head-bias", check=False)  # the checkpoint has no head biases
    assert p.returncode != 0 and not json.loads((tmp_path / "split" / "args.json").read_text())["head_bias"]
    run("--resume", tmp_path / "split", "--out", tmp_path / "moved")  # continues in another folder
    run("--resume", tmp_path / "split", "--out", tmp_path / "faster", "--lr", "1e-2")  # a flag wins over the optimizer
    lr = {r["step"]: r["lr"] for r in log(tmp_path / "faster") if "lr" in r}
    assert lr[4] == pytest.approx(1e-2 * train.lr_scale(3, 6, 0))
    run("--resume", tmp_path / "split")  # its own flags: the failed --head-bias resume changed none
    straight = losses(tmp_path / "straight")
    for folder in ("split", "moved"):
        split = losses(tmp_path / folder)
        assert sorted(split) == list(range(1, 7))
        assert all(abs(straight[s] - split[s]) < 1e-5 for s in straight), (folder, straight, split)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(toy, tmp_path, parallel):
    """torchrun (gloo): same global batches, so the same losses and weights as one process; a rank that drifted
    would change the all-reduced losses, a wrong gradient scale the weights. Also resumes from DCP shards; FSDP
    also evaluates in place, before the first step too (when its root has not run yet). With the release's LM
    targets, whose count per rank differs more than the answers'."""
    evals = [0, 2, 4] if parallel == "fsdp" else [4]  # the end's evaluation always
    flags = [*SMALL, "--annotations", toy, "--max-steps", 4, "--lr", "3e-3", "--supervise", "official"] + [
        "--eval-every", 2] * (parallel == "fsdp")
    run(*flags, "--out", tmp_path / "one")
    run(*flags, "--out", tmp_path / "two", "--parallel", parallel, "--stop-after", 2, nproc=2)
    run("--resume", tmp_path / "two", nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4] and all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    accuracy = [{r["step"]: (r["mqa_letter"], r["mqa_text"]) for r in log(tmp_path / d) if "mqa_letter" in r}
                for d in ("one", "two")]
    assert accuracy[0] == accuracy[1] and sorted(accuracy[0]) == evals
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1 if w1[k].is_floating_point())


@pytest.mark.slow
def test_fsdp_ranks_with_different_batches_match_one_model(toy_root):
    """A text-only micro-batch on one rank beside a video on the other, and an MQA check where one rank's clips all
    fail: FSDP's collectives still pair up across ranks, and losses and accuracies are the unsharded model's."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(ROOT / "tests" / "fsdp_uneven_ranks.py"), str(toy_root)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count(": ok") == 2, p.stdout[-2000:] + p.stderr[-4000:]


def test_missing_video_names_the_file_unless_skip_bad(toy, tmp_path):
    broken = shutil.copytree(toy, tmp_path / "toy")
    victim = sorted((broken / "videos").glob("*.mp4"))[0]
    victim.unlink()
    flags = [*SMALL, "--annotations", broken, "--max-steps", 2, "--out", tmp_path / "run"]
    p = run(*flags, check=False)
    assert p.returncode != 0 and victim.stem in p.stderr and "--skip-bad" in p.stderr
    run(*flags, "--skip-bad")
    assert [r for r in log(tmp_path / "run") if "loss" in r][-1]["bad_videos"] > 0


def test_bad_inputs_leave_no_run_folder(toy, tmp_path):
    p = run("--base", "no-such-model", "--annotations", toy, "--data", "toy", "--out", tmp_path / "run", check=False)
    assert p.returncode != 0 and "llava-video-7b" in p.stderr and "tiny" in p.stderr
    empty = shutil.copytree(toy, tmp_path / "empty", ignore=shutil.ignore_patterns("videos"))
    header = (empty / data.SPLIT_FILES["train"]).read_text().splitlines()[0]
    (empty / data.SPLIT_FILES["train"]).write_text(header + "\n")
    p = run(*SMALL, "--annotations", empty, "--out", tmp_path / "run", check=False)
    assert p.returncode != 0 and "EPIC_100_train.csv has a header but no rows" in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_converted_base_keeps_its_head_options(toy, tmp_path):
    """No head flag given: the run trains with what the base was trained with (here its supervised layers), and
    args.json and the exported action.json say so."""
    from conftest import make_next_checkpoint
    make_next_checkpoint(tmp_path / "next", action_tokens=0, vision_token_training="all_layers", torch_dtype="bfloat16")
    run(*SMALL, "--annotations", toy, "--base", tmp_path / "next", "--max-steps", 1, "--out", tmp_path / "run")
    trained = final_weights(tmp_path / "run")["llava.model.language_model.embed_tokens.weight"]
    assert (trained.bfloat16().float() != trained).float().mean() > 0.5  # fp32 weights, from a bf16 base
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    action = json.loads((tmp_path / "run" / "action.json").read_text())
    assert args["supervise_layer"] == action["supervise_layer"] == "all" and args["head_norm"] == "layers+1"
    assert args["video_layout"] == action["video_layout"] == "grid" and action["action_tokens"] == 1
    assert args["perspective"] == action["perspective"] == "ego"
