"""Where batctl's words go: progress and logs on stderr, results on stdout.

Makefiles capture stdout (`batctl info runs/scores --json > info.json`), so nothing but results
may reach it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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


PROGRESS_INTERVAL_ENV = "BATCTL_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 10.0
"""Seconds between two plain progress lines when stderr is not a terminal (CI logs)."""


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (live bars) or a pipe/file (plain lines)."""
    return stderr.is_terminal


def progress_interval() -> float:
    """Seconds between plain progress lines: $BATCTL_PROGRESS_INTERVAL, default 10."""
    raw = os.environ.get(PROGRESS_INTERVAL_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_PROGRESS_INTERVAL
    return value if value >= 0 else DEFAULT_PROGRESS_INTERVAL


UNACTIONABLE = {
    # batctl loads CLIP's image processor only to build tiny pipelines and feature models; the
    # PIL backend it falls back to is what it wants, and torchvision is not a dependency.
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    # batctl tokenizes whole texts, then truncates to --max-length itself and counts the
    # truncated samples: the model never sees the long sequence this warns about.
    "transformers.tokenization_utils_base": "Token indices sequence length is longer",
}
"""Third-party log messages a batctl user cannot act on: logger name -> message fragment."""


class _DropFragment(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_unactionable_warnings() -> None:
    """Drop the third-party messages in UNACTIONABLE (nothing else), without importing the
    libraries: a filter on each named logger. Idempotent."""
    for name, fragment in UNACTIONABLE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropFragment) for f in logger.filters):
            logger.addFilter(_DropFragment(fragment))


def setup_logging(debug: bool = False) -> None:
    """Send batctl's log records to stderr, INFO and up (DEBUG with --debug).

    On a terminal through rich; otherwise as plain `LEVEL message` lines, never wrapped, so CI
    logs can be grepped one event per line.
    """
    silence_unactionable_warnings()
    logger = logging.getLogger("batctl")
    logger.handlers.clear()
    handler: logging.Handler
    if stderr_is_terminal():
        handler = RichHandler(console=stderr, show_time=False, show_path=debug, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
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


def _seconds(value: float | None) -> str:
    if value is None or value != value or value == float("inf"):
        return "?"
    value = int(round(value))
    if value < 60:
        return f"{value}s"
    minutes, seconds = divmod(value, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class PlainProgress:
    """Progress as plain lines on stderr, for logs: one line per `interval` seconds and one at
    the end, each a whole event (`train: 12/30 steps (40%) loss=0.512 lr=0.0001 2.1 steps/s
    elapsed 6s eta 9s`), never wrapped, never redrawn."""

    def __init__(self, description: str, total: int | None, unit: str, interval: float) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = interval
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.started = time.monotonic()
        self.last_line = self.started
        self.lines = 0

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if now - self.last_line >= self.interval and not self._finished():
            self.emit(now)

    def _finished(self) -> bool:
        return self.total is not None and self.done >= self.total

    def emit(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.last_line = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}:"]
        if self.total:
            parts.append(
                f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            )
        else:
            parts.append(f"{self.done} {self.unit}")
        parts += [f"{k}={_format_field(v)}" for k, v in self.fields.items()]
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_seconds(elapsed)}")
        if self.total and not self._finished():
            eta = (self.total - self.done) / rate if rate > 0 else None
            parts.append(f"eta {_seconds(eta)}")
        self.lines += 1
        sys.stderr.write(" ".join(parts) + "\n")
        sys.stderr.flush()


class FieldsColumn(ProgressColumn):
    """The latest values a loop reported (`loss=0.512 lr=0.0001`)."""

    def render(self, task: Task) -> Text:
        fields = task.fields.get("values") or {}
        return Text(" ".join(f"{k}={_format_field(v)}" for k, v in fields.items()))


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "samples") -> Iterator[Any]:
    """Progress on stderr; yields `advance(n=1, **fields)`, fields such as loss=... and lr=...

    On a terminal: a rich live bar with the fields, rate, elapsed time and ETA. Otherwise plain
    unwrapped lines every $BATCTL_PROGRESS_INTERVAL seconds (default 10) and one at the end.
    """
    if not stderr_is_terminal():
        plain = PlainProgress(description, total, unit, progress_interval())
        yield plain.advance
        if plain.done:
            plain.emit()
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        FieldsColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total, values={})

        def advance(n: int = 1, **fields: Any) -> None:
            if fields:
                values = {**progress.tasks[task].fields.get("values", {}), **fields}
                progress.update(task, advance=n, values=values)
            else:
                progress.advance(task, n)

        yield advance
