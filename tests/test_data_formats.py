"""Annotation adapters on fixture files of every format, with tiny generated videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vop.data import get_dataset, load_records, verify
from vop.data.formats import FORMATS, format_names, lsmdc_movie
from vop.data.synth import write_video
from vop.errors import DataError


def tiny(path: Path, seed: int = 0, n: int = 6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    codec = {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(path.suffix, "libx264")
    return write_video(path, frames, codec=codec)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_msrvtt(tmp_path):
    sentences = [("video0", "a dog jumps into a pool"), ("video1", "a man cooks"), ("video0", "dog swimming"),
                 ("video2", "cars race"), ("video0", "a pool party"), ("video1", "cooking show"),
                 ("video3", "a woman slices a tomato"), ("video2", "a race")]
    data = {"info": {}, "videos": [{"id": i, "video_id": f"video{i}", "category": 1, "url": "u", "start time": 1.5,
                                    "end time": 9.0, "split": "train"} for i in range(5)],
            "sentences": [{"sen_id": i, "video_id": v, "caption": c} for i, (v, c) in enumerate(sentences)]}
    write(tmp_path / "MSRVTT_data.json", json.dumps(data))
    write(tmp_path / "MSRVTT_train.9k.csv", "video_id\nvideo0\nvideo1\nvideo2\n")
    write(tmp_path / "MSRVTT_train.7k.csv", "video_id\nvideo0\nvideo1\n")
    write(tmp_path / "MSRVTT_JSFUSION_test.csv",
          "key,vid_key,video_id,sentence\nret0,msr3,video3,a woman slices a tomato\nret1,msr4,video4,a man, a dog and a cat\n")
    for i in range(4):
        tiny(tmp_path / "videos" / f"video{i}.mp4", i)
    tiny(tmp_path / "videos" / "video4.webm", 4)

    train = get_dataset("msrvtt", tmp_path, "9k", size=16)
    assert train.train and train.frames == 12
    assert len(train) == 7 and train.videos == ["video0", "video1", "video2"]
    assert train.captions == ["a dog jumps into a pool", "a man cooks", "dog swimming", "cars race", "a pool party",
                              "cooking show", "a race"]
    assert train.text_to_video.tolist() == [0, 1, 0, 2, 0, 1, 2]
    assert train.video_to_texts() == [[0, 2, 4], [1, 5], [3, 6]]
    assert len(get_dataset("msrvtt", tmp_path, "7k")) == 5
    assert len(get_dataset("msrvtt", tmp_path, "train")) == 7  # train = 9k
    test = get_dataset("msrvtt", tmp_path, "test", size=16)
    assert not test.train and test.captions == ["a woman slices a tomato", "a man, a dog and a cat"]
    assert test.video_paths == [tmp_path / "videos/video3.mp4", tmp_path / "videos/video4.webm"]
    item = test[1]
    assert item["video"].shape == (12, 3, 16, 16) and item["video"].dtype == torch.uint8 and item["text"] == test.captions[1]
    with pytest.raises(DataError, match="no split"):
        get_dataset("msrvtt", tmp_path, "val")


def test_didemo_paragraphs_and_a_missing_video(tmp_path):
    moments = [
        {"annotation_id": 1, "description": "the red car turns left", "dl_link": "x", "num_segments": 6,
         "times": [[2, 2]], "video": "111@N01_222_abc.mov"},
        {"annotation_id": 2, "description": "a boy waves ", "dl_link": "x", "num_segments": 6,
         "times": [[0, 1]], "video": "333@N02_444_def.m4v"},
        {"annotation_id": 3, "description": "the car stops", "dl_link": "x", "num_segments": 6,
         "times": [[3, 4]], "video": "111@N01_222_abc.mov"},
        {"annotation_id": 4, "description": "nobody has this one", "dl_link": "x", "num_segments": 6,
         "times": [[3, 4]], "video": "555@N03_666_ghi.mp4"},
    ]
    write(tmp_path / "annotations" / "test_data.json", json.dumps(moments))
    write(tmp_path / "annotations" / "test_list.txt", "333@N02_444_def.m4v\n111@N01_222_abc.mov\n555@N03_666_ghi.mp4\n")
    tiny(tmp_path / "videos" / "111@N01_222_abc.mov")
    tiny(tmp_path / "videos" / "converted" / "333@N02_444_def.mp4")  # a converted copy: found by stem

    records, split = load_records("didemo", tmp_path, "test")
    assert [r.caption for r in records] == ["a boy waves", "the red car turns left the car stops", "nobody has this one"]
    ds = get_dataset("didemo", tmp_path, "test", size=16)
    assert ds.frames == 64 and len(ds) == 2  # the missing video is left out, and listed
    assert ds.videos == ["333@N02_444_def.m4v", "111@N01_222_abc.mov"]
    assert ds.video_paths[0] == tmp_path / "videos/converted/333@N02_444_def.mp4"
    assert list(ds.dropped) == ["555@N03_666_ghi.mp4"]
    report = verify("didemo", tmp_path, "test")
    assert (report.samples, report.videos, len(report.missing), len(report.undecodable)) == (3, 3, 1, 0)
    assert report.missing[0]["video_id"] == "555@N03_666_ghi.mp4"
    with pytest.raises(DataError, match="1 videos missing"):
        get_dataset("didemo", tmp_path, "test", missing="error")


def test_activitynet_sentences_with_leading_spaces(tmp_path):
    data = {
        "v_abc-123": {"duration": 82.5, "timestamps": [[0.0, 20.1], [18.0, 80.0]],
                      "sentences": ["A man sets up a tent.", " He then lights a fire.", "  It gets dark. "]},
        "v_xyz": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": [" A cat sleeps."]},
    }
    write(tmp_path / "val_1.json", json.dumps(data))
    write(tmp_path / "val_ids.json", json.dumps(["v_xyz", "v_nocaption", "v_abc-123"]))
    tiny(tmp_path / "videos" / "deep" / "er" / "abc-123.mp4")
    tiny(tmp_path / "videos" / "xyz.mkv")
    ds = get_dataset("activitynet", tmp_path, "val_1", size=16)
    assert ds.videos == ["v_xyz", "v_abc-123"]  # order of the id list; ids without captions skipped
    assert ds.captions == ["A cat sleeps.", "A man sets up a tent. He then lights a fire. It gets dark."]
    assert ds.video_paths == [tmp_path / "videos/xyz.mkv", tmp_path / "videos/deep/er/abc-123.mp4"]
    assert get_dataset("activitynet", tmp_path, "test").split == "val_1"


LSMDC_LINES = [
    "0001_American_Beauty_00.00.51.926-00.00.54.019\t00.00.51.926\t00.00.54.019\t00.00.51.000\t00.00.55.000\t"
    'SOMEONE says "hello" to the \'man\'.',
    "0001_American_Beauty_00.00.51.926-00.00.54.019\t00.00.51.926\t00.00.54.019\t00.00.51.000\t00.00.55.000\t"
    'He turns, "wait.',
    "0002_Other_Movie_01.02.03.456-01.02.07.890\t01.02.03.456\t01.02.07.890\t01.02.03.000\t01.02.08.000\t"
    "She leaves, smiling.",
]


def test_lsmdc_tabs_quotes_and_repeated_clips(tmp_path):
    write(tmp_path / "LSMDC16_annos_training.csv", "\n".join(LSMDC_LINES) + "\n")
    clip1, clip2 = (line.split("\t")[0] for line in LSMDC_LINES[::2])
    assert lsmdc_movie(clip1) == "0001_American_Beauty"
    tiny(tmp_path / "videos" / "0001_American_Beauty" / f"{clip1}.avi")
    tiny(tmp_path / "videos" / f"{clip2}.mp4")  # a flat copy with another extension: found by stem
    ds = get_dataset("lsmdc", tmp_path, "train", size=16)
    assert ds.captions == ['SOMEONE says "hello" to the \'man\'.', 'He turns, "wait.', "She leaves, smiling."]
    assert ds.videos == [clip1, clip2] and ds.text_to_video.tolist() == [0, 0, 1]
    assert ds.video_paths == [tmp_path / "videos/0001_American_Beauty" / f"{clip1}.avi", tmp_path / f"videos/{clip2}.mp4"]
    assert ds[2]["video"].shape == (12, 3, 16, 16)

    bad = write(tmp_path / "bad" / "LSMDC16_annos_val.csv",
                LSMDC_LINES[0] + "\n\n" + "0003_X_00.00.01.000-00.00.02.000\t1\t2\t3\tonly five\n")
    with pytest.raises(DataError, match=f"{bad}:3: expected 6 tab-separated fields, found 5"):
        load_records("lsmdc", bad.parent, "val")


def test_collection_jsonl_and_csv(tmp_path):
    rows = [{"video": "clips/a.mp4", "caption": "a red ball", "split": "train", "source": "cam1"},
            {"video": "clips/a.mp4", "caption": "a ball that is red", "split": "train"},
            {"video": "clips/b.mp4", "caption": "a blue box", "split": "test"},
            {"video": "clips/c.mp4", "caption": "a green cup", "split": "train"}]
    write(tmp_path / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for name in "abc":
        tiny(tmp_path / "clips" / f"{name}.mp4")
    train = get_dataset("collection", tmp_path, "train", frames=4, size=16)
    assert train.train and len(train) == 3 and train.videos == ["clips/a.mp4", "clips/c.mp4"]
    assert train.text_to_video.tolist() == [0, 0, 1] and train.meta_column("source") == ["cam1", None, None]
    assert get_dataset("collection", tmp_path, "test").captions == ["a blue box"]
    assert len(get_dataset("collection", tmp_path, "all")) == 4
    with pytest.raises(DataError, match="splits present: test, train"):
        get_dataset("collection", tmp_path, "val")

    csv = write(tmp_path / "mine.csv", 'video,caption\nclips/a.mp4,"a red ball, rolling"\nclips/b.mp4,a box\n')
    ds = get_dataset("collection", tmp_path, "all", annotations=csv)
    assert ds.captions == ["a red ball, rolling", "a box"]
    with pytest.raises(DataError, match="no 'split' column"):
        get_dataset("collection", tmp_path, "train", annotations=csv)


def test_only_a_collection_accepts_any_split_name(tmp_path):
    """``any_split`` is declared in the format table: the user's own collection names its splits."""
    assert [f.name for f in FORMATS.values() if f.any_split] == ["collection"]
    write(tmp_path / "captions.jsonl", json.dumps({"video": "a.mp4", "caption": "a red ball", "split": "cam2"}) + "\n")
    tiny(tmp_path / "a.mp4")
    records, split = load_records("collection", tmp_path, "cam2")
    assert split == "cam2" and [r.caption for r in records] == ["a red ball"]
    with pytest.raises(DataError, match="has no split 'cam2'; choose one of train, val, test"):
        FORMATS["lsmdc"].canonical_split("cam2")
    assert format_names() == "msrvtt, didemo, activitynet, lsmdc or collection"


@pytest.mark.parametrize("text, line, message", [
    ('{"video": "a.mp4", "caption": "ok"}\n{"video": "b.mp4", "caption": "ok",\n', 2, "invalid JSON"),
    ('{"video": "a.mp4", "caption": "ok"}\n\n{"video": "b.mp4"}\n', 3, "string 'caption'"),
    ('["a.mp4", "x"]\n', 1, "JSON object"),
])
def test_malformed_collection_lines_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path / "captions.jsonl", text)
    with pytest.raises(DataError, match=f"{path}:{line}: .*{message}"):
        load_records("collection", tmp_path, "all")


def test_missing_annotations_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="MSRVTT_JSFUSION_test.csv not found"):
        load_records("msrvtt", tmp_path, "test")
    write(tmp_path / "val_1.json", '{"v_a": {"sentences": ["x"]},\n "v_b": }')
    with pytest.raises(DataError, match=r"val_1.json:2: invalid JSON"):
        load_records("activitynet", tmp_path, "val_1")
    with pytest.raises(DataError, match="unknown dataset"):
        load_records("kinetics", tmp_path, "test")
