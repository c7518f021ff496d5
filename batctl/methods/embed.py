"""Embedding retrieval as a score-store method: cosine between a pool sample's embedding and the
centroid of the adaptation samples' embeddings, from the bare backbone (`Task.embed`: an LM's
last hidden layer averaged over tokens) or, with `--clip DIR`, from a CLIP model (images by its
vision tower: how LAION is searched). No surrogate, no backward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import Method, Result, Scorer, target_samples
from batctl.methods.influence import batches_by_size
from batctl.methods.lexical import STATE, load_state, save_state

log = logging.getLogger("batctl.score")


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def embed_samples(task: Any, samples: Sequence[Sample], role: str, batch_size: int) -> np.ndarray:
    """f64[len(samples), H]: `task.embed` of every sample, batched by size, in input order."""
    import torch

    out: list[np.ndarray | None] = [None] * len(samples)
    with torch.no_grad():
        for batch in batches_by_size(task, samples, batch_size):
            vectors = task.embed(task.collate([samples[i] for i in batch], role))
            for i, row in zip(batch, vectors.double().cpu().numpy(), strict=True):
                out[i] = row
    return np.stack(out) if out else np.zeros((0, 0))


Encoder = Callable[[Sequence[Sample], str], np.ndarray]
"""(samples, role) -> f64[len(samples), H]: the embeddings a method compares."""


def backbone_encoder(task: Any, batch_size: int) -> Encoder:
    """`Task.embed` of the bare backbone, batched by size."""
    return lambda samples, role: embed_samples(task, samples, role, batch_size)


def clip_encoder(
    source: str | Path, batch_size: int, instance_prompt: str | None, device: str | None
) -> Encoder:
    """CLIP's image (or, without an image, text) features: `batctl.methods.clip`, on `device`
    (--device; default this rank's GPU, else the CPU)."""
    from batctl.methods.clip import ClipEncoder
    from batctl.tasks.base import pick_device

    encoder = ClipEncoder(source, pick_device(device))
    return lambda samples, role: encoder.encode(samples, batch_size, instance_prompt)


class EmbedScorer(Scorer):
    def __init__(
        self, encode: Encoder, direction: np.ndarray, n: int, family: str, strict: bool = False
    ) -> None:
        self.encode, self.direction, self.family = encode, direction, family
        self.n_adaptation, self.strict = n, strict

    def score(self, samples: Sequence[Sample], rows: Sequence[int]) -> list[Result]:
        from batctl.errors import BadSampleError

        results: list[Result] = []
        if not samples:  # a chunk with nothing readable
            return results
        try:
            values = unit_rows(self.encode(samples, "pool"))
        except BadSampleError as exc:
            if len(samples) == 1:
                if self.strict:
                    raise
                log.warning(
                    "skipped %s (the %s task cannot take it): %s", samples[0].key, self.family, exc
                )
                return [None]
            # one sample the task cannot take: score the rest one by one
            for sample, row in zip(samples, rows, strict=True):
                results += self.score([sample], [row])
            return results
        return [(float(v), None) for v in values @ self.direction]


class Embed(Method):
    name = "embed"

    def prepare(self, work: Path, pool: Any, config: Any) -> Scorer:
        if config.clip is not None:
            encode = clip_encoder(
                config.clip, config.batch_size, config.instance_prompt, config.device
            )
            family = "clip"
        else:
            from batctl.tasks import load_task

            task = load_task(config.task_settings(), config.task)
            task.model.eval()
            encode, family = backbone_encoder(task, config.batch_size), task.family
        path = work / STATE
        if not path.is_file():
            adaptation = target_samples(config)
            vectors = unit_rows(encode(adaptation, "adaptation"))
            centroid = vectors.mean(axis=0)
            norm = np.linalg.norm(centroid)
            save_state(
                path,
                {"direction": centroid / norm if norm > 0 else centroid},
                {"n_adaptation": len(adaptation)},
            )
            log.info("embed: centroid of %d adaptation embeddings", len(adaptation))
        arrays, meta = load_state(path)
        return EmbedScorer(
            encode, arrays["direction"], int(meta["n_adaptation"]), family, config.strict
        )
