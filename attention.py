"""Attention statistics of LLaVAction section 4.5 and attention maps over the frames (figure 4).

    python attention.py --ckpt runs/toy --annotations toy --limit 200
    python attention.py --ckpt runs/toy --clip P13_01_2 --maps          # heatmaps over the frames, PNG
    python attention.py --ckpt runs/toy --compare tiny                   # side by side with an untrained model

Positions in a prompt (data.encode_conversation, prompt only, the answer left out):
  <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n  <video> x V  <action> x A  \\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n
- visual tokens: the V video placeholders (data.py counts them for the checkpoint's layout: T x g(g+1) in the grid
  layout, whose row newlines are visual tokens too; T x g^2 + 1 in the hf layout, the last being its newline);
- action tokens: the A (0, 1 or 3) <action> ids right after the last <video> id;
- text tokens: everything after the last action token up to the end of the prompt: the newline, the question with
  its options (the time instruction first, where the checkpoint uses it), <|im_end|>, and the generation prompt
  (T tokens; the chat prefix before the video is not text). The answer position is the last of them.
Text-visual correlation (paper): attention of the T text rows to the V visual columns (N x T x V, averaged over
heads, one layer or the mean over layers), max over text -> N x V, then mean and 90th percentile over all N x V.
Text-action: the same with the action column (N x T x 1), max over text, mean over N (with three action tokens,
the mean of their three maxima); and the share of the N x V visual values below their sample's action value.
"""
import argparse
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as model_lib
import structured

MAP_TITLE, MAP_COLUMNS = 20, 8  # attention-map images: title band in pixels, frames per row


# attention of the text rows, recomputed from the attention modules' inputs ---
def prompt_positions(ids, video_id, action_id, n_action):
    """(first visual position, V, first text position), alike in all rows: shared prefix and frames, right padding."""
    video = ids == video_id
    first, n_visual = int(video[0].nonzero()[0]), int(video[0].sum())
    start = first + n_visual
    assert (video[:, first:start].all(1) & (video.sum(1) == n_visual)).all(), "rows differ in their video tokens"
    assert (ids[:, start:start + n_action] == action_id).all(), "<action> is not right after the last <video>"
    return first, n_visual, start + n_action


def text_attention(m, batch, layers):
    """Layer- and head-averaged softmax(q k^T / sqrt(d) + causal mask) of the text rows against all keys, recomputed in
    hooks from the chosen layers' inputs (RoPE, GQA as in Qwen2Attention; B x heads x T x L at a time, never L x L);
    returns it as (B, T_max, V + A), the last hidden state and the positions."""
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv, rotate_half  # here: a slow import for --help

    inputs = m.lm_inputs(batch)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    first, n_visual, text = prompt_positions(ids, m.llava.config.video_token_index, m.action_id, m.cfg.action_tokens)
    key_pos = torch.arange(ids.shape[1], device=ids.device)
    allowed = (key_pos[None, None, :] <= key_pos[text:, None]) & mask[:, None, :].bool()  # (B, T, L)
    total = 0

    def hook(module, args, kwargs, out):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = (x.float() for x in kwargs["position_embeddings"])
        (b, length, _), d = h.shape, module.head_dim
        q = module.q_proj(h[:, text:]).float().view(b, length - text, -1, d).transpose(1, 2)
        k = module.k_proj(h).float().view(b, length, -1, d).transpose(1, 2)
        q = q * cos[:, None, text:] + rotate_half(q) * sin[:, None, text:]
        k = repeat_kv(k * cos[:, None] + rotate_half(k) * sin[:, None], module.num_key_value_groups)
        scores = (q @ k.transpose(2, 3) * module.scaling).masked_fill(~allowed[:, None], float("-inf"))
        nonlocal total
        total = total + scores.softmax(-1).mean(1)[:, :, first:text]  # a running sum: one (B, T, V + A) kept

    lm = m.llava.model.language_model
    handles = [lm.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        out = m.llava.model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return total / len(layers), out.last_hidden_state, (first, n_visual, text)


def reduce_rows(att, mask, text):
    """(B, T, K) -> max over the real text rows (B, K) and the answer position's row (B, K)."""
    real = mask[:, text:].bool()
    last = mask.sum(1) - 1 - text  # right padding: the last real token is the end of the prompt
    return att.masked_fill(~real[..., None], 0).amax(1), att[torch.arange(len(att)), last]


def statistics(text_max, n_visual):
    """The paper's numbers from the per-sample maxima over text (N, V + A)."""
    vis, n_action = text_max[:, :n_visual].double(), text_max.shape[1] - n_visual
    stats = dict(n=len(text_max), visual_tokens=n_visual, action_tokens=n_action,
                 text_visual_mean=vis.mean().item(), text_visual_p90=float(np.percentile(vis.numpy(), 90)))
    if n_action:
        act = text_max[:, n_visual:].double().mean(1)
        stats.update(text_action_mean=act.mean().item(),
                     share_visual_below_action=(vis < act[:, None]).double().mean().item())
    return stats


def collate_readable(items, pad_id):
    """data.collate of the items whose clip could be read (--skip-bad), in the DataLoader workers; None if none."""
    good = [x for x in items if x["bad"] is None]
    return data.collate(good, pad_id) if good else None


@torch.inference_mode()
def analyse(m, rows, args, desc):
    """Statistics, answer-position rows, chosen options, and the indices of the rows analysed (their clips read)."""
    dataset = data.TaskDataset(rows, args.video_root, m.tokenizer, m.spec, args.frames, m.cfg.action_tokens,
                               time_prompt=m.cfg.time_instruction, with_answer=False, skip_bad=args.skip_bad)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size, num_workers=args.num_workers,
                                         collate_fn=partial(collate_readable, pad_id=m.tokenizer.pad_token_id))
    n_layers = m.llava.config.text_config.num_hidden_layers
    layers = range(n_layers) if args.layer == "mean" else [int(args.layer.replace("last", "-1"))]  # lm.layers checks
    letters = structured.letter_token_ids(m.tokenizer, len(rows[0]["options"])).to(m.llava.device)
    text_max, answer, chosen, kept = [], [], [], []
    for batch in filter(None, tqdm(loader, desc=desc)):  # None: none of the batch's clips could be read
        kept += batch["index"].tolist()
        att, hidden, (_, n_visual, text) = text_attention(m, batch, layers)
        top, last_row = reduce_rows(att, batch["attention_mask"].to(att.device), text)
        text_max.append(top.cpu()), answer.append(last_row.cpu())
        last = hidden[torch.arange(len(hidden)), batch["attention_mask"].to(hidden.device).sum(1) - 1]
        chosen += m.llava.lm_head(last)[:, letters].argmax(-1).tolist()
    if not kept:
        raise RuntimeError(f"none of the {len(rows)} clips could be read (without --skip-bad the error says why)")
    return statistics(torch.cat(text_max), n_visual), torch.cat(answer), chosen, kept


# attention maps over the frames ----------------------------------------------
def frame_maps(answer_row, n_frames, spec, frame_hw):
    """(T, H, W) maps of the answer position's attention to the T x g x g frame tokens (not the newlines: the grid
    layout's after each row, the hf layout's after the video); maps.sum() = 1, maps[t].sum() = frame t's share."""
    g = spec.grid  # pooled tokens are row-major on a g x g grid per frame
    grid = answer_row[:n_frames * spec.tokens_per_frame].double().reshape(n_frames, 1, g, -1)[..., :g]
    grid = grid / grid.sum()
    maps = F.interpolate(grid, size=tuple(frame_hw), mode="bilinear", align_corners=False)[:, 0]
    return maps * (grid.sum((1, 2, 3)) / maps.sum((1, 2)).clamp_min(1e-30))[:, None, None]


def draw_maps(frames, maps, title, path):
    """Frames in rows of MAP_COLUMNS under the title, overlaid with the maps from the clip's min (blue) to max (red)."""
    from PIL import Image, ImageDraw

    t, h, w, _ = frames.shape
    m = maps.numpy()
    m = (m - m.min()) / max(m.max() - m.min(), 1e-30)
    heat = (np.clip(1.5 - np.abs(4 * m[..., None] - np.array([3, 2, 1])), 0, 1) * 255).astype(np.uint8)  # jet-like
    blend = (0.5 * frames + 0.5 * heat).astype(np.uint8)
    columns = min(t, MAP_COLUMNS)
    image = Image.new("RGB", (columns * w, math.ceil(t / columns) * h + MAP_TITLE), "white")
    for i, frame in enumerate(blend):
        image.paste(Image.fromarray(frame), (i % columns * w, MAP_TITLE + i // columns * h))
    ImageDraw.Draw(image).text((4, 4), title, fill="black")
    image.save(path)


# one model's statistics and maps, printed beside another's -------------------
def run(m, ckpt, rows, args, suffix=""):
    """Statistics of one model over the rows (asked in its prompt style); with --maps, a PNG per clip in {out}/maps."""
    rows = [dict(r, question=data.mqa_question(r["options"], m.cfg.prompt_style, m.cfg.perspective)) for r in rows]
    stats, answer, chosen, kept = analyse(m, rows, args, desc=str(ckpt))
    skipped, rows = len(rows) - len(kept), [rows[i] for i in kept]
    for row, row_answer, choice in tqdm(zip(rows, answer, chosen), total=len(rows), desc="maps") if args.maps else ():
        frames, _ = data.load_clip(args.video_root, row["video_id"], row["start"], row["end"], args.frames)
        maps = frame_maps(row_answer, args.frames, m.spec, frames.shape[1:3])
        truth = row.get("answer_index", -1)
        title = (f"{row['id']} ({ckpt}): chosen {data.LETTERS[choice]}. {row['options'][choice]}"
                 + (f", truth {data.LETTERS[truth]}. {row['options'][truth]}" if truth >= 0 else ""))
        print(title)
        (Path(args.out) / "maps").mkdir(parents=True, exist_ok=True)
        draw_maps(frames, maps, title, Path(args.out) / "maps" / f"{row['id']}{suffix}.png")
    return dict(stats, ckpt=str(ckpt), layer=args.layer, video_layout=m.spec.layout, skipped_bad=skipped,
                accuracy=float(np.mean([c == r.get("answer_index") for c, r in zip(chosen, rows)])))


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/toy", help="a train.py run, an alias (model.py), a folder or hub id")
    p.add_argument("--compare", help="a second checkpoint or alias, statistics printed side by side")
    p.add_argument("--annotations", default="toy", help="annotation root of the benchmark and its videos")
    p.add_argument("--benchmark", help=f"MQA JSONL (mine.py); default {{annotations}}/{data.BENCHMARK}")
    p.add_argument("--video-root", help="default {annotations}/videos")
    p.add_argument("--limit", type=int, default=200, help="the first N rows of the benchmark")
    p.add_argument("--clip", action="append", help="only this sample id (repeatable); --limit then ignored")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--layer", default="last", help="'last', a layer index (negative counts back) or 'mean'")
    p.add_argument("--maps", action="store_true", help="write {out}/maps/{id}.png for every selected clip")
    p.add_argument("--skip-bad", action="store_true", help="leave out (and count) clips that cannot be read")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers decoding the clips (default: cores / (4 x ranks), at most 4)")
    p.add_argument("--action-tokens", type=int, choices=[0, 1, 3], default=1,
                   help="for a base without heads (a checkpoint with heads has its own)")
    model_lib.add_load_flags(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", help="default: {ckpt}/attention, {ckpt}/attention/clips with --clip")
    args = p.parse_args(argv)
    args.benchmark = args.benchmark or str(Path(args.annotations) / data.BENCHMARK)
    args.video_root = args.video_root or str(Path(args.annotations) / "videos")
    if args.limit < 1:
        p.error(f"--limit {args.limit}: no rows to analyse")
    rows = data.read_jsonl(args.benchmark)
    rows = [r for r in rows if r["id"] in set(args.clip)] if args.clip else rows[:args.limit]
    if args.clip and len(rows) != len(set(args.clip)):
        p.error(f"--clip: {sorted(set(args.clip) - {r['id'] for r in rows})} not in {args.benchmark}")
    if not rows:
        p.error(f"no rows selected from {args.benchmark}: it is empty")
    args.out = args.out or str(model_lib.results_folder(args.ckpt) / "attention" / ("clips" if args.clip else ""))
    models = [(ckpt, model_lib.load_for_eval(ckpt, torch.device(args.device), args.random_init, args.tokenizer,
                                             args.cache, args.action_tokens))
              for ckpt in [args.ckpt] + ([args.compare] if args.compare else [])]
    data.lock_folder(args.out)  # inputs all loaded: from here on this run owns {out}
    results = [run(m, ckpt, rows, args, "_compare" if k else "") for k, (ckpt, m) in enumerate(models)]
    data.write_json_atomic(Path(args.out) / "args.json", vars(args))  # with the stats: a failed run changes neither
    print(f"{'':28s}" + "".join(f"{r['ckpt'][-24:]:>26s}" for r in results))  # a column per model
    for key in ["n", "skipped_bad", "accuracy", "text_visual_mean", "text_visual_p90", "text_action_mean",
                "share_visual_below_action"]:
        print(f"{key:28s}" + "".join(f"{r[key]:>26.4g}" if key in r else f"{'n/a':>26s}" for r in results))
    data.write_json_atomic(Path(args.out) / "stats.json", results if args.compare else results[0])
    print(f"wrote {args.out}/stats.json")


if __name__ == "__main__":
    main(sys.argv[1:])
