"""Image folders (sidecar captions, metadata.jsonl) and datasets.save_to_disk directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batctl.data import BadSample, Sample, open_pool
from batctl.errors import BadSampleError

from .data_fixtures import assert_read_back, assert_roundtrip, jpeg, png

REPO = Path(__file__).resolve().parents[1]


def test_image_folder_with_sidecar_captions(tmp_path):
    d = tmp_path / "instance"
    (d / "sub").mkdir(parents=True)
    (d / "dog1.jpg").write_bytes(jpeg())
    (d / "dog1.txt").write_text("a photo of sks dog\n")
    (d / "dog2.PNG").write_bytes(png())
    (d / "dog2.txt").write_text("sks dog on grass")
    (d / "sub" / "dog3.jpeg").write_bytes(jpeg((1, 2, 3)))
    (d / "sub" / "dog3.json").write_text(json.dumps({"caption": "sks dog, json"}))
    (d / "nocap.jpg").write_bytes(jpeg())
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    (d / "broken.txt").write_text("x")
    (d / ".hidden.jpg").write_bytes(b"ignored")
    (d / "notes.md").write_text("ignored")
    pool = open_pool([d])
    assert pool.parts[0].kind == "imagefolder"
    rows = list(pool.iter_rows())
    assert [(r.key, r.offset, type(r)) for r in rows] == [
        ("broken", 0, BadSample),
        ("dog1", 1, Sample),
        ("dog2", 2, Sample),
        ("nocap", 3, BadSample),
        ("sub/dog3", 4, Sample),
    ]
    assert rows[1].record["caption"] == "a photo of sks dog"
    assert set(rows[2].raw) == {"png", "txt"}
    assert rows[4].record["caption"] == "sks dog, json"
    assert rows[3].code == "caption" and rows[0].code == "image"
    good = assert_read_back(pool)
    assert_roundtrip(good, tmp_path)
    with pytest.raises(BadSampleError, match=r"instance \[nocap\]: missing caption"):
        pool.read(0, 3)


def test_dreambooth_folder_without_captions(tmp_path):
    d = tmp_path / "dog"
    d.mkdir()
    for i in range(5):
        (d / f"{i:02d}.jpg").write_bytes(jpeg((i * 40, 0, 0)))
    pool = open_pool([d], require_caption=False)
    samples = assert_read_back(pool)
    assert [s.key for s in samples] == ["00", "01", "02", "03", "04"]
    assert all(set(s.record) == {"image"} for s in samples)
    assert_roundtrip(samples, tmp_path, require_caption=False)


def test_image_folder_with_metadata_jsonl(tmp_path):
    d = tmp_path / "hf_style"
    (d / "train").mkdir(parents=True)
    (d / "train" / "a.png").write_bytes(png())
    (d / "train" / "b.jpg").write_bytes(jpeg())
    (d / "metadata.jsonl").write_text(
        json.dumps({"file_name": "train/a.png", "text": "green square"})
        + "\n"
        + json.dumps({"file_name": "train/b.jpg", "caption": "red square", "score": 5})
        + "\n"
        + "{oops\n"
        + json.dumps({"file_name": "train/gone.jpg", "text": "missing"})
        + "\n"
    )
    pool = open_pool([d])
    rows = list(pool.iter_rows())
    lines = (d / "metadata.jsonl").read_bytes().split(b"\n")
    offsets = [0]
    for line in lines[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    assert [(r.key, r.offset, type(r)) for r in rows] == [
        ("train/a", offsets[0], Sample),
        ("train/b", offsets[1], Sample),
        (f"@{offsets[2]}", offsets[2], BadSample),
        ("train/gone", offsets[3], BadSample),
    ]
    assert rows[0].record["caption"] == "green square"
    assert rows[1].record["caption"] == "red square" and rows[1].record["meta"]["score"] == 5
    assert rows[3].code == "missing_file"
    good = assert_read_back(pool)
    assert_roundtrip(good, tmp_path)


def test_hf_save_to_disk_text_and_images(tmp_path):
    import datasets  # in [dev]: a missing package is a broken environment, not a skip
    from PIL import Image

    lm = datasets.Dataset.from_dict(
        {
            "instruction": ["add", "greet", "x"],
            "input": ["1 2", "", ""],
            "output": ["3", "hello", "y"],
        }
    )
    lm.save_to_disk(str(tmp_path / "alpaca_hf"))
    images = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(3)],
            "text": ["a", "b", ""],
            "id": ["img.0", "img.1", "img.2"],
        }
    ).cast_column("image", datasets.Image())
    images.save_to_disk(str(tmp_path / "imgs_hf"))
    pool = open_pool([tmp_path / "alpaca_hf", tmp_path / "imgs_hf"])
    assert [p.kind for p in pool.parts] == ["hf_dataset", "hf_dataset"]
    rows = list(pool.iter_rows())
    assert [(r.key, r.offset) for r in rows] == [
        ("alpaca_hf:0", 0),
        ("alpaca_hf:1", 1),
        ("alpaca_hf:2", 2),
        ("img.0", 0),
        ("img.1", 1),
        ("img.2", 2),
    ]
    assert rows[1].record["output"] == "hello"
    assert rows[3].record["caption"] == "a" and rows[3].record["image"].size == (8, 8)
    assert type(rows[5]) is BadSample and rows[5].code == "caption"  # empty caption
    good = assert_read_back(pool)
    assert_roundtrip(good, tmp_path)


def test_hf_dir_without_datasets_installed_says_what_to_install(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "state.json").write_text("{}")
    (d / "dataset_info.json").write_text("{}")
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "from batctl.data import open_pool\n"
        "from batctl.errors import BatctlError\n"
        "try:\n"
        f"    open_pool([{str(d)!r}])\n"
        "except BatctlError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.startswith("ERR ") and "pip install 'batctl[datasets]'" in out and str(d) in out
