"""Shared fixtures: the CLI runner and an offline Hugging Face environment."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must never reach a hub; a missing local file has to fail loudly instead.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cli():
    """Invoke `batctl ARGS...` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from batctl.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], terminal_width=200, **kwargs)

    return invoke
