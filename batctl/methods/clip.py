"""CLIP embeddings for `score --method embed --clip DIR`: retrieval the way LAION is searched.

An image pool is compared with the adaptation images in CLIP's joint space instead of the
backbone's: each sample's image goes through the vision tower (a sample without an image, its
text or caption through the text tower), projected and L2-normalised by the caller. DIR is
anything `transformers.CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` read: a
local copy of `openai/clip-vit-base-patch32`, a hub id where there is internet, or a tiny CLIP
from `batctl tiny clip DIR`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batctl.data import Sample
from batctl.methods.base import text_of


def features(output: Any) -> Any:
    """The projected features of a `get_image_features` / `get_text_features` call: a tensor in
    transformers 4, the output's `pooler_output` in transformers 5."""
    return output if hasattr(output, "dim") else output.pooler_output


def load_processor(source: str | Path) -> Any:
    """CLIPProcessor.from_pretrained, without transformers 5's notice that torchvision is
    missing (its PIL fallback gives the same pixels)."""
    from transformers import CLIPProcessor
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return CLIPProcessor.from_pretrained(str(source))
    finally:
        hf_logging.set_verbosity(level)


class ClipEncoder:
    """A CLIP model and its processor, loaded once, embedding samples in batches."""

    def __init__(self, source: str | Path, device: Any = "cpu") -> None:
        import torch
        from transformers import CLIPModel

        from batctl.tasks.lm import quiet_libraries

        quiet_libraries()
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(source)).to(self.device).eval()
        self.processor = load_processor(source)
        self.dim = int(self.model.config.projection_dim)

    def encode(
        self, samples: Sequence[Sample], batch_size: int, instance_prompt: str | None = None
    ) -> np.ndarray:
        """f64[len(samples), projection_dim]: each sample's image features, or its text's (the
        record's text or caption, else `instance_prompt`) when it has no image; input order."""
        import torch

        out = np.zeros((len(samples), self.dim))
        images = [i for i, s in enumerate(samples) if s.record.get("image") is not None]
        texts = [i for i, s in enumerate(samples) if s.record.get("image") is None]
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                rows = images[start : start + batch_size]
                batch = self.processor(
                    images=[samples[i].record["image"].convert("RGB") for i in rows],
                    return_tensors="pt",
                )
                pixels = batch["pixel_values"].to(self.device)
                out[rows] = (
                    features(self.model.get_image_features(pixel_values=pixels))
                    .double()
                    .cpu()
                    .numpy()
                )
            for start in range(0, len(texts), batch_size):
                rows = texts[start : start + batch_size]
                batch = self.processor(
                    text=[text_of(samples[i], instance_prompt) for i in rows],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                )
                found = self.model.get_text_features(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                )
                out[rows] = features(found).double().cpu().numpy()
        return out
