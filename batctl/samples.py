"""Small in-memory sample sets (D_A, a target set, a selection's samples.tar) and their fingerprints.

Pools are streamed (`batctl.data.open_pool`); the sets read here are the few samples a stage
trains or scores against, so they are read whole, and an empty one is an error naming the flag.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from batctl.artifacts import describe_input
from batctl.data import Sample, expand_specs, open_pool
from batctl.data.core import DEFAULT_MAX_SAMPLE_BYTES
from batctl.errors import BatctlError

log = logging.getLogger("batctl.samples")


def load_samples(
    specs: str | Sequence[str],
    *,
    flag: str,
    strict: bool = False,
    paragraphs: bool = False,
    allow_empty: bool = False,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> list[Sample]:
    """Every readable sample of `specs`, in order. Unreadable ones (including any larger than
    `max_sample_bytes`) are counted and skipped (or fatal with `strict`); none readable at all
    is a BatctlError naming `flag` and the files."""
    pool = open_pool(
        specs,
        strict=strict,
        paragraphs=paragraphs,
        require_caption=False,
        max_sample_bytes=max_sample_bytes,
    )
    samples = list(pool)
    if pool.stats.bad:
        log.warning(
            "%s: skipped %d unreadable sample(s) of %d", flag, pool.stats.bad, pool.stats.total
        )
    if not samples and not allow_empty:
        files = ", ".join(str(p.path) for p in pool.parts)
        raise BatctlError(
            f"{flag} {files}: no usable samples ({pool.stats.bad} unreadable); an LM needs 'text' or "
            "Alpaca 'instruction'/'output' records, a diffusion model images"
        )
    return samples


def describe_data(
    specs: str | Sequence[str], strict: bool = False, content_only: bool = False
) -> list[dict[str, Any]]:
    """Manifest entries (path, kind, fingerprint) for every part `specs` expands to
    (`describe_input`'s fingerprint modes)."""
    return [describe_input(path, strict, content_only) for path in expand_specs(specs)]
