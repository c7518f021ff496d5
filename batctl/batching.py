"""How `score` cuts a chunk into batches, and what it does when a batch does not fit in memory.

- Batches are capped by a sample count (`--batch-size`) and, for families whose samples have a
  size (LM: tokens), by a padded-token budget (`--max-batch-tokens`): a batch of b samples whose
  longest has t tokens costs b·t, which is what the hooks engine's activations scale with.
- The costliest batch runs first, so a budget that is too big fails in the first seconds, not
  after an hour.
- An out-of-memory error halves the batch and retries, and every later batch of the run stays
  at that size; a sample that does not fit alone is skipped and counted (status unreadable).
  Scores are per sample, so none of this changes a score beyond float rounding, and the batch
  size is not part of a store's identity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger("batctl.score")

T = TypeVar("T")
TOO_BIG = "too big"


def plan_batches(sizes: Sequence[int], max_samples: int, max_tokens: int | None) -> list[list[int]]:
    """Indices of `sizes` (sorted ascending, so neighbours pad alike) cut into batches of at most
    `max_samples` samples and, with `max_tokens`, at most that many padded tokens (a sample over
    the budget gets a batch of its own); the costliest batch first."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, size in enumerate(sizes):
        widest = max(longest, size)
        over_budget = max_tokens is not None and (len(current) + 1) * widest > max_tokens
        if current and (len(current) >= max_samples or over_budget):
            batches.append(current)
            current, widest = [], size
        current.append(i)
        longest = widest
    if current:
        batches.append(current)
    return sorted(batches, key=lambda b: (len(b) * max(sizes[j] for j in b), len(b)), reverse=True)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device running out of memory (CUDA, MPS or the CPU allocator)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_memory() -> None:
    """Give cached device memory back after an out-of-memory error."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryGuard:
    """Runs batches, halving them on out-of-memory errors; remembers the size that fits."""

    def __init__(self) -> None:
        self.cap: int | None = None
        """Most samples per batch since the last out-of-memory error (None: no error yet)."""
        self.skipped = 0
        """Samples that did not fit even alone."""

    def run(self, items: Sequence[T], score: Callable[[list[T]], list[Any]]) -> list[Any]:
        """`score(items)` (one result per item), in pieces of at most `cap` items, halving a
        piece that runs out of memory; an item that does not fit alone gets `TOO_BIG`."""
        items = list(items)
        cap = self.cap
        if cap is not None and len(items) > cap:
            out: list[Any] = []
            for start in range(0, len(items), cap):  # the cap may shrink again meanwhile
                out += self.run(items[start : start + cap], score)
            return out
        try:
            return score(items)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(exc):
                raise
        release_memory()
        if len(items) == 1:
            self.skipped += 1
            log.warning("a sample does not fit in memory even alone: skipped (status unreadable)")
            return [TOO_BIG]
        self.cap = len(items) // 2
        log.warning(
            "out of memory on a batch of %d samples: retrying in batches of %d",
            len(items),
            self.cap,
        )
        return self.run(items, score)
