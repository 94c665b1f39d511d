import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import mine

ROOT = Path(__file__).resolve().parents[1]
EPIC = ROOT / "tests" / "fixtures" / "epic100"


@pytest.fixture(scope="module")
def ann(toy_root):
    return data.load_annotations(toy_root)


@pytest.fixture(scope="module")
def tim(toy_root, ann):
    return mine.read_scores(toy_root / "scores" / "tim_validation.npz", ann, "validation")


def ranking(row):
    """Reference ranking: a full stable sort, best first, ties by lower id."""
    return np.argsort(-row, kind="stable")


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "mine.py"), *map(str, args)], capture_output=True, text=True)


def check_mqa_row(row, seg, ann, k):
    acts, opts = row["option_actions"], row["options"]
    assert row["task"] == "mqa" and len(acts) == len(opts) == k
    assert len(set(opts)) == k and len(set(acts)) == k
    assert acts.count(seg.action_class) == 1
    i = row["answer_index"]
    assert acts[i] == seg.action_class and row["answer"] == f"{data.LETTERS[i]}. {opts[i]}"
    assert row["question"] == data.mqa_question(opts)
    assert (row["id"], row["video_id"], row["action_class"]) == (seg.id, seg.video_id, seg.action_class)
    assert (row["verb_class"], row["noun_class"]) == (seg.verb_class, seg.noun_class)


def test_eq3_distractors_are_top_non_truth_with_narrations(ann, tim):
    segs = ann.segments("validation")
    rows = mine.mine(ann, "validation", tim, k=5)
    for row, seg, s in zip(rows, segs, tim):
        check_mqa_row(row, seg, ann, 5)
        top = [a for a in ranking(s) if a != seg.action_class][:4]
        i = row["answer_index"]
        assert row["options"][i] == seg.narration
        distractors = [(a, t) for j, (a, t) in enumerate(zip(row["option_actions"], row["options"])) if j != i]
        assert sorted(a for a, _ in distractors) == sorted(top)
        for a, t in distractors:
            assert t in (ann.narrations.get(a) or [ann.vocab.labels[a]])


def test_label_texts(ann, tim):
    for row in mine.mine(ann, "validation", tim, k=5, text="label"):
        assert row["options"] == [ann.vocab.labels[a] for a in row["option_actions"]]


def test_pool_draws_from_top_pool_and_varies(ann, tim):
    segs = ann.segments("validation")
    rows = mine.mine(ann, "validation", tim, k=5, pool=8)
    exact = 0
    for row, seg, s in zip(rows, segs, tim):
        check_mqa_row(row, seg, ann, 5)
        top = [a for a in ranking(s) if a != seg.action_class]
        distractors = set(row["option_actions"]) - {seg.action_class}
        assert distractors <= set(top[:8])
        exact += distractors == set(top[:4])
    assert exact < len(rows) // 2   # the pool really varies the negatives


def test_core_matches_naive_reference_including_truth_outside_top():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((200, 50)).astype(np.float32)
    truth = rng.integers(0, 50, 200)
    scores[:100, truth[:100]] = -10.0                 # truth ranked last for some rows
    scores[np.arange(100, 200), truth[100:]] = 10.0  # first for the others
    got = mine.top_distractor_classes(scores, truth, 4)
    want = np.array([[a for a in ranking(s) if a != t][:4] for s, t in zip(scores, truth)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mine.ranked_top(scores, 7), np.stack([ranking(s)[:7] for s in scores]))


def test_same_seed_same_bytes_and_args_saved(toy_root, tmp_path):
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.jsonl"
        r = run_cli("--model", "tim", "--annotations", toy_root, "--split", "validation", "--k", 5,
                    "--seed", seed, "--out", out)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    saved = json.loads((tmp_path / "a.jsonl.args.json").read_text())
    assert saved["k"] == 5 and saved["scores"].endswith("tim_validation.npz")


def test_random_mode_never_uses_truth(ann):
    segs = ann.segments("validation")
    rows = mine.mine(ann, "validation", None, k=5, seed=3)
    with_narrations = {a for a, n in ann.narrations.items() if n}
    for row, seg in zip(rows, segs):
        check_mqa_row(row, seg, ann, 5)
        others = set(row["option_actions"]) - {seg.action_class}
        assert len(others) == 4 and others <= with_narrations
    assert rows == mine.mine(ann, "validation", None, k=5, seed=3)


def test_candidates_keep_rank_order_and_never_add_truth(ann, tim):
    segs = ann.segments("validation")
    scores = tim.copy()
    scores[np.arange(10), [s.action_class for s in segs[:10]]] = -100.0   # truth far outside the top for 10 rows
    scores[10:20, -8:] = -5.0                                               # ties across the cut: lower id first
    rows = mine.mine(ann, "validation", scores, topk=20, text="label")
    for n, (row, seg, s) in enumerate(zip(rows, segs, scores)):
        assert row["task"] == "candidates"
        assert row["option_actions"] == ranking(s)[:20].tolist()
        assert row["options"] == [ann.vocab.labels[a] for a in row["option_actions"]]
        if seg.action_class in row["option_actions"]:
            i = row["answer_index"]
            assert row["option_actions"][i] == seg.action_class and row["answer"].startswith(f"{data.LETTERS[i]}. ")
        else:
            assert row["answer_index"] == -1 and "answer" not in row
        assert n >= 10 or row["answer_index"] == -1


def test_repeated_texts_are_replaced_deterministically(ann, tim):
    narr = {a: sorted(set(t) | {"do something"}) for a, t in ann.narrations.items()}
    shared = dataclasses.replace(ann, narrations=narr)
    rows = mine.mine(shared, "validation", tim, k=5, seed=0)
    for row, seg in zip(rows, ann.segments("validation")):
        check_mqa_row(row, seg, shared, 5)
    assert rows == mine.mine(shared, "validation", tim, k=5, seed=0)


def test_pt_json_and_superset_npz_give_the_same_rows(toy_root, ann, tim, tmp_path):
    import torch

    segs = ann.segments("validation")
    ids = [s.id for s in segs]
    want = mine.mine(ann, "validation", tim, k=5)
    torch.save({"ids": ids, "scores": torch.from_numpy(tim)}, tmp_path / "s.pt")
    ranked = {str(r): {"predictions": [f"{v}:{n}" for v, n in ann.vocab.pairs[ranking(s)]],
                       "target": f"{segs[r].verb_class}:{segs[r].noun_class}"} for r, s in enumerate(tim)}
    (tmp_path / "s.json").write_text(json.dumps(ranked))
    train = mine.load_score_file(toy_root / "scores" / "tim_train.npz")
    perm = np.random.default_rng(0).permutation(len(segs) + len(train[0]))
    all_ids, all_scores = np.array(ids + train[0])[perm], np.concatenate([tim, train[1]])[perm]
    np.savez(tmp_path / "s.npz", ids=all_ids, scores=all_scores)
    with open(tmp_path / "s.pkl", "wb") as f:
        pickle.dump({"ids": ids, "scores": tim}, f)
    for name in ("s.pt", "s.json", "s.npz"):
        assert mine.mine(ann, "validation", mine.read_scores(tmp_path / name, ann, "validation"), k=5) == want
    with pytest.raises(ValueError, match="trust-pickle"):
        mine.read_scores(tmp_path / "s.pkl", ann, "validation")
    np.testing.assert_array_equal(mine.read_scores(tmp_path / "s.pkl", ann, "validation", trust_pickle=True), tim)


def test_compare_identical_and_against_reference_js(toy_root, tmp_path):
    a = toy_root / "scores" / "tim_validation.npz"
    same = mine.compare_files(a, a)
    assert same["top1_agreement"] == 1.0 and same["topk_overlap"] == 1.0
    assert abs(same["js_mean"]) < 1e-12 and same["js_std"] < 1e-12

    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 2, (30, 12)), rng.normal(0, 2, (30, 12))
    res = mine.compare_scores(x, y, k=3)
    js = []
    for u, v in zip(x, y):
        p, q = np.exp(u) / np.exp(u).sum(), np.exp(v) / np.exp(v).sum()
        total = 0.0
        for pi, qi in zip(p, q):
            m = (pi + qi) / 2
            total += 0.5 * pi * np.log(pi / m) + 0.5 * qi * np.log(qi / m)
        js.append(total)
    js = np.array(js)
    assert res["js_mean"] == pytest.approx(js.mean(), rel=1e-9)
    assert res["js_std"] == pytest.approx(js.std(ddof=1), rel=1e-9)
    half = 1.96 * js.std(ddof=1) / np.sqrt(30)
    assert res["js_ci95_mean"] == pytest.approx([js.mean() - half, js.mean() + half])
    assert res["js_percentile_2.5_97.5"] == pytest.approx(np.percentile(js, [2.5, 97.5]).tolist())
    top_x, top_y = np.argsort(-x, 1)[:, :3], np.argsort(-y, 1)[:, :3]
    assert res["topk_overlap"] == pytest.approx(np.mean([len(set(p) & set(q)) / 3 for p, q in zip(top_x, top_y)]))
    assert res["top1_agreement"] == pytest.approx(np.mean(top_x[:, 0] == top_y[:, 0]))
    probs = mine.compare_scores(np.exp(x) / np.exp(x).sum(1, keepdims=True), y, k=3)   # probabilities kept as they are
    assert probs["js_mean"] == pytest.approx(js.mean(), rel=1e-9)

    full = dict(np.load(a))  # B may hold a superset of A's ids in any order; a subset is refused by count
    order = np.random.default_rng(0).permutation(len(full["ids"]))
    np.savez(tmp_path / "shuffled.npz", ids=full["ids"][order], scores=full["scores"][order])
    assert mine.compare_files(a, tmp_path / "shuffled.npz")["top1_agreement"] == 1.0
    np.savez(tmp_path / "fewer.npz", ids=full["ids"][2:], scores=full["scores"][2:])
    with pytest.raises(ValueError, match=rf"fewer\.npz has no scores for 2 of the {len(order)} ids"):
        mine.compare_files(a, tmp_path / "fewer.npz")


def test_compare_cli_writes_json(toy_root, tmp_path):
    s = toy_root / "scores"
    r = run_cli("compare", s / "tim_validation.npz", s / "avion_validation.npz", "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement" in r.stdout and "nats" in r.stdout and "percentiles" in r.stdout
    res = json.loads((tmp_path / "c.json").read_text())
    assert 0 <= res["top1_agreement"] <= 1 and 0 < res["js_mean"] < np.log(2)


def test_compare_cli_reads_a_ranked_json_whatever_the_suffix_case(toy_root, ann, tim, tmp_path):
    segs = ann.segments("validation")
    ranked = {str(r): {"predictions": [f"{v}:{n}" for v, n in ann.vocab.pairs[ranking(s)[:5]]],
                       "target": f"{segs[r].verb_class}:{segs[r].noun_class}"} for r, s in enumerate(tim)}
    (tmp_path / "TIM.JSON").write_text(json.dumps(ranked))
    r = run_cli("compare", tmp_path / "TIM.JSON", toy_root / "scores" / "tim_validation.npz",
                "--annotations", toy_root, "--split", "validation", "--json", tmp_path / "c.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c.json").read_text())["top1_agreement"] == 1.0


def test_bad_scores_raise_naming_the_file(toy_root, ann, tim, tmp_path):
    ids = [s.id for s in ann.segments("validation")]
    np.savez(tmp_path / "classes.npz", ids=np.array(ids), scores=tim[:, :-1])
    with pytest.raises(ValueError, match=rf"classes\.npz.*{len(ann.vocab) - 1}.*actions\.csv.*{len(ann.vocab)}"):
        mine.read_scores(tmp_path / "classes.npz", ann, "validation")
    np.savez(tmp_path / "missing.npz", ids=np.array(ids[3:]), scores=tim[3:])
    with pytest.raises(ValueError, match=rf"missing\.npz.*3 of the.*{ids[0]}.*--scores"):
        mine.read_scores(tmp_path / "missing.npz", ann, "validation")
    with pytest.raises(ValueError, match=r"tim_train\.npz.*scores of split 'train'"):
        mine.read_scores(toy_root / "scores" / "tim_train.npz", ann, "validation")
    segs = ann.segments("validation")
    wrong = {"0": {"predictions": ["0:0"], "target": f"{segs[0].verb_class}:{segs[0].noun_class + 1}"}}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=r"wrong\.json.*target"):
        mine.read_scores(tmp_path / "wrong.json", ann, "validation")


def test_scores_over_more_actions_than_one_split_has_say_how_to_renumber(tmp_path):
    """Only the validation CSV: its actions alone are numbered, and a recognizer's scores over all of EPIC's fail."""
    root = shutil.copytree(EPIC, tmp_path / "epic100")
    with pytest.warns(UserWarning, match="validation alone"):
        ann = data.load_annotations(root)
    segs = ann.segments("validation")
    np.savez(tmp_path / "tim.npz", ids=np.array([s.id for s in segs]), scores=np.zeros((len(segs), 3806)))
    with pytest.raises(ValueError, match=r"only validation annotations in .*add the other split's CSV and delete "
                                         r"actions\.csv"):
        mine.read_scores(tmp_path / "tim.npz", ann, "validation")


def test_score_file_without_scores_lists_its_keys(ann, tmp_path):
    np.savez(tmp_path / "logits.npz", ids=np.array(["a"]), logits=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"logits\.npz: expected 'ids' .* and 'scores' .*found \['ids', 'logits'\]"):
        mine.read_scores(tmp_path / "logits.npz", ann, "validation")


def test_an_empty_split_stops_mining(toy_root, tmp_path):
    root = shutil.copytree(toy_root, tmp_path / "toy", ignore=shutil.ignore_patterns("videos"))
    header = (root / "EPIC_100_validation.csv").read_text().splitlines()[0]
    (root / "EPIC_100_validation.csv").write_text(header + "\n")
    r = run_cli("--model", "tim", "--annotations", root, "--out", tmp_path / "x.jsonl")
    assert r.returncode != 0 and "EPIC_100_validation.csv has a header but no rows" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_toy_files_are_mined_once(toy_root, tmp_path):
    root = shutil.copytree(toy_root, tmp_path / "toy", ignore=shutil.ignore_patterns("videos"))
    mine.mine_toy(root)
    train, bench = data.read_jsonl(root / mine.TOY_TRAIN), data.read_jsonl(root / data.BENCHMARK)
    ann = data.load_annotations(root)
    assert len(train) == mine.TOY_DRAWS * len(ann.segments("train")) and len(bench) == len(ann.segments("validation"))
    assert all(len(r["options"]) == mine.K for r in train + bench)
    stamp = (root / mine.TOY_TRAIN).stat().st_mtime_ns
    mine.mine_toy(root)
    assert (root / mine.TOY_TRAIN).stat().st_mtime_ns == stamp


def test_cli_missing_score_file_names_default_and_flag(toy_root, tmp_path):
    r = run_cli("--model", "rulstm", "--annotations", toy_root, "--out", tmp_path / "x.jsonl")
    assert r.returncode != 0
    assert str(toy_root / "scores" / "rulstm_validation.npz") in r.stderr and "--scores" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()
    r = run_cli("--annotations", toy_root, "--topk", 5, "--pool", 8, "--out", tmp_path / "x.jsonl")
    assert r.returncode == 2 and "pass one of them" in r.stderr and not (tmp_path / "x.jsonl").exists()


def test_unknown_class_segment_raises_on_load(toy_root, tmp_path):
    root = tmp_path / "toy"
    shutil.copytree(toy_root, root, ignore=shutil.ignore_patterns("videos"))
    csv_path = root / "EPIC_100_validation.csv"
    head, first, *rest = csv_path.read_text().splitlines(keepends=True)
    used = {(int(v), int(n)) for v, n in data.load_annotations(root).vocab.pairs}
    v, n = next((v, n) for v in range(len(data.TOY_VERBS)) for n in range(len(data.TOY_NOUNS)) if (v, n) not in used)
    cells = first.rstrip("\n").split(",")
    cells[10], cells[12] = str(v), str(n)
    csv_path.write_text(head + ",".join(cells) + "\n" + "".join(rest))
    with pytest.raises(ValueError, match="EPIC_100_validation.csv"):
        data.load_annotations(root)


def test_real_epic_excerpt(tmp_path):
    root = tmp_path / "epic"
    shutil.copytree(EPIC, root)
    ann = data.load_annotations(root)
    segs = ann.segments("validation")
    rng = np.random.default_rng(0)
    np.savez(root / "tim.npz", ids=np.array([s.id for s in segs])[::-1],
             scores=rng.standard_normal((len(segs), len(ann.vocab))).astype(np.float32)[::-1])
    scores = mine.read_scores(root / "tim.npz", ann, "validation")
    rows = mine.mine(ann, "validation", scores, k=5)
    assert len(rows) == len(segs) >= 40
    for row, seg in zip(rows, segs):
        check_mqa_row(row, seg, ann, 5)
    labels = mine.mine(ann, "validation", scores, k=5, text="label")
    assert labels[1]["options"][labels[1]["answer_index"]] == "put plate"   # P01_11_1: verb class 1 (key put), noun 2
    r = run_cli("--model", "tim", "--annotations", root, "--scores", root / "tim.npz", "--out", root / "m.jsonl")
    assert r.returncode == 0, r.stderr
    assert data.read_jsonl(root / "m.jsonl") == json.loads(json.dumps(rows))
