"""Base models, the LLaVA-NeXT checkpoint format, both video layouts, the action token and its heads (paper eq. 5).

The model is transformers' LlavaOnevisionForConditionalGeneration as it is (SigLIP, 2-layer MLP projector, Qwen2 LLM).
The paper's base and the authors' checkpoints are in the LLaVA-NeXT format (`architectures: ["LlavaQwenForCausalLM"]`,
`mm_*` config fields): `convert` turns such a folder into a native one; `load_model` does so once, into a cache folder.

    python model.py convert lmms-lab/LLaVA-Video-7B-Qwen2 ckpt/llava-video-7b   # or a local LLaVA-NeXT folder
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
import transformers  # its classes load on first use (transformers' own lazy modules): --help stays fast
from transformers.modeling_outputs import BaseModelOutputWithPooling

import data
from data import ACTION_TOKEN, IM_END, IM_START, IMAGE_TOKEN, VIDEO_TOKEN

# shapes for --random-init (no hub here) and the base table -------------------
# so400m-384/14 with its last layer dropped and no head, as the authors' tower and the native class use it
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)
QWEN2 = dict(max_position_embeddings=32768, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
QWEN2_7B = dict(QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, tie_word_embeddings=False)
QWEN2_05B = dict(QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True)
# tiny: 32 px / 8 px patches = 4x4 patches, pooled to 2x2 a frame
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, vision_use_head=False)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


@dataclass(frozen=True)
class Base:
    source: str | None      # hub id; None: built in code
    text: dict              # the Qwen2 shapes --random-init builds (embedding rows as published)
    video_layout: str       # the layout its weights were trained with
    time_instruction: bool  # trained with the time instruction before the question
    action_tokens: int = 0  # the released action token(s) and heads


NEXT_7B, NEXT_05B = dict(QWEN2_7B, vocab_size=152064), dict(QWEN2_05B, vocab_size=151936)  # LLaVA-NeXT tables
BASES = {
    "llava-video-7b": Base("lmms-lab/LLaVA-Video-7B-Qwen2", NEXT_7B, "grid", True),
    "llavaction-7b": Base("MLAdaptiveIntelligence/LLaVAction-7B", NEXT_7B, "grid", True, 1),
    "llavaction-0.5b": Base("MLAdaptiveIntelligence/LLaVAction-0.5B", NEXT_05B, "grid", True, 1),
    "llava-ov-7b": Base("llava-hf/llava-onevision-qwen2-7b-ov-hf", dict(QWEN2_7B, vocab_size=152128), "hf", False),
    "llava-ov-0.5b": Base("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", dict(QWEN2_05B, vocab_size=152000), "hf", False),
    "tiny": Base(None, TINY_TEXT, "grid", False),  # tests, the toy demo, CPU runs
}
SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN, ACTION_TOKEN]
HEAD_TOKEN = {1: (0, 0, 0), 3: (0, 1, 2)}  # which action token feeds the verb, noun and action head
HEAD_FIELDS = ("n_verbs", "n_nouns", "n_actions", "head_bias")  # fixed by a checkpoint's trained heads
CONVERTED_CACHE = Path(os.environ.get("LLAVACTION_CACHE", Path.home() / ".cache" / "llavaction"))


@dataclass
class ActionConfig:
    """What LLaVAction adds to a base, saved as action.json beside the weights. Defaults follow the authors'
    release: heads without bias, loss 0.1 x (0.5 verb + 0.5 noun + 0.1 action CE) summed over the supervised
    layers and divided by L + 1 (head_norm "layers+1"; "layers" divides by L, twice the weight at one layer)."""
    action_tokens: int = 1  # 0, 1 or 3 <action> tokens right after the last video token
    n_verbs: int = 97
    n_nouns: int = 300
    n_actions: int = 3806
    head_bias: bool = False
    supervise_layer: str = "last"  # last, first (the first decoder layer's output) or all layers
    head_weight: float = 0.1
    verb_weight: float = 0.5
    noun_weight: float = 0.5
    action_weight: float = 0.1
    head_norm: str = "layers+1"
    video_layout: str = "hf"  # grid: a newline after every row of pooled tokens; hf: one newline per video
    prompt_style: str = "official"  # data.STYLES
    perspective: str = "ego"        # data.PERSPECTIVES: the point of view the questions are asked from
    time_instruction: bool = False


@dataclass
class VisionSpec:
    """What data.py needs to make pixel values and count the video placeholders."""
    size: int
    mean: tuple
    std: tuple
    grid: int    # pooled tokens per side of a frame
    layout: str  # "grid" or "hf"

    @property
    def tokens_per_frame(self):
        return self.grid * (self.grid + (self.layout == "grid"))

    def video_tokens(self, n_frames: int) -> int:
        """grid: T x g(g+1) (14 x 15 = 210 a frame at 384/14); hf: T x g^2 + 1 (196 a frame, one newline)."""
        return n_frames * self.tokens_per_frame + (self.layout == "hf")


def vision_spec(config, layout) -> VisionSpec:
    """SigLIP normalises with mean = std = 0.5; the native class pools p x p patches to ceil(p/2)^2 tokens."""
    if layout not in ("grid", "hf"):
        raise ValueError(f"unknown video layout {layout!r}: grid or hf")
    v = config.vision_config
    return VisionSpec(v.image_size, (0.5,) * 3, (0.5,) * 3, math.ceil(v.image_size // v.patch_size / 2), layout)


# tokenizers ------------------------------------------------------------------
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer: tiny splits as it does (digits one by one, newlines apart)
TINY_WORDS = """take put put-down open close wash cut mix pour throw dry move remove turn-on turn-off insert shake peel
squeeze fill scoop stir check adjust apply empty flip break spray wipe grate hold pick-up rinse press slice eat drink
plate knife spoon fork cup glass bowl pan pot lid tap water sponge board chopping bag box bottle jar oil salt onion
garlic tomato potato carrot pepper cheese bread egg rice pasta meat chicken milk butter sauce towel fridge drawer
cupboard cooker hob oven microwave kettle coffee maker tea dough food container hand hands the now on counter
user assistant system"""


def build_tokenizer_tiny(vocab_size=1024, special_tokens=SPECIAL_TOKENS):
    """A byte-level BPE trained here in well under a second on the prompts and kitchen words: tests need no download."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    prompts = [data.SYSTEM_PROMPT, *data.PERSPECTIVES.values(), data.MQA_INSTRUCTION, data.MQA_OPTIONS,
               data.PRIOR_PROMPT, data.DIRECT_PROMPT, *data.CAPTION_PROMPT.values(), data.TEMPORAL_PROMPT,
               data.TIME_PROMPT, TINY_WORDS, " " + TINY_WORDS.replace("\n", " ")]
    tok.train_from_iterator(prompts + [" ".join(f"{c}. {c}," for c in data.LETTERS)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token=IM_END)


def with_special_tokens(tokenizer):
    """Add <image>, <video>, <action> where missing, in that order (a plain Qwen2-Instruct tokenizer of 151,646
    entries then has them at 151646, 151647, 151648: inside the published embedding tables, no resize)."""
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, ACTION_TOKEN) if t not in tokenizer.get_vocab()]
    tokenizer.add_tokens(missing, special_tokens=True)  # none missing: a no-op
    return tokenizer


def base_tokenizer(base, tokenizer=None):
    """The tokenizer of --random-init `base`: --tokenizer DIR, 'tiny', or the alias's own when it is cached here."""
    source = BASES[base].source
    if base == "tiny" or tokenizer == "tiny":
        tok = build_tokenizer_tiny()
        if base != "tiny":
            print(f"WARNING: --random-init {base} with the tiny test tokenizer ({len(tok)} entries inside a table of "
                  f"{BASES[base].text['vocab_size']:,} rows): real shapes, toy token ids", file=sys.stderr)
        return tok
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or source, local_files_only=not tokenizer)
    except OSError:
        raise ValueError(f"--random-init {base}: its tokenizer ({tokenizer or source}) is not available here; pass "
                         "--tokenizer DIR (a Qwen2 tokenizer folder), or --tokenizer tiny for a smoke test") from None
    print(f"--random-init {base}: tokenizer from {tokenizer or source} ({len(tok):,} entries)", file=sys.stderr)
    return with_special_tokens(tok)


# the LLaVA-NeXT format: checks, config, key map, conversion ------------------
NEXT_SUPPORTED = {  # config field: (value when absent, values this converter reads exactly)
    "mm_projector_type": ("mlp2x_gelu", {"mlp2x_gelu"}),
    "mm_spatial_pool_mode": ("bilinear", {"bilinear"}),
    "mm_spatial_pool_stride": (2, {2}),
    "mm_resampler_type": (None, {None, ""}),
    "add_faster_video": (False, {False, None}),
    "mm_newline_position": ("one_token", {"grid", "one_token"}),
    "vision_supervision": (None, {None, "one_token", "three_tokens"}),
    "vision_token_training": (None, {None, "last_layer", "first_layer", "all_layers"}),
}
SUPERVISED_LAYER = {None: "last", "last_layer": "last", "first_layer": "first", "all_layers": "all"}
QWEN2_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
                "tie_word_embeddings", "sliding_window", "use_sliding_window", "max_window_layers", "attention_dropout")
NEXT_KEYS = (  # LLaVA-NeXT key prefix -> native prefix (None: dropped); the first match wins
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.action_supervision", "action_embeds"),
    ("model.vision_resampler.", None), ("model.faster_token", None),
    ("model.", "model.language_model."),  # embed_tokens, layers, norm
)
HEAD_KEYS = ("action_embeds", "verb_head.weight", "noun_head.weight", "action_head.weight")


def is_next_format(config: dict) -> bool:
    return "LlavaQwenForCausalLM" in (config.get("architectures") or [])


def next_key(key):
    if key.endswith(".inv_freq"):
        return None
    for old, new in NEXT_KEYS:
        if key.startswith(old):
            return new and new + key[len(old):]
    return key  # lm_head.weight, the heads; anything else is reported as unexpected


def next_config(src, cfg, tokenizer):
    """(LlavaOnevisionConfig, ActionConfig) of a LLaVA-NeXT config.json; unsupported options are refused by name."""
    for name, (default, accepted) in NEXT_SUPPORTED.items():
        if cfg.get(name, default) not in accepted:
            raise ValueError(f"{src}/config.json: {name} = {cfg.get(name)!r} is not supported (only "
                             f"{sorted(map(str, accepted))} convert exactly); this checkpoint cannot be loaded here")
    merge, newline = cfg.get("mm_patch_merge_type", "flat"), cfg.get("mm_newline_position", "one_token")
    if not merge.startswith("spatial") or (newline == "one_token" and "unpad" not in merge):
        raise ValueError(f"{src}/config.json: mm_patch_merge_type = {merge!r} with mm_newline_position = {newline!r} "
                         "is not supported: only spatial* with grid, or spatial*unpad with one_token, convert exactly")
    if cfg.get("vision_supervision") and not cfg.get("action_types"):
        raise ValueError(f"{src}/config.json: vision_supervision = {cfg['vision_supervision']!r} but no action_types "
                         "(the head sizes, e.g. \"97,300,3806\"); add it")
    tower = str(cfg.get("mm_vision_tower"))
    if "siglip" not in tower.lower():
        raise ValueError(f"{src}/config.json: mm_vision_tower = {tower!r} is not supported: only SigLIP towers")
    try:
        vision = transformers.SiglipVisionConfig.from_pretrained(tower)
    except OSError as e:
        if tower != "google/siglip-so400m-patch14-384":
            raise ValueError(f"{src}/config.json: cannot read the config of mm_vision_tower {tower!r} ({e})") from None
        vision = transformers.SiglipVisionConfig(**dict(SIGLIP_SO400M, num_hidden_layers=27))  # its published shapes
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ValueError(f"{src}/config.json: mm_hidden_size = {cfg['mm_hidden_size']} but {tower} is "
                         f"{vision.hidden_size} wide")
    # the authors' tower drops its last layer and head
    vision = {**vision.to_dict(), "num_hidden_layers": vision.num_hidden_layers - 1, "vision_use_head": False}
    config = native_config(vision, {k: cfg[k] for k in QWEN2_FIELDS if cfg.get(k) is not None}, tokenizer)
    last = max(tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, ACTION_TOKEN]))
    if last >= config.text_config.vocab_size:
        raise ValueError(f"{src}: the tokenizer puts {ACTION_TOKEN} at {last}, past the "
                         f"{config.text_config.vocab_size} embedding rows of config.json")
    tokens = {None: 0, "one_token": 1, "three_tokens": 3}[cfg.get("vision_supervision")]
    sizes = [int(x) for x in cfg["action_types"].split(",")] if tokens else []  # none: ActionConfig's defaults
    grid = newline == "grid"  # LLaVA-Video's layout, trained with the time prompt
    return config, ActionConfig(tokens, *sizes, supervise_layer=SUPERVISED_LAYER[cfg.get("vision_token_training")],
                                video_layout="grid" if grid else "hf",
                                time_instruction=bool(cfg.get("add_time_instruction", grid)))


def weights_fingerprint(folder):
    """[name, bytes, mtime] of a checkpoint's weight files: it changes when they are re-exported or replaced."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).iterdir())
            if p.suffix in (".safetensors", ".pt") and p.is_file()]


def convert(src, out):
    """A LLaVA-NeXT folder -> a native one: config, tokenizer with <image>/<video>/<action>, weights renamed a shard at
    a time (bf16 stays bf16), action token(s) and bias-free heads in heads.pt, training settings in action.json. Exactly
    the native keys (never loaded half-right), in a temporary folder renamed at the end: a failure leaves nothing."""
    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    if not is_next_format(cfg):
        raise ValueError(f"{src}/config.json: architectures = {cfg.get('architectures')}, not LlavaQwenForCausalLM")
    tokenizer = with_special_tokens(transformers.AutoTokenizer.from_pretrained(src))
    config, action = next_config(src, cfg, tokenizer)
    with torch.device("meta"):
        expected = set(transformers.LlavaOnevisionForConditionalGeneration(config).state_dict())
    expected -= {"lm_head.weight"} if config.tie_word_embeddings else set()
    expected |= set(HEAD_KEYS) if action.action_tokens else set()
    index = src / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    if not all((src / s).exists() for s in shards):
        raise FileNotFoundError(f"{src}: no {shards[0]}; only safetensors checkpoints convert")
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map, heads, size = {}, {}, 0
        for shard in shards:
            tensors = {}
            with safe_open(src / shard, "pt") as f:
                for key in f.keys():
                    if (new := next_key(key)) is not None:
                        (heads if new in HEAD_KEYS else tensors)[new] = f.get_tensor(key).contiguous()
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            size += sum(t.numel() * t.element_size() for t in tensors.values())
        written = set(weight_map) | set(heads)
        if written != expected:
            raise ValueError(f"{src}: the weights do not match its config.json: missing "
                             f"{sorted(expected - written)[:5]}, unexpected {sorted(written - expected)[:5]}")
        if index.exists():
            data.write_json_atomic(tmp / index.name, {"metadata": {"total_size": size}, "weight_map": weight_map})
        config.dtype = cfg.get("torch_dtype") or cfg.get("dtype")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if heads:
            torch.save(heads, tmp / "heads.pt")
        data.write_json_atomic(tmp / "action.json", asdict(action))
        data.write_json_atomic(tmp / "source.json", {"source": str(src.resolve()), "weights": weights_fingerprint(src)})
        try:
            tmp.rename(out)
        except OSError:  # another process converted it meanwhile
            if not (out / "action.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name, cache=None):
    """`name` (an alias, a local folder or a hub id) as a native checkpoint: a Path, or the name itself for `tiny` and a
    native hub id. A LLaVA-NeXT one is converted once: into `{folder}.native` beside a folder, into $LLAVACTION_CACHE
    (default ~/.cache/llavaction) for a hub id, or into `cache` when given (named after the folder's whole path). A
    conversion whose local source has new weights since is refused, never used."""
    if name == "tiny":
        return name
    source = BASES[name].source if name in BASES else str(name)
    if (local := Path(source)).is_dir():
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"checkpoint {local} holds no config.json: not a model folder (train one with "
                                    "train.py, or pass an alias: " + ", ".join(BASES) + ")")
        if not is_next_format(json.loads((local / "config.json").read_text())):
            return local
        out = Path(cache) / "--".join(local.resolve().parts[1:]) if cache else local.with_name(local.name + ".native")
        made = json.loads((out / "source.json").read_text()) if (out / "source.json").exists() else None
        if made and made != {"source": str(local.resolve()), "weights": weights_fingerprint(local)}:
            raise ValueError(f"{out} was converted from {made['source']} as it was then, and its weights have changed "
                             f"since: delete {out} to convert {local} again")
    else:
        if name not in BASES and not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise FileNotFoundError(f"checkpoint {source}: no such folder, and not an alias ({', '.join(BASES)})")
        out = Path(cache or CONVERTED_CACHE) / source.replace("/", "--")
        if (out / "action.json").exists():
            return out
        from huggingface_hub import hf_hub_download, snapshot_download
        try:
            if not is_next_format(json.loads(Path(hf_hub_download(source, "config.json")).read_text())):
                return source
            local = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as e:
            raise FileNotFoundError(f"{source}: no such folder here, and the hub repository could not be fetched "
                                    f"({type(e).__name__}); download it (huggingface-cli download {source} "
                                    "--local-dir DIR) and pass DIR") from None
    if not (out / "action.json").exists():
        print(f"converting {source} (LLaVA-NeXT format) into {out}, once", file=sys.stderr)
        convert(local, out)
    return out


# loading a base --------------------------------------------------------------
def native_config(vision: dict, text: dict, tokenizer):
    """The native config of SigLIP and Qwen2 shapes; <image>, <video>, pad and end ids from the tokenizer."""
    image, video, end = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN, IM_END])
    text = transformers.Qwen2Config(**text, pad_token_id=tokenizer.pad_token_id, eos_token_id=end)
    return transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**vision).to_dict(), text_config=text.to_dict(),
        image_token_index=image, video_token_index=video, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=text.tie_word_embeddings)


def base_config(base, tokenizer):
    """A config in code for `tiny` and for --random-init of a real alias; placeholder ids from the tokenizer."""
    if base == "tiny":
        return native_config(TINY_VISION, dict(TINY_TEXT, vocab_size=64 * math.ceil(len(tokenizer) / 64)), tokenizer)
    return native_config(SIGLIP_SO400M, BASES[base].text, tokenizer)


def load_base(name, random_init=False, dtype=None, device=None, tokenizer=None, cache=None, seed=0):
    """-> (LlavaOnevisionForConditionalGeneration, tokenizer, the checkpoint's ActionConfig fields, heads file or
    None). Random weights are drawn on `device` directly (a 7B model initialised on the CPU takes minutes)."""
    if name == "tiny" or (random_init and name in BASES):
        tok, b = base_tokenizer(name, tokenizer), BASES[name]
        config, heads = base_config(name, tok), None
        saved = dict(video_layout=b.video_layout, time_instruction=b.time_instruction, action_tokens=b.action_tokens)
    else:
        path = resolve(name, cache)
        meta = Path(path) / "action.json"
        try:
            saved = json.loads(meta.read_text()) if meta.exists() else dict(video_layout="hf", action_tokens=0)
            ActionConfig(**saved)
        except (ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {path}: action.json is corrupt ({e}); re-export the checkpoint") from None
        heads = Path(path) / "heads.pt" if saved.get("action_tokens") and not random_init else None
        if heads and not heads.exists():
            raise FileNotFoundError(f"checkpoint {path}: action.json names {saved['action_tokens']} action token(s) "
                                    "but heads.pt is missing; re-export the checkpoint")
        tok = with_special_tokens(transformers.AutoTokenizer.from_pretrained(path))
        if not random_init:
            try:
                llava = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype,
                                                                                            device_map=device)
            except Exception as e:  # safetensors cut short, a shard missing, ...
                raise ValueError(f"checkpoint {path}: its weights do not load ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); the files are corrupt or truncated: "
                                 "re-export or re-download them") from None
            return freeze_unused(llava), tok, saved, heads
        config = transformers.LlavaOnevisionConfig.from_pretrained(path)
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device else contextlib.nullcontext()):
        torch.manual_seed(seed)
        llava = transformers.LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    return freeze_unused(llava), tok, saved, heads


def freeze_unused(llava):
    """SigLIP's post_layernorm (and head) never see a gradient with vision_feature_layer=-1 (hidden_states[-1]
    is taken before them); frozen, DDP needs no find_unused_parameters and strict DCP loads work."""
    for name, p in llava.model.vision_tower.named_parameters():
        if name.startswith(("post_layernorm", "head")):
            p.requires_grad_(False)
    return llava


# the action token, its heads, and the video in either layout -----------------
class ActionLLaVA(nn.Module):
    """LLaVA plus learnable action tokens whose final states are supervised by verb/noun/action heads."""

    def __init__(self, llava, tokenizer, cfg: ActionConfig):
        super().__init__()
        assert cfg.action_tokens in (0, 1, 3) and cfg.supervise_layer in ("last", "first", "all")
        assert cfg.head_norm in ("layers+1", "layers") and cfg.prompt_style in data.STYLES
        assert cfg.perspective in data.PERSPECTIVES
        self.llava, self.tokenizer, self.cfg = llava, with_special_tokens(tokenizer), cfg
        self.spec = vision_spec(llava.config, cfg.video_layout)
        self.action_id = tokenizer.convert_tokens_to_ids(ACTION_TOKEN)
        emb = llava.get_input_embeddings()
        if self.action_id >= emb.num_embeddings:  # real checkpoints have spare rows; tiny may not
            emb = llava.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        if cfg.action_tokens == 0:
            return
        hidden, w = llava.config.text_config.hidden_size, emb.weight
        # Start from the mean token embedding: in distribution for the pretrained LM from the first step (the
        # authors' code leaves it uninitialised); a released checkpoint's own token replaces it on load.
        self.action_embeds = nn.Parameter(w.detach().mean(0, keepdim=True).repeat(cfg.action_tokens, 1).clone())
        self.verb_head, self.noun_head, self.action_head = [
            nn.Linear(hidden, n, bias=cfg.head_bias, device=w.device, dtype=w.dtype)
            for n in (cfg.n_verbs, cfg.n_nouns, cfg.n_actions)]
        emb.register_forward_hook(self._write_action_embeds)

    def _write_action_embeds(self, module, args, out):
        """Put action_embeds[k] at each row's k-th <action>: sync-free, so it runs in generate too, and it trains
        even with the embedding table frozen."""
        is_action = args[0] == self.action_id
        k = (is_action.cumsum(-1) - 1).clamp(0, self.cfg.action_tokens - 1)
        return torch.where(is_action[..., None], self.action_embeds[k].to(out.dtype), out)

    def video_features(self, pixels):
        """(B, N, H) video embeddings: hf as the native class makes them; grid adds image_newline after each row."""
        video = self.llava.model.get_video_features(pixels).pooler_output
        if self.spec.layout == "hf":
            return video
        (b, t), g = pixels.shape[:2], self.spec.grid
        rows = video[:, :-1].reshape(b, t, g, g, -1)
        newline = self.llava.model.image_newline.to(rows.dtype).expand(b, t, g, 1, -1)
        return torch.cat([rows, newline], 3).flatten(1, 3)

    def lm_inputs(self, batch):
        """llava.model's arguments, the video as embeddings (the native class counts them against the <video>s)."""
        dev = self.llava.device
        inputs = dict(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        if (pixels := batch.get("pixel_values_videos")) is not None:
            video = self.video_features(pixels.to(dev, self.llava.model.vision_tower.dtype))
            inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=video)}
        return inputs

    def objective(self, lm_loss_sum, head_loss_sum, tokens, samples):
        """The training loss, written once: train.py passes the counts of its accumulation window over all ranks."""
        return lm_loss_sum / tokens.clamp(min=1) + self.cfg.head_weight * head_loss_sum / samples.clamp(min=1)

    def forward(self, batch: dict) -> dict:
        """LM loss at the supervised answer tokens only (never the (B, L, V) logits) plus the head loss."""
        inputs, cfg, unused = self.lm_inputs(batch), self.cfg, 0
        if "mm_encoder_outputs" not in inputs and self.training:  # a text-only batch (replay, skipped videos) runs
            # the tower on a blank frame, before the LM as a video does: every rank runs FSDP's collectives in the
            # same order, and DDP finds every parameter
            tower = self.llava.model.vision_tower
            blank = torch.zeros((1, 1, 3, self.spec.size, self.spec.size), dtype=tower.dtype, device=self.llava.device)
            unused = 0 * self.video_features(blank).sum()
        out = self.llava.model(**inputs, use_cache=False,
                               output_hidden_states=cfg.action_tokens > 0 and cfg.supervise_layer != "last")
        h = out.last_hidden_state  # after the final norm, as is hidden_states[-1]
        target = batch["labels"].to(h.device)[:, 1:]  # position t predicts token t + 1
        supervised = target != -100
        logits = self.llava.lm_head(h[:, :-1][supervised]).float()
        result = dict(lm_loss_sum=F.cross_entropy(logits, target[supervised], reduction="sum") + unused,
                      lm_tokens=supervised.sum())
        labels = batch.get("action_labels")
        labels = torch.full((len(h), 3), -100, device=h.device) if labels is None else labels.to(h.device)
        result.update(self.head_losses(out, inputs["input_ids"] == self.action_id, labels))
        result["loss"] = self.objective(result["lm_loss_sum"], result["head_loss"] * result["head_samples"],
                                        result["lm_tokens"], result["head_samples"])
        return result

    def head_losses(self, out, is_action, action_labels) -> dict:
        """Eq. 5 (ActionConfig's *_weight and head_norm) at the action tokens, per labelled sample (-100 adds nothing);
        zeros without action tokens. Every row holds exactly cfg.action_tokens <action> ids (data.py's layout)."""
        cfg, zero = self.cfg, out.last_hidden_state.new_zeros((), dtype=torch.float32)
        if not cfg.action_tokens:
            return dict(head_loss=zero, verb_loss=zero, noun_loss=zero, action_loss=zero, verb_acc=zero, noun_acc=zero,
                        head_samples=torch.zeros((), dtype=torch.long, device=zero.device))
        # hidden_states[0] is the embedding output (action_embeds itself): "first" is the first layer's output
        layers = {"last": None, "first": slice(1, 2), "all": slice(1, None)}[cfg.supervise_layer]
        states = [out.last_hidden_state] if layers is None else out.hidden_states[layers]
        heads, valid = (self.verb_head, self.noun_head, self.action_head), action_labels != -100
        count, per_head = valid.sum(0).clamp(min=1), 0
        for s in states:
            tokens = s[is_action].view(len(s), cfg.action_tokens, -1)
            logits = [head(tokens[:, k].to(head.weight.dtype)).float() for head, k in
                      zip(heads, HEAD_TOKEN[cfg.action_tokens])]
            per_head = per_head + torch.stack([F.cross_entropy(lg, action_labels[:, j], reduction="sum")
                                               for j, lg in enumerate(logits)]) / count
        per_head = per_head / (len(states) + (cfg.head_norm == "layers+1"))
        head_loss = cfg.verb_weight * per_head[0] + cfg.noun_weight * per_head[1] + cfg.action_weight * per_head[2]
        correct = [((lg.argmax(-1) == action_labels[:, j]) & valid[:, j]).sum() / count[j] for j, lg in
                   enumerate(logits[:2])]  # accuracy of the last supervised layer
        per_head = per_head.detach()
        return dict(head_loss=head_loss, verb_loss=per_head[0], noun_loss=per_head[1], action_loss=per_head[2],
                    verb_acc=correct[0], noun_acc=correct[1], head_samples=valid.any(1).sum())

    def save(self, out):
        """A plain from_pretrained directory, plus heads.pt and action.json (everything it was trained with)."""
        out = Path(out)
        self.llava.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        if self.cfg.action_tokens:
            torch.save({k: v for k, v in self.state_dict().items() if not k.startswith("llava.")}, out / "heads.pt")
        data.write_json_atomic(out / "action.json", asdict(self.cfg))


def load_model(name, random_init=False, dtype=None, device=None, tokenizer=None, cache=None, **overrides):
    """An alias, folder or hub id (native, or LLaVA-NeXT converted once) as an ActionLLaVA. Trained heads stay (their
    token count and sizes win; a different given size is an error), else `overrides` (ActionConfig fields, None: the
    checkpoint's) make new ones. Layout, prompt style, time instruction: the checkpoint's unless overridden."""
    llava, tok, saved, heads = load_base(str(name), random_init, dtype, device, tokenizer, cache)
    given = {k: v for k, v in overrides.items() if v is not None}
    if heads is not None:  # trained heads (under --random-init an alias's heads are new: any sizes)
        have = {k: saved.get(k, getattr(ActionConfig, k)) for k in HEAD_FIELDS}
        if clash := [k for k in HEAD_FIELDS if k in given and given[k] != have[k]]:
            raise ValueError(f"checkpoint {name} has heads for {have['n_verbs']} verbs, {have['n_nouns']} nouns and "
                             f"{have['n_actions']} actions (bias {have['head_bias']}), but the run asks for "
                             + ", ".join(f"{k} {given[k]}" for k in clash))
        if given.get("action_tokens", saved["action_tokens"]) != saved["action_tokens"]:
            print(f"checkpoint {name} keeps its {saved['action_tokens']} action token(s) and their heads "
                  f"(--action-tokens {given['action_tokens']} is for a base without heads)", file=sys.stderr)
        given = {k: v for k, v in given.items() if k not in HEAD_FIELDS + ("action_tokens",)}
    model = ActionLLaVA(llava, tok, ActionConfig(**{**saved, **given}))
    if heads is not None:
        try:
            state = torch.load(heads, weights_only=True, map_location=device)
        except Exception as e:
            raise ValueError(f"checkpoint {heads.parent}: heads.pt is corrupt or truncated (torch.load failed: "
                             f"{type(e).__name__}); re-export it with train.py, or convert the source again") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or not all(k.startswith("llava.") for k in missing):
            raise ValueError(f"checkpoint {heads.parent}: heads.pt holds {sorted(state)}, the model needs "
                             f"{sorted(k for k in model.state_dict() if not k.startswith('llava.'))}")
    return model


def load_for_eval(name, device, random_init=False, tokenizer=None, cache=None, action_tokens=None):
    """The loader of evaluate.py and attention.py: a checkpoint with heads keeps its action token(s) in the prompt, as
    trained; a base gets `action_tokens` (None: its own; 0: zero-shot for a plain base). bf16 on GPU, fp32 on CPU."""
    return load_model(name, random_init, torch.bfloat16 if device.type == "cuda" else torch.float32,
                      device if random_init else None, tokenizer, cache, action_tokens=action_tokens).to(device).eval()


def init_distributed(timeout_minutes):
    """(rank, world, device) for train.py and evaluate.py: torchrun's process group, or a group of one (an
    in-process store) under a plain `python`, so collectives and barriers need no branches."""
    if cuda := torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():  # a second main() in one Python process keeps the group
        single = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes), **single)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def add_load_flags(parser):
    """The flags with which train.py, evaluate.py and attention.py load a model, named alike in all three."""
    parser.add_argument("--random-init", action="store_true", help="its architecture with random weights (no download)")
    parser.add_argument("--tokenizer", default=None, help="--random-init of an alias: a tokenizer folder, or 'tiny'")
    parser.add_argument("--cache", default=None, help="folder for checkpoints converted from the LLaVA-NeXT format")


def results_folder(ckpt):
    """Where evaluate.py and attention.py write by default: the folder itself, or runs/{name} for an alias or hub id."""
    return Path(ckpt) if Path(ckpt).is_dir() else Path("runs") / Path(ckpt).name


def describe(model: ActionLLaVA) -> str:
    """One line of parameter counts for the logs."""
    def millions(module, trainable=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable) / 1e6
    parts = (model.llava.model.vision_tower, model.llava.model.multi_modal_projector, model.llava, model)
    vision, projector, llava, total = map(millions, parts)
    lm = llava - vision - projector
    return (f"params {total:.2f}M (vision {vision:.2f}M, projector {projector:.2f}M, LM {lm:.2f}M, action token and "
            f"heads {total - llava:.3f}M), trainable {millions(model, True):.2f}M; video layout {model.spec.layout}, "
            f"{model.spec.tokens_per_frame} tokens a frame")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["convert"], help="convert: a LLaVA-NeXT checkpoint to a native folder")
    parser.add_argument("src", help="a LLaVA-NeXT folder or hub id (e.g. MLAdaptiveIntelligence/LLaVAction-7B)")
    parser.add_argument("out", help="the native folder to write (must not exist)")
    args = parser.parse_args(argv)
    if Path(args.out).exists():
        parser.error(f"{args.out} exists; pass a new folder")
    if not (src := Path(args.src)).is_dir():
        from huggingface_hub import snapshot_download
        src = Path(snapshot_download(args.src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    out = convert(src, args.out)
    meta = json.loads((out / "action.json").read_text())
    print(f"wrote {out}: video layout {meta['video_layout']}, {meta['action_tokens']} action token(s), "
          f"time instruction {'on' if meta['time_instruction'] else 'off'}")


if __name__ == "__main__":
    main(sys.argv[1:])
