"""Pool specs: braces expanded inside batctl, globs, several specs, dedupe, errors."""

from __future__ import annotations

import os

import pytest

from batctl.data import expand_braces, expand_specs, open_pool
from batctl.errors import BatctlError, UsageError

from .data_fixtures import write_laion


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pool-{000..003}.tar", [f"pool-{i:03d}.tar" for i in range(4)]),
        ("p{8..11}", ["p8", "p9", "p10", "p11"]),
        ("p{3..1}", ["p3", "p2", "p1"]),
        ("p{00..10..5}", ["p00", "p05", "p10"]),
        ("{a,b}.tar", ["a.tar", "b.tar"]),
        ("{a,b}-{1..2}", ["a-1", "a-2", "b-1", "b-2"]),
        ("x{a,{b,c}d}y", ["xay", "xbdy", "xcdy"]),
        ("{x..z}", ["x", "y", "z"]),
        ("lit{}eral", ["lit{}eral"]),
        ("no{brace", ["no{brace"]),
        ("{single}", ["{single}"]),
        ("{single}{a,b}", ["{single}a", "{single}b"]),
        ("plain.tar", ["plain.tar"]),
    ],
)
def test_expand_braces(text, expected):
    assert expand_braces(text) == expected


@pytest.fixture
def shards(tmp_path):
    for i in range(3):
        write_laion(tmp_path / f"pool-{i:03d}.tar", 1, start=i)
    write_laion(tmp_path / "a.tar", 1, start=10)
    write_laion(tmp_path / "b.tar", 1, start=20)
    return tmp_path


def test_braces_globs_and_several_specs_keep_order_without_duplicates(shards):
    d = str(shards)
    paths = expand_specs([f"{d}/pool-{{000..002}}.tar", f"{d}/{{b,a}}.tar", f"{d}/pool-*.tar"])
    assert [p.name for p in paths] == [
        "pool-000.tar",
        "pool-001.tar",
        "pool-002.tar",
        "b.tar",
        "a.tar",
    ]
    # a single string is one spec; a directory of shards stands for its data files, sorted
    assert [p.name for p in expand_specs(f"{d}/pool-00[12].tar")] == [
        "pool-001.tar",
        "pool-002.tar",
    ]
    assert [p.name for p in expand_specs([d])] == [
        "a.tar",
        "b.tar",
        "pool-000.tar",
        "pool-001.tar",
        "pool-002.tar",
    ]
    # the same file reached twice (another spelling) is kept once
    rel = os.path.relpath(shards / "a.tar")
    assert [p.name for p in expand_specs([str(shards / "a.tar"), rel])] == ["a.tar"]
    pool = open_pool([f"{d}/pool-{{000..002}}.tar", f"{d}/a.tar"])
    assert [(s.part, s.key) for s in pool] == [
        (0, "000000000"),
        (1, "000000001"),
        (2, "000000002"),
        (3, "000000010"),
    ]
    assert [p.index for p in pool.parts] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "spec",
    ["{d}/nothing-*.tar", "{d}/missing.tar", "{d}/pool-{{000..003}}.tar", "{d}/{{a,zz}}.tar"],
)
def test_a_spec_matching_nothing_is_a_usage_error_naming_it(shards, spec):
    spec = spec.format(d=shards)
    with pytest.raises(UsageError) as err:
        expand_specs([f"{shards}/a.tar", spec])
    assert spec in str(err.value)
    assert err.value.exit_code == 2


def test_other_spec_errors(tmp_path):
    with pytest.raises(UsageError, match="remote"):
        expand_specs(["s3://bucket/x.tar"])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UsageError, match="unknown data format"):
        open_pool([tmp_path / "notes.csv"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        expand_specs([tmp_path / "emptydir"])
    with pytest.raises(UsageError):
        open_pool([])


def test_datasets_dict_dir_asks_for_a_split(tmp_path):
    d = tmp_path / "dd"
    d.mkdir()
    (d / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(BatctlError, match="train"):
        open_pool([d])
