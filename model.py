"""Base models, the action token with its verb/noun/action heads (paper eq. 5), save and load.

The base is transformers' native LlavaOnevisionForConditionalGeneration (SigLIP tower, 2-layer MLP projector,
Qwen2 LLM), used as it is: this file only adds what LLaVAction adds on top and never re-implements the base.
"""
import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)

BASES = {
    "llava-video-7b": "llava-hf/LLaVA-Video-7B-Qwen2-hf",  # community conversion of lmms-lab/LLaVA-Video-7B-Qwen2
    "llava-ov-7b": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "llava-ov-0.5b": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    "tiny": None,  # built in code: tests, the toy demo, CPU runs
}
ACTION_TOKEN = "<action>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>", "<image>", ACTION_TOKEN]

# Real shapes for --random-init (no hub here). SigLIP so400m-384/14 as in transformers' convert_llava_onevision
# script and LlavaOnevisionConfig's own vision defaults (26 layers: the last SigLIP layer is dropped, no head).
# Qwen2-7B/0.5B-Instruct from their config.json; vocab = Qwen2 vocab + <image>, <video>, padded to a multiple
# of 64 by the convert script: 152064 + 2 -> 152128 (7b), 151936 + 2 -> 152000 (0.5b, as DESIGN.md measured).
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152128, tie_word_embeddings=False)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=152000, tie_word_embeddings=True)
QWEN2_COMMON = dict(max_position_embeddings=32768, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
TEXT_CONFIGS = {"llava-video-7b": QWEN2_7B, "llava-ov-7b": QWEN2_7B, "llava-ov-0.5b": QWEN2_05B}
# tiny: 32 px / 8 px patches = 4x4 patches, pooled to 2x2 = 4 tokens a frame
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8, vision_use_head=False)
TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)

# Which action token feeds which head (verb, noun, action): one token feeds all three; with three tokens
# token 0 is supervised by the verb head, token 1 by the noun head, token 2 by the action head.
HEAD_TOKEN = {1: (0, 0, 0), 3: (0, 1, 2)}

# The tiny tokenizer's training text: the prompts of DESIGN.md, answer letters, digits and kitchen words.
TINY_CORPUS = """You are seeing this video from egocentric view and you are the person. Your hands are sometimes
interacting with objects. What action are you doing? The video is taken from egocentric view. The person's hands
are sometimes interacting with objects. What action is the person doing? seconds ago, you started an action.
What action are you currently performing? Here are the options of actions you can select: The provided video
contains an action that lasts seconds. What is the relative start and end time of the action in seconds? Format
it as 'start_timestamp: end_timestamp' and round to 2 decimal places. What action are you performing? Give a
short sentence such as 'move knife'. Describe in details what you see from the video frames. Try to focus on
what you are doing. The provided video lasts for seconds, and frames are uniformly sampled from it.
user assistant system
take put put-down open close wash cut mix pour throw dry move remove turn-on turn-off insert shake peel squeeze
fill scoop stir check adjust apply empty flip break spray wipe grate hold pick-up rinse press slice eat drink
plate knife spoon fork cup glass bowl pan pot lid tap water sponge board chopping bag box bottle jar oil salt
onion garlic tomato potato carrot pepper cheese bread egg rice pasta meat chicken milk butter sauce towel
fridge drawer cupboard cooker hob oven microwave kettle coffee maker tea dough food container hand hands
"""


@dataclass
class VisionSpec:
    """What data.py needs to turn frames into pixel values and count the video placeholder tokens."""
    size: int
    mean: tuple
    std: tuple
    tokens_per_frame: int

    def __post_init__(self):  # tuples also when read back from action.json
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    def video_tokens(self, n_frames: int) -> int:
        """HF-native layout: each frame pooled to ceil(p/2)^2 tokens, one image_newline per video."""
        return n_frames * self.tokens_per_frame + 1


def vision_spec(config: LlavaOnevisionConfig) -> VisionSpec:
    """SigLIP normalises with mean = std = 0.5 (all llava-onevision / LLaVA-Video checkpoints use SigLIP)."""
    v = config.vision_config
    p = v.image_size // v.patch_size
    return VisionSpec(v.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), math.ceil(p / 2) ** 2)


def preprocess_frames(frames, spec: VisionSpec) -> torch.Tensor:
    """uint8 (T,H,W,3) -> float32 (T,3,S,S) in plain torch, since torchvision does not run beside this torch."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0, 255) / 255  # bicubic overshoots; the HF processors resize in uint8 and so clip too
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def build_tokenizer_tiny(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here in well under a second, so tests need no download."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    letters = " ".join(f"{c}. {c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    digits = " ".join(f"{i} {i}.{i:02d} 0.{i:02d}" for i in range(100))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = " " + TINY_CORPUS.replace("\n", " ")  # also as later words of a sentence: " take", " plate"
    tok.train_from_iterator([TINY_CORPUS, words, letters, digits], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def base_config(base: str, tokenizer) -> LlavaOnevisionConfig:
    """A config in code for `tiny` and for --random-init of a real alias; placeholder ids from the tokenizer."""
    if base == "tiny":
        vision, text = TINY_VISION, dict(TINY_TEXT, vocab_size=64 * math.ceil(len(tokenizer) / 64))
    else:
        vision, text = SIGLIP_SO400M, {**QWEN2_COMMON, **TEXT_CONFIGS[base]}
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision).to_dict(),
        text_config=Qwen2Config(**text, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id).to_dict(),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=text["tie_word_embeddings"])


def load_base(base: str, random_init=False, dtype=None, seed=0, device=None):
    """An alias or a local directory -> (LlavaOnevisionForConditionalGeneration, tokenizer); random weights are
    drawn on `device` directly (a 7B model initialised on the CPU takes minutes)."""
    if base not in BASES and not Path(base).exists():
        raise ValueError(f"unknown base {base!r}: not a directory; aliases are {', '.join(BASES)}")
    source = BASES.get(base, base)
    if base == "tiny" or (random_init and base in BASES):
        try:  # a real alias without weights here: its cached tokenizer, else the tiny one (the ids follow it)
            tokenizer = (AutoTokenizer.from_pretrained(source, local_files_only=True) if source
                         else build_tokenizer_tiny())
        except OSError:
            tokenizer = build_tokenizer_tiny()
        config = base_config(base, tokenizer)
    elif random_init:
        tokenizer, config = AutoTokenizer.from_pretrained(source), LlavaOnevisionConfig.from_pretrained(source)
    else:
        llava = LlavaOnevisionForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=device)
        return freeze_unused(llava), AutoTokenizer.from_pretrained(source)
    with torch.random.fork_rng(devices=[]), (torch.device(device) if device else contextlib.nullcontext()):
        torch.manual_seed(seed)
        llava = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    return freeze_unused(llava), tokenizer


def freeze_unused(llava):
    """SigLIP's post_layernorm (and head) never see a gradient with vision_feature_layer=-1 (hidden_states[-1]
    is taken before them); frozen, DDP needs no find_unused_parameters and strict DCP loads work."""
    for name, p in llava.model.vision_tower.named_parameters():
        if name.startswith(("post_layernorm", "head")):
            p.requires_grad_(False)
    return llava


class ActionLLaVA(nn.Module):
    """LLaVA plus learnable action tokens whose final states are supervised by verb/noun/action heads."""

    def __init__(self, llava, tokenizer, n_verbs, n_nouns, n_actions, n_action_tokens=1, spec=None,
                 supervise_layer="last", head_weight=0.1, verb_weight=0.5, noun_weight=0.5, action_weight=0.1):
        super().__init__()
        assert n_action_tokens in (0, 1, 3) and supervise_layer in ("last", "first", "all")
        self.llava, self.tokenizer = llava, tokenizer
        self.spec = spec or vision_spec(llava.config)
        self.n_action_tokens, self.supervise_layer = n_action_tokens, supervise_layer
        self.loss_weights = dict(head_weight=head_weight, verb_weight=verb_weight, noun_weight=noun_weight,
                                 action_weight=action_weight)
        self.head_sizes = dict(n_verbs=n_verbs, n_nouns=n_nouns, n_actions=n_actions)
        if ACTION_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [ACTION_TOKEN]})
        self.action_id = tokenizer.convert_tokens_to_ids(ACTION_TOKEN)
        emb = llava.get_input_embeddings()
        if self.action_id >= emb.num_embeddings:  # real checkpoints have spare rows; tiny may not
            llava.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
            emb = llava.get_input_embeddings()
        if n_action_tokens == 0:
            return
        hidden, w = llava.config.text_config.hidden_size, emb.weight
        # Start from the mean token embedding: in distribution for the pretrained LM from the first step,
        # unlike a fresh N(0, 0.02) row whose norm need not match the checkpoint's embeddings.
        self.action_embeds = nn.Parameter(w.detach().mean(0, keepdim=True).repeat(n_action_tokens, 1).clone())
        self.verb_head = nn.Linear(hidden, n_verbs, device=w.device, dtype=w.dtype)
        self.noun_head = nn.Linear(hidden, n_nouns, device=w.device, dtype=w.dtype)
        self.action_head = nn.Linear(hidden, n_actions, device=w.device, dtype=w.dtype)
        emb.register_forward_hook(self._write_action_embeds)

    def _write_action_embeds(self, module, args, out):
        """Put action_embeds[k] at the k-th <action> of each row. Sync-free, so it also runs in generate,
        and it trains even when the embedding table is frozen."""
        is_action = args[0] == self.action_id
        k = (is_action.cumsum(-1) - 1).clamp(0, self.n_action_tokens - 1)
        return torch.where(is_action[..., None], self.action_embeds[k].to(out.dtype), out)

    def forward(self, batch: dict) -> dict:
        """LM loss at the supervised answer tokens only (never the (B, L, V) logits) plus the head loss."""
        ids, labels = batch["input_ids"], batch["labels"]
        pixels = batch.get("pixel_values_videos")
        if pixels is not None:
            pixels = pixels.to(next(self.llava.model.vision_tower.parameters()).dtype)
        all_layers = self.n_action_tokens > 0 and self.supervise_layer != "last"
        out = self.llava.model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values_videos=pixels,
                               output_hidden_states=all_layers, use_cache=False)
        h = out.last_hidden_state  # after the final norm, as is hidden_states[-1]
        unused = h.new_zeros(())
        if pixels is None and self.training:  # a text-only batch (replay, skipped videos) runs the tower on a
            # blank frame: every rank then runs the same FSDP collectives, and DDP finds every parameter used
            cfg, size = self.llava.config, self.spec.size
            blank = h.new_zeros((1, 1, 3, size, size), dtype=self.llava.model.vision_tower.dtype)
            unused = 0 * self.llava.model.get_video_features(
                blank, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output.sum()
        target = labels[:, 1:]  # position t predicts token t + 1
        supervised = target != -100
        logits = self.llava.lm_head(h[:, :-1][supervised]).float()
        lm_loss_sum = F.cross_entropy(logits, target[supervised], reduction="sum")
        lm_tokens = supervised.sum()
        result = dict(lm_loss_sum=lm_loss_sum, lm_tokens=lm_tokens)
        if self.n_action_tokens == 0:
            zero = lm_loss_sum.new_zeros(())
            result.update(head_loss=zero, verb_loss=zero, noun_loss=zero, action_loss=zero, verb_acc=zero,
                          noun_acc=zero, head_samples=torch.zeros_like(lm_tokens))
        else:
            # hidden_states[0] is the embedding output (action_embeds itself): "first" is the first layer's output
            layers = {"last": None, "first": slice(1, 2), "all": slice(1, None)}[self.supervise_layer]
            states = [h] if layers is None else out.hidden_states[layers]
            action_labels = batch.get("action_labels")
            if action_labels is None:  # still run the heads so every parameter is in the graph (DDP)
                action_labels = torch.full((len(ids), 3), -100, dtype=torch.long, device=ids.device)
            result.update(self.head_losses(states, ids == self.action_id, action_labels))
        w = self.loss_weights
        result["lm_loss_sum"] = lm_loss_sum + unused  # adds 0: only the graph changes
        result["loss"] = result["lm_loss_sum"] / lm_tokens.clamp(min=1) + w["head_weight"] * result["head_loss"]
        return result

    def head_losses(self, states, is_action, action_labels) -> dict:
        """Eq. 5: verb, noun and action CE at the action tokens, averaged over the supervised layers; samples
        labelled -100 add nothing. Every row holds exactly n_action_tokens <action> ids (data.py's layout)."""
        w, heads = self.loss_weights, (self.verb_head, self.noun_head, self.action_head)
        valid = action_labels != -100
        count = valid.sum(0).clamp(min=1)
        per_head = 0
        for s in states:
            tokens = s[is_action].view(len(s), self.n_action_tokens, -1)
            logits = [head(tokens[:, k].to(head.weight.dtype)).float() for head, k in
                      zip(heads, HEAD_TOKEN[self.n_action_tokens])]
            per_head = per_head + torch.stack([F.cross_entropy(lg, action_labels[:, j], reduction="sum")
                                               for j, lg in enumerate(logits)]) / count / len(states)
        head_loss = w["verb_weight"] * per_head[0] + w["noun_weight"] * per_head[1] + w["action_weight"] * per_head[2]
        correct = [((lg.argmax(-1) == action_labels[:, j]) & valid[:, j]).sum() / count[j] for j, lg in
                   enumerate(logits[:2])]  # accuracy of the last supervised layer
        per_head = per_head.detach()
        return dict(head_loss=head_loss, verb_loss=per_head[0], noun_loss=per_head[1], action_loss=per_head[2],
                    verb_acc=correct[0], noun_acc=correct[1], head_samples=valid.any(1).sum())

    def save(self, out):
        """A plain from_pretrained directory, plus the heads and what it takes to rebuild them."""
        out = Path(out)
        self.llava.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        heads = {k: v for k, v in self.state_dict().items() if not k.startswith("llava.")}
        torch.save(heads, out / "heads.pt")
        meta = dict(n_action_tokens=self.n_action_tokens, supervise_layer=self.supervise_layer, **self.head_sizes,
                    loss_weights=self.loss_weights, spec=asdict(self.spec))
        (out / "action.json").write_text(json.dumps(meta, indent=1))


def load_model(path_or_base, n_verbs, n_nouns, n_actions, n_action_tokens=1, random_init=False, dtype=None,
               device=None, **loss_flags) -> ActionLLaVA:
    """A saved ActionLLaVA directory (heads restored; its token count wins; sizes None = the checkpoint's) or a
    plain LLaVA directory / alias (fresh heads). loss_flags: supervise_layer and the *_weight options."""
    meta_file = Path(path_or_base) / "action.json"
    if not meta_file.exists():
        llava, tokenizer = load_base(str(path_or_base), random_init=random_init, dtype=dtype, device=device)
        return ActionLLaVA(llava, tokenizer, n_verbs, n_nouns, n_actions, n_action_tokens, **loss_flags)
    meta = json.loads(meta_file.read_text())
    have = (meta["n_verbs"], meta["n_nouns"], meta["n_actions"])
    given = (n_verbs, n_nouns, n_actions)
    if meta["n_action_tokens"] and any(g is not None and g != h for g, h in zip(given, have)):
        raise ValueError(f"checkpoint {path_or_base} has heads for {have[0]} verbs, {have[1]} nouns and "
                         f"{have[2]} actions, but the data has {given[0]}, {given[1]} and {given[2]}")
    llava, tokenizer = load_base(str(path_or_base), dtype=dtype, device=device)
    flags = {"supervise_layer": meta["supervise_layer"], **meta["loss_weights"], **loss_flags}
    model = ActionLLaVA(llava, tokenizer, *have, meta["n_action_tokens"], VisionSpec(**meta["spec"]), **flags)
    missing, unexpected = model.load_state_dict(torch.load(meta_file.parent / "heads.pt", weights_only=True, map_location=device),
                                                strict=False)
    assert not unexpected and all(k.startswith("llava.") for k in missing), (missing, unexpected)
    return model


def describe(model: ActionLLaVA) -> str:
    """One line of parameter counts for the logs."""
    def millions(module, trainable=False):
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable) / 1e6
    m = model.llava.model
    vision, projector = millions(m.vision_tower), millions(m.multi_modal_projector)
    llava, total = millions(model.llava), millions(model)
    return (f"params {total:.2f}M (vision {vision:.2f}M, projector {projector:.2f}M,"
            f" LM {llava - vision - projector:.2f}M, action token and heads {total - llava:.3f}M),"
            f" trainable {millions(model, True):.2f}M")
