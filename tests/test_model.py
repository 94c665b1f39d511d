"""model.py: the action token and heads, the two video layouts, the LLaVA-NeXT conversion, save and load."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import data
import model as M
from conftest import ROOT, make_next_checkpoint

N_VERBS, N_NOUNS, N_ACTIONS = 5, 6, 7


def tiny(n_action_tokens=1, layout="hf", **flags):
    return M.load_model("tiny", action_tokens=n_action_tokens, n_verbs=N_VERBS, n_nouns=N_NOUNS, n_actions=N_ACTIONS,
                        video_layout=layout, **flags)


def make_batch(model, answers=("B. take plate", "A. open fridge door"), n_frames=2, drop_video_token=False):
    """data.py's layout: system and user turn with video placeholders and action tokens, supervised answer."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i, answer in enumerate(answers):
        ids, labels = data.encode_conversation(model.tokenizer, "What action are you doing?", answer,
                                               model.spec.video_tokens(n_frames) - drop_video_token,
                                               model.cfg.action_tokens)
        frames = torch.randint(0, 256, (n_frames, 40, 48, 3), dtype=torch.uint8, generator=g)
        items.append(dict(index=i, input_ids=torch.tensor(ids), labels=torch.tensor(labels), clamped=0, bad=None,
                          pixel_values_videos=data.preprocess_frames(frames, model.spec.size, model.spec.mean,
                                                                     model.spec.std),
                          action_labels=torch.tensor([[1, 2, 3], [4, 5, 6]][i])))
    return data.collate(items, model.tokenizer.pad_token_id)


def test_tiny_tokenizer():
    tok = M.build_tokenizer_tiny()
    assert tok.get_vocab() == M.build_tokenizer_tiny().get_vocab()  # deterministic
    assert 500 < len(tok) < 2000
    for letter in data.LETTERS:
        assert len(tok(letter)["input_ids"]) == 1 and len(tok(" " + letter)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok("B. take plate")["input_ids"])[0] == "B"
    assert tok.convert_ids_to_tokens(tok("4.25")["input_ids"]) == ["4", ".", "2", "5"]  # digits apart, as Qwen2
    for special in M.SPECIAL_TOKENS:
        assert tok(special)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_hf_layout_forward_matches_the_native_class_and_trains_everything():
    model = tiny()
    batch = make_batch(model)
    out = model(batch)
    # reference: the plain HF forward's full logits (the hook is on its embeddings too), shifted CE
    logits = model.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values_videos=batch["pixel_values_videos"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out["lm_loss_sum"], reference, rtol=1e-5, atol=1e-5)
    assert out["lm_tokens"] == (batch["labels"] != -100).sum()
    # the release's loss: 0.1 x (0.5 verb + 0.5 noun + 0.1 action) / (L + 1), L = 1 supervised layer
    expected_head = (0.5 * out["verb_loss"] + 0.5 * out["noun_loss"] + 0.1 * out["action_loss"])
    torch.testing.assert_close(out["head_loss"].detach(), expected_head)
    torch.testing.assert_close(out["loss"], out["lm_loss_sum"] / out["lm_tokens"] + 0.1 * out["head_loss"])
    assert model.verb_head.bias is None and out["head_samples"] == 2
    out["loss"].backward()
    vision = model.llava.model.vision_tower
    for p in (model.action_embeds, model.verb_head.weight, model.noun_head.weight, model.action_head.weight,
              vision.embeddings.patch_embedding.weight, model.llava.model.multi_modal_projector.linear_1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vision.post_layernorm.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing unused (DDP)


def grid_by_hand(llava, pixels):
    """The grid layout built independently: tower hidden_states[-1], projector, bilinear pool to g x g, then
    row by row: the g tokens of each row followed by the newline embedding; frames one after another."""
    t = pixels.shape[0]
    tower = llava.model.vision_tower(pixels, output_hidden_states=True)
    feats = llava.model.multi_modal_projector(tower.hidden_states[-1])
    p = int(feats.shape[1] ** 0.5)
    g = -(-p // 2)
    pooled = F.interpolate(feats.view(t, p, p, -1).permute(0, 3, 1, 2), size=(g, g), mode="bilinear")
    pooled = pooled.permute(0, 2, 3, 1)  # (T, g, g, H)
    rows = []
    for frame in range(t):
        for row in range(g):
            rows += list(pooled[frame, row]) + [llava.model.image_newline]
    return torch.stack(rows)


def test_grid_layout_equals_a_construction_row_by_row():
    model = tiny(layout="grid")
    batch = make_batch(model)
    with torch.no_grad():
        video = model.video_features(batch["pixel_values_videos"])
        for b in range(2):
            torch.testing.assert_close(video[b], grid_by_hand(model.llava, batch["pixel_values_videos"][b]),
                                       atol=1e-6, rtol=0)
    assert video.shape[1] == model.spec.video_tokens(2) == 2 * 2 * 3  # tiny: 2 x 2 pooled, a newline each row
    ids = batch["input_ids"][0]
    last_video = (ids == model.llava.config.video_token_index).nonzero().max()
    assert ids[last_video + 1] == model.action_id  # right after the last row's newline


@pytest.mark.parametrize("frames", [1, 8, 32])
def test_placeholder_counts_of_both_layouts_with_real_shapes(frames):
    tok = M.build_tokenizer_tiny()
    config = M.base_config("llava-video-7b", tok)
    grid, hf = M.vision_spec(config, "grid"), M.vision_spec(config, "hf")
    assert grid.video_tokens(frames) == 210 * frames and hf.video_tokens(frames) == 196 * frames + 1
    for spec in (grid, hf):
        ids, _ = data.encode_conversation(tok, "q", None, spec.video_tokens(frames), 1)
        video = [i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids(data.VIDEO_TOKEN)]
        assert len(video) == spec.video_tokens(frames) and ids[video[-1] + 1] == tok.convert_tokens_to_ids("<action>")


def test_text_only_batch_still_runs_every_parameter():
    """A batch without video (replay, skipped clips) runs the tower on a blank frame, adding nothing to the loss:
    every rank then runs the same FSDP collectives, and DDP needs no find_unused_parameters."""
    model = tiny(layout="grid")
    batch = make_batch(model)
    batch["input_ids"][batch["input_ids"] == model.llava.config.video_token_index] = model.tokenizer.pad_token_id
    del batch["pixel_values_videos"]
    out = model(batch)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["loss"], out["loss"].detach())  # the blank frame adds exactly 0


def test_action_hook_writes_kth_row():
    model = tiny(n_action_tokens=3)
    with torch.no_grad():
        model.action_embeds.copy_(torch.randn_like(model.action_embeds))
    ids = make_batch(model)["input_ids"]
    embeds = model.llava.get_input_embeddings()(ids)
    plain = F.embedding(ids, model.llava.get_input_embeddings().weight)
    is_action = ids == model.action_id
    assert is_action.sum(1).tolist() == [3, 3]
    for row in range(len(ids)):
        torch.testing.assert_close(embeds[row][is_action[row]], model.action_embeds)
    torch.testing.assert_close(embeds[~is_action], plain[~is_action])
    batch = make_batch(model, answers=("B. take plate",))  # cached decoding runs through the same hook
    prompt = batch["input_ids"][:, :(batch["labels"][0] == -100).sum()]
    out = model.llava.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               pixel_values_videos=batch["pixel_values_videos"], do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 3)


@pytest.mark.parametrize("n, layer, norm", [(3, "last", "layers+1"), (1, "first", "layers+1"), (3, "all", "layers"),
                                            (1, "all", "layers+1")])
def test_head_losses_read_the_right_token_and_layer(n, layer, norm):
    """Against a computation by hand from the hidden states: with three tokens the verb head reads token 0, the
    noun head token 1, the action head token 2; 'first' is the first decoder layer's output, 'all' every layer's;
    the summed layer losses are divided by L + 1 (the release) or by L."""
    model = tiny(n_action_tokens=n, supervise_layer=layer, head_norm=norm)
    batch = make_batch(model)
    out = model(batch)
    with torch.no_grad():
        hidden = model.llava.model(**model.lm_inputs(batch), output_hidden_states=True).hidden_states
    states = {"last": hidden[-1:], "first": hidden[1:2], "all": hidden[1:]}[layer]
    where = (batch["input_ids"] == model.action_id).nonzero()[:, 1].view(2, n)
    labels = batch["action_labels"]
    expected = []
    for j, head in enumerate((model.verb_head, model.noun_head, model.action_head)):
        k = j if n == 3 else 0
        total = sum(F.cross_entropy(head(s[torch.arange(2), where[:, k]]), labels[:, j]) for s in states)
        expected.append(total / (len(states) + (norm == "layers+1")))
    for name, value in zip(("verb_loss", "noun_loss", "action_loss"), expected):
        torch.testing.assert_close(out[name], value.detach(), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert model.verb_head.weight.grad.abs().sum() > 0


def test_unlabelled_samples_and_no_action_token():
    model = tiny()
    batch = make_batch(model)
    batch["action_labels"][0] = -100
    only_second = {k: v[1:] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
    torch.testing.assert_close(model(batch)["verb_loss"], model(only_second)["verb_loss"])
    batch["action_labels"][:] = -100
    out = model(batch)
    assert out["head_loss"] == 0 and out["head_samples"] == 0
    out["loss"].backward()
    assert model.verb_head.weight.grad is not None  # in the graph, zero: DDP sees every parameter
    plain = tiny(n_action_tokens=0)
    assert not hasattr(plain, "verb_head") and not hasattr(plain, "action_embeds")
    out = plain(make_batch(plain))
    torch.testing.assert_close(out["loss"], out["lm_loss_sum"] / out["lm_tokens"])


def test_tokenizer_without_action_token_gets_it_and_a_row():
    tok = M.build_tokenizer_tiny(special_tokens=M.SPECIAL_TOKENS[:-1])
    llava = LlavaOnevisionForConditionalGeneration._from_config(M.base_config("tiny", tok))
    llava.resize_token_embeddings(len(tok))  # no spare row left
    model = M.ActionLLaVA(llava, tok, M.ActionConfig(n_verbs=N_VERBS, n_nouns=N_NOUNS, n_actions=N_ACTIONS))
    assert model.tokenizer(data.ACTION_TOKEN)["input_ids"] == [model.action_id] == [len(tok) - 1]
    assert llava.get_input_embeddings().num_embeddings > model.action_id
    assert torch.isfinite(model(make_batch(model))["loss"])


def test_video_token_count_must_match():
    model = tiny(layout="grid")
    with pytest.raises(Exception, match="Video features and video tokens do not match"):
        model(make_batch(model, drop_video_token=True))


def test_save_load_round_trip(tmp_path, capsys):
    model = tiny(n_action_tokens=3, layout="grid", supervise_layer="all", head_weight=0.2, head_bias=True,
                 prompt_style="paper", time_instruction=True)
    with torch.no_grad():
        model.action_embeds.add_(torch.randn_like(model.action_embeds))
    model.save(tmp_path)
    loaded = M.load_model(tmp_path)
    assert loaded.cfg == model.cfg and loaded.spec == model.spec and loaded.action_id == model.action_id
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    saved = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k
    batch = make_batch(model)
    a, b = model(batch), loaded(batch)
    for k in ("loss", "lm_loss_sum", "head_loss", "verb_loss"):
        assert torch.equal(a[k], b[k]), k
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)  # a plain transformers user
    text = model.tokenizer(["<|im_start|>user\nWhat action are you doing?<|im_end|>\n"], return_tensors="pt")
    torch.testing.assert_close(plain(**text).logits, model.llava(**text).logits)
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} has heads for 5 verbs.*asks for n_verbs 9"):
        M.load_model(tmp_path, n_verbs=9)
    assert M.load_model(tmp_path, action_tokens=1).cfg.action_tokens == 3  # the checkpoint's own count wins
    err = capsys.readouterr().err
    assert "keeps its 3 action token(s) and their heads (--action-tokens 1 is for a base without heads)" in err


def test_corrupt_checkpoint_files_name_the_file(tmp_path):
    tiny(n_action_tokens=1).save(tmp_path / "ckpt")
    heads = tmp_path / "ckpt" / "heads.pt"
    good = heads.read_bytes()
    for damaged in (os.urandom(2000), good[:len(good) // 2]):
        heads.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"heads\.pt is corrupt or truncated") as e:
            M.load_model(tmp_path / "ckpt")
        assert "weights_only" not in str(e.value)  # never a hint to load unsafely
    heads.write_bytes(good)
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"its weights do not load.*corrupt or truncated"):
        M.load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "action.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"action\.json is corrupt"):
        M.load_model(tmp_path / "ckpt")


def test_plain_directory_gets_fresh_heads(tmp_path):
    llava, tokenizer, _, _ = M.load_base("tiny")
    llava.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = M.load_model(tmp_path, action_tokens=1, n_verbs=3, n_nouns=4, n_actions=5)
    assert model.action_head.out_features == 5 and model.spec.layout == "hf"  # a native folder: the native layout
    torch.testing.assert_close(model.llava.lm_head.weight, llava.lm_head.weight)


def test_unknown_base_lists_aliases(tmp_path):
    with pytest.raises(FileNotFoundError, match="llava-video-7b, llavaction-7b, llavaction-0.5b, llava-ov-7b"):
        M.load_base("no-such-model")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        M.load_base(str(tmp_path))


def test_random_init_of_a_real_alias_needs_its_tokenizer(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # nothing cached
    with pytest.raises(ValueError, match="--tokenizer DIR"):
        M.base_tokenizer("llava-video-7b")
    M.base_tokenizer("llava-video-7b", "tiny")
    assert "tiny test tokenizer" in capsys.readouterr().err


def test_real_shapes_on_meta_device():
    with torch.device("meta"):
        video, tok, saved, _ = M.load_base("llava-video-7b", random_init=True, tokenizer="tiny")
        action = M.load_model("llavaction-7b", random_init=True, tokenizer="tiny")
        small, _, _, _ = M.load_base("llava-ov-0.5b", random_init=True, tokenizer="tiny")
    assert video.config.text_config.hidden_size == 3584 and video.get_input_embeddings().num_embeddings == 152064
    assert 8.0e9 < video.num_parameters() < 8.1e9  # LLaVA-Video-7B-Qwen2: about 8.03B
    assert saved["video_layout"] == "grid" and M.vision_spec(video.config, "grid").tokens_per_frame == 210
    assert action.spec.tokens_per_frame == 210 and action.cfg.action_tokens == 1 and action.cfg.time_instruction
    heads = (action.verb_head, action.noun_head, action.action_head)
    assert tuple(h.out_features for h in heads) == (97, 300, 3806)
    assert small.get_input_embeddings().num_embeddings == 152000 and small.config.tie_word_embeddings
    assert 0.88e9 < small.num_parameters() < 0.9e9  # llava-onevision-qwen2-0.5b: about 0.89B
    assert small.model.apply_pooling(torch.randn(2, 27 * 27, 8)).shape == (2, 196, 8)
    # a random-init release has no trained heads to keep: fresh ones of the data's sizes, its own token count
    toy = M.load_model("llavaction-0.5b", random_init=True, tokenizer="tiny", device="meta", n_verbs=6, n_nouns=8,
                       n_actions=30)
    assert (toy.verb_head.out_features, toy.noun_head.out_features, toy.action_head.out_features) == (6, 8, 30)
    assert toy.cfg.action_tokens == 1 and toy.spec.layout == "grid"


# -----------------------------------------------------------------------------
# the LLaVA-NeXT format

HAND_MAP = [("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
            ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
            ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
            ("model.image_newline", "model.image_newline"), ("lm_head.", "lm_head."),
            ("model.", "model.language_model.")]


def placed_by_hand(sd, tokenizer, tied):
    """The official weights put by hand into a native model built from a config written here."""
    text = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       rope_theta=1e6, tie_word_embeddings=tied)
    vision = SiglipVisionConfig(**M.TINY_VISION).to_dict()
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text.to_dict(),
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", tie_word_embeddings=tied)
    ref = LlavaOnevisionForConditionalGeneration(config).eval()
    mapped = {}
    for key, value in sd.items():
        if "inv_freq" in key or key.startswith(("model.action_supervision", "verb_head", "noun_head", "action_head")):
            continue
        old, new = next((o, n) for o, n in HAND_MAP if key.startswith(o))
        mapped[new + key[len(old):]] = value
    missing, unexpected = ref.load_state_dict(mapped, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or tied)
    return ref


@pytest.mark.parametrize("tokens, tied", [(1, False), (3, True), (0, False)])
def test_converted_checkpoint_equals_the_weights_placed_by_hand(tmp_path, tokens, tied, capsys):
    sd = make_next_checkpoint(tmp_path / "next", action_tokens=tokens, tied=tied)
    converted = M.load_model(tmp_path / "next").eval()
    assert "converting" in capsys.readouterr().err and (tmp_path / "next.native" / "action.json").exists()
    assert converted.cfg.video_layout == "grid" and converted.cfg.time_instruction and not converted.cfg.head_bias
    tok = converted.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<video>", "<action>"]) == [len(tok) - 3, len(tok) - 2, len(tok) - 1]
    ref = placed_by_hand(sd, tok, tied)
    batch = make_batch(converted, answers=("B. take plate",), n_frames=3)
    ids, pixels = batch["input_ids"], batch["pixel_values_videos"]
    with torch.no_grad():
        embeds = ref.get_input_embeddings()(ids)
        embeds[ids == ref.config.video_token_index] = grid_by_hand(ref, pixels[0])
        action_at = (ids[0] == tok.convert_tokens_to_ids("<action>")).nonzero()[:, 0]
        if tokens:
            embeds[0, action_at] = sd["model.action_supervision"]
        h_ref = ref.model.language_model(inputs_embeds=embeds).last_hidden_state
        h = converted.llava.model(**converted.lm_inputs(batch)).last_hidden_state
        torch.testing.assert_close(converted.llava.lm_head(h), ref.lm_head(h_ref), atol=1e-5, rtol=0)
        for j, name in enumerate(("verb", "noun", "action")[:3 if tokens else 0]):
            state = h[0, action_at[j if tokens == 3 else 0]]
            torch.testing.assert_close(getattr(converted, f"{name}_head")(state),
                                       sd[f"{name}_head.weight"] @ h_ref[0, action_at[j if tokens == 3 else 0]],
                                       atol=1e-5, rtol=0)
    converted.save(tmp_path / "saved")  # round trip
    again = M.load_model(tmp_path / "saved")
    assert again.cfg == converted.cfg
    with torch.no_grad():
        torch.testing.assert_close(again.llava.model(**again.lm_inputs(batch)).last_hidden_state, h)
    M.load_model(tmp_path / "next")  # converted once: the second load reads the cache
    assert "converting" not in capsys.readouterr().err


def test_conversion_keeps_bf16_and_writes_a_plain_transformers_folder(tmp_path):
    sd = make_next_checkpoint(tmp_path / "next", torch_dtype="bfloat16")
    from safetensors.torch import load_file, save_file
    save_file({k: v.bfloat16() for k, v in load_file(tmp_path / "next" / "model.safetensors").items()},
              tmp_path / "next" / "model.safetensors", metadata={"format": "pt"})
    out = M.convert(tmp_path / "next", tmp_path / "out")
    converted = load_file(out / "model.safetensors")
    assert {v.dtype for v in converted.values()} == {torch.bfloat16}
    assert len(converted) == len(sd) - 4 - 2  # the heads, inv_freq
    assert set(torch.load(out / "heads.pt", weights_only=True)) == set(M.HEAD_KEYS)
    plain, info = LlavaOnevisionForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert plain.config.vision_config.num_hidden_layers == 2  # the tower's last layer dropped
    assert {p.dtype for p in M.load_for_eval(out, torch.device("cpu")).parameters()} == {torch.float32}  # CPU: fp32


@pytest.mark.parametrize("field, value", [("mm_spatial_pool_mode", "average"), ("mm_projector_type", "linear"),
                                          ("mm_resampler_type", "spatial_pool"), ("add_faster_video", True),
                                          ("vision_supervision", "all_newlines"), ("mm_newline_position", "frame"),
                                          ("mm_spatial_pool_stride", 4), ("mm_vision_tower", "openai/clip-vit-large")])
def test_unsupported_options_are_refused_by_name(tmp_path, field, value):
    make_next_checkpoint(tmp_path / "next", **{field: value})
    with pytest.raises(ValueError, match=f"{field} = {value!r} is not supported"):
        M.convert(tmp_path / "next", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))  # nothing half-written


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    make_next_checkpoint(tmp_path / "next")
    sd = load_file(tmp_path / "next" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.vision_resampler.extra"] = torch.zeros(1)  # dropped, as the authors' code ignores it
    sd["model.mystery.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "next" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.language_model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.language_model.mystery.weight'\]"):
        M.convert(tmp_path / "next", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merge, newline", [("flat", "grid"), ("spatial", "one_token"), ("unpad", "grid")])
def test_layouts_the_authors_code_would_build_otherwise_are_refused(tmp_path, merge, newline):
    make_next_checkpoint(tmp_path / "next", mm_patch_merge_type=merge, mm_newline_position=newline)
    with pytest.raises(ValueError, match=f"mm_patch_merge_type = {merge!r} with mm_newline_position = {newline!r}"):
        M.convert(tmp_path / "next", tmp_path / "out")


def test_absent_fields_read_as_llava_next_reads_them(tmp_path):
    """No mm_newline_position: LLaVA-NeXT's default one_token, one newline per video (the hf layout); heads
    without action_types: an error naming the field."""
    make_next_checkpoint(tmp_path / "next", mm_newline_position=None, add_time_instruction=None)
    cfg = json.loads((tmp_path / "next" / "config.json").read_text())
    (tmp_path / "next" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    M.convert(tmp_path / "next", tmp_path / "out")
    action = json.loads((tmp_path / "out" / "action.json").read_text())
    assert action["video_layout"] == "hf" and not action["time_instruction"]
    make_next_checkpoint(tmp_path / "heads", action_types="")
    with pytest.raises(ValueError, match="vision_supervision = 'one_token' but no action_types"):
        M.convert(tmp_path / "heads", tmp_path / "out2")


def test_a_conversion_is_never_reused_for_other_weights(tmp_path):
    """Two folders of one name under one --cache convert apart; new weights in a source refuse its old conversion."""
    for name in ("a", "b"):
        make_next_checkpoint(tmp_path / name / "checkpoint-1000", seed=ord(name))
    a, b = (M.resolve(tmp_path / name / "checkpoint-1000", cache=tmp_path / "cache") for name in ("a", "b"))
    assert a != b and (a / "action.json").exists() and (b / "action.json").exists()
    assert M.resolve(tmp_path / "a" / "checkpoint-1000", cache=tmp_path / "cache") == a  # converted once
    from safetensors.torch import load_file, save_file
    weights = tmp_path / "a" / "checkpoint-1000" / "model.safetensors"
    save_file({k: v + 1 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})  # retrained
    with pytest.raises(ValueError, match="its weights have changed since: delete"):
        M.resolve(tmp_path / "a" / "checkpoint-1000", cache=tmp_path / "cache")


def test_convert_cli(tmp_path):
    make_next_checkpoint(tmp_path / "next", action_tokens=3)
    res = subprocess.run([sys.executable, str(ROOT / "model.py"), "convert", str(tmp_path / "next"),
                          str(tmp_path / "out")], capture_output=True, text=True, check=True)
    assert "video layout grid, 3 action token(s), time instruction on" in res.stdout
    assert json.loads((tmp_path / "out" / "action.json").read_text())["action_tokens"] == 3


@pytest.mark.slow
def test_llavaction_half_b_random_init_steps_on_cpu():
    """llavaction-0.5b's shapes and layout (grid, 210 tokens a frame) at 2 frames: one forward and backward of
    the training loss and one MQA letter scoring, in a subprocess so that its peak memory can be read."""
    script = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import data, model as M, structured
m = M.load_model("llavaction-0.5b", random_init=True, tokenizer="tiny", dtype=torch.bfloat16)
ids, labels = data.encode_conversation(m.tokenizer, data.mqa_question(["take plate", "open tap"]), "A. take plate",
                                       m.spec.video_tokens(2), 1)
item = dict(index=0, input_ids=torch.tensor(ids), labels=torch.tensor(labels), clamped=0, bad=None,
            pixel_values_videos=torch.zeros(2, 3, 384, 384), action_labels=torch.tensor([1, 2, 3]))
batch = data.collate([item], m.tokenizer.pad_token_id)
out = m(batch)
out["loss"].backward()
assert torch.isfinite(out["loss"]) and m.action_embeds.grad.abs().sum() > 0
with torch.no_grad():
    scores = structured.score_options(m.eval(), batch, 2)
print(m.spec.video_tokens(2), tuple(scores.shape), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
""".format(root=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    tokens, shape = res.stdout.split("(")[0].split()[0], res.stdout.split(")")[0] + ")"
    peak_gb = float(res.stdout.split()[-1])
    assert tokens == "420" and "(1, 2)" in shape and peak_gb < 10, res.stdout


def test_preprocess_frames_matches_pil_bicubic():
    """PIL's bicubic resize (what the HF image processors call) as the reference."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    x = data.preprocess_frames(frames, 32, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    levels = (x.permute(0, 2, 3, 1).double().numpy() * 0.5 + 0.5) * 255
    pil = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC)) for f in frames]).astype(np.float64)
    diff = np.abs(levels - pil)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) < 2.5, (diff.mean(), np.percentile(diff, 99))
    same_size = np.repeat(np.array([0, 255], dtype=np.uint8), 512).reshape(1, 32, 32, 1).repeat(3, -1)
    torch.testing.assert_close(data.preprocess_frames(same_size, 32, (0.5,) * 3, (0.5,) * 3)[0, 0, [0, 31], 0],
                               torch.tensor([-1.0, 1.0]))
