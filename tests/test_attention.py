"""attention.py: hook-recomputed attention equals the model's own full attention matrices; positions; maps."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import attention
import data
import mine
import model as model_lib
from conftest import ROOT

N_FRAMES = 2
QUESTIONS = [data.mqa_question(["take plate", "cut cup", "wash pan"]), "What action are you doing?"]


def tiny(n_action_tokens, layout="grid"):
    torch.manual_seed(0)
    return model_lib.load_model("tiny", action_tokens=n_action_tokens, n_verbs=3, n_nouns=4, n_actions=5,
                                video_layout=layout).eval()


def make_batch(m):
    """Two prompts of different lengths (so one is right-padded), as evaluation feeds them."""
    n_video = m.spec.video_tokens(N_FRAMES)
    items = []
    for i, q in enumerate(QUESTIONS):
        ids, labels = data.encode_conversation(m.tokenizer, q, None, n_video, m.cfg.action_tokens)
        items.append(dict(index=i, input_ids=torch.tensor(ids), labels=torch.tensor(labels), clamped=0, bad=None,
                          pixel_values_videos=torch.randn(N_FRAMES, 3, m.spec.size, m.spec.size),
                          action_labels=torch.full((3,), -100)))
    return data.collate(items, m.tokenizer.pad_token_id)


def eager_attentions(m, batch):
    """Full (B, heads, L, L) matrices of every layer from transformers' own eager attention."""
    m.llava.set_attn_implementation("eager")
    with torch.no_grad():
        out = m.llava.model(**m.lm_inputs(batch), use_cache=False, output_attentions=True)
    m.llava.set_attn_implementation("sdpa")
    return [a.mean(1) for a in out.attentions]  # averaged over heads


@pytest.mark.parametrize("n_action_tokens, layout", [(1, "grid"), (3, "hf"), (0, "grid")])
@pytest.mark.parametrize("layer", ["last", "mean", "0"])
def test_statistics_equal_direct_computation_from_full_attention(n_action_tokens, layout, layer):
    m = tiny(n_action_tokens, layout)
    batch = make_batch(m)
    ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1)
    full = eager_attentions(m, batch)
    ref_att = {"last": full[-1], "mean": torch.stack(full).mean(0), "0": full[0]}[layer]
    n_layers = len(full)
    layers = range(n_layers) if layer == "mean" else [int(layer.replace("last", "-1")) % n_layers]
    with torch.no_grad():
        att, _, (first, n_visual, text) = attention.text_attention(m, batch, layers)
    text_max, answer = attention.reduce_rows(att, batch["attention_mask"], text)
    # direct: per sample, the visual and action columns found by id, the text rows up to the prompt's end
    video_id = m.llava.config.video_token_index
    stats_rows, action_rows = [], []
    for b in range(len(ids)):
        vis = (ids[b] == video_id).nonzero().flatten()
        act = (ids[b] == m.action_id).nonzero().flatten()
        cols = torch.cat([vis, act])
        rows = torch.arange(int(cols.max()) + 1, int(lengths[b]))
        sub = ref_att[b][rows][:, cols]  # (T, V + A)
        torch.testing.assert_close(text_max[b], sub.amax(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(answer[b], ref_att[b, lengths[b] - 1, cols], atol=1e-5, rtol=1e-4)
        stats_rows.append(sub[:, :len(vis)].amax(0).numpy())
        action_rows.append(sub[:, len(vis):].amax(0).numpy())
    stats = attention.statistics(text_max, n_visual)
    vis_max = np.stack(stats_rows)
    assert stats["n"] == 2 and stats["visual_tokens"] == m.spec.video_tokens(N_FRAMES)
    assert stats["text_visual_mean"] == pytest.approx(vis_max.mean(), rel=1e-4)
    assert stats["text_visual_p90"] == pytest.approx(np.percentile(vis_max, 90), rel=1e-4)
    if n_action_tokens:
        act_max = np.stack(action_rows).mean(1)
        assert stats["text_action_mean"] == pytest.approx(act_max.mean(), rel=1e-4)
        assert stats["share_visual_below_action"] == pytest.approx((vis_max < act_max[:, None]).mean())
    else:
        assert "text_action_mean" not in stats


def test_action_token_sits_right_after_the_last_video_token():
    m = tiny(1)
    batch = make_batch(m)
    ids = batch["input_ids"]
    first, n_visual, text = attention.prompt_positions(ids, m.llava.config.video_token_index, m.action_id, 1)
    last_video = (ids[0] == m.llava.config.video_token_index).nonzero().max().item()
    assert n_visual == m.spec.video_tokens(N_FRAMES) and first + n_visual - 1 == last_video
    assert (ids[:, last_video + 1] == m.action_id).all() and text == last_video + 2
    # the model writes its action embedding at exactly that position
    with torch.no_grad():
        embeds = m.llava.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[:, last_video + 1], m.action_embeds.expand(len(ids), -1))
    with pytest.raises(AssertionError, match="action"):
        attention.prompt_positions(ids, m.llava.config.video_token_index, m.action_id + 1, 1)


@pytest.mark.parametrize("layout", ["grid", "hf"])
def test_frame_maps_have_the_frame_size_and_sum_to_one_per_clip(tmp_path, layout):
    spec, n_frames, hw = model_lib.VisionSpec(32, (0.5,) * 3, (0.5,) * 3, 2, layout), 3, (64, 96)
    row = torch.rand(spec.video_tokens(n_frames) + 30)  # frame tokens (and newlines), action and text columns
    maps = attention.frame_maps(row, n_frames, spec, hw)
    assert maps.shape == (n_frames, *hw) and (maps >= 0).all()
    assert maps.sum().item() == pytest.approx(1.0)
    frame_tokens = row[:n_frames * spec.tokens_per_frame].view(n_frames, 2, -1)[..., :2]  # grid: row newlines out
    torch.testing.assert_close(maps.sum((1, 2)), (frame_tokens.sum((1, 2)) / frame_tokens.sum()).double())
    # the top-left token's weight stays in the top-left quarter of its frame; a newline's weight nowhere
    one_hot = torch.zeros_like(row)
    one_hot[spec.tokens_per_frame] = 1  # frame 1, grid cell (0, 0)
    spot = attention.frame_maps(one_hot, n_frames, spec, hw)
    assert spot[1, :32, :48].sum().item() > 0.5 and spot[0].sum() == 0 and spot[2].sum() == 0
    if layout == "grid":
        newline = torch.ones_like(row)
        newline[spec.tokens_per_frame + 2] = 1e6  # frame 1's first row newline
        assert attention.frame_maps(newline, n_frames, spec, hw).sum((1, 2)).tolist() == pytest.approx([1 / 3] * 3)
    frames = np.zeros((n_frames, *hw, 3), dtype=np.uint8)
    attention.draw_maps(frames, maps, "clip: chosen A. take plate", tmp_path / "map.png")
    assert Image.open(tmp_path / "map.png").size == (n_frames * hw[1], hw[0] + attention.MAP_TITLE)


def test_cli_on_the_toy_kitchen_with_maps_and_compare(toy_root, tmp_path):
    ann = data.load_annotations(toy_root)
    rows = mine.mine(ann, "validation", k=3)[:3]
    data.write_jsonl_atomic(tmp_path / "mqa.jsonl", rows)
    ckpt = tmp_path / "ckpt"
    tiny(1).save(ckpt)  # grid layout
    out = tmp_path / "att"
    cmd = [sys.executable, str(ROOT / "attention.py"), "--ckpt", str(ckpt), "--compare", "tiny",
           "--benchmark", str(tmp_path / "mqa.jsonl"), "--video-root", str(toy_root / "videos"), "--frames", "2",
           "--clip", rows[0]["id"], "--clip", rows[2]["id"], "--maps", "--out", str(out)]
    log = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    assert "chosen" in log and "share_visual_below_action" in log
    results = json.loads((out / "stats.json").read_text())
    assert [r["n"] for r in results] == [2, 2] and results[1]["ckpt"] == "tiny"
    assert json.loads((out / "args.json").read_text())["clip"] == [rows[0]["id"], rows[2]["id"]]
    frame_h, frame_w = data.load_clip(toy_root / "videos", rows[0]["video_id"], rows[0]["start"], rows[0]["end"],
                                      1)[0].shape[1:3]
    for name in (rows[0]["id"], rows[2]["id"] + "_compare"):
        assert Image.open(out / "maps" / f"{name}.png").size == (2 * frame_w, frame_h + attention.MAP_TITLE)


def test_skip_bad_leaves_out_unreadable_clips(toy_root, tmp_path):
    ann = data.load_annotations(toy_root)
    rows = mine.mine(ann, "validation", k=3)[:3]
    rows[1] = dict(rows[1], video_id="P99_01")  # no such video
    data.write_jsonl_atomic(tmp_path / "mqa.jsonl", rows)
    flags = ["--ckpt", "tiny", "--benchmark", str(tmp_path / "mqa.jsonl"), "--video-root", str(toy_root / "videos"),
             "--frames", "2", "--num-workers", "0"]
    with pytest.raises(FileNotFoundError, match="video P99_01 not found"):
        attention.main([*flags, "--out", str(tmp_path / "strict")])
    attention.main([*flags, "--out", str(tmp_path / "att"), "--skip-bad"])
    stats = json.loads((tmp_path / "att" / "stats.json").read_text())
    assert (stats["n"], stats["skipped_bad"]) == (2, 1)
    with pytest.raises(FileNotFoundError):  # a failed run into the same folder: its flags are not saved
        attention.main([*flags, "--out", str(tmp_path / "att"), "--layer", "mean"])
    assert json.loads((tmp_path / "att" / "args.json").read_text())["layer"] == stats["layer"] == "last"
    with pytest.raises(IndexError, match="index 2 is out of range"):  # tiny has layers 0, 1: never wrapped to 0
        attention.main([*flags, "--out", str(tmp_path / "att"), "--skip-bad", "--layer", "2"])
