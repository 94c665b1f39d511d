"""The codebase's shape: imports point one way, every script has main(argv) and a fast --help, no function runs
past 100 lines, and nothing names a path outside the repository."""
import ast
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SOURCES = ["data.py", "mine.py", "model.py", "structured.py", "train.py", "evaluate.py", "attention.py"]
SCRIPTS = ["data.py", "mine.py", "model.py", "train.py", "evaluate.py", "attention.py"]


def imports(name):
    tree = ast.parse((ROOT / name).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imports_point_one_way():
    ours = {s[:-3] for s in SOURCES}
    graph = {s[:-3]: imports(s) & ours for s in SOURCES}
    assert graph["data"] == set() and graph["mine"] == {"data"} and graph["model"] == {"data"}
    assert graph["structured"] == {"data"}
    assert "evaluate" not in graph["train"] and "train" not in graph["evaluate"]
    assert graph["attention"] <= {"data", "model", "structured"}
    res = subprocess.run([sys.executable, "-c", "import sys, data; print(sorted({'model', 'torch', 'transformers'} "
                          "& set(sys.modules)))"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"  # the data layer knows no model (and mine.py starts without torch)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_main_and_a_fast_help(script):
    tree = ast.parse((ROOT / script).read_text())
    main = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert main and [a.arg for a in main[0].args.args] == ["argv"]
    guard = tree.body[-1]
    assert isinstance(guard, ast.If) and ast.unparse(guard) == "if __name__ == '__main__':\n    main(sys.argv[1:])"
    start = time.perf_counter()
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "usage:" in res.stdout and time.perf_counter() - start < 5


def test_no_function_runs_past_100_lines():
    trees = {s: ast.parse((ROOT / s).read_text()) for s in SOURCES}
    long = [(s, n.name, n.end_lineno - n.lineno + 1) for s, tree in trees.items() for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 100]
    assert not long


def test_nothing_names_a_path_outside_the_repository():
    outside = ("DESIGN" + ".md", "../" + "shared")
    files = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".txt", ".ini", "")
             and ".git" not in p.parts and "__pycache__" not in p.parts]
    assert not [str(p) for p in files for word in outside if word in p.read_text(errors="ignore")]


BENCHMARKS = {  # script: (tiny arguments, what its last lines must report)
    "bench_mine.py": (["--n", "500", "--a", "300"], "speed-up of the core over the naive reference"),
    "bench_multi_round.py": (["--repeats", "1", "--actions", "50"], "speed-up:"),
    "bench_option_text.py": (["--repeats", "1", "--clips", "2"], "same choices: True"),
    "bench_two_stage.py": (["--clips", "16", "--repeats", "1", "--num-workers", "0"], "clips/s"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(BENCHMARKS))
def test_benchmarks_run_with_the_scripts_flag_names(script):
    """The README quotes these scripts: they keep running as the code under them changes, and name a model --ckpt
    and DataLoader workers --num-workers as evaluate.py does."""
    source = (ROOT / "tests" / "benchmarks" / script).read_text()
    assert '"--base"' not in source and '"--workers"' not in source
    args, expected = BENCHMARKS[script]
    res = subprocess.run([sys.executable, f"tests/benchmarks/{script}", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expected in res.stdout
