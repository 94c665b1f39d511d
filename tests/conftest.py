import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (minutes); CI runs them too")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """One small toy kitchen for the whole session (read-only: copy it before writing into it)."""
    import data

    return data.make_toy(tmp_path_factory.mktemp("toy"), videos_per_split=(2, 1), segments_per_video=30)


def make_next_checkpoint(out, action_tokens=1, tied=False, seed=0, **config):
    """A tiny checkpoint in the LLaVA-NeXT format as the authors publish theirs: config.json with
    architectures LlavaQwenForCausalLM, the Qwen2 fields and the mm_* fields; a plain tokenizer (no <image>,
    <video> or <action>); official key names (model.layers.*, model.vision_tower.vision_tower.vision_model.*,
    model.mm_projector.0|2, model.image_newline, model.action_supervision, bias-free heads); a SigLIP tower
    config of 3 layers, of which the authors' tower drops the last. Random weights. Returns the state dict."""
    import torch
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig

    import model as M

    out = Path(out)
    out.mkdir(parents=True)
    M.build_tokenizer_tiny(special_tokens=M.SPECIAL_TOKENS[:3]).save_pretrained(out)
    SiglipVisionConfig(**dict(M.TINY_VISION, num_hidden_layers=3)).save_pretrained(out / "siglip")
    g = torch.Generator().manual_seed(seed)
    H, V, D, FF, VFF = 128, 1024, 64, 256, 128

    def r(*shape, one=False):
        return (1 if one else 0) + 0.05 * torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": r(H, one=True)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in (("q_proj", (H, H)), ("k_proj", (64, H)), ("v_proj", (64, H))):
            sd[f"{p}self_attn.{name}.weight"], sd[f"{p}self_attn.{name}.bias"] = r(*shape), r(shape[0])
        sd[p + "self_attn.o_proj.weight"] = r(H, H)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"], sd[p + "mlp.down_proj.weight"] = (
            r(FF, H), r(FF, H), r(H, FF))
        sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"] = r(H, one=True), r(H, one=True)
        sd[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # old checkpoints carry it; dropped
    if not tied:
        sd["lm_head.weight"] = r(V, H)
    v = "model.vision_tower.vision_tower.vision_model."
    sd[v + "embeddings.patch_embedding.weight"], sd[v + "embeddings.patch_embedding.bias"] = r(D, 3, 8, 8), r(D)
    sd[v + "embeddings.position_embedding.weight"] = r(16, D)
    for i in range(2):  # the authors' tower saved without its last layer
        p = f"{v}encoder.layers.{i}."
        for name, shape in (("self_attn.q_proj", (D, D)), ("self_attn.k_proj", (D, D)), ("self_attn.v_proj", (D, D)),
                            ("self_attn.out_proj", (D, D)), ("mlp.fc1", (VFF, D)), ("mlp.fc2", (D, VFF))):
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = r(*shape), r(shape[0])
        for name in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = r(D, one=True), r(D)
    sd[v + "post_layernorm.weight"], sd[v + "post_layernorm.bias"] = r(D, one=True), r(D)
    sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"] = r(H, D), r(H)
    sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"] = r(H, H), r(H)
    sd["model.image_newline"] = r(H)
    if action_tokens:
        sd["model.action_supervision"] = r(action_tokens, H)
        sd["verb_head.weight"], sd["noun_head.weight"], sd["action_head.weight"] = r(97, H), r(300, H), r(3806, H)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", hidden_size=H, intermediate_size=FF,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
               max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=tied,
               torch_dtype="float32", mm_vision_tower=str(out / "siglip"), mm_hidden_size=D,
               mm_projector_type="mlp2x_gelu", mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2,
               mm_newline_position="grid", mm_patch_merge_type="spatial_unpad", mm_vision_select_layer=-2,
               add_faster_video=False, add_time_instruction=True, action_types="97,300,3806",
               vision_supervision={0: None, 1: "one_token", 3: "three_tokens"}[action_tokens],
               vision_token_training="last_layer")
    (out / "config.json").write_text(json.dumps({**cfg, **config}))
    return sd
