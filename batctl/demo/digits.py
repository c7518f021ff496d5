"""The diffusion demo world: scikit-learn's handwritten digits, a tiny Stable Diffusion pretrained
on them by batctl.

``sklearn.datasets.load_digits()`` ships 1797 8 x 8 digits (values 0..16) with scikit-learn, so
every machine has them offline. Each is drawn white on black at 16 x 16 RGB (bilinear upscaling
to 12 x 12, centred; ``JITTER`` can shift them by a few seeded pixels) and stored as a lossless PNG. The domains are the digits'
names (``zero`` .. ``nine``), keys ``seven-00012`` and captions "a handwritten digit seven".

As in the LM world, the target domain (``seven``) is split three ways: held-out images for eval,
n adaptation images (D_A), and the rest, which go into the pool with every other digit. The pool
is a LAION-layout webdataset tar (``png``, ``txt`` caption, ``json`` metadata) and is exactly the
backbone's pretraining data: ``batctl.tiny.build_tiny_diffusion`` gives a random tiny pipeline
whose UNet is then trained on the pool (DDPM ε-prediction on VAE latents, frozen random VAE and
text encoder). The oracle set is D_A plus the pool's sevens. The adaptation, held-out and oracle
sets are caption-less image folders: the diffusion task captions adaptation-role images with the
DreamBooth instance prompt (``INSTANCE_PROMPT``).

The world also trains a tiny CLIP on the pool's image/caption pairs (``pretrain_clip``), as
OpenAI's was trained on web pairs: the CLIP retrieval baseline (``score --method embed --clip``)
reads it, since no real CLIP can be downloaded here.

The random VAE's latents are far from unit variance (std ~0.08 after SD's 0.18215), which would
leave the denoising loss nearly blind to the images; like Stable Diffusion's own constant, the
VAE's ``scaling_factor`` is set to 1 / std of the pool's latent means before pretraining (the
VAE's weights are untouched).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batctl.demo.world import World, cached_world

log = logging.getLogger("batctl.demo")

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Domain names by label."""

TARGET = "seven"
N_ADAPTATION = 8
N_HELDOUT = 40
POOL_PARTS = 2
RESOLUTION = 16
"""Image side. 16 (8 x 8 latents, the digits' own resolution) rather than 32: the tiny UNet
is 4x cheaper there, which keeps the whole demo to a few minutes on a laptop CPU."""

DIGIT_SIZE = 12
"""Side of the upscaled digit inside the RESOLUTION x RESOLUTION image."""

JITTER = 0
"""Largest seeded shift (pixels, each axis) of a digit from the centre. 0: shifts blur what
makes the target's images alike (with 2, the pool's sevens score an AUC of 0.73 against the
other digits instead of 0.82 at 4 loss draws), and the 1797 handwritings differ anyway."""

INSTANCE_PROMPT = "a handwritten sks digit"

PRETRAIN = {"steps": 250, "batch_size": 32, "lr": 2e-3, "warmup_steps": 10}
VERSION = 2
"""Bump when the world's recipe changes, so cached worlds built by the old recipe are not used."""

SURROGATE_FLAGS = {
    "adapter": "lora",
    "rank": 4,
    "steps": 40,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 4,
}
"""The surrogate: 40 steps of 4 over 8 images, 20 epochs. The learning rate stays low because
the surrogate's gradients are what the scores are made of: the pool's sevens score an AUC of
0.82 against the other digits with a surrogate trained at 1e-3, 0.78 at 2e-3 and 0.66 at
5e-3."""

TRAIN_FLAGS = {**SURROGATE_FLAGS, "steps": 80, "lr": 1e-2}
"""Adaptation, chosen as a practitioner would: the lowest 4-fold cross-validated loss on the dev
digit's D_A alone (benchmarks/train_recipe.py --family digits; steps 40/80/160 × lr 1e-3, 3e-3,
1e-2; plain adaptation, 2 images held back per fold): 0.0818 against 0.0833 for the bare
backbone and 0.0831 for the surrogate's recipe, which was the demo's before and under which no
selection, not even perfect-target data, lowered held-out loss."""

ORACLE_FLAGS = {**TRAIN_FLAGS, "steps": 200}
"""θ*: the adaptation recipe, 200 steps of 4 over the 139 oracle images (D_A and the pool's
sevens), ~6 epochs."""

DATA_FLAGS = {"instance_prompt": INSTANCE_PROMPT, "resolution": RESOLUTION}
"""Every stage's data flags."""

SCORE_FLAGS = {"loss_draws": 8}
"""Eight (timestep, noise) draws per sample instead of four: the pool's sevens score an AUC of
0.88 instead of 0.82 (the per-sample loss, and so its gradient, is less noisy)."""

RECIPE = {
    "train_flags": TRAIN_FLAGS,
    "oracle_flags": ORACLE_FLAGS,
    "surrogate_flags": SURROGATE_FLAGS,
    "score_flags": SCORE_FLAGS,
    "demo_methods": ("mmr", "embed", "influence"),
    "method_flags": {"mmr": {"fuse": ("embed",)}},
}
"""How the demo runs the stages on this world (not part of the world's identity); the demo
compares batctl's default for a diffusion model given a CLIP (`score --method auto --clip`: mmr
over CLIP retrieval, `--fuse embed` with the world's CLIP) with the strongest cheap baseline,
CLIP retrieval alone (embed), and with the default without a CLIP (influence, from the
surrogate's gradients), which beats caption BM25, the cheap text baseline, in 12 of the 14 dev
and fresh digit × γ cases (caption BM25 ranks the target digit at chance: a DreamBooth set has
no captions to match)."""


@dataclass(frozen=True)
class Digit:
    """One rendered digit: its key (``DOMAIN-NNNNN``), label, caption and PNG bytes."""

    key: str
    label: int
    png: bytes

    @property
    def domain(self) -> str:
        return NAMES[self.label]

    @property
    def caption(self) -> str:
        return caption(self.label)


@dataclass(frozen=True)
class DigitsData:
    """The data files of a digits world, written by ``write_data``."""

    adaptation: Path
    heldout: Path
    oracle: Path
    pool: tuple[Path, ...]
    pool_digits: list[Digit]
    """The pool in pool order (what the backbone is pretrained on)."""

    @property
    def pool_domains(self) -> dict[str, int]:
        return dict(Counter(World.domain_of(d.key) for d in self.pool_digits))


def caption(label: int) -> str:
    """The pool caption of a digit: "a handwritten digit seven"."""
    return f"a handwritten digit {NAMES[label]}"


def load_digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits: images float [1797, 8, 8] in 0..16 and labels int [1797]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def data_hash() -> str:
    """sha256 of the digits' pixels and labels (part of the world's identity)."""
    import numpy as np

    images, labels = load_digits_arrays()
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def render(image: Any, dx: int = 0, dy: int = 0) -> bytes:
    """An 8 x 8 digit (0..16) as RESOLUTION x RESOLUTION RGB PNG bytes: white on black, upscaled
    bilinearly to DIGIT_SIZE and shifted by (dx, dy) pixels from the centre."""
    import numpy as np
    from PIL import Image

    gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0 / 16.0), 0, 255)
    small = Image.fromarray(gray.astype(np.uint8)).resize((DIGIT_SIZE, DIGIT_SIZE), Image.BILINEAR)
    canvas = Image.new("L", (RESOLUTION, RESOLUTION), 0)
    corner = (RESOLUTION - DIGIT_SIZE) // 2
    canvas.paste(small, (corner + dx, corner + dy))
    out = io.BytesIO()
    canvas.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def render_all(seed: int) -> list[Digit]:
    """Every digit rendered, in the dataset's order, keyed by its index within its label."""
    images, labels = load_digits_arrays()
    rng = random.Random(f"digits-jitter-{seed}")
    counts: Counter[int] = Counter()
    out = []
    for image, label in zip(images, labels, strict=True):
        label = int(label)
        dx, dy = rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)
        out.append(Digit(f"{NAMES[label]}-{counts[label]:05d}", label, render(image, dx, dy)))
        counts[label] += 1
    return out


def split(
    digits: list[Digit], seed: int, target_name: str = TARGET, n_adaptation: int = N_ADAPTATION
) -> dict[str, list[Digit]]:
    """Held-out, adaptation, oracle and pool digits (see the module docstring), with
    ``target_name`` (one of NAMES) as the target domain and ``n_adaptation`` images in D_A."""
    if target_name not in NAMES:
        raise ValueError(f"target must be one of {', '.join(NAMES)}, got {target_name!r}")
    rng = random.Random(seed)
    target = [d for d in digits if d.domain == target_name]
    rng.shuffle(target)
    heldout = target[:N_HELDOUT]
    adaptation = target[N_HELDOUT : N_HELDOUT + n_adaptation]
    in_pool = target[N_HELDOUT + n_adaptation :]
    pool = [d for d in digits if d.domain != target_name] + in_pool
    rng.shuffle(pool)
    return {
        "heldout": heldout,
        "adaptation": adaptation,
        "oracle": adaptation + in_pool,
        "pool": pool,
    }


def write_folder(path: Path, digits: list[Digit]) -> Path:
    """An image folder: one ``KEY.png`` per digit, no captions."""
    path.mkdir(parents=True)
    for d in digits:
        (path / f"{d.key}.png").write_bytes(d.png)
    return path


def write_tar(path: Path, digits: list[Digit]) -> Path:
    """A LAION-layout webdataset tar: ``KEY.png``, ``KEY.txt`` (caption), ``KEY.json``
    ({"caption", "label", "digit"}); fixed mtime, so the same digits give the same bytes."""
    from webdataset import TarWriter

    with open(path, "wb") as f, TarWriter(f, mtime=0) as tar:
        for d in digits:
            meta = {"caption": d.caption, "label": d.label, "digit": d.domain}
            tar.write(
                {
                    "__key__": d.key,
                    "png": d.png,
                    "txt": d.caption.encode("utf-8"),
                    "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
                }
            )
    return path


def write_data(
    data: Path, seed: int, target: str = TARGET, n_adaptation: int = N_ADAPTATION
) -> DigitsData:
    """Render and split the digits and write the world's data files into ``data`` (created):
    ``adaptation/``, ``heldout/``, ``oracle/`` (image folders) and ``pool-NNN.tar``."""
    parts = split(render_all(seed), seed, target, n_adaptation)
    data.mkdir(parents=True, exist_ok=True)
    pool = parts["pool"]
    size = math.ceil(len(pool) / POOL_PARTS)
    tars = tuple(
        write_tar(data / f"pool-{i:03d}.tar", pool[i * size : (i + 1) * size])
        for i in range(POOL_PARTS)
    )
    return DigitsData(
        adaptation=write_folder(data / "adaptation", parts["adaptation"]),
        heldout=write_folder(data / "heldout", parts["heldout"]),
        oracle=write_folder(data / "oracle", parts["oracle"]),
        pool=tars,
        pool_digits=pool,
    )


def edit_config(part: Path, **updates: Any) -> None:
    """Update a pipeline part's config.json, dropping ``_name_or_path`` (where it was loaded
    from, which ``save_pretrained`` records and a cached world must not)."""
    path = Path(part) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("_name_or_path", None)
    config.update(updates)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def pretraining_plan(
    module: Any, count: int, seed: int, *, steps: int, batch_size: int, lr: float, warmup_steps: int
) -> tuple[Any, Any, Any, Any]:
    """What the world's pretraining loops share: a generator seeded with ``seed``, the sample
    order (seeded permutations of ``count`` rows, enough for ``steps`` batches), AdamW over
    ``module``'s parameters and its warmup-then-cosine schedule. Returns (generator, order,
    optimizer, schedule)."""
    import torch

    from batctl.training import warmup_cosine

    epochs = math.ceil(steps * batch_size / count)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(count, generator=gen) for _ in range(epochs)])
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, steps)
    )
    return gen, order, optimizer, schedule


def pretraining_stats(
    losses: list[float], batch_size: int, started: float, images: int
) -> dict[str, Any]:
    """What a pretraining loop reports: steps, batch size, first loss, last loss (mean of the
    last 20 steps), wall seconds since ``started`` (time.monotonic) and the image count."""
    tail = losses[-20:]
    return {
        "steps": len(losses),
        "batch_size": batch_size,
        "first_loss": losses[0],
        "last_loss": sum(tail) / len(tail),
        "seconds": round(time.monotonic() - started, 1),
        "images": images,
    }


def pretrain(
    model_dir: Path,
    images: list[bytes],
    captions: list[str],
    seed: int,
    *,
    steps: int = PRETRAIN["steps"],
    batch_size: int = PRETRAIN["batch_size"],
    lr: float = PRETRAIN["lr"],
    warmup_steps: int = PRETRAIN["warmup_steps"],
) -> dict[str, Any]:
    """Train the UNet of the pipeline in ``model_dir`` on ``images`` (PNG bytes) and captions.

    The VAE and text encoder stay frozen. First the VAE's ``scaling_factor`` is calibrated to
    1 / std of the images' latent means (saved in ``vae/config.json``); then DDPM's training
    loss (ε-prediction MSE on latent mean x scaling_factor, uniform timesteps, the scheduler's
    ``add_noise``), AdamW, linear warmup then cosine decay, batches in a seeded order, noise and
    timesteps from a seeded generator. The UNet is saved over the random one. Returns steps,
    first and last loss (last: mean of the last 20 steps), seconds and the scaling factor.
    """
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from batctl.console import progress_bar
    from batctl.tasks.diffusion import quiet_diffusion_libraries

    started = time.monotonic()
    quiet_diffusion_libraries()
    model_dir = Path(model_dir)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    # frozen parts, once: latent means of every image, text states of every distinct caption
    pixels = []
    for png in images:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.BILINEAR)
        pixels.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    distinct = sorted(set(captions))
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)]
        )
        ids = tokenizer(
            distinct,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = text_encoder(ids)[0]
    scaling = round(1.0 / float(means.std()), 5)
    edit_config(model_dir / "vae", scaling_factor=scaling)
    latents = means * scaling
    which = torch.tensor([distinct.index(c) for c in captions])

    gen, order, optimizer, schedule = pretraining_plan(
        unet,
        len(images),
        seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
    )
    unet.train()
    losses = []
    n_timesteps = scheduler.config.num_train_timesteps
    with progress_bar("pretraining the demo UNet", steps, unit="steps") as advance:
        for step in range(steps):
            rows = order[step * batch_size : (step + 1) * batch_size]
            clean = latents[rows]
            noise = torch.randn(clean.shape, generator=gen)
            t = torch.randint(0, n_timesteps, (len(rows),), generator=gen)
            pred = unet(scheduler.add_noise(clean, noise, t), t, states[which[rows]]).sample
            if scheduler.config.prediction_type == "v_prediction":
                noise = scheduler.get_velocity(clean, noise, t)  # the target
            loss = torch.nn.functional.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            advance(1, loss=losses[-1])
    unet.eval()
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    edit_config(model_dir / "unet")  # no _name_or_path: the build directory is temporary
    return {
        **pretraining_stats(losses, batch_size, started, len(images)),
        "scaling_factor": scaling,
    }


CLIP_PRETRAIN = {"steps": 300, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20}
"""The world's CLIP (``World.clip``): contrastive training on the pool's images and captions."""


def pretrain_clip(
    clip_dir: Path,
    images: list[bytes],
    captions: list[str],
    seed: int,
    *,
    steps: int = CLIP_PRETRAIN["steps"],
    batch_size: int = CLIP_PRETRAIN["batch_size"],
    lr: float = CLIP_PRETRAIN["lr"],
    warmup_steps: int = CLIP_PRETRAIN["warmup_steps"],
) -> dict[str, Any]:
    """Train the CLIP in ``clip_dir`` (``batctl.tiny.build_tiny_clip``) on image/caption pairs.

    CLIP's symmetric contrastive loss over each batch, with one change for a world of ten
    captions: pairs whose captions are equal count as matches (the target row is uniform over
    them) instead of as negatives. AdamW, warmup then cosine, a seeded order; the model is saved
    over the random one. Returns steps, first and last loss (mean of the last 20) and the share
    of pool images whose nearest caption is their own (top-1 accuracy over the distinct captions).
    """
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPModel

    from batctl.methods.clip import features, load_processor
    from batctl.tasks.lm import quiet_libraries
    from batctl.tiny import _no_progress_bars

    started = time.monotonic()
    quiet_libraries()
    model = CLIPModel.from_pretrained(clip_dir)
    processor = load_processor(clip_dir)
    pixels = processor(
        images=[Image.open(io.BytesIO(png)).convert("RGB") for png in images], return_tensors="pt"
    )["pixel_values"]
    distinct = sorted(set(captions))
    tokens = processor(text=distinct, return_tensors="pt", padding=True)
    which = torch.tensor([distinct.index(c) for c in captions])

    def text_features() -> Any:
        found = model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        )
        return torch.nn.functional.normalize(features(found), dim=-1)

    _, order, optimizer, schedule = pretraining_plan(
        model,
        len(images),
        seed,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
    )
    model.train()
    losses = []
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        image = features(model.get_image_features(pixel_values=pixels[rows]))
        image = torch.nn.functional.normalize(image, dim=-1)
        text = text_features()[which[rows]]
        logits = model.logit_scale.exp() * image @ text.T
        same = (which[rows][:, None] == which[rows][None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        image = torch.cat(
            [
                features(model.get_image_features(pixel_values=pixels[i : i + 512]))
                for i in range(0, len(pixels), 512)
            ]
        )
        nearest = (torch.nn.functional.normalize(image, dim=-1) @ text_features().T).argmax(1)
    with _no_progress_bars():
        model.save_pretrained(clip_dir, safe_serialization=True)
    edit_config(clip_dir)
    accuracy = float(np.mean((nearest == which).numpy()))
    return {
        **pretraining_stats(losses, batch_size, started, len(images)),
        "caption_accuracy": accuracy,
    }


CLIP_DIR = "clip"


def build(work: Path, seed: int, target: str = TARGET, n_adaptation: int = N_ADAPTATION) -> World:
    """Write the digits world of ``target`` with ``n_adaptation`` DreamBooth images into ``work``
    (data files, pretrained backbone, CLIP); return it."""
    from batctl.tiny import build_tiny_clip, build_tiny_diffusion

    data = write_data(work / "data", seed, target, n_adaptation)
    model = build_tiny_diffusion(work / "model", seed=seed, resolution=RESOLUTION)
    pool = data.pool_digits
    stats = pretrain(model, [d.png for d in pool], [d.caption for d in pool], seed)
    clip = build_tiny_clip(work / CLIP_DIR, seed=seed, image_size=RESOLUTION)
    clip_stats = pretrain_clip(clip, [d.png for d in pool], [d.caption for d in pool], seed)
    return World(
        family="diffusion",
        root=work,
        model=model,
        adaptation=data.adaptation,
        heldout=data.heldout,
        oracle=data.oracle,
        pool=data.pool,
        target=target,
        pool_domains=data.pool_domains,
        data_flags=dict(DATA_FLAGS),
        pretraining={**stats, "clip": clip_stats},
        clip=clip,
    )


def recipe(target: str = TARGET, n_adaptation: int = N_ADAPTATION) -> dict[str, Any]:
    """The constants that shape a world (part of its identity, so editing one rebuilds it)."""
    return {
        "target": target,
        "n_adaptation": n_adaptation,
        "n_heldout": N_HELDOUT,
        "pool_parts": POOL_PARTS,
        "resolution": RESOLUTION,
        "digit_size": DIGIT_SIZE,
        "jitter": JITTER,
        "pretrain": PRETRAIN,
        "clip_pretrain": CLIP_PRETRAIN,
        "data_flags": DATA_FLAGS,
    }


def digits_world(
    seed: int = 0, cache: Path | None = None, target: str = TARGET, n_adaptation: int = N_ADAPTATION
) -> tuple[World, bool]:
    """The diffusion demo world for ``seed``, ``target`` digit (one of NAMES) and
    ``n_adaptation`` DreamBooth images, from the cache or built now (about 40 s on 2 cores, most
    of it pretraining the UNet and the CLIP). Each target has its own backbone, pretrained on
    its own pool, so its held-out images are never in pretraining. Returns the world and whether
    it was built now."""
    from importlib.metadata import version

    from batctl import __version__
    from batctl.tiny import _library_versions

    params = {
        "family": "diffusion",
        "recipe": VERSION,
        "constants": recipe(target, n_adaptation),
        "seed": seed,
        "data": data_hash(),
        "batctl": __version__,
        "libraries": {
            **_library_versions(),
            **{name: version(name) for name in ("pillow", "webdataset", "scikit-learn")},
        },
    }
    world, built = cached_world(
        "digits", params, lambda work: build(work, seed, target, n_adaptation), cache
    )
    return world.with_recipe(RECIPE), built
