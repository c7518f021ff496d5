"""Multiple-choice benchmark files: JSON Lines of `{"context": str, "choices": [str], "label": int}`.

Read whole and checked up front, before any model is loaded: a bad line is one `BatctlError`
naming the file and the line number. Blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from batctl.errors import BatctlError


@dataclass(frozen=True)
class Question:
    """One multiple-choice question."""

    context: str
    """The prompt the choices continue, e.g. "Question: ... Answer:"."""

    choices: tuple[str, ...]
    """Candidate continuations, without the leading space (the scorer adds it)."""

    label: int
    """Index of the correct choice."""

    line: int
    """1-based line number in the benchmark file, for error messages and per-question logs."""


def read_benchmark(path: str | Path, flag: str = "--benchmark") -> tuple[Question, ...]:
    """Every question of a multiple-choice JSONL file; BatctlError `FILE:LINE: problem` otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatctlError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BatctlError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        questions.append(_parse(line, f"{path}:{number}", number))
    if not questions:
        raise BatctlError(
            f"{flag} {path}: no questions; expected JSON Lines of "
            '{"context": str, "choices": [str, ...], "label": int}'
        )
    return tuple(questions)


def _parse(line: str, where: str, number: int) -> Question:
    expected = 'expected {"context": str, "choices": [str, ...], "label": int}'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BatctlError(f"{where}: not valid JSON ({exc.msg}); {expected}") from None
    if not isinstance(record, dict):
        raise BatctlError(f"{where}: a JSON {type(record).__name__}, not an object; {expected}")
    missing = [k for k in ("context", "choices", "label") if k not in record]
    if missing:
        raise BatctlError(f"{where}: missing {', '.join(missing)}; {expected}")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise BatctlError(f"{where}: context must be a string; {expected}")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise BatctlError(
            f"{where}: choices must be a list of at least 2 non-empty strings; {expected}"
        )
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise BatctlError(
            f"{where}: label must be an integer index into choices (0..{len(choices) - 1}), got {label!r}"
        )
    return Question(context=context, choices=tuple(choices), label=label, line=number)
