"""Multi-round appending: shared-prefix trie scoring (structured.score_candidates) vs the naive loop (one full
forward of video + prompt + candidate per candidate), side by side in one run.

    python tests/benchmarks/bench_multi_round.py                      # tiny model, CPU: same scores, ratio
    python tests/benchmarks/bench_multi_round.py --ckpt llava-video-7b --random-init --frames 32 --device cuda

Action texts are EPIC-KITCHENS-100 verb x noun labels from the class files in tests/fixtures. On a real alias
the naive loop is timed on --naive candidates and extrapolated to all of them.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as M  # noqa: E402
import structured as S  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "epic100"


def action_texts(n):
    """n EPIC labels ("put-down coffee maker"): the verb x noun pairs of smallest verb id + noun id (EPIC numbers
    its classes by frequency, so these are the common ones; 3,806 spans 86 verbs and 87 nouns)."""
    verbs = data.read_class_keys(FIXTURES / "EPIC_100_verb_classes.csv")
    nouns = data.read_class_keys(FIXTURES / "EPIC_100_noun_classes.csv")
    pairs = sorted(itertools.product(range(len(verbs)), range(len(nouns))), key=lambda p: (sum(p), p))[:n]
    return [data.label_text(verbs[v], nouns[u]) for v, u in pairs]


def candidates_for(model, texts, real_vocab):
    """Token ids as the model would see them. A random-init real alias without its cached tokenizer gets the tiny
    BPE, which splits EPIC words into many pieces; it then gets one id per word instead, close to Qwen2's 2.5
    tokens per label, so the timing reflects the real continuation length."""
    if not real_vocab:
        return S.candidate_token_ids(model.tokenizer, texts)
    end = model.tokenizer.convert_tokens_to_ids(data.IM_END)
    words = {w: 1000 + i for i, w in enumerate(sorted({w for t in texts for w in t.split()}))}
    return [[words[w] for w in t.split()] + [end] for t in texts]


def clip_batch(model, n_frames, device, question=None):
    """One clip: random frames, the time instruction and (by default) the direct-prediction question."""
    spec = model.spec
    question = data.TIME_PROMPT.format(duration=2.5, frames=n_frames) + (question or data.direct_question())
    ids, _ = data.encode_conversation(model.tokenizer, question, None, spec.video_tokens(n_frames),
                                      model.cfg.action_tokens)
    frames = torch.randint(0, 256, (n_frames, spec.size, spec.size, 3), dtype=torch.uint8)
    return dict(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                dtype=torch.long), pixel_values_videos=data.preprocess_frames(frames, spec.size, spec.mean, spec.std)[None].to(device))


@torch.no_grad()
def naive_scores(model, batch, candidates):
    """The paper's way: one full forward (vision tower included) per candidate, mean log-prob of its tokens."""
    ids, out = batch["input_ids"][0], []
    for c in candidates:
        c = torch.tensor(c, device=ids.device)
        full = torch.cat([ids, c])[None]
        row = dict(batch, input_ids=full, attention_mask=torch.ones_like(full))
        h = model.llava.model(**model.lm_inputs(row)).last_hidden_state[0, -len(c) - 1:-1]
        out.append(model.llava.lm_head(h).float().log_softmax(-1).gather(1, c[:, None]).mean())
    return torch.stack(out)[None]


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def model_flags(p):
    """The flags both model benchmarks share."""
    p.add_argument("--ckpt", default="tiny")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--tokenizer", default=None, help="--random-init of a real alias: a tokenizer folder, or 'tiny'")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    return p


def main():
    p = model_flags(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--actions", type=int, default=None, help="candidates (default 600 on tiny, 3,806 otherwise)")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--naive", type=int, default=None,
                   help="time the naive loop on this many candidates (default: all on tiny, 16 otherwise)")
    args = p.parse_args()
    tiny = args.ckpt == "tiny"
    n_actions = args.actions or (600 if tiny else 3806)
    n_naive = args.naive or (n_actions if tiny else 16)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(args.device):  # parameters are created on the device: a 7B model never sits on the CPU
        model = M.load_model(args.ckpt, args.random_init, dtype, tokenizer=args.tokenizer, action_tokens=1).eval()
    tokenizer = model.tokenizer
    texts = action_texts(n_actions)
    candidates = candidates_for(model, texts, real_vocab=not tiny and len(tokenizer) < 10_000)
    batch = clip_batch(model, args.frames, args.device)
    trie = S.build_candidate_trie(sorted(set(map(tuple, candidates))))
    print(f"{args.ckpt}: {args.frames} frames, prompt {batch['input_ids'].shape[1]} tokens, {n_actions} candidates "
          f"of {sum(map(len, candidates)) / n_actions:.2f} tokens (with <|im_end|>); their trie feeds {len(trie.tokens)} "
          f"positions (passes of {args.chunk} candidates)")

    S.score_candidates(model, batch, candidates[:8], chunk=args.chunk)  # warm-up
    runs = [timed(lambda: S.score_candidates(model, batch, candidates, chunk=args.chunk), args.device)
            for _ in range(args.repeats)]
    fast, t_fast = runs[0][0], min(t for _, t in runs)
    naive, t_naive = timed(lambda: naive_scores(model, batch, candidates[:n_naive]), args.device)
    t_naive *= n_actions / n_naive
    diff = (fast[:, :n_naive] - naive).abs().max().item()
    tol = 1e-4 if tiny else 5e-2
    print(f"max |batched - naive| over {n_naive} candidates: {diff:.2e} (tolerance {tol:g})")
    print(f"batched shared prefix: {t_fast:.3f} s per clip")
    print(f"naive loop:            {t_naive:.3f} s per clip" + ("" if n_naive == n_actions else
                                                                f" (extrapolated from {n_naive} candidates)"))
    print(f"speed-up: {t_naive / t_fast:.1f}x")
    if diff > tol:
        sys.exit("scores differ")


if __name__ == "__main__":
    main()
