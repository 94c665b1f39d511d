import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration

import model as M

N_VERBS, N_NOUNS, N_ACTIONS = 5, 6, 7


def tiny(n_action_tokens=1, **flags):
    llava, tokenizer = M.load_base("tiny")
    return M.ActionLLaVA(llava, tokenizer, N_VERBS, N_NOUNS, N_ACTIONS, n_action_tokens, **flags)


def make_batch(model, answers=("B. take plate", "A. open fridge door"), n_frames=2, drop_video_token=False):
    """data.py's layout: user turn with video placeholders and action tokens, supervised answer + <|im_end|>."""
    tok, spec = model.tokenizer, model.spec
    n_video = spec.video_tokens(n_frames) - drop_video_token
    rows, labels = [], []
    for answer in answers:
        prompt = tok("<|im_start|>user\n" + "<video>" * n_video + "<action>" * model.n_action_tokens +
                     "\nWhat action are you doing?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        target = tok(answer + "<|im_end|>")["input_ids"]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    length = max(map(len, rows))
    pad = lambda r, v: r + [v] * (length - len(r))
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (len(answers), n_frames, 40, 48, 3), dtype=torch.uint8, generator=g)
    return dict(
        input_ids=torch.tensor([pad(r, tok.pad_token_id) for r in rows]),
        attention_mask=torch.tensor([pad([1] * len(r), 0) for r in rows]),
        labels=torch.tensor([pad(r, -100) for r in labels]),
        pixel_values_videos=torch.stack([M.preprocess_frames(f, spec) for f in frames]),
        action_labels=torch.tensor([[1, 2, 3], [4, 5, 6]][:len(answers)]),
    )


def test_tiny_tokenizer():
    tok = M.build_tokenizer_tiny()
    assert tok.get_vocab() == M.build_tokenizer_tiny().get_vocab()  # deterministic
    assert 500 < len(tok) < 2000
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        assert len(tok(letter)["input_ids"]) == 1 and len(tok(" " + letter)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok("B. take plate")["input_ids"])[0] == "B"
    for special in M.SPECIAL_TOKENS:
        assert tok(special)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_tiny_forward_matches_full_logits_and_trains_everything():
    model = tiny()
    batch = make_batch(model)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    # reference: the plain HF forward's full logits (the hook is on its embeddings too), shifted CE
    logits = model.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values_videos=batch["pixel_values_videos"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out["lm_loss_sum"], reference, rtol=1e-5, atol=1e-5)
    assert out["lm_tokens"] == (batch["labels"] != -100).sum()  # the first label is never a target here
    torch.testing.assert_close(out["loss"], out["lm_loss_sum"] / out["lm_tokens"] + 0.1 * out["head_loss"])
    expected_head = 0.5 * out["verb_loss"] + 0.5 * out["noun_loss"] + 0.1 * out["action_loss"]
    torch.testing.assert_close(out["head_loss"].detach(), expected_head)
    assert out["head_samples"] == 2 and 0 <= out["verb_acc"] <= 1
    out["loss"].backward()
    vision = model.llava.model.vision_tower
    for p in (model.action_embeds, model.verb_head.weight, model.noun_head.weight, model.action_head.weight,
              vision.embeddings.patch_embedding.weight, model.llava.model.multi_modal_projector.linear_1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vision.post_layernorm.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # nothing unused (DDP)


def test_text_only_batch_still_runs_every_parameter():
    """A batch without video (replay, skipped clips) runs the tower on a blank frame, adding nothing to the loss:
    every rank then runs the same FSDP collectives, and DDP needs no find_unused_parameters."""
    model = tiny()
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
    # the action token follows the video's last placeholder (after its newline feature)
    first = is_action[0].nonzero()[0, 0]
    assert ids[0, first - 1] == model.llava.config.video_token_id
    # cached decoding runs through the same hook (the prompt's action tokens are written once, at prefill)
    batch = make_batch(model, answers=("B. take plate",))
    prompt = batch["input_ids"][:, :(batch["labels"][0] == -100).sum()]
    out = model.llava.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               pixel_values_videos=batch["pixel_values_videos"], do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 3)


def test_three_tokens_and_layer_options():
    for n, layer in ((3, "last"), (1, "first"), (3, "all")):
        model = tiny(n_action_tokens=n, supervise_layer=layer)
        out = model(make_batch(model))
        assert torch.isfinite(out["loss"]) and out["head_loss"] > 0
        out["loss"].backward()
        assert model.verb_head.weight.grad.abs().sum() > 0


def test_unlabelled_samples_and_no_action_token():
    model = tiny()
    batch = make_batch(model)
    batch["action_labels"][0] = -100
    one = model(batch)
    only_second = {k: v[1:] for k, v in batch.items()}
    torch.testing.assert_close(one["verb_loss"], model(only_second)["verb_loss"])
    batch["action_labels"][:] = -100
    out = model(batch)
    assert out["head_loss"] == 0 and out["head_samples"] == 0
    out["loss"].backward()
    assert model.verb_head.weight.grad is not None  # in the graph, zero: DDP sees every parameter
    plain = tiny(n_action_tokens=0)
    assert not hasattr(plain, "verb_head") and not hasattr(plain, "action_embeds")
    out = plain(make_batch(plain))
    torch.testing.assert_close(out["loss"], out["lm_loss_sum"] / out["lm_tokens"])


def test_tokenizer_without_action_token_gets_it_and_a_row(monkeypatch):
    monkeypatch.setattr(M, "SPECIAL_TOKENS", M.SPECIAL_TOKENS[:-1])
    llava, tokenizer = M.load_base("tiny")
    assert M.ACTION_TOKEN not in tokenizer.get_vocab()
    llava.resize_token_embeddings(len(tokenizer))  # no spare row left
    model = M.ActionLLaVA(llava, tokenizer, N_VERBS, N_NOUNS, N_ACTIONS)
    assert model.tokenizer(M.ACTION_TOKEN)["input_ids"] == [model.action_id] == [len(tokenizer) - 1]
    assert llava.get_input_embeddings().num_embeddings > model.action_id
    assert torch.isfinite(model(make_batch(model))["loss"])


def test_video_token_count_must_match():
    model = tiny()
    with pytest.raises(Exception, match="Video features and video tokens do not match"):
        model(make_batch(model, drop_video_token=True))


def test_save_load_round_trip(tmp_path):
    model = tiny(n_action_tokens=3, supervise_layer="all", head_weight=0.2)
    with torch.no_grad():
        model.action_embeds.add_(torch.randn_like(model.action_embeds))
    model.save(tmp_path)
    loaded = M.load_model(tmp_path, N_VERBS, N_NOUNS, N_ACTIONS)
    assert loaded.n_action_tokens == 3 and loaded.supervise_layer == "all"
    assert loaded.loss_weights["head_weight"] == 0.2 and loaded.spec == model.spec
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab() and loaded.action_id == model.action_id
    saved = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k
    batch = make_batch(model)
    a, b = model(batch), loaded(batch)
    for k in ("loss", "lm_loss_sum", "head_loss", "verb_loss"):
        assert torch.equal(a[k], b[k]), k
    # a plain transformers user can load the directory
    plain = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path)
    text = model.tokenizer(["<|im_start|>user\nWhat action are you doing?<|im_end|>\n"], return_tensors="pt")
    torch.testing.assert_close(plain(**text).logits, model.llava(**text).logits)
    assert M.load_model(tmp_path, None, None, None).head_sizes == model.head_sizes
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} has heads for 5 verbs.*data has 9"):
        M.load_model(tmp_path, 9, N_NOUNS, N_ACTIONS)


def test_plain_directory_gets_fresh_heads(tmp_path):
    llava, tokenizer = M.load_base("tiny")
    llava.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = M.load_model(tmp_path, 3, 4, 5, n_action_tokens=1)
    assert model.action_head.out_features == 5
    torch.testing.assert_close(model.llava.lm_head.weight, llava.lm_head.weight)


def test_unknown_base_lists_aliases():
    with pytest.raises(ValueError, match="llava-video-7b, llava-ov-7b, llava-ov-0.5b, tiny"):
        M.load_base("no-such-model")


def test_real_shapes_on_meta_device():
    with torch.device("meta"):
        video, tok = M.load_base("llava-video-7b", random_init=True)
        small, _ = M.load_base("llava-ov-0.5b", random_init=True)
    assert video.config.text_config.hidden_size == 3584 and video.get_input_embeddings().num_embeddings == 152128
    assert 8.0e9 < video.num_parameters() < 8.1e9  # LLaVA-Video-7B-Qwen2: about 8.03B
    assert small.get_input_embeddings().num_embeddings == 152000 and small.config.tie_word_embeddings
    assert 0.88e9 < small.num_parameters() < 0.9e9  # llava-onevision-qwen2-0.5b: about 0.89B
    spec = M.vision_spec(small.config)
    assert (spec.size, spec.tokens_per_frame, spec.video_tokens(32)) == (384, 196, 6273)
    features = torch.randn(2, (384 // 14) ** 2, 8)  # 27 x 27 patches of a 384/14 frame
    assert small.model.apply_pooling(features).shape == (2, 196, 8)
    assert tok.convert_tokens_to_ids(M.ACTION_TOKEN) < 152000  # no resize needed for the real vocab size


@pytest.mark.slow
def test_ov_half_b_random_init_runs_one_frame():
    model = M.load_model("llava-ov-0.5b", 97, 300, 3806, random_init=True, dtype=torch.bfloat16)
    batch = make_batch(model, answers=("B. take plate",), n_frames=1)
    assert batch["pixel_values_videos"].shape == (1, 1, 3, 384, 384)
    with torch.no_grad():
        features = model.llava.model.get_video_features(batch["pixel_values_videos"].bfloat16()).pooler_output
        out = model(batch)
    assert features.shape == (1, 197, 896)
    position = (batch["input_ids"][0] == model.action_id).nonzero()[0, 0]
    assert position == len(model.tokenizer("<|im_start|>user\n")["input_ids"]) + 197
    assert torch.isfinite(out["loss"])


def test_preprocess_frames():
    spec = M.VisionSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 4)
    frames = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8)
    x = M.preprocess_frames(frames.numpy(), spec)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    for t in range(3):  # frame by frame, channels-last through a float64 path
        ref = F.interpolate(frames[t].double().permute(2, 0, 1)[None], size=(32, 32), mode="bicubic",
                            antialias=True).clamp(0, 255)[0]
        torch.testing.assert_close(x[t].double(), ref / 127.5 - 1, atol=1e-5, rtol=0)
    same_size = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(512).view(1, 32, 32, 1).expand(1, 32, 32, 3)
    torch.testing.assert_close(M.preprocess_frames(same_size, spec)[0, 0, [0, 31], 0], torch.tensor([-1.0, 1.0]))
