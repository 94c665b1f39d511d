"""Fine-tune a video LLM for action understanding (LLaVAction): MQA with hard distractors, prior actions, temporal
detection, direct prediction (captions, replay), plus the action token's verb/noun/action heads.

    python train.py --base tiny --data toy                                       # CPU, minutes, learns
    torchrun --nproc_per_node 2 train.py --base tiny --data toy --parallel fsdp --out runs/toy_fsdp  # sharded (gloo)
    torchrun --nproc_per_node 8 train.py --base llava-video-7b --train-file train.jsonl --annotations EPIC \\
        --video-root VIDEOS --frames 16 --out runs/NAME
    torchrun --nproc_per_node 8 train.py --resume runs/NAME                      # continues where it stopped

A plain `python train.py` is rank 0 of a process group of one, so there is a single code path. What a step does
is fixed by its number: the samples (a permutation per epoch cut into global batches that do not depend on the
number of ranks), the learning rate (a function of the step and the planned total), each clip's frame jitter
(seeded per item by data.TaskDataset). --resume therefore continues with exactly the next batch.
"""
import argparse
import contextlib
import functools
import gc
import json
import math
import os
import random
import sys
import time
from datetime import timedelta
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
from transformers.modeling_layers import GradientCheckpointingLayer

import data
import evaluate
import mine
from model import ActionLLaVA, describe, load_model

# -----------------------------------------------------------------------------
# config: every flag with the paper's default; --data toy fills TOY_PRESET into the flags not given

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--data", choices=["toy"], default=None, help="toy: make the toy kitchen under --annotations "
                    "(default toy/) and its mined MQA files when missing, and apply the toy preset")
parser.add_argument("--train-file", action="append", default=None,
                    help="MQA JSONL from mine.py; repeat the flag or comma-separate")
parser.add_argument("--annotations", default=None, help="EPIC annotation root: classes, and the segments of the "
                    "prior-action, temporal and direct tasks")
parser.add_argument("--split", default="train", help="annotation split the training files were mined from")
parser.add_argument("--video-root", default=None, help="default {annotations}/videos")
parser.add_argument("--frames", type=int, default=16, help="frames per clip")
parser.add_argument("--time-prompt", action="store_true", help="prefix LLaVA-Video's time instruction")
parser.add_argument("--prompt", choices=["ego", "allo"], default="ego", help="MQA prompt: egocentric or allocentric")
parser.add_argument("--prior-ratio", type=float, default=0.3, help="share of MQA rows asked with two prior actions")
parser.add_argument("--no-temporal", action="store_true", help="leave out the temporal detection task")
parser.add_argument("--no-direct", action="store_true", help="leave out the direct prediction task")
parser.add_argument("--pad-seconds", type=float, default=3.0, help="temporal detection: padding around the action")
parser.add_argument("--captions", default=None, help="captions and open QA by narration id (JSON)")
parser.add_argument("--replay", default=None, help="LLaVA conversation JSON replayed against forgetting")
parser.add_argument("--replay-root", default=None, help="videos of --replay (default: the JSON's folder)")
parser.add_argument("--replay-ratio", type=float, default=0.0, help="replay rows per task row")
parser.add_argument("--skip-bad", action="store_true", help="count unreadable videos and go on without them")
parser.add_argument("--num-workers", type=int, default=data.DEFAULT_WORKERS,
                    help="DataLoader workers decoding clips, per rank (default: cores / (4 x ranks on the node), at most 4)")
parser.add_argument("--eval-file", default=None, help="MQA benchmark (mine.py) evaluated at the end")
parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps, and at step 0 (0: end only)")
parser.add_argument("--eval-batch-size", type=int, default=8)
parser.add_argument("--base", default="llava-video-7b", help="model.py alias or a local directory")
parser.add_argument("--random-init", action="store_true", help="the base's architecture with random weights")
parser.add_argument("--action-tokens", type=int, choices=[0, 1, 3], default=1)
parser.add_argument("--supervise-layer", choices=["last", "first", "all"], default="last")
parser.add_argument("--head-weight", type=float, default=0.1, help="head loss weight against the LM loss")
parser.add_argument("--verb-weight", type=float, default=0.5)
parser.add_argument("--noun-weight", type=float, default=0.5)
parser.add_argument("--action-weight", type=float, default=0.1)
parser.add_argument("--grad-checkpointing", action="store_true", help="recompute layer activations in the backward")
parser.add_argument("--batch-size", type=int, default=64, help="global: samples per optimizer step, all ranks")
parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--max-steps", type=int, default=None, help="planned optimizer steps (overrides --epochs)")
parser.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop at this step; the schedule "
                    "still runs to the planned end, so --resume continues it")
parser.add_argument("--lr", type=float, default=1e-5, help="projector, LLM, action token, heads")
parser.add_argument("--lr-vision", type=float, default=2e-6, help="vision tower")
parser.add_argument("--warmup-ratio", type=float, default=0.03)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default=None, help="run directory (default runs/{base name}; runs/toy with --data toy)")
parser.add_argument("--resume", default=None, help="run directory to continue; its args.json fills the flags not given")
parser.add_argument("--save-every", type=int, default=1000, help="DCP checkpoint every N steps (and at the end)")
parser.add_argument("--log-every", type=int, default=10)
parser.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU (default from the GPU name)")

TOY_K, TOY_DRAWS, TOY_VIDEOS = 5, 8, (12, 2)  # options per question; training MQA draws; train/val videos


def toy_preset(root):
    """The quickstart: minutes on a CPU. In that time the tiny random-init model learns the actions (heads,
    multi-round), not yet to answer by option letter (README, Known gap); a real base answers letters from the start."""
    return dict(base="tiny", annotations=str(root), out="runs/toy",
                train_file=[f"{root}/train_mqa_avion_k{TOY_K}_pool{2 * (TOY_K - 1)}_x{TOY_DRAWS}.jsonl"],
                eval_file=f"{root}/ek100_mqa_tim_k{TOY_K}.jsonl", frames=8, batch_size=16, grad_accum=1,
                epochs=1, lr=2e-3, lr_vision=2e-3, warmup_ratio=0.05, log_every=10, save_every=500)


def resolve_args(argv):
    """Flags given on the command line win, then the resumed run's args.json, then the toy preset, then defaults."""
    args = parser.parse_args(argv)
    given = {a.dest for a in parser._actions for s in a.option_strings for x in argv if x == s or x.startswith(s + "=")}
    if args.resume:
        saved = json.loads((Path(args.resume) / "args.json").read_text())
        for k, v in saved.items():
            if k not in given and k not in ("resume", "stop_after", "out"):
                setattr(args, k, v)
        args.out = args.out or args.resume
        given |= saved.keys()
    preset = {k: v for k, v in toy_preset(args.annotations or "toy").items() if k not in given} if args.data else {}
    vars(args).update(preset)
    if args.train_file:
        args.train_file = [f for arg in args.train_file for f in arg.split(",") if f]
    args.video_root = args.video_root or (args.annotations and str(Path(args.annotations) / "videos"))
    args.out = args.out or str(Path("runs") / Path(args.base).name)
    if not args.annotations or not args.train_file:
        parser.error("need --annotations and --train-file (or --data toy)")
    return args, preset

# -----------------------------------------------------------------------------
# data


def prepare_toy(args):
    """--data toy: the toy kitchen; training MQA from AVION, drawn TOY_DRAWS times (K-1 distractors from its top
    2(K-1), options shuffled anew: the tiny model must match options to the video, it cannot memorise letters);
    the validation benchmark from TIM (eq. 3): another recognizer's errors, as in the paper."""
    preset, root = toy_preset(args.annotations), Path(args.annotations)
    if not (root / data.SPLIT_FILES["train"]).exists():
        data.make_toy(root, videos_per_split=TOY_VIDEOS)
    ann = data.load_annotations(root)
    train_file, eval_file = preset["train_file"][0], preset["eval_file"]
    if not Path(train_file).exists():
        scores = mine.read_scores(root / "scores" / "avion_train.npz", ann, "train")
        data.write_jsonl_atomic(train_file, [row for draw in range(TOY_DRAWS) for row in mine.mine(
            ann, "train", scores, k=TOY_K, pool=2 * (TOY_K - 1), seed=args.seed + draw)])
    if not Path(eval_file).exists():
        scores = mine.read_scores(root / "scores" / "tim_validation.npz", ann, "validation")
        data.write_jsonl_atomic(eval_file, mine.mine(ann, "validation", scores, k=TOY_K, seed=args.seed))


def training_rows(args, ann):
    """The task mix of data.build_training_samples; the same on every rank (one seeded generator)."""
    mqa = [r for f in args.train_file for r in data.read_jsonl(f)]
    replay = data.read_replay(args.replay, args.replay_root) if args.replay else None
    return data.build_training_samples(
        ann, args.split, mqa, np.random.default_rng(args.seed), prior_ratio=args.prior_ratio,
        temporal=not args.no_temporal, direct=not args.no_direct, pad_seconds=args.pad_seconds, captions=args.captions,
        replay=replay, replay_ratio=args.replay_ratio, prompt=data.ALLO_PROMPT if args.prompt == "allo" else data.EGO_PROMPT)


def epoch_batches(n_rows, epoch, steps, args, rank, world, start):
    """This rank's micro-batches for steps start.. of an epoch: one permutation per (seed, epoch), cut into global
    batches; each is split rank-major into world x accum micro-batches, so a step's samples (and its gradient)
    are the same on any number of ranks."""
    perm = np.random.default_rng((args.seed, epoch)).permutation(n_rows)[:steps * args.batch_size]
    micro = perm.reshape(steps, world, args.grad_accum, -1)[start:, rank]
    return micro.reshape(-1, micro.shape[-1]).tolist()

# -----------------------------------------------------------------------------
# distributed setup, model, optimizer, schedule


def init_distributed():
    """torchrun's environment, or a group of one (in-process store): collectives and DCP then need no branches."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def parallelize(model, args, device):
    """FSDP2: one unit per decoder and per vision encoder layer, then the root; bf16 compute with fp32 gradient
    reduction on GPU. Every parameter gets a gradient on every step (model.py runs the tower on text-only batches),
    so DDP needs no find_unused_parameters."""
    if args.parallel == "fsdp":
        mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
        for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(model, sync):
    """Reduce gradients only on the window's last micro-step: DDP's no_sync, FSDP2's requires_gradient_sync."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def lr_scale(step, total, warmup):
    """Linear warmup, then cosine to zero at the planned total (never where a run happens to stop)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def default_peak_tflops(device):
    """Dense bf16 peak per device for MFU; None (MFU not logged) where unknown."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in {"H100": 989.0, "H200": 989.0, "A100": 312.0}.items() if k in name), None)

# -----------------------------------------------------------------------------
# checkpoints: DCP (sharded model + optimizer) with the position and RNG, and the plain exported model


def rng_state():
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=(torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss), python=random.getstate())


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state(s["cuda"])
    key, *rest = s["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), *rest))
    random.setstate(s["python"])


def save_checkpoint(model, opt, args, state, rank):
    """{out}/step_N/: DCP shards, each rank's RNG, args.json and train_state.json, written last: its presence
    marks a complete checkpoint."""
    path = Path(args.out) / f"step_{state['step']}"
    dist.barrier()
    if rank == 0:  # a step_N written over (after a resume) is incomplete until train_state.json is back
        (path / "train_state.json").unlink(missing_ok=True)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (path / "args.json").write_text(json.dumps(vars(args), indent=1))
        (path / "train_state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(model, opt, run, rank):
    """The latest complete step_N of a run into the (wrapped) model and optimizer; returns its train state."""
    done = [p.parent for p in Path(run).glob("step_*/train_state.json")]
    if not done:
        raise FileNotFoundError(f"--resume {run}: no complete checkpoint (step_N/train_state.json) in it")
    path = max(done, key=lambda p: int(p.name.split("_")[1]))
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    if (path / f"rng_rank{rank}.pt").exists():  # absent when resuming on more ranks than before
        set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=True))
    return json.loads((path / "train_state.json").read_text())


def export(model, out, dtype, rank):
    """The plain directory that evaluate.py --ckpt and from_pretrained read: the full state dict gathered on rank 0
    (from the shards under FSDP) and written through a twin built on the meta device, so no second copy is made."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with torch.device("meta"):
            twin = ActionLLaVA(type(model.llava)(model.llava.config), model.tokenizer, **model.head_sizes,
                               n_action_tokens=model.n_action_tokens, spec=model.spec,
                               supervise_layer=model.supervise_layer, **model.loss_weights)
        twin.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}, assign=True)
        twin.save(out)
    dist.barrier()


def evaluate_in_place(model, args, rows, autocast):
    """MQA accuracy of the training model. evaluate.py calls LLaVA's submodules, which FSDP's root hooks would not
    unshard, so every unit is gathered for the evaluation and resharded after."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units:  # before the first training forward (--eval-every), or a unit would make itself the root
        model._get_fsdp_state()._lazy_init()
    for m in units:
        m.unshard()
    with autocast:
        result = evaluate.evaluate_mqa(model, rows, args.video_root, args.frames, args.eval_batch_size,
                                       args.num_workers, args.skip_bad, args.time_prompt)
    for m in units:
        m.reshard()
    return result

# -----------------------------------------------------------------------------
# training


STATS = ("lm_sum", "lm_tokens", "head_sum", "verb_sum", "noun_sum", "action_sum", "verb_correct", "noun_correct",
         "head_samples")


def main(argv):
    args, preset = resolve_args(argv)
    rank, world, device = init_distributed()
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    say = functools.partial(print, flush=True) if rank == 0 else lambda *a, **k: None
    if preset:
        say("toy preset: " + " ".join(f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}"
                                      for k, v in preset.items()))
    if args.batch_size % (world * args.grad_accum):
        parser.error(f"--batch-size {args.batch_size} is not a multiple of ranks x --grad-accum = {world * args.grad_accum}")
    out = Path(args.out)
    earlier = sorted(out.glob("step_*/train_state.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    if earlier and not args.resume:  # a fresh run here would leave them to a later --resume
        parser.error(f"{out} holds checkpoints of an earlier run (up to {earlier[-1].parent.name}): continue it with "
                     f"--resume {out}, or pass another --out, or delete {out}")
    if rank == 0:  # rank 0 first: it may make the toy set and write actions.csv
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=1))
        if args.data:
            prepare_toy(args)
        data.load_annotations(args.annotations)
    dist.barrier()
    ann = data.load_annotations(args.annotations)
    rows = training_rows(args, ann)
    eval_rows = evaluate.benchmark_rows(args.eval_file) if args.eval_file else None
    steps_per_epoch = len(rows) // args.batch_size
    if steps_per_epoch == 0:
        parser.error(f"{len(rows)} training rows make no global batch of --batch-size {args.batch_size}")
    total = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    stop = min(total, args.stop_after if args.stop_after is not None else total)
    warmup = math.ceil(args.warmup_ratio * total)

    torch.manual_seed(args.seed)  # the heads start alike on every rank: FSDP shards each rank's own initialisation
    raw = load_model(args.base, len(ann.vocab.verbs), len(ann.vocab.nouns), len(ann.vocab), args.action_tokens,
                     random_init=args.random_init, supervise_layer=args.supervise_layer, head_weight=args.head_weight,
                     verb_weight=args.verb_weight, noun_weight=args.noun_weight, action_weight=args.action_weight)
    say(f"{describe(raw)}; {len(rows)} training rows, {steps_per_epoch} steps an epoch, {total} steps planned; "
        f"{world} rank(s) x {args.grad_accum} micro-batches of {args.batch_size // (world * args.grad_accum)}")
    raw.to(device).train()
    if args.grad_checkpointing:
        raw.llava.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in raw.parameters())
    model = parallelize(raw, args, device)  # FSDP2 shards raw in place; DDP wraps it
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and args.parallel == "ddp" else contextlib.nullcontext()
    params = [p for p in raw.parameters() if p.requires_grad]
    vision = {id(p) for p in raw.llava.model.vision_tower.parameters()}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) in vision]},
                             {"params": [p for p in params if id(p) not in vision]}],
                            lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    peaks = (args.lr_vision, args.lr)
    state = dict(step=0, epoch=0, step_in_epoch=0, bad_videos=0, clamped_frames=0)
    log_path, old_log = out / "log.jsonl", Path(args.resume or out) / "log.jsonl"
    if args.resume:  # its RNG states included
        state = load_checkpoint(raw, opt, args.resume, rank)
        say(f"resumed {args.resume} at step {state['step']} (epoch {state['epoch']}, step {state['step_in_epoch']}"
            f" in it)" + ("" if Path(args.resume) == out else f"; continuing in {out}"))
    else:
        torch.manual_seed(args.seed + rank)  # per-rank randomness from here on (dropout, if any)
    if rank == 0 and old_log.exists():  # a resumed run drops what the killed one logged after its checkpoint
        kept = [line for line in old_log.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
        log_path.write_text("".join(line + "\n" for line in kept) if args.resume else "")

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(step):
        result = evaluate_in_place(raw, args, eval_rows, autocast)
        log(dict(step=step, mqa_accuracy=result["accuracy"], eval_n=result["n"], eval_skipped_bad=result["skipped_bad"]))
        say(f"\nstep {step}: MQA accuracy {result['accuracy']:.4f} on {result['n']} questions of {args.eval_file}")
        return result

    dataset = data.TaskDataset(rows, args.video_root, raw.tokenizer, raw.spec, args.frames, args.action_tokens,
                               train=True, time_prompt=args.time_prompt, skip_bad=args.skip_bad, seed=args.seed)
    collate = functools.partial(data.collate, pad_id=raw.tokenizer.pad_token_id)
    head_weight, peak_tflops = args.head_weight, args.peak_tflops or default_peak_tflops(device)
    window = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    host = dict(tokens=0, samples=0, bad=0, clamped=0)  # plain ints from the CPU batches: no device sync
    step, result = state["step"], None
    if eval_rows and args.eval_every and step == 0:
        result = run_eval(0)
    pbar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    t_last = time.time()
    while step < stop:
        epoch, start = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        batches = iter(DataLoader(dataset, batch_sampler=epoch_batches(len(rows), epoch, steps_per_epoch, args, rank,
                                                                       world, start),
                                  collate_fn=collate, num_workers=args.num_workers, pin_memory=cuda,
                                  prefetch_factor=4 if args.num_workers else None))
        while step < min(stop, (epoch + 1) * steps_per_epoch):
            micro = [next(batches) for _ in range(args.grad_accum)]
            # The normalisers are known before any forward (labels come with the batch): the window's supervised
            # answer tokens and labelled samples over all ranks. Each micro-step backpropagates
            #   (lm_loss_sum / tokens_all + head_weight * head_loss_mean * head_samples / samples_all) * world,
            # and DDP / FSDP average gradients over ranks (/ world): the gradient of the token mean of the LM loss
            # (answers of any length weigh per token) plus the sample mean of the head loss, over the global batch.
            counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                   sum(int((b["action_labels"] != -100).any(1).sum()) for b in micro)],
                                  dtype=torch.float32, device=device)
            dist.all_reduce(counts)
            tokens_all, samples_all = counts.clamp(min=1)
            scale = lr_scale(step, total, warmup)
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * scale
            for i, b in enumerate(micro):
                host["tokens"] += int(b["attention_mask"].sum())
                host["samples"] += len(b["input_ids"])
                host["bad"] += b["bad"]
                host["clamped"] += b["clamped"]
                b = {k: v.to(device, non_blocking=True) for k, v in b.items() if torch.is_tensor(v)}
                with grad_sync(model, i == args.grad_accum - 1):
                    with autocast:
                        res = model(b)
                    hs = res["head_samples"].to(torch.float32)
                    loss = (res["lm_loss_sum"] / tokens_all + head_weight * res["head_loss"] * hs / samples_all) * world
                    loss.backward()
                window += torch.stack([res["lm_loss_sum"].detach(), res["lm_tokens"].float(), res["head_loss"].detach() * hs,
                                       res["verb_loss"] * hs, res["noun_loss"] * hs, res["action_loss"] * hs,
                                       res["verb_acc"] * hs, res["noun_acc"] * hs, hs]).double()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            pbar.update(1)
            if step % args.log_every == 0 or step % args.save_every == 0 or step == stop:
                stats = torch.cat([window, torch.tensor(list(host.values()), dtype=torch.float64, device=device)])
                dist.all_reduce(stats)  # the one host sync of a logging window
                s = dict(zip(STATS + tuple(host), stats.tolist()))
                dt, t_last = time.time() - t_last, time.time()
                state.update(bad_videos=state["bad_videos"] + int(s["bad"]),
                             clamped_frames=state["clamped_frames"] + int(s["clamped"]))
                n_head, lm_loss = max(s["head_samples"], 1), s["lm_sum"] / max(s["lm_tokens"], 1)
                record = dict(step=step, epoch=epoch, loss=lm_loss + head_weight * s["head_sum"] / n_head,
                              lm_loss=lm_loss, head_loss=s["head_sum"] / n_head, verb_loss=s["verb_sum"] / n_head,
                              noun_loss=s["noun_sum"] / n_head, action_loss=s["action_sum"] / n_head,
                              verb_acc=s["verb_correct"] / n_head, noun_acc=s["noun_correct"] / n_head,
                              lr_vision=peaks[0] * scale, lr=peaks[1] * scale,
                              tokens_per_s=s["tokens"] / dt, samples_per_s=s["samples"] / dt,
                              bad_videos=state["bad_videos"], clamped_frames=state["clamped_frames"])
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                if peak_tflops:  # 6 x parameters x tokens: forward and backward of a dense model, per second
                    record["mfu"] = 6 * n_params * s["tokens"] / dt / (peak_tflops * 1e12 * world)
                log(record)
                pbar.set_postfix(loss=f"{record['loss']:.4f}", verb=f"{record['verb_acc']:.2f}",
                                 noun=f"{record['noun_acc']:.2f}", samples_s=f"{record['samples_per_s']:.1f}")
                window.zero_()
                host = dict.fromkeys(host, 0)
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
        export(raw, out, torch.bfloat16 if cuda else torch.float32, rank)
        if eval_rows:
            result = run_eval(step)
        say(f"model saved to {out}" + (f"; MQA accuracy {result['accuracy']:.4f}" if result else "")
            + f"; {state['bad_videos']} unreadable videos skipped, {state['clamped_frames']} frames clamped")
    else:
        say(f"stopped at step {step} of {total}; continue with: python train.py --resume {out}")
    # DDP's reducer holds the process group: free it while the group lives, or gloo's destructor can hang at exit
    del model, run_eval
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
