"""The LM demo's corpus: the standard library's docstrings, one domain per package family.

Every machine with Python has them, they are real English about real software, and the package
a paragraph comes from is ground truth for relevance: an ``email`` docstring talks about MIME
parts and headers, an ``asyncio`` one about event loops and futures. The files are parsed with
``ast``, never imported (importing ``tkinter`` or ``idlelib`` can fail, or open windows).
"""

from __future__ import annotations

import ast
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOMAINS: dict[str, tuple[str, ...]] = {
    "email": ("email",),
    "asyncio": ("asyncio",),
    "unittest": ("unittest",),
    "http": ("http", "urllib", "wsgiref", "xmlrpc"),
    "xml": ("xml",),
    "concurrency": ("multiprocessing", "concurrent"),
    "importlib": ("importlib",),
    "logging": ("logging",),
    "tkinter": ("tkinter",),
    "idlelib": ("idlelib",),
    "lib2to3": ("lib2to3",),
    "encodings": ("encodings",),
    "ctypes": ("ctypes",),
    "json": ("json",),
}
"""Domain -> the stdlib packages it is made of. Domains missing from a Python build (Debian
ships ``tkinter`` and ``idlelib`` separately; ``lib2to3`` left in 3.13) are simply absent."""

TEST_DIRS = {"test", "tests", "idle_test"}
"""Test suites are skipped: their docstrings describe tests, not the package."""

MIN_CHARS = 40
"""Shorter paragraphs ("Return the value.") say nothing about their domain."""

MAX_CHARS = 300
"""Longer paragraphs are cut at a word boundary, keeping sequences short for a tiny LM."""


@dataclass(frozen=True)
class Paragraph:
    """One docstring paragraph: its domain and its text (whitespace collapsed)."""

    domain: str
    text: str


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def clip(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut if cut else text[:limit]


def docstring_paragraphs(source: str) -> Iterator[str]:
    """Every paragraph of every docstring (module, class, function) in ``source``, in order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if not isinstance(node, kinds):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            if len(text) >= MIN_CHARS:
                yield clip(text)


def domain_files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    """The ``.py`` files of ``packages`` under ``root``, test suites excluded, sorted."""
    files: list[Path] = []
    for package in packages:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if not TEST_DIRS & set(path.relative_to(root).parts):
                files.append(path)
    return files


def read_corpus(root: Path | None = None) -> list[Paragraph]:
    """All paragraphs of every domain found under ``root`` (default: this interpreter's stdlib).

    Deterministic for a given stdlib: domains in ``DOMAINS`` order, files sorted, paragraphs in
    source order; exact repeats (the same docstring in two places) kept once.
    """
    root = stdlib_dir() if root is None else root
    seen: set[str] = set()
    out: list[Paragraph] = []
    for domain, packages in DOMAINS.items():
        for path in domain_files(root, packages):
            source = path.read_text(encoding="utf-8", errors="replace")
            for text in docstring_paragraphs(source):
                if text not in seen:
                    seen.add(text)
                    out.append(Paragraph(domain, text))
    return out
