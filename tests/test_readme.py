"""The README's quickstart runs as written, in order, on a fresh folder (training shortened to a few steps)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].split() for line in block.splitlines() if line.strip()]


def test_the_quickstart_block_is_found_and_names_every_script():
    commands = quickstart_commands()
    assert [c[:2] for c in commands[:1]] == [["python", "train.py"]]
    assert {c[1] for c in commands} == {"train.py", "evaluate.py", "attention.py", "mine.py"}


@pytest.mark.slow
def test_the_quickstart_runs_in_order(tmp_path):
    for script in ROOT.glob("*.py"):
        shutil.copy(script, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for command in quickstart_commands():
        argv = [sys.executable, *command[1:]] + (["--max-steps", "30"] if command[1] == "train.py" else [])
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (" ".join(command), res.stdout[-2000:], res.stderr[-3000:])
    assert (tmp_path / "runs" / "toy" / "eval_mqa" / "plots" / "per_verb_frames8.png").exists()
    assert (tmp_path / "runs" / "toy" / "attention" / "stats.json").exists()
