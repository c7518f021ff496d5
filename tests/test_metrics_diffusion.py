"""Diffusion eval metrics (batctl.metrics.diffusion, batctl.metrics.vendi, DiffusionTask's
family_metrics) with real libraries: tiny random DINOv2 and CLIP models built from configs and
saved to local directories (no hub), and the tiny Stable Diffusion pipeline.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from batctl.metrics import diffusion as dm
from batctl.metrics.options import EvalOptions
from batctl.metrics.vendi import vendi_score
from batctl.tasks.base import TaskSettings
from batctl.tasks.diffusion import DiffusionTask
from batctl.tiny import build_tiny_clip_tokenizer, build_tiny_diffusion
from tests.diffusion_fixtures import image, image_samples

PROMPTS = ["a photo of sks dog", "a sks dog on the beach"]


# ----------------------------------------------------------------------------- Vendi Score


@pytest.mark.parametrize("n", [1, 2, 5])
def test_vendi_of_identical_samples_is_one(n):
    x = torch.tensor([[1.0, 2.0, -3.0]]).repeat(n, 1) * torch.arange(1, n + 1).view(n, 1)
    assert vendi_score(x) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_vendi_of_orthogonal_samples_is_n(n):
    x = torch.eye(8)[:n] * 3.0
    assert vendi_score(x) == pytest.approx(float(n), abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert vendi_score(q[:, :n].T) == pytest.approx(float(n), abs=1e-9)


def test_vendi_of_two_samples_by_hand():
    # cos = 1/2: K/2 = [[1/2, 1/4], [1/4, 1/2]], eigenvalues 3/4 and 1/4.
    x = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert vendi_score(x) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.7548, abs=1e-4)


def test_vendi_rejects_empty_and_zero_rows():
    with pytest.raises(ValueError):
        vendi_score(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        vendi_score(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


# ----------------------------------------------------------------------------- feature models


def write_image_processor(out, kind, shortest_edge, mean, std):
    """The image processor config a hub checkpoint ships: resize, center-crop 32, normalise."""
    config = {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"shortest_edge": shortest_edge},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    Dinov2Model(config).eval().save_pretrained(out)
    # BitImageProcessor's config, as facebook/dinov2-* ship it (scaled down: 36 -> crop 32).
    write_image_processor(out, "BitImageProcessor", 36, dm.IMAGENET_MEAN, dm.IMAGENET_STD)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    out = tmp_path_factory.mktemp("clip")
    tokenizer = build_tiny_clip_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            **ids,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(1)
    CLIPModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_image_processor(out, "CLIPImageProcessor", 32, dm.CLIP_MEAN, dm.CLIP_STD)
    return out


@pytest.fixture(scope="module")
def dino(dino_dir):
    return dm.DinoFeatures(dino_dir)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return dm.ClipFeatures(clip_dir)


@pytest.fixture(scope="module")
def images():
    sizes = [(40, 48), (48, 40), (32, 32), (64, 36)]
    return [image(100 + i, w, h) for i, (w, h) in enumerate(sizes)]


def test_preprocessing_matches_the_transformers_image_processor(dino_dir, images):
    from transformers import AutoImageProcessor

    ours = dm.DinoFeatures(dino_dir).preprocess(images)
    theirs = AutoImageProcessor.from_pretrained(dino_dir)(images=images, return_tensors="pt")
    assert ours.shape == (4, 3, 32, 32)
    assert torch.allclose(ours, theirs["pixel_values"], atol=1e-5)


def test_dino_and_clip_i_of_a_set_with_itself(dino, clip, images):
    for features in (dino.images(images), clip.images(images)):
        assert features.dtype == torch.float32
        assert dm.paired_cosine(features, features) == pytest.approx(1.0, abs=1e-9)
        assert torch.diagonal(dm.cosine_matrix(features, features)).sub(1).abs().max() < 1e-9
        score = dm.mean_pairwise_cosine(features, features)
        assert -1.0 <= score <= 1.0 + 1e-12
        assert dm.centroid_distance(features, features) == pytest.approx(0.0, abs=1e-12)
        assert 0.0 < dm.centroid_distance(features[:2], features[2:]) <= 2.0
        assert 1.0 <= vendi_score(features) <= len(images) + 1e-9
    # batching does not change an embedding
    assert torch.allclose(dino.images(images, batch_size=1), dino.images(images), atol=1e-5)


def test_clip_t_is_a_finite_cosine(clip, images):
    texts = clip.texts(PROMPTS * 2)
    assert texts.shape == (4, 16)
    value = dm.paired_cosine(clip.images(images), texts)
    assert math.isfinite(value) and -1.0 <= value <= 1.0


def test_personalisation_metrics_keys_follow_the_models_given(dino, clip, images):
    gen, refs = images[:2], images[2:]
    assert dm.personalisation_metrics(gen, PROMPTS, refs) == {}
    only_dino = dm.personalisation_metrics(gen, PROMPTS, refs, dino=dino)
    assert set(only_dino) == {"dino", "vendi"}
    both = dm.personalisation_metrics(gen, PROMPTS, refs, dino=dino, clip=clip)
    assert set(both) == {"dino", "clip_i", "clip_t", "centroid_distance", "vendi"}
    assert both["vendi"] == pytest.approx(vendi_score(dino.images(gen)))  # DINO first
    only_clip = dm.personalisation_metrics(gen, PROMPTS, refs, clip=clip)
    assert only_clip["vendi"] == pytest.approx(vendi_score(clip.images(gen)))
    same = dm.personalisation_metrics(refs, PROMPTS, refs, dino=dino, clip=clip)
    assert same["centroid_distance"] == pytest.approx(0.0, abs=1e-9)


def test_grid_layout(tmp_path):
    tiles = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    assert dm.grid_shape(1) == (1, 1) and dm.grid_shape(2) == (1, 2) and dm.grid_shape(5) == (2, 3)
    assert dm.write_grid(tiles, tmp_path / "g.png") == (24, 16)
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (24, 16) and grid.getpixel((8 + 4, 4)) == (40, 0, 0)


def test_read_prompts(tmp_path):
    from batctl.errors import UsageError

    (tmp_path / "p.txt").write_text("  one \n\n two\n")
    assert dm.read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UsageError, match="no prompts"):
        dm.read_prompts(tmp_path / "empty.txt")


# ----------------------------------------------------------------------------- family_metrics


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    model = build_tiny_diffusion(tmp_path_factory.mktemp("sd") / "sd", resolution=32)
    settings = TaskSettings(
        model=str(model), resolution=32, loss_draws=1, instance_prompt=PROMPTS[0], device="cpu"
    )
    return DiffusionTask(settings)


@pytest.fixture
def few_steps(monkeypatch):
    monkeypatch.setattr(dm, "INFERENCE_STEPS", 2)


def test_family_metrics_writes_the_grid_and_only_the_metrics_of_given_models(
    task, dino_dir, clip_dir, tmp_path, few_steps
):
    from batctl.tasks.base import AdapterSettings

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    heldout = image_samples(3, seed=4)
    out = tmp_path / "out"
    out.mkdir()

    none = task.family_metrics(heldout, EvalOptions(), out, "backbone")
    assert none == {} and not list(out.iterdir())
    assert any("no --prompts" in n for n in task.metric_notes)

    row = task.family_metrics(heldout, EvalOptions(prompts=prompts, dino=dino_dir), out, "backbone")
    assert set(row) == {"dino", "vendi"}
    assert all(math.isfinite(v) for v in row.values())
    assert any("no --clip" in n for n in task.metric_notes)
    assert not any("no --dino" in n for n in task.metric_notes)
    grid = Image.open(out / "images-backbone.png")
    # two 32 px renders, scaled up to labelled tiles of GRID_TILE px, captions and a title
    assert grid.size[0] == 2 * dm.GRID_TILE and grid.size[1] > dm.GRID_TILE
    first = grid.copy()

    # fixed seeds: the same model gives the same images
    again = task.family_metrics(heldout, EvalOptions(prompts=prompts), out, "backbone")
    assert again == {}
    assert any("no --dino or --clip" in n for n in task.metric_notes)
    assert np.array_equal(np.asarray(Image.open(out / "images-backbone.png")), np.asarray(first))

    # the current UNet's adapter is used: a non-zero LoRA changes the images
    task.add_adapter(AdapterSettings(kind="lora", rank=2), seed=0)
    try:
        with torch.no_grad():
            for name, p in task.trainable_parameters().items():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        task.model.eval()
        options = EvalOptions(prompts=prompts, clip=clip_dir, batch_size=2)
        adapted = task.family_metrics(heldout, options, out, "runs/a")
    finally:
        task.remove_adapter()
    assert set(adapted) == {"clip_i", "clip_t", "centroid_distance", "vendi"}
    assert 0.0 <= adapted["centroid_distance"] <= 2.0
    assert 1.0 <= adapted["vendi"] <= 2.0 + 1e-9
    changed = Image.open(out / "images-runs_a.png")
    assert changed.size == first.size
    # compare the first tile only (the titles differ anyway): the adapter changed the image
    tile = _first_tile_box(changed)
    assert not np.array_equal(np.asarray(changed.crop(tile)), np.asarray(first.crop(tile)))


def _first_tile_box(grid):
    """The first tile of a labelled grid: the first row that is not white, GRID_TILE high."""
    pixels = np.asarray(grid.convert("RGB"))
    column = pixels[:, dm.GRID_TILE // 2]
    top = next(y for y in range(20, len(column)) if tuple(column[y]) != (255, 255, 255))
    return (0, top, dm.GRID_TILE, top + dm.GRID_TILE)


def test_labelled_grid_scales_small_renders_up_and_writes_labels(tmp_path):
    tiles = [Image.new("RGB", (32, 32), (200, 0, 0)) for _ in range(3)]
    labels = [f"a photo of sks ball number {i} (seed {42 + i})" for i in range(3)]
    w, h = dm.write_grid(tiles, tmp_path / "g.png", labels=labels, title="albat: 3 prompts")
    grid = Image.open(tmp_path / "g.png").convert("RGB")
    assert w == 2 * dm.GRID_TILE and h > 2 * dm.GRID_TILE  # room for the title and captions
    # the tiles are scaled up whole (nearest neighbour) and the captions are drawn in black
    pixels = [tuple(p) for p in np.asarray(grid).reshape(-1, 3).tolist()]
    assert pixels.count((200, 0, 0)) == 3 * dm.GRID_TILE * dm.GRID_TILE
    assert any(sum(p) < 200 for p in pixels)  # dark text (the font may antialias)
