"""Where batctl's words go: progress and logs on stderr, results on stdout.

Makefiles capture stdout (`batctl info runs/scores --json > info.json`), so nothing but results
may reach it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

stderr = Console(stderr=True, soft_wrap=True)  # one message, one line: grep-able logs
stdout = Console(soft_wrap=True)
T = TypeVar("T")


def setup_logging(debug: bool = False) -> None:
    """Send batctl's log records to stderr through rich, INFO and up (DEBUG with --debug)."""
    logger = logging.getLogger("batctl")
    logger.handlers.clear()
    handler = RichHandler(console=stderr, show_time=False, show_path=debug, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    # Propagation stays on: the root logger has no handler in the CLI (no duplicates), and
    # library users and pytest's caplog still see batctl's records.


def error(message: str) -> None:
    """One-line error on stderr."""
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)


def print_result(result: Mapping[str, Any], as_json: bool) -> None:
    """A stage's result on stdout: JSON with --json, else `key: value` lines."""
    if as_json:
        from batctl.metrics.report import jsonable  # strict JSON: no NaN or Infinity

        payload = jsonable(result)
        sys.stdout.write(
            json.dumps(payload, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
        )
        return
    for key, value in result.items():
        if isinstance(value, str) and "\n" in value:  # a block (the demo's table): as it is
            stdout.print(f"{key}:\n{value}", highlight=False, markup=False, soft_wrap=True)
            continue
        if isinstance(value, Mapping | list):
            value = json.dumps(value, default=str)
        stdout.print(f"{key}: {value}", highlight=False, markup=False)


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """A two-column table on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(str(key), str(value))
    stdout.print(table)


class RateColumn(ProgressColumn):
    """Items per second, e.g. `412.3 samples/s`."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "samples") -> Iterator[Any]:
    """A rich progress bar on stderr with ETA and rate; yields `advance(n)`."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance
