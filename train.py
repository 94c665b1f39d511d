"""Fine-tune a video LLM for action understanding (LLaVAction): MQA with hard distractors, prior actions, temporal
detection, direct prediction (captions, replay), plus the action token's verb/noun/action heads.

    python train.py --base tiny --data toy                                       # CPU, minutes
    torchrun --nproc_per_node 2 train.py --base tiny --data toy --parallel fsdp --out runs/toy_fsdp  # sharded (gloo)
    torchrun --nproc_per_node 8 train.py --base llava-video-7b --train-file train.jsonl --annotations EPIC \\
        --video-root VIDEOS --frames 16 --out runs/NAME
    torchrun --nproc_per_node 8 train.py --resume runs/NAME                      # continues where it stopped

A plain `python train.py` is rank 0 of a process group of one: one code path. A step's number fixes its samples (a
permutation per epoch cut into global batches, whatever the number of ranks), learning rate (lr_scale) and clips' frame
jitter (seeded per item by data.TaskDataset), so --resume continues with exactly the next batch. The prompt style,
perspective, time instruction and video layout default to the base's own (what its weights saw), saved with the run.
"""
import argparse
import contextlib
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import mine
import structured
from model import ActionLLaVA, add_load_flags, describe, init_distributed, load_model, resolve

RESOLVED = dict(time_prompt="time_instruction", **{k: k for k in (  # flag -> ActionConfig field
    "prompt_style", "perspective", "video_layout", "supervise_layer", "head_bias", "head_norm", "head_weight",
    "verb_weight", "noun_weight", "action_weight", "action_tokens")})
TOY_EXPECTATION = ("\nOn the toy, expect the option texts well above chance and the letters near it: a random-init LM "
                   "learns the actions in minutes (heads, texts, multi-round) but not yet to copy the letter of the "
                   "matching option, which a pretrained base does from the start.")
HEAD_STATS = ("head_loss", "verb_loss", "noun_loss", "action_loss", "verb_acc", "noun_acc")  # per labelled sample
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per device, for MFU (else not logged)


# data ------------------------------------------------------------------------
def epoch_batches(n_rows, epoch, steps, args, rank, world, start):
    """This rank's micro-batches for steps start.. of an epoch: one permutation per (seed, epoch) cut into global
    batches, each split rank-major into world x accum micro-batches, so a step's samples do not depend on world."""
    perm = np.random.default_rng((args.seed, epoch)).permutation(n_rows)[:steps * args.batch_size]
    micro = perm.reshape(steps, world, args.grad_accum, -1)[start:, rank]
    return micro.reshape(-1, micro.shape[-1]).tolist()


# model, optimizer, schedule --------------------------------------------------
def parallelize(model, args, device):
    """FSDP2 (a unit per decoder and vision encoder layer, then the root; on GPU bf16 compute, fp32 reduction) or DDP,
    without find_unused_parameters: every parameter gets a gradient every step (text-only batches run the tower)."""
    if args.parallel == "fsdp":
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
        for layer in [*model.llava.model.language_model.layers, *model.llava.model.vision_tower.encoder.layers]:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizer(raw, args):
    """AdamW with two groups, the vision tower and everything else; main sets their learning rates (--lr-vision, --lr)
    and weight decay every step from the flags, so a resumed run follows the flags it is given. -> (opt, params)"""
    params = [p for p in raw.parameters() if p.requires_grad]
    vision = {id(p) for p in raw.llava.model.vision_tower.parameters()}
    groups = [[p for p in params if id(p) in vision], [p for p in params if id(p) not in vision]]
    return torch.optim.AdamW([{"params": g} for g in groups], foreach=True), params


def grad_sync(model, sync):
    """Reduce gradients only on the window's last micro-step: DDP's no_sync, FSDP2's requires_gradient_sync."""
    if fsdp := isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext() if sync or fsdp else model.no_sync()


def lr_scale(step, total, warmup):
    """Linear warmup, then cosine to zero at the planned total (never where a run happens to stop)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# checkpoints: DCP (sharded model + optimizer) with the position and RNG, and the plain exported model ---
def save_checkpoint(model, opt, args, state, rank):
    """{out}/step_N/: DCP shards, each rank's torch RNG (numpy's and Python's global ones are never drawn from),
    args.json, and train_state.json last: it marks a complete one."""
    path = Path(args.out) / f"step_{state['step']}"
    dist.barrier()
    if rank == 0:  # a step_N written over (after a resume) is incomplete until train_state.json is back
        (path / "train_state.json").unlink(missing_ok=True)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save(dict(torch=torch.get_rng_state(), cuda=cuda), path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        for folder in (path, Path(args.out)):  # the run's flags once they have trained: a failed resume changes none
            data.write_json_atomic(folder / "args.json", vars(args))
        data.write_json_atomic(path / "train_state.json", state)


def load_checkpoint(model, opt, run, rank):
    """The latest complete step_N of a run into the (wrapped) model and optimizer; returns its train state."""
    done = [p.parent for p in Path(run).glob("step_*/train_state.json")]
    if not done:
        raise FileNotFoundError(f"--resume {run}: no complete checkpoint (step_N/train_state.json) in it")
    path = max(done, key=lambda p: int(p.name.split("_")[1]))
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    if (rng_file := path / f"rng_rank{rank}.pt").exists():  # absent when resuming on more ranks than before
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "train_state.json").read_text())


def export(model, out, dtype, rank):
    """The folder evaluate.py and from_pretrained read: gathered on rank 0, saved via a meta-device twin (no copy)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            twin = ActionLLaVA(type(model.llava)(model.llava.config), model.tokenizer, model.cfg)
        twin.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}, assign=True)
        twin.save(out)
    dist.barrier()


# the in-training MQA check, the step's statistics, the run folder ------------
@torch.no_grad()
def check_mqa(raw, rows, args, autocast, log, say, step):
    """In-training MQA accuracy by option letter and text over all ranks, logged and printed. Each rank scores
    rows[rank::world], padded with uncounted repeats so FSDP's collectives line up. structured.py calls LLaVA's
    submodules, which FSDP's root hooks would not unshard: all units are gathered once and kept so (ranks may differ
    in forwards), then resharded (the root initialised first, or the first training forward makes a unit root)."""
    units = [m for m in raw.modules() if isinstance(m, FSDPModule)]
    if units:
        raw._get_fsdp_state()._lazy_init()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    rank, world, k_options = dist.get_rank(), dist.get_world_size(), len(rows[0]["options"])
    share = list(range(rank, len(rows), world))
    padded = share + [i % len(rows) for i in range(-(-len(rows) // world) - len(share))]
    dataset = data.TaskDataset(rows, args.video_root, raw.tokenizer, raw.spec, args.frames, raw.cfg.action_tokens,
                               time_prompt=args.time_prompt, skip_bad=args.skip_bad, with_answer=False)
    batches = [padded[i:i + args.eval_batch_size] for i in range(0, len(padded), args.eval_batch_size)]
    was_training, counts = raw.training, torch.zeros(4, dtype=torch.float64)  # letter, text right; scored, skipped
    raw.eval()
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, collate_fn=list)
    for k, items in enumerate(tqdm(loader, desc="MQA check", disable=rank != 0, leave=False)):
        batch, options = data.collate(items, raw.tokenizer.pad_token_id), [rows[x["index"]]["options"] for x in items]
        with autocast:
            letter = structured.score_options(raw, batch, k_options).argmax(-1).tolist()
            text = structured.score_option_texts(raw, batch, options).argmax(-1).tolist()
        for j, item in enumerate(items[:len(share) - k * args.eval_batch_size]):  # the padding is not counted
            good, truth = item["bad"] is None, rows[item["index"]]["answer_index"]
            counts += torch.tensor([good and letter[j] == truth, good and text[j] == truth, good, not good])
    raw.train(was_training)
    for m in units:
        m.set_reshard_after_forward(m is not raw, recurse=False)  # as fully_shard left them: the root keeps its own
        m.reshard()
    counts = counts.to(raw.llava.device)
    dist.all_reduce(counts)
    letter, text, n, bad = counts.tolist()
    r = dict(step=step, mqa_letter=letter / max(n, 1), mqa_text=text / max(n, 1), eval_n=int(n),
             eval_skipped_bad=int(bad))
    log(r)
    say(f"\nstep {step}: MQA accuracy {r['mqa_text']:.4f} by option text, {r['mqa_letter']:.4f} by letter (chance "
        f"{1 / k_options:.2f}) on {r['eval_n']} questions of {args.benchmark}")
    return r


def append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def reduce_window(window, device):
    """A logging window's named sums over all ranks: the one host sync of a window."""
    names = sorted(window)
    sums = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=device) for k in names])
    dist.all_reduce(sums)
    return dict(zip(names, sums.tolist()))


def step_stats(res):
    """What one micro-step adds to the logging window, by name: sums over its tokens and labelled samples."""
    hs = res["head_samples"].to(torch.float32)
    return dict(lm_sum=res["lm_loss_sum"].detach(), lm_tokens=res["lm_tokens"].float(), head_samples=hs,
                **{f"{k}_sum": res[k].detach() * hs for k in HEAD_STATS})


def log_record(raw, s, step, epoch, opt, dt, state, n_params, peak_tflops, world, grad_norm):
    """One log.jsonl line from a window's all-reduced sums `s`."""
    n_head = max(s["head_samples"], 1)
    loss = raw.objective(*(torch.tensor(s[k]) for k in ("lm_sum", "head_loss_sum", "lm_tokens", "head_samples")))
    record = dict(step=step, epoch=epoch, loss=float(loss), lm_loss=s["lm_sum"] / max(s["lm_tokens"], 1),
                  **{k: s[f"{k}_sum"] / n_head for k in HEAD_STATS}, lr_vision=opt.param_groups[0]["lr"],
                  lr=opt.param_groups[1]["lr"], tokens_per_s=s["tokens"] / dt, samples_per_s=s["samples"] / dt,
                  bad_videos=state["bad_videos"], clamped_frames=state["clamped_frames"])
    if peak_tflops:  # 6 x parameters x tokens: forward and backward of a dense model, per second
        record["mfu"] = 6 * n_params * s["tokens"] / dt / (peak_tflops * 1e12 * world)
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    return record


def prepare(args, rank, world, say):
    """All the run reads, before it writes anything: the toy kitchen (--data toy), the annotations, the model (its
    resolved prompt, layout and head options go back into args), the training and benchmark rows in its style."""
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of ranks x --grad-accum = "
                         f"{world * args.grad_accum}")
    if args.data and rank == 0:
        if not (Path(args.annotations) / data.SPLIT_FILES["train"]).exists():
            data.make_toy(args.annotations)
        mine.mine_toy(args.annotations)
    if rank == 0 and not args.random_init:
        resolve(args.base, args.cache)  # rank 0 first: it may download the checkpoint or convert it
    dist.barrier()
    ann = data.load_annotations(args.annotations)
    torch.manual_seed(args.seed)  # the heads start alike on every rank: FSDP shards each rank's own initialisation
    raw = load_model(args.base, args.random_init, torch.float32, tokenizer=args.tokenizer, cache=args.cache,
                     n_verbs=len(ann.vocab.verbs), n_nouns=len(ann.vocab.nouns), n_actions=len(ann.vocab),
                     **{field: getattr(args, flag) for flag, field in RESOLVED.items()})
    for flag, field in RESOLVED.items():  # the run's args.json says what it trained with
        setattr(args, flag, getattr(raw.cfg, field))
    mqa = [r for f in args.train_file for r in data.read_jsonl(f)]
    replay = data.read_replay(args.replay, args.replay_root) if args.replay else None
    rows = data.build_training_samples(  # the task mix in the run's prompt style, the same on every rank
        ann, args.split, mqa, np.random.default_rng(args.seed), style=args.prompt_style, perspective=args.perspective,
        prior_ratio=args.prior_ratio, temporal=None if args.temporal == "none" else args.temporal,
        direct=not args.no_direct, captions=args.captions, replay=replay, replay_ratio=args.replay_ratio)
    eval_rows = [dict(r, question=data.mqa_question(r["options"], args.prompt_style, args.perspective))
                 for r in data.read_jsonl(args.benchmark)] if args.benchmark else None
    if len(rows) < args.batch_size:
        raise SystemExit(f"{len(rows)} training rows make no global batch of --batch-size {args.batch_size}")
    say(f"{describe(raw)}; {args.prompt_style} prompts, time instruction {'on' if args.time_prompt else 'off'}; "
        f"{len(rows)} training rows")
    return raw, rows, eval_rows


def open_run(args, raw, opt, rank, say):
    """Lock {out}; refuse a fresh run over earlier checkpoints (a later --resume would pick them up);
    resume the model, optimizer and RNG; trim the log to the checkpoint's step. Returns (train state, log path)."""
    out = Path(args.out)
    if rank == 0:
        data.lock_folder(out)
        earlier = sorted(out.glob("step_*/train_state.json"), key=lambda p: int(p.parent.name.split("_")[1]))
        if earlier and not args.resume:
            raise SystemExit(f"{out} holds checkpoints of an earlier run (up to {earlier[-1].parent.name}): continue "
                             f"it with --resume {out}, or pass another --out, or delete {out}")
    dist.barrier()
    state = dict(step=0, epoch=0, step_in_epoch=0, bad_videos=0, clamped_frames=0)
    if args.resume:
        state = load_checkpoint(raw, opt, args.resume, rank)
        say(f"resumed {args.resume} at step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']}"
            f" in it)" + ("" if Path(args.resume) == out else f"; continuing in {out}"))
    else:
        torch.manual_seed(args.seed + rank)  # per-rank randomness from here on (dropout, if any)
    old_log = Path(args.resume or out) / "log.jsonl"
    if rank == 0 and old_log.exists():  # a resumed run drops what the killed one logged after its checkpoint
        kept = [line for line in old_log.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
        data.write_atomic(out / "log.jsonl", "".join(line + "\n" for line in kept) if args.resume else "")
    return state, out / "log.jsonl"


# flags: the parser, the toy preset, and the layers of defaults ---------------
def build_parser():
    """Every flag with the paper's default; --data toy and --resume layer their own defaults on top."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", choices=["toy"], help="toy: make the toy kitchen under --annotations (default toy/) and "
                   "its mined MQA files when missing, and apply the toy preset")
    p.add_argument("--train-file", action="append", help="MQA JSONL from mine.py; repeat the flag or comma-separate")
    p.add_argument("--annotations", help="EPIC annotation root: classes, and the segments of the prior-action, "
                   "temporal and direct tasks")
    p.add_argument("--split", default="train", help="annotation split the training files were mined from")
    p.add_argument("--video-root", help="default {annotations}/videos")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--prompt-style", choices=data.STYLES, help="official (the authors' code) or paper (appendix C); "
                   "default: the base's own")
    p.add_argument("--time-prompt", action=argparse.BooleanOptionalAction,
                   help="the time instruction before each video question (default: the base's own)")
    p.add_argument("--perspective", choices=list(data.PERSPECTIVES),
                   help="egocentric or allocentric questions (default: the base's own, else ego)")
    p.add_argument("--prior-ratio", type=float, default=0.3, help="share of MQA rows asked with two prior actions")
    p.add_argument("--temporal", choices=[*data.TEMPORAL_FORMS, "none"], default="paper",
                   help="temporal detection: paper (3 s pad, 'start: end'), official (5 s, 'start, end') or none")
    p.add_argument("--no-direct", action="store_true", help="leave out the direct prediction task")
    p.add_argument("--captions", help="captions and open QA by narration id (JSON)")
    p.add_argument("--replay", help="LLaVA conversation JSON replayed against forgetting")
    p.add_argument("--replay-root", help="videos of --replay (default: the JSON's folder)")
    p.add_argument("--replay-ratio", type=float, default=0.0, help="replay rows per task row")
    p.add_argument("--supervise", choices=data.SUPERVISION, default="official", help="the LM loss's targets: "
                   "official (the authors' code: whole assistant turns and every <|im_start|>, <|im_end|> and newline "
                   "token) or answers (each answer and its <|im_end|>)")
    p.add_argument("--skip-bad", action="store_true", help="count unreadable videos and go on without them")
    p.add_argument("--num-workers", type=int, default=data.DEFAULT_WORKERS,
                   help="DataLoader workers decoding clips, per rank (default: cores / (4 x ranks), at most 4)")
    p.add_argument("--benchmark", help="MQA benchmark (mine.py) evaluated at the end")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps, and at step 0 (0: end only)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--base", default="llava-video-7b", help="alias (model.py), folder (native or LLaVA-NeXT) or hub id")
    add_load_flags(p)
    p.add_argument("--video-layout", choices=["grid", "hf"], help="default: the base's own")
    p.add_argument("--action-tokens", type=int, choices=[0, 1, 3], default=1)
    # the head options below default to the base's own (a converted release keeps its supervised layer), else
    # to the release's: last layer, no bias, 0.1 x (0.5 verb + 0.5 noun + 0.1 action) / (L + 1)
    p.add_argument("--supervise-layer", choices=["last", "first", "all"])
    p.add_argument("--head-bias", action=argparse.BooleanOptionalAction, help="head biases (the release has none)")
    p.add_argument("--head-norm", choices=["layers+1", "layers"], help="divide the summed per-layer head losses by "
                   "L + 1 (the release) or by L (twice the weight at one layer)")
    for part, weight in (("head", "0.1, against the LM loss"), ("verb", 0.5), ("noun", 0.5), ("action", 0.1)):
        p.add_argument(f"--{part}-weight", type=float, help=f"{part} loss weight (the release: {weight})")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layer activations in the backward")
    p.add_argument("--batch-size", type=int, default=64, help="global: samples per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, help="planned optimizer steps (overrides --epochs)")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop at this step; the schedule still runs to the "
                   "planned end, so --resume continues it")
    p.add_argument("--lr", type=float, default=1e-5, help="projector, LLM, action token, heads")
    p.add_argument("--lr-vision", type=float, default=2e-6, help="vision tower")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run directory (default runs/{base name}; runs/toy with --data toy)")
    p.add_argument("--resume", help="run directory to continue; its args.json fills the flags not given")
    p.add_argument("--save-every", type=int, default=1000, help="DCP checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="per device, for MFU (default from the GPU name)")
    return p


def toy_preset(root):
    """The quickstart, minutes on a CPU (TOY_EXPECTATION: what the tiny model learns in that time), supervised on
    the answers: the template's easy targets would dilute a tiny model's answer loss."""
    return dict(base="tiny", annotations=str(root), out="runs/toy", train_file=[f"{root}/{mine.TOY_TRAIN}"],
                benchmark=f"{root}/{data.BENCHMARK}", frames=8, batch_size=16, grad_accum=1, epochs=1, lr=2e-3,
                lr_vision=2e-3, warmup_ratio=0.05, log_every=10, save_every=500, supervise="answers")


def resolve_args(argv):
    """Flags given on the command line win, then the resumed run's args.json, then the toy preset, then the
    defaults: each layer is a parser.set_defaults under one more parse. Returns (args, the preset values used)."""
    parser = build_parser()
    first = parser.parse_args(argv)
    saved = json.loads((Path(first.resume) / "args.json").read_text()) if first.resume else {}
    saved = {"supervise": "answers", **saved} if saved else saved  # runs saved before --supervise trained on answers
    root = first.annotations or saved.get("annotations") or "toy"
    preset = toy_preset(root) if (first.data or saved.get("data")) == "toy" else {}
    parser.set_defaults(**preset)
    parser.set_defaults(**{k: v for k, v in saved.items() if k not in ("resume", "stop_after", "out")})
    args = parser.parse_args(argv)
    if first.resume and first.out is None:  # a resumed run continues in its own folder unless told otherwise
        args.out = first.resume
    # append would add the given files to the layered ones
    args.train_file = [f for arg in first.train_file or args.train_file or [] for f in arg.split(",") if f]
    args.video_root = args.video_root or (args.annotations and str(Path(args.annotations) / "videos"))
    args.out = args.out or str(Path("runs") / Path(args.base).name)
    if not args.annotations or not args.train_file:
        parser.error("need --annotations and --train-file (or --data toy)")
    return args, {k: v for k, v in preset.items() if getattr(args, k) == v}


# training --------------------------------------------------------------------
def main(argv):
    args, preset = resolve_args(argv)
    rank, world, device = init_distributed(timeout_minutes=60)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    say = functools.partial(print, flush=True) if rank == 0 else lambda *a, **k: None
    if preset:
        say("toy preset: " + " ".join(f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
                                      for k, v in preset.items()))
    raw, rows, eval_rows = prepare(args, rank, world, say)
    steps_per_epoch = len(rows) // args.batch_size
    total = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    stop = min(total, args.stop_after if args.stop_after is not None else total)
    say(f"{steps_per_epoch} steps an epoch, {total} steps planned; {world} rank(s) x {args.grad_accum} micro-batches "
        f"of {args.batch_size // (world * args.grad_accum)}")
    raw.to(device).train()
    if args.grad_checkpointing:
        raw.llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in raw.parameters())
    model = parallelize(raw, args, device)  # FSDP2 shards raw in place; DDP wraps it
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and args.parallel == "ddp" else contextlib.nullcontext()
    opt, params = build_optimizer(raw, args)
    state, log_path = open_run(args, raw, opt, rank, say)

    log = functools.partial(append_log, log_path) if rank == 0 else lambda record: None
    run_eval = functools.partial(check_mqa, raw, eval_rows, args, autocast, log, say)
    dataset = data.TaskDataset(rows, args.video_root, raw.tokenizer, raw.spec, args.frames, raw.cfg.action_tokens,
                               train=True, time_prompt=args.time_prompt, skip_bad=args.skip_bad, seed=args.seed,
                               supervise=args.supervise)
    collate = functools.partial(data.collate, pad_id=raw.tokenizer.pad_token_id)
    gpu = torch.cuda.get_device_name(device) if cuda else ""
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    window, step = {}, state["step"]
    result = run_eval(0) if eval_rows and args.eval_every and step == 0 else None
    pbar, t_last = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True), time.time()
    while step < stop:
        epoch, start = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler = epoch_batches(len(rows), epoch, steps_per_epoch, args, rank, world, start)
        batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                                  pin_memory=cuda, prefetch_factor=4 if args.num_workers else None))
        while step < min(stop, (epoch + 1) * steps_per_epoch):
            micro = [next(batches) for _ in range(args.grad_accum)]
            # The normalisers, known before any forward, are the step's supervised tokens and labelled samples on all
            # ranks: each micro-step backpropagates world x objective(its sums, those counts), as DDP / FSDP average
            # over ranks, giving the gradient of the global batch's token-mean LM loss plus sample-mean head loss.
            counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                   sum(int((b["action_labels"] != -100).any(1).sum()) for b in micro)],
                                  dtype=torch.float32, device=device)
            dist.all_reduce(counts)
            scale = lr_scale(step, total, math.ceil(args.warmup_ratio * total))
            for group, peak in zip(opt.param_groups, (args.lr_vision, args.lr)):  # vision first, as grouped
                group.update(lr=peak * scale, weight_decay=args.weight_decay)
            for i, b in enumerate(micro):
                host = dict(tokens=int(b["attention_mask"].sum()), samples=len(b["input_ids"]), bad_videos=b["bad"],
                            clamped_frames=b["clamped"])  # plain ints from the CPU batch: no device sync
                b = {k: v.to(device, non_blocking=True) for k, v in b.items() if torch.is_tensor(v)}
                with grad_sync(model, i == args.grad_accum - 1):
                    with autocast:
                        res = model(b)
                    stats = step_stats(res)
                    loss = raw.objective(res["lm_loss_sum"], res["head_loss"] * stats["head_samples"], *counts)
                    (loss * world).backward()
                window = {k: window.get(k, 0) + v for k, v in {**stats, **host}.items()}
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            pbar.update(1)
            if step % args.log_every == 0 or step % args.save_every == 0 or step == stop:
                s, window, dt, t_last = reduce_window(window, device), {}, time.time() - t_last, time.time()
                state.update({k: state[k] + int(s[k]) for k in ("bad_videos", "clamped_frames")})
                record = log_record(raw, s, step, epoch, opt, dt, state, n_params, peak_tflops, world, grad_norm)
                log(record)
                pbar.set_postfix(loss=f"{record['loss']:.4f}", verb=f"{record['verb_acc']:.2f}",
                                 noun=f"{record['noun_acc']:.2f}", samples_s=f"{record['samples_per_s']:.1f}")
            state.update(step=step, epoch=step // steps_per_epoch, step_in_epoch=step % steps_per_epoch)
            if step % args.save_every == 0 or step == stop:
                save_checkpoint(raw, opt, args, state, rank)
                t_last = time.time()
            if eval_rows and args.eval_every and step % args.eval_every == 0 and step < total:
                result = run_eval(step)
                t_last = time.time()
    pbar.close()
    if step == total:
        if step == 0:
            save_checkpoint(raw, opt, args, state, rank)
        export(raw, args.out, torch.bfloat16 if cuda else torch.float32, rank)
        result = run_eval(step) if eval_rows else None
    say(f"model saved to {args.out}" if step == total else f"stopped at step {step} of {total}; continue with: "
        f"python train.py --resume {args.out}")
    say(f"{state['bad_videos']} unreadable videos skipped, {state['clamped_frames']} frames clamped"
        + (TOY_EXPECTATION if result and args.base == "tiny" else ""))
    # DDP's reducer holds the process group: free it while the group lives, or gloo's destructor can hang at exit
    del model, run_eval
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
