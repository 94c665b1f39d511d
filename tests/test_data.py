"""data.py core: annotations and action ids, clips in every layout, bad inputs, toy kitchens."""
import csv
import json
import shutil
import warnings
from datetime import datetime

import av
import numpy as np
import pytest

import data
from conftest import FIXTURES

FPS, SIZE, N_INDEX_FRAMES = 10, 64, 400  # index-coded test video: 40 s
CHUNK_SECONDS = 15.0  # AVION's chunked layout: {root}/{video_id}.MP4/{chunk_start}.MP4


@pytest.fixture
def epic(tmp_path):
    """A writable copy of the official excerpt (load_annotations writes actions.csv)."""
    return shutil.copytree(FIXTURES / "epic100", tmp_path / "epic100")


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# -----------------------------------------------------------------------------
# annotations and action ids


def test_official_excerpt_loads(epic):
    ann = data.load_annotations(epic)
    segments = {s.id: s for s in ann.segments("validation")}
    assert len(segments) == 60 and set(ann.splits) == {"validation"}
    first, last = segments["P01_11_0"], segments["P01_11_133"]
    assert (first.start, first.end, first.narration, first.participant) == (0.0, 1.89, "take plate", "P01")
    assert (last.start, last.end) == pytest.approx((465.78, 467.03))
    midnight = datetime(1900, 1, 1)
    for row in csv_rows(epic / "EPIC_100_validation.csv"):
        s = segments[row["narration_id"]]
        for value, seconds in ((row["start_timestamp"], s.start), (row["stop_timestamp"], s.end)):
            assert seconds == pytest.approx((datetime.strptime(value, "%H:%M:%S.%f") - midnight).total_seconds())
        assert abs(s.start - int(row["start_frame"]) / 60) < 0.05  # these videos are 60 fps
    with pytest.raises(FileNotFoundError, match="EPIC_100_train.csv"):
        ann.segments("train")
    assert ann.vocab.labels[ann.vocab.index[(0, 2)]] == "take plate"
    assert "take plate" in ann.narrations[first.action_class]


def test_action_ids_are_sorted_strings_and_read_back(epic):
    ann = data.load_annotations(epic)
    keys = sorted({f"{r['verb_class']}:{r['noun_class']}" for r in csv_rows(epic / "EPIC_100_validation.csv")})
    assert [f"{v}:{n}" for v, n in ann.vocab.pairs] == keys
    assert "0:10" < "0:2" and keys != sorted(keys, key=lambda k: tuple(map(int, k.split(":"))))  # strings, not ints
    table = csv_rows(epic / "actions.csv")
    assert [(int(r["id"]), f"{r['verb_class']}:{r['noun_class']}") for r in table] == list(enumerate(keys))
    again = data.load_annotations(epic)
    assert np.array_equal(again.vocab.pairs, ann.vocab.pairs) and again.vocab.labels == ann.vocab.labels
    # a given actions.csv wins: reversed order, ids follow the file
    write_csv(epic / "actions.csv", ["id", "verb_class", "noun_class", "label"],
              [[i, r["verb_class"], r["noun_class"], r["label"]] for i, r in enumerate(table[::-1])])
    flipped = data.load_annotations(epic)
    assert np.array_equal(flipped.vocab.pairs, ann.vocab.pairs[::-1])
    for s, t in zip(ann.segments("validation"), flipped.segments("validation")):
        assert t.action_class == len(keys) - 1 - s.action_class


def test_label_text_rotates_the_noun_key_as_the_authors_do():
    assert data.label_text("put-down", "maker:coffee") == "put-down coffee maker"
    assert data.label_text("take", "board:chopping") == "take chopping board"
    assert data.label_text("turn-on", "machine:sous:vide") == "turn-on sous vide machine"  # not "vide sous machine"
    assert data.label_text("wash", "plate") == "wash plate"
    nouns = data.read_class_keys(FIXTURES / "epic100" / "EPIC_100_noun_classes.csv")
    assert "machine:sous:vide" in nouns


def test_generic_minimal_csv(epic, tmp_path):
    root = tmp_path / "generic"
    root.mkdir()
    for name in (data.VERB_FILE, data.NOUN_FILE):
        shutil.copy(epic / name, root / name)
    write_csv(root / "EPIC_100_train.csv", data.SEGMENT_COLUMNS,
              [["kitchen1_a", "1.5", "3.25", "take plate", 0, 2],
               ["kitchen1_a", "00:00:04.00", "6", "wash cup", 2, 13]])
    ann = data.load_annotations(root)
    a, b = ann.segments("train")
    assert (a.id, a.participant, a.start, a.end) == ("kitchen1_a_0", "kitchen1", 1.5, 3.25)
    assert (b.id, b.start, b.end, b.action_class) == ("kitchen1_a_1", 4.0, 6.0, 1)
    assert ann.vocab.labels == ["take plate", "wash cup"]


def test_bad_annotations_name_the_problem(epic, tmp_path):
    rows = csv_rows(epic / "EPIC_100_validation.csv")
    bad = tmp_path / "bad.csv"
    write_csv(bad, [c for c in rows[0] if c != "noun_class"], [[r[c] for c in r if c != "noun_class"] for r in rows])
    with pytest.raises(ValueError, match=r"bad\.csv.*noun_class"):
        data.read_segments(bad)
    with pytest.raises(ValueError, match="cannot read time"):
        data.parse_time("1:xx")
    empty, header = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header.write_text(",".join(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"empty\.csv is empty; expected a CSV with columns"):
        data.read_segments(empty)
    with pytest.raises(ValueError, match=r"header\.csv has a header but no rows"):
        data.read_segments(header)
    shutil.copy(header, epic / "EPIC_100_validation.csv")
    with pytest.raises(ValueError, match="has a header but no rows"):
        data.load_annotations(epic)
    shutil.copy(FIXTURES / "epic100" / "EPIC_100_validation.csv", epic / "EPIC_100_validation.csv")
    data.load_annotations(epic)
    table = csv_rows(epic / "actions.csv")
    dropped = table[-1]
    write_csv(epic / "actions.csv", list(table[0]), [list(r.values()) for r in table[:-1]])
    users = [r["narration_id"] for r in rows if (r["verb_class"], r["noun_class"]) ==
             (dropped["verb_class"], dropped["noun_class"])]
    with pytest.raises(ValueError, match=f"segment {users[0]} .*actions.csv"):
        data.load_annotations(epic)


def test_a_bom_and_blank_lines_keep_ids_and_line_numbers(epic, tmp_path):
    """Excel saves CSVs with a BOM: the first column must still be narration_id, not '\ufeffnarration_id'."""
    path = epic / "EPIC_100_validation.csv"
    lines = path.read_text().splitlines()
    want = [s.id for s in data.read_segments(path)]
    bom = tmp_path / "bom.csv"
    bom.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf" and [s.id for s in data.read_segments(bom)] == want
    bad = lines[6].split(",")
    bad[4] = "xx:00:01.00"  # start_timestamp of the record on physical line 8, after a blank line
    blank = tmp_path / "blank.csv"
    blank.write_text("\n".join(lines[:3] + [""] + lines[3:6] + [",".join(bad)] + lines[7:]) + "\n")
    with pytest.raises(ValueError, match=r"blank\.csv, line 8: cannot read time 'xx:00:01.00'"):
        data.read_segments(blank)


def test_action_ids_of_one_split_warn_and_a_read_only_root_still_loads(epic, monkeypatch):
    with pytest.warns(UserWarning, match=r"action ids numbered over validation alone .*train \+ validation"):
        ann = data.load_annotations(epic)
    (epic / "actions.csv").unlink()

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(data, "write_atomic", read_only)
    with pytest.warns(UserWarning, match=r"cannot write .*actions\.csv .*rebuilt on every load"):
        again = data.load_annotations(epic)
    assert not (epic / "actions.csv").exists() and again.vocab.labels == ann.vocab.labels
    assert [s.action_class for s in again.segments("validation")] == [s.action_class for s in ann.splits["validation"]]


# -----------------------------------------------------------------------------
# clips: an index-coded video in the flat, original and AVION-chunked layouts


def index_frame(i):
    """A grey frame whose two halves spell i in base 20, readable after lossy coding."""
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:, :SIZE // 2], frame[:, SIZE // 2:] = 10 + 12 * (i // 20), 10 + 12 * (i % 20)
    return frame


def read_index(frame):
    hi, lo = np.median(frame[8:-8, 8:SIZE // 2 - 8]), np.median(frame[8:-8, SIZE // 2 + 8:-8])
    return int(round((hi - 10) / 12)) * 20 + int(round((lo - 10) / 12))


def write_video(path, indices):
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
    stream.options = {"crf": "10", "preset": "ultrafast"}
    for i in indices:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")))
    container.mux(stream.encode())
    container.close()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 40 s video flat, in EPIC's original folders, and cut into AVION's 15 s chunks."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "flat").mkdir()
    write_video(root / "flat" / "P01_01.mp4", range(N_INDEX_FRAMES))
    (root / "original" / "P01" / "videos").mkdir(parents=True)
    shutil.copy(root / "flat" / "P01_01.mp4", root / "original" / "P01" / "videos" / "P01_01.MP4")
    (root / "chunked" / "P01_01.MP4").mkdir(parents=True)
    chunk = int(CHUNK_SECONDS * FPS)
    for start in range(0, N_INDEX_FRAMES, chunk):
        write_video(root / "chunked" / "P01_01.MP4" / f"{start // FPS}.MP4",
                    range(start, min(start + chunk, N_INDEX_FRAMES)))
    return [root / "flat", root / "original", root / "chunked"]


def test_layouts_return_the_same_frames(layouts):
    assert [len(data.find_video(r, "P01_01")) for r in layouts] == [1, 1, 3]
    for start, end, n in ((10.0, 20.0, 8), (13.0, 17.5, 6), (0.0, 40.0, 5), (29.0, 31.0, 4)):  # 2 span chunks
        expected = np.round(data.frame_times(start, end, n) * FPS).astype(int).tolist()
        clips = [data.load_clip(r, "P01_01", start, end, n) for r in layouts]
        for frames, clamped in clips:
            assert frames.shape == (n, SIZE, SIZE, 3) and frames.dtype == np.uint8 and clamped == 0
            assert [read_index(f) for f in frames] == expected
            assert np.abs(frames.astype(int) - clips[0][0].astype(int)).mean() < 3


def test_clamping_is_counted_and_a_clip_past_the_end_is_an_error(layouts):
    for root in layouts:
        frames, clamped = data.load_clip(root, "P01_01", 38.0, 42.0, 4)  # times 38.5 39.5 40.5 41.5
        assert clamped == 2 and [read_index(f) for f in frames] == [385, 395, 399, 399]
        assert data.video_duration(root, "P01_01") == pytest.approx(40.0)
        with pytest.raises(RuntimeError,
                           match=r"clip 40\.00-42\.00 s of P01_01 starts after the video ends \(40\.00 s"):
            data.load_clip(root, "P01_01", 40.0, 42.0, 4)
    # decoder-side resize (decord 0.6.0 fails at a few small widths: 16, 24, 48, 72; 32 to 512 work)
    frames, _ = data.load_clip(layouts[0], "P01_01", 0, 4, 2, size=(32, 40))
    assert frames.shape == (2, 32, 40, 3)


def test_frame_times():
    assert data.frame_times(0, 8, 4).tolist() == [1, 3, 5, 7]
    assert data.frame_times(2, 3, 2).tolist() == [2.25, 2.75]
    t = data.frame_times(0, 8, 4, jitter=True, rng=np.random.default_rng(0))
    assert ((t >= [0, 2, 4, 6]) & (t < [2, 4, 6, 8])).all() and t.tolist() != [1, 3, 5, 7]
    assert t.tolist() == data.frame_times(0, 8, 4, jitter=True, rng=np.random.default_rng(0)).tolist()


def test_a_container_decord_misreads_is_warned_once(tmp_path):
    """An MPEG-1 program stream starts at 0.54 s: decord stamps its frames wrongly and seeks to other frames."""
    container = av.open(str(tmp_path / "P05_04.mpg"), mode="w", format="mpeg")
    stream = container.add_stream("mpeg1video", rate=25)
    stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
    for i in range(60):
        container.mux(stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")))
    container.mux(stream.encode())
    container.close()
    (tmp_path / "P05_04.mp4").symlink_to(tmp_path / "P05_04.mpg")  # found under the usual name
    with pytest.warns(UserWarning, match=r"P05_04\.mp4: its first frame is stamped .* not 0.*re-encode it to H\.264"):
        data.load_clip(tmp_path, "P05_04", 0.0, 2.0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_clip(tmp_path, "P05_04", 0.0, 2.0, 2, size=(32, 32))  # once per file


def test_missing_and_unreadable_videos(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"P05_02 not found.*P05_02\.MP4 \(flat\).*P05/videos/P05_02\.MP4"):
        data.find_video(tmp_path, "P05_02")
    (tmp_path / "P05_03.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(RuntimeError, match=r"cannot read .*P05_03\.mp4"):
        data.load_clip(tmp_path, "P05_03", 0, 1, 2)


# -----------------------------------------------------------------------------
# toy kitchens


def test_toy_is_deterministic(tmp_path):
    small = dict(videos_per_split=(1, 1), segments_per_video=4)
    a, b, c = (data.make_toy(tmp_path / name, seed=seed, **small) for name, seed in (("a", 5), ("b", 5), ("c", 6)))
    for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv", "actions.csv", "captions.json", "replay.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "EPIC_100_train.csv").read_bytes() != (c / "EPIC_100_train.csv").read_bytes()
    for name in ("tim_train", "avion_validation"):
        x, y = (np.load(root / "scores" / f"{name}.npz") for root in (a, b))
        assert np.array_equal(x["scores"], y["scores"]) and np.array_equal(x["ids"], y["ids"])
    ann = data.load_annotations(a)
    assert set(json.loads((a / "captions.json").read_text())) == {s.id for split in ann.splits.values() for s in split}


def test_toy_recognizers_rank_the_truth_and_confuse_similar_actions(toy_root):
    ann = data.load_annotations(toy_root)
    pairs = ann.vocab.pairs
    for name in data.TOY_RECOGNIZERS:
        for split in ("train", "validation"):
            segments = ann.segments(split)
            scores = np.load(toy_root / "scores" / f"{name}_{split}.npz")
            assert scores["ids"].tolist() == [s.id for s in segments]
            truth = np.array([s.action_class for s in segments])
            s = scores["scores"].copy()
            assert 5 / len(ann.vocab) < (s.argmax(1) == truth).mean() < 0.8  # right often, not always
            s[np.arange(len(truth)), truth] = -np.inf
            confused = np.argsort(-s, axis=1)[:, :4]  # the four best wrong actions
            shares = (pairs[confused, 0] == pairs[truth, None, 0]) | (pairs[confused, 1] == pairs[truth, None, 1])
            chance = np.mean([((pairs[:, 0] == pairs[t, 0]) | (pairs[:, 1] == pairs[t, 1])).sum() - 1
                              for t in truth]) / (len(pairs) - 1)
            assert shares.mean() > chance + 0.2
