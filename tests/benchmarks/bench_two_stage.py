"""Two-stage evaluation: share of wall time spent outside the model forward (clip decoding, tokenising, collate,
Python), with clips decoded in the main process (--num-workers 0) and by DataLoader workers, side by side. The toy
set's clips are cycled to --clips, so that a worker's start-up is spread as over a real validation set.

    python tests/benchmarks/bench_two_stage.py                        # a fresh toy kitchen, tiny model, CPU
    python tests/benchmarks/bench_two_stage.py --annotations toy --frames 16 --num-workers 0 2 4

"Forward" is structured.score_options (the one prompt forward per batch and the letter log-softmax), timed
around the call with a device sync; everything else evaluate.predict does counts as outside.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import structured  # noqa: E402
from model import load_for_eval  # noqa: E402


def timed_forward(device, spent):
    """structured.score_options, adding its wall time to spent[0]; evaluate.predict looks it up at call time."""
    real = structured.score_options

    def score_options(model, batch, n_options):
        t = time.perf_counter()
        out = real(model, batch, n_options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t
        return out
    return score_options


def run(model, rows, vocab, args, workers, device):
    """(wall seconds, forward seconds) of one two-stage pass over rows."""
    spent = [0.0]
    structured.score_options = timed_forward(device, spent)
    batches = evaluate.plan_batches(rows, {}, 0, 1, args.batch_size, False, args.prompt_style)
    t = time.perf_counter()
    n = sum(1 for _ in evaluate.predict(model, rows, batches, args.frames, vocab, argparse.Namespace(
        **{**vars(args), "num_workers": workers}), {}))
    assert n == len(rows)
    return time.perf_counter() - t, spent[0]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", default=None, help="toy or EPIC root; default: a fresh toy kitchen (4+2 videos)")
    p.add_argument("--video-root", default=None, help="default {annotations}/videos")
    p.add_argument("--ckpt", default="tiny")
    p.add_argument("--random-init", action="store_true", help="with a real alias: its shapes, random weights")
    p.add_argument("--tokenizer", default=None, help="--random-init of a real alias: a tokenizer folder, or 'tiny'")
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--clips", type=int, default=960, help="evaluate this many clips (the toy clips, cycled)")
    p.add_argument("--repeats", type=int, default=2, help="passes per setting; the fastest one is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    root = Path(args.annotations or data.make_toy(Path(tempfile.mkdtemp()) / "toy", videos_per_split=(4, 2)))
    args.video_root = args.video_root or str(root / "videos")
    device = torch.device(args.device)
    ann = data.load_annotations(root)
    args.__dict__.update(mode="two_stage", score="letter", sap=False, skip_bad=False, candidates=None, split="validation",
                         scores=root / "scores" / "tim_validation.npz", text="label", seed=0, perspective="ego",
                         trust_pickle=False)
    model = load_for_eval(args.ckpt, device, args.random_init, args.tokenizer)
    args.prompt_style, args.time_prompt = model.cfg.prompt_style, model.cfg.time_instruction
    rows = evaluate.ask(evaluate.two_stage_rows(ann, args), args)
    rows = [dict(rows[i % len(rows)], id=f"{rows[i % len(rows)]['id']}#{i}") for i in range(args.clips)]
    vocab = ann.vocab
    run(model, rows[:args.batch_size], vocab, args, 0, device)  # warm-up: first-call allocations and kernel choice
    print(f"two-stage, {len(rows)} clips, top-{args.topk}, {args.frames} frames, batch {args.batch_size}, "
          f"{args.ckpt} on {device}, torch threads {torch.get_num_threads()}")
    print(f"{'workers':>8} {'wall s':>8} {'forward s':>10} {'outside':>8} {'clips/s':>8}")
    for workers in args.num_workers:
        wall, fwd = min((run(model, rows, vocab, args, workers, device) for _ in range(args.repeats)),
                        key=lambda r: r[0])
        print(f"{workers:>8} {wall:>8.2f} {fwd:>10.2f} {1 - fwd / wall:>8.1%} {len(rows) / wall:>8.1f}")
