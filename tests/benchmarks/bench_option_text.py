"""MQA by option text (evaluate.py --score text): structured.score_option_texts (one prefill per clip, the options
of the batch as one packed trie against the cached prompts) vs one full forward of video + prompt + option per
option, side by side in one run; both scores printed to show they are equal.

    python tests/benchmarks/bench_option_text.py                          # tiny model, CPU
    python tests/benchmarks/bench_option_text.py --ckpt llava-ov-0.5b --random-init --tokenizer tiny --frames 16 --device cuda
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import data  # noqa: E402
import model as M  # noqa: E402
import structured as S  # noqa: E402
from bench_multi_round import action_texts, clip_batch, model_flags, naive_scores, timed  # noqa: E402


def main():
    p = model_flags(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--clips", type=int, default=8, help="clips in the batch")
    p.add_argument("--options", type=int, default=5, help="options per question (5: EK100-MQA, 20: two-stage)")
    args = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.float32 if args.ckpt == "tiny" else torch.bfloat16
    with torch.device(args.device):
        model = M.load_model(args.ckpt, args.random_init, dtype, tokenizer=args.tokenizer, action_tokens=1).eval()
    texts = action_texts(args.clips * args.options)
    options = [texts[i * args.options:(i + 1) * args.options] for i in range(args.clips)]
    clips = [clip_batch(model, args.frames, args.device, data.mqa_question(o)) for o in options]
    items = [dict(index=i, input_ids=c["input_ids"][0].cpu(), labels=torch.full_like(c["input_ids"][0].cpu(), -100),
                  pixel_values_videos=c["pixel_values_videos"][0].cpu(), action_labels=torch.full((3,), -100),
                  clamped=0, bad=None) for i, c in enumerate(clips)]
    batch = data.collate(items, model.tokenizer.pad_token_id)
    S.score_option_texts(model, batch, options)  # warm-up
    runs = [timed(lambda: S.score_option_texts(model, batch, options), args.device) for _ in range(args.repeats)]
    packed, t_packed = runs[0][0], min(t for _, t in runs)

    def per_option():
        return torch.cat([naive_scores(model, c, S.candidate_token_ids(model.tokenizer, o)) for c, o in zip(clips, options)])

    naive, t_naive = timed(per_option, args.device)
    diff = (packed - naive).abs().max().item()
    tol = 1e-4 if args.ckpt == "tiny" else 5e-2
    print(f"{args.ckpt}: {args.clips} clips x {args.options} options, {args.frames} frames, prompts of "
          f"{batch['attention_mask'].sum(1).float().mean():.0f} tokens, on {args.device}")
    print(f"max |packed - per option| = {diff:.2e} (tolerance {tol:g}); same choices: "
          f"{bool((packed.argmax(1) == naive.argmax(1)).all())}")
    print(f"packed against cached prompts: {t_packed:.3f} s; a forward per option: {t_naive:.3f} s; "
          f"speed-up {t_naive / t_packed:.1f}x")
    if diff > tol:
        sys.exit("scores differ")


if __name__ == "__main__":
    main()
