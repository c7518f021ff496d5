"""Third-party warnings a batctl user cannot act on never reach the terminal; others still do."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from batctl.console import silence_unactionable_warnings
from batctl.tiny import write_tiny


def test_tiny_diffusion_prints_no_torchvision_warning(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batctl", "tiny", "diffusion", str(tmp_path / "sd")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torchvision" not in proc.stderr and "ImageProcessor" not in proc.stderr


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_long_sequence_warning_is_dropped_and_other_warnings_kept(tmp_path) -> None:
    from transformers import AutoTokenizer

    write_tiny("lm", tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    tokenizer.model_max_length = 8
    silence_unactionable_warnings()
    collect = _Collect()
    parent = logging.getLogger("transformers")  # where transformers' own handler sits
    parent.addHandler(collect)
    try:
        assert len(tokenizer("word " * 50).input_ids) > 8
        logging.getLogger("transformers.tokenization_utils_base").warning("something else")
    finally:
        parent.removeHandler(collect)
    assert not any("sequence length is longer" in m for m in collect.messages)
    assert collect.messages == ["something else"]
