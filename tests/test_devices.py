"""Which device and dtype a process picks: a pure function of the flag, LOCAL_RANK and the machine."""

from __future__ import annotations

import pytest

from batctl.devices import choose_device, choose_dtype, device_problem
from batctl.errors import BatctlError


@pytest.mark.parametrize(
    ("requested", "env", "gpus", "mps", "expected"),
    [
        (None, {}, 0, False, "cpu"),
        (None, {}, 0, True, "mps"),
        (None, {}, 8, False, "cuda:0"),
        # torchrun / accelerate launch: each rank its own GPU, not all on GPU 0
        (None, {"LOCAL_RANK": "5", "RANK": "13"}, 8, False, "cuda:5"),
        ("cuda", {"LOCAL_RANK": "3"}, 8, False, "cuda:3"),
        # an explicit index wins over LOCAL_RANK
        ("cuda:1", {"LOCAL_RANK": "0"}, 2, False, "cuda:1"),
        ("cuda:1", {"LOCAL_RANK": "1"}, 2, False, "cuda:1"),
        ("cpu", {"LOCAL_RANK": "1"}, 8, False, "cpu"),
        ("mps", {}, 0, True, "mps"),
    ],
)
def test_the_device_each_rank_uses(requested, env, gpus, mps, expected):
    assert choose_device(requested, env, gpus, mps) == expected


@pytest.mark.parametrize(
    ("requested", "env", "gpus", "needle"),
    [
        ("cuda:1", {}, 1, "1 CUDA device(s)"),
        ("cuda:0", {}, 0, "no CUDA device"),
        ("cuda", {}, 0, "no CUDA device"),
        ("mps", {}, 0, "no Apple GPU"),
        (None, {"LOCAL_RANK": "4"}, 4, "one process per GPU"),
    ],
)
def test_a_device_this_machine_lacks_is_one_line(requested, env, gpus, needle):
    with pytest.raises(BatctlError) as err:
        choose_device(requested, env, gpus, False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_flag_spelling():
    for ok in (None, "cpu", "cuda", "cuda:7", "mps"):
        assert device_problem(ok) is None
    for bad in ("gpu", "cuda:", "cuda:x", "tpu", "CUDA"):
        assert "--device" in device_problem(bad)


def test_auto_dtype_is_bf16_only_on_a_gpu_that_has_it():
    assert choose_dtype("auto", "cuda", True) == "bf16"
    assert choose_dtype("auto", "cuda", False) == "fp32"
    assert choose_dtype("auto", "cpu", True) == "fp32"
    assert choose_dtype("auto", "mps", False) == "fp32"
    assert choose_dtype("fp16", "cpu", False) == "fp16"


def test_the_device_flag_reaches_the_task_settings():
    from batctl.stages.score import ScoreConfig

    config, problems = ScoreConfig.from_sources(
        {"model": "m", "surrogate": "s", "data": "d", "pool": ("p",), "out": "o", "device": "gpu0"}
    )
    assert config is None and any(p.startswith("--device") for p in problems)
    config, problems = ScoreConfig.from_sources(
        {
            "model": "m",
            "surrogate": "s",
            "data": "d",
            "pool": ("p",),
            "out": "o",
            "device": "cuda:1",
        }
    )
    assert not problems and config.task_settings().device == "cuda:1"
    assert "device" not in config.params()  # how it runs, not what it produces
    assert config.params()["dtype"] == "auto"
