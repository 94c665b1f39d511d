"""Two FSDP ranks that see different kinds of batches, against the same model unsharded (run by test_train.py):

    torchrun --nproc_per_node 2 tests/fsdp_uneven_ranks.py TOY_KITCHEN

- a training micro-batch with a video on rank 0 and text only on rank 1 (replay, or clips skipped with --skip-bad);
- train.check_mqa where all of rank 1's clips are unreadable, so only rank 0 runs the vision tower.
FSDP matches its collectives across ranks by order: both must give the unsharded model's numbers, not hang or fail.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import mine  # noqa: E402
import train  # noqa: E402
from model import init_distributed, load_model  # noqa: E402

root = Path(sys.argv[1])
rank, world, device = init_distributed(timeout_minutes=2)
assert world == 2, "run with torchrun --nproc_per_node 2"
torch.manual_seed(0)
raw = load_model("tiny", action_tokens=1, n_verbs=6, n_nouns=8, n_actions=30)
unsharded = copy.deepcopy(raw)
model = train.parallelize(raw, argparse.Namespace(parallel="fsdp"), device)

# training: video on rank 0, text only on rank 1
frames, tok = 2, raw.tokenizer
ids, labels = data.encode_conversation(tok, "what?", "take plate", raw.spec.video_tokens(frames) if rank == 0 else 0,
                                       1, supervise="answers")
batch = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
             labels=torch.tensor([labels]), action_labels=torch.tensor([[1, 2, 3]]))
if rank == 0:
    batch["pixel_values_videos"] = torch.randn(1, frames, 3, raw.spec.size, raw.spec.size,
                                               generator=torch.Generator().manual_seed(1))
loss = model(batch)["loss"]
loss.backward()
torch.testing.assert_close(loss, unsharded.train()(batch)["loss"])
model.zero_grad(set_to_none=True)

# the MQA check: rank 1 scores rows[1::2], whose videos do not exist
ann = data.load_annotations(root)
rows = mine.mine(ann, "validation", mine.read_scores(root / "scores" / "tim_validation.npz", ann, "validation"))[:8]
rows = [dict(r, question=data.mqa_question(r["options"]), video_id=r["video_id"] if i % 2 == 0 else "P99_01")
        for i, r in enumerate(rows)]
args = argparse.Namespace(video_root=root / "videos", frames=frames, time_prompt=False, skip_bad=True,
                          eval_batch_size=2, num_workers=0, benchmark="rows")
check = [train.check_mqa(m, rows, args, torch.autocast("cpu", enabled=False), lambda r: None, lambda s: None, 0)
         for m in (raw, unsharded)]
assert check[0] == check[1] and check[0]["eval_skipped_bad"] == 4 and check[0]["eval_n"] == 4, check
print(f"rank {rank}: ok", flush=True)
torch.distributed.destroy_process_group()
