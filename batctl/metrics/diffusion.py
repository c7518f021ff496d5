"""Diffusion eval metrics (DESIGN §3, eval; issue 6): images for --prompts at fixed seeds and the
personalisation metrics of DreamBooth-style adaptation.

Definitions (generated images G = one per prompt, reference images R = the held-out --data
images, every embedding taken in float32 and compared in float64):

- ``dino``: mean cosine similarity over all |G| x |R| pairs of DINOv2 embeddings, the CLS token
  of ``Dinov2Model``'s last layer after its final layer norm (``pooler_output``), as DreamBooth's
  DINO metric (there with ViT-S/16 DINO; here whatever ``--dino`` holds).
- ``clip_i``: the same mean pairwise cosine with CLIP image embeddings (``get_image_features``:
  the projected image embedding).
- ``clip_t``: mean over generated images of the cosine between the image's CLIP embedding and
  the CLIP text embedding of the prompt it was generated from (``get_text_features``).
- ``centroid_distance``: the Euclidean (L2) distance between the centroid of the generated and
  the centroid of the reference images, each centroid the mean of the L2-normalised CLIP image
  embeddings (so it lies in the unit ball and the distance in [0, 2]; 0 for a set against itself).
- ``vendi``: the Vendi Score of the generated images (``batctl.metrics.vendi``, cosine kernel)
  on the DINOv2 embeddings when ``--dino`` is given, else on the CLIP image embeddings.

Images are preprocessed without torchvision, as the feature model's ``preprocessor_config.json``
says (transformers' BitImageProcessor / CLIPImageProcessor arithmetic): RGB, shorter side
resized to ``size.shortest_edge`` (or to ``size.height`` x ``size.width``) with the given PIL
resample filter, center crop to ``crop_size``, times ``rescale_factor``, then (x − mean) / std.
Without that file: the model config's ``image_size`` for both, bicubic, and ImageNet (DINOv2) or
OpenAI CLIP mean / std.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batctl.errors import BatctlError, UsageError

INFERENCE_STEPS = 25
"""Denoising steps per generated image (read at call time: tests lower it)."""

GUIDANCE_SCALE = 7.5
"""Classifier-free guidance scale (StableDiffusionPipeline's default)."""

FIRST_SEED = 42
"""Prompt i (0-based, file order) is generated from seed FIRST_SEED + i, as the paper."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- prompts, images


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a --prompts file, stripped, in file order."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prompts {path}: cannot read it ({exc})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts (one per line expected)")
    return prompts


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    size: int,
    steps: int | None = None,
    guidance_scale: float | None = None,
    first_seed: int = FIRST_SEED,
) -> list[Any]:
    """One PIL image per prompt, prompt i from a generator seeded with ``first_seed + i``.

    Prompts run one at a time, so an image depends only on its prompt and seed; the generator is
    a CPU one (diffusers draws the initial latents on it and moves them), so the starting noise
    is the same on any device.
    """
    steps = INFERENCE_STEPS if steps is None else steps
    guidance_scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(first_seed + i)
        with torch.no_grad():
            out = pipe(
                prompt,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="pil",
            )
        images.append(out.images[0])
    return images


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the near-square grid for n images: ceil(sqrt(n)) columns."""
    columns = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / columns), columns


GRID_TILE = 160
"""Smallest tile side in a labelled grid: smaller renders are scaled up (nearest neighbour, so
the pixels stay visible as pixels) to leave room for readable labels."""


def write_grid(
    images: Sequence[Any],
    path: Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> tuple[int, int]:
    """Tile same-size images row-major (the prompts' order) into one PNG; returns its (w, h).

    Without labels the tiles are the images as rendered. With `labels` (one per image, e.g. the
    prompt and seed), every tile is at least GRID_TILE pixels a side and has its label written
    under it, and `title` (e.g. the adapter) heads the grid.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("write_grid: no images")
    w, h = images[0].size
    rows, columns = grid_shape(len(images))
    if labels is None:
        grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
        for i, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
        grid.save(path, format="PNG")
        return grid.size
    scale = max(1, math.ceil(GRID_TILE / max(1, min(w, h))))
    tw, th = w * scale, h * scale
    line, pad = 12, 4
    chars = max(8, tw // 6)  # PIL's default bitmap font is about 6 px a character
    wrapped = [_wrap(text, chars)[:3] for text in labels]
    caption = max(len(lines) for lines in wrapped) * line + pad
    head = line + 2 * pad if title else 0
    grid = Image.new("RGB", (columns * tw, head + rows * (th + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black")
    for i, image in enumerate(images):
        x, y = (i % columns) * tw, head + (i // columns) * (th + caption)
        tile = image.convert("RGB").resize((w, h)).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (x, y))
        for k, text in enumerate(wrapped[i]):
            draw.text((x + pad, y + th + 2 + k * line), text, fill="black")
    grid.save(path, format="PNG")
    return grid.size


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How a feature model wants its pixels (a transformers image processor config, read)."""

    size: tuple[int, int] | int
    """int: the shorter side; (height, width): resize to exactly that."""

    crop: tuple[int, int] | None
    """(height, width) of the center crop; None: no crop."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL.Image.BICUBIC
    rescale: float = 1 / 255

    @classmethod
    def from_dir(
        cls,
        directory: Path,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> Preprocess:
        """Read ``preprocessor_config.json`` in ``directory``; defaults as the module says."""
        file = Path(directory) / "preprocessor_config.json"
        if not file.is_file():
            return cls(size=image_size, crop=(image_size, image_size), mean=mean, std=std)
        config = json.loads(file.read_text(encoding="utf-8"))
        raw_size = config.get("size", image_size)
        if isinstance(raw_size, dict):
            if "shortest_edge" in raw_size:
                size: tuple[int, int] | int = int(raw_size["shortest_edge"])
            else:
                size = (int(raw_size["height"]), int(raw_size["width"]))
        else:
            size = int(raw_size)
        if not config.get("do_resize", True):
            size = 0
        crop = None
        if config.get("do_center_crop", False):
            raw_crop = config.get("crop_size", image_size)
            if isinstance(raw_crop, dict):
                crop = (int(raw_crop["height"]), int(raw_crop["width"]))
            else:
                crop = (int(raw_crop), int(raw_crop))
        normalize = config.get("do_normalize", True)
        return cls(
            size=size,
            crop=crop,
            mean=tuple(config.get("image_mean", mean)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", std)) if normalize else (1.0, 1.0, 1.0),
            resample=int(config.get("resample", 3)),
            rescale=float(config.get("rescale_factor", 1 / 255))
            if config.get("do_rescale", True)
            else 1.0,
        )

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        """[n, 3, H, W] float32 pixel values."""
        import numpy as np

        arrays = []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            if isinstance(self.size, tuple):
                image = image.resize((self.size[1], self.size[0]), self.resample)
            elif self.size:
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = self.size, int(self.size * long / short)
                new = (new_short, new_long) if w <= h else (new_long, new_short)
                if new != (w, h):
                    image = image.resize(new, self.resample)
            if self.crop is not None:
                ch, cw = self.crop
                w, h = image.size
                top, left = (h - ch) // 2, (w - cw) // 2
                image = image.crop((left, top, left + cw, top + ch))
            arrays.append(np.asarray(image, dtype=np.float32) * self.rescale)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


# --------------------------------------------------------------------------- feature models


class DinoFeatures:
    """A local transformers ``Dinov2Model``: CLS embeddings of images."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu") -> None:
        from transformers import Dinov2Model

        from batctl.safeload import check_model_dir

        check_model_dir(str(directory), trust_remote_code=False)
        try:
            self.model = (
                Dinov2Model.from_pretrained(str(directory), use_safetensors=True).eval().to(device)
            )
        except (OSError, ValueError) as exc:
            raise BatctlError(f"--dino {directory}: cannot load a DINOv2 model ({exc})") from None
        self.device = torch.device(device)
        self.preprocess = Preprocess.from_dir(
            directory, int(self.model.config.image_size), IMAGENET_MEAN, IMAGENET_STD
        )

    def images(self, images: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
        """[n, hidden] float32 on CPU: the layer-normed CLS token (``pooler_output``)."""
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = self.preprocess(images[start : start + batch_size]).to(self.device)
                out.append(self.model(pixel_values=pixels).pooler_output.float().cpu())
        return torch.cat(out)


def _features(output: Any) -> torch.Tensor:
    """transformers 4 returns a tensor from get_*_features, 5 an output with pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipFeatures:
    """A local transformers ``CLIPModel`` and its tokenizer: projected image and text embeddings."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        from batctl.safeload import check_model_dir

        check_model_dir(str(directory), trust_remote_code=False)
        try:
            self.model = (
                CLIPModel.from_pretrained(str(directory), use_safetensors=True).eval().to(device)
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise BatctlError(
                f"--clip {directory}: cannot load a CLIP model and tokenizer ({exc})"
            ) from None
        self.device = torch.device(device)
        vision = self.model.config.vision_config
        self.preprocess = Preprocess.from_dir(
            directory, int(vision.image_size), CLIP_MEAN, CLIP_STD
        )
        self.max_tokens = min(
            int(self.tokenizer.model_max_length),
            int(self.model.config.text_config.max_position_embeddings),
        )

    def images(self, images: Sequence[Any], batch_size: int = 8) -> torch.Tensor:
        """[n, projection_dim] float32 on CPU."""
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = self.preprocess(images[start : start + batch_size]).to(self.device)
                out.append(
                    _features(self.model.get_image_features(pixel_values=pixels)).float().cpu()
                )
        return torch.cat(out)

    def texts(self, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """[n, projection_dim] float32 on CPU."""
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                features = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
                out.append(_features(features).float().cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------- metrics


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to("cpu", torch.float64)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] float64: cos(a_i, b_j)."""
    return _unit(a) @ _unit(b).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over all n x m pairs (DINO, CLIP-I)."""
    return float(cosine_matrix(a, b).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i) over matching rows (CLIP-T: image i against prompt i)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_cosine: {a.shape[0]} rows against {b.shape[0]}")
    return float((_unit(a) * _unit(b)).sum(dim=-1).mean())


def centroid_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mean_i a_i/|a_i| − mean_j b_j/|b_j|||_2 (L2 distance of the unit-embedding centroids)."""
    return float((_unit(a).mean(dim=0) - _unit(b).mean(dim=0)).norm())


def personalisation_metrics(
    generated: Sequence[Any],
    prompts: Sequence[str],
    references: Sequence[Any],
    *,
    dino: DinoFeatures | None = None,
    clip: ClipFeatures | None = None,
    batch_size: int = 8,
    reference_cache: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """The metrics whose feature model is given (see the module docstring); none are faked.

    ``reference_cache`` (name -> embeddings) spares re-embedding the same references per row.
    """
    from batctl.metrics.vendi import vendi_score

    cache = {} if reference_cache is None else reference_cache
    metrics: dict[str, float] = {}
    vendi_embeddings = None
    if dino is not None:
        gen = dino.images(generated, batch_size)
        if references:
            if "dino" not in cache:
                cache["dino"] = dino.images(references, batch_size)
            metrics["dino"] = mean_pairwise_cosine(gen, cache["dino"])
        vendi_embeddings = gen
    if clip is not None:
        gen = clip.images(generated, batch_size)
        if references:
            if "clip" not in cache:
                cache["clip"] = clip.images(references, batch_size)
            metrics["clip_i"] = mean_pairwise_cosine(gen, cache["clip"])
            metrics["centroid_distance"] = centroid_distance(gen, cache["clip"])
        metrics["clip_t"] = paired_cosine(gen, clip.texts(prompts, batch_size))
        if vendi_embeddings is None:
            vendi_embeddings = gen
    if vendi_embeddings is not None:
        metrics["vendi"] = vendi_score(vendi_embeddings)
    return metrics


def metric_notes(
    prompts: Path | None, dino: Path | None, clip: Path | None, n_prompts: int = 0
) -> list[str]:
    """What the report should say about the diffusion metrics of this run (left out and why)."""
    notes: list[str] = []
    if prompts is None:
        notes.append(
            "generated images, DINO, CLIP-I, CLIP-T, centroid distance, Vendi: no --prompts given"
        )
        return notes
    notes.append(
        f"images: images-<row>.png, {n_prompts} prompts (file order, row-major), seeds "
        f"{FIRST_SEED}..{FIRST_SEED + max(n_prompts, 1) - 1}, {INFERENCE_STEPS} steps, "
        f"guidance {GUIDANCE_SCALE}"
    )
    if dino is None:
        notes.append("DINO: no --dino given")
    if clip is None:
        notes.append("CLIP-I, CLIP-T, centroid distance: no --clip given")
    if dino is None and clip is None:
        notes.append("Vendi Score: no --dino or --clip given")
    else:
        notes.append(
            "Vendi Score: cosine kernel on "
            + ("DINOv2 CLS embeddings" if dino is not None else "CLIP image embeddings")
        )
    if clip is not None:
        notes.append("centroid distance: L2 between means of unit CLIP image embeddings")
    return notes
