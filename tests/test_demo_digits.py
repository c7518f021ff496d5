"""The diffusion demo world: scikit-learn's digits rendered, split and written as a pool tar and
image folders, the tiny UNet's pretraining, and the cached world (with a 1-step pretraining)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batctl.demo import build_world
from batctl.demo import digits as dd
from batctl.demo.world import World


def file_bytes(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (``DIR/weights``: the safetensors files of DIR only)."""
    if d.name == "weights":
        return {p.name: p.read_bytes() for p in sorted(d.parent.glob("*.safetensors"))}
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def folder_keys(path: Path) -> list[str]:
    return sorted(p.stem for p in path.iterdir())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dd.DigitsData:
    return dd.write_data(tmp_path_factory.mktemp("digits") / "data", seed=0)


def test_rendering_is_white_on_black_png_at_the_world_resolution():
    images, labels = dd.load_digits_arrays()
    assert images.shape == (1797, 8, 8) and len(labels) == 1797
    png = dd.render(images[0])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (dd.RESOLUTION, dd.RESOLUTION)
    pixels = np.asarray(image.convert("L"))
    assert pixels[0, 0] == 0 and pixels.max() > 200  # black ground, white strokes
    assert dd.render(images[0], 1, 1) != png  # a shift moves the digit
    assert dd.caption(7) == "a handwritten digit seven"


def test_split_is_disjoint_counts_add_up_and_keys_carry_the_domain(data):
    adaptation, heldout = folder_keys(data.adaptation), folder_keys(data.heldout)
    oracle = folder_keys(data.oracle)
    pool = [d.key for d in data.pool_digits]
    assert len(adaptation) == dd.N_ADAPTATION and len(heldout) == dd.N_HELDOUT
    assert len(set(pool)) == len(pool)
    assert not set(heldout) & (set(pool) | set(adaptation))
    assert not set(adaptation) & set(pool)
    target_in_pool = {k for k in pool if World.domain_of(k) == dd.TARGET}
    assert set(oracle) == set(adaptation) | target_in_pool
    assert all(World.domain_of(k) == dd.TARGET for k in adaptation + heldout)
    assert len(pool) + dd.N_ADAPTATION + dd.N_HELDOUT == 1797
    labels = Counter(int(t) for t in dd.load_digits_arrays()[1])
    expected = {name: labels[i] for i, name in enumerate(dd.NAMES)}
    expected[dd.TARGET] -= dd.N_ADAPTATION + dd.N_HELDOUT
    assert data.pool_domains == expected
    assert all(d.domain == World.domain_of(d.key) == dd.NAMES[d.label] for d in data.pool_digits)
    assert [d.key for d in data.pool_digits] != sorted(pool)  # shuffled


def test_the_pool_tars_read_with_webdataset_and_with_batctl(data):
    import webdataset as wds

    from batctl.data import open_pool

    assert len(data.pool) == dd.POOL_PARTS
    seen = []
    for part in data.pool:
        for sample in wds.WebDataset(str(part), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            assert caption == meta["caption"] == dd.caption(meta["label"])
            assert World.domain_of(sample["__key__"]) == meta["digit"] == dd.NAMES[meta["label"]]
            assert Image.open(io.BytesIO(sample["png"])).size == (dd.RESOLUTION, dd.RESOLUTION)
            seen.append(sample["__key__"])
    assert seen == [d.key for d in data.pool_digits]

    pool = open_pool([str(p) for p in data.pool], strict=True)
    samples = list(pool)
    assert [s.key for s in samples] == seen
    first = samples[0]
    assert first.record["caption"] == data.pool_digits[0].caption
    assert first.record["image"].size == (dd.RESOLUTION, dd.RESOLUTION)
    assert first.raw["png"] == data.pool_digits[0].png
    assert pool.read(first.part, first.offset).key == first.key


def test_the_image_folders_read_without_captions(data):
    from batctl.samples import load_samples

    adaptation = load_samples(str(data.adaptation), flag="--data")
    assert sorted(s.key for s in adaptation) == folder_keys(data.adaptation)
    assert all(s.record["image"].size == (dd.RESOLUTION, dd.RESOLUTION) for s in adaptation)
    assert len(load_samples(str(data.oracle), flag="--data")) == len(folder_keys(data.oracle))


def test_the_same_seed_writes_the_same_bytes_and_another_seed_another_split(data, tmp_path):
    again = dd.write_data(tmp_path / "again", seed=0)
    assert file_bytes(again.adaptation.parent) == file_bytes(data.adaptation.parent)
    other = dd.split(dd.render_all(1), seed=1)
    assert {d.key for d in other["adaptation"]} != set(folder_keys(data.adaptation))


def test_base_rate_is_the_target_share_of_the_pool(data, tmp_path):
    world = World(
        family="diffusion",
        root=tmp_path,
        model=tmp_path,
        adaptation=tmp_path,
        heldout=tmp_path,
        oracle=tmp_path,
        pool=(),
        target=dd.TARGET,
        pool_domains=data.pool_domains,
    )
    n_target = sum(World.domain_of(d.key) == dd.TARGET for d in data.pool_digits)
    assert world.base_rate == pytest.approx(n_target / len(data.pool_digits))
    assert 0.05 < world.base_rate < 0.1


def test_pretraining_trains_the_unet_only_and_the_pipeline_still_loads(data, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from batctl.tiny import build_tiny_diffusion

    model = build_tiny_diffusion(tmp_path / "model", seed=0, resolution=dd.RESOLUTION)
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    before = load_file(unet_file)
    frozen = file_bytes(model / "text_encoder"), file_bytes(model / "vae" / "weights")
    pool = data.pool_digits[:16]
    stats = dd.pretrain(
        model, [d.png for d in pool], [d.caption for d in pool], seed=0, steps=3, batch_size=8
    )
    assert stats["steps"] == 3 and stats["images"] == 16
    assert all(math.isfinite(stats[k]) and stats[k] > 0 for k in ("first_loss", "last_loss"))
    after = load_file(unet_file)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert (file_bytes(model / "text_encoder"), file_bytes(model / "vae" / "weights")) == frozen
    # the VAE's scaling factor is calibrated to the images' latents
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == stats["scaling_factor"] != 0.18215

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == stats["scaling_factor"]
    image = pipe("a handwritten digit seven", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, dd.RESOLUTION, dd.RESOLUTION, 3)


def test_the_world_is_built_once_cached_and_its_flags_suit_every_stage(tmp_path, monkeypatch):
    from batctl.cli import STAGES
    from batctl.tasks import load_task

    real, real_clip = dd.pretrain, dd.pretrain_clip
    monkeypatch.setattr(dd, "pretrain", lambda *a, **kw: real(*a, **{**kw, "steps": 1}))
    monkeypatch.setattr(dd, "pretrain_clip", lambda *a, **kw: real_clip(*a, **{**kw, "steps": 1}))
    world, built = build_world("diffusion", seed=0, cache=tmp_path)
    assert built and world.family == "diffusion" and world.target == dd.TARGET
    assert world.pretraining["steps"] == 1 and world.pretraining["clip"]["steps"] == 1
    assert world.demo_methods == ("mmr", "embed", "influence")
    assert world.fuse_of("mmr") == ("embed",) and world.fuse_of("embed") == ()
    again, built = dd.digits_world(seed=0, cache=tmp_path)
    assert not built and again == world
    for path in (
        world.model,
        world.clip,
        world.adaptation,
        world.heldout,
        world.oracle,
        *world.pool,
    ):
        assert path.exists() and path.is_relative_to(world.root)
    assert (
        json.loads((world.clip / "config.json").read_text())["vision_config"]["image_size"]
        == dd.RESOLUTION
    )
    for part in ("unet", "vae"):  # no trace of the temporary build directory
        assert "_name_or_path" not in json.loads((world.model / part / "config.json").read_text())

    # the demo stage hands data_flags to every stage and its recipe's flags to their stages
    for stage in ("surrogate", "score", "train", "eval"):
        extra = {"surrogate": world.root} if stage == "score" else {}  # influence reads one
        config = STAGES[stage][0](model=str(world.model), **world.data_flags, **extra)
        assert config.problems() == []
    for stage, flags in (
        ("surrogate", world.surrogate_flags),
        ("train", world.train_flags),
        ("train", world.oracle_flags),
        ("score", world.score_flags),
    ):
        assert flags, stage
        extra = {"surrogate": world.root} if stage == "score" else {}
        config = STAGES[stage][0](model=str(world.model), **world.data_flags, **flags, **extra)
        assert config.problems() == []

    # batctl's diffusion task reads the world: adaptation images with the instance prompt
    from batctl.samples import load_samples

    config = STAGES["score"][0](model=str(world.model), **world.data_flags)
    task = load_task(config.task_settings(), "diffusion")
    samples = list(load_samples(str(world.adaptation), flag="--data"))[:2]
    with torch.no_grad():
        loss = task.per_sample_loss(task.collate(samples, "adaptation"))
    assert loss.shape == (2,) and torch.isfinite(loss).all()


def test_the_table_shows_enough_decimals_to_tell_diffusion_losses_apart(tmp_path, monkeypatch):
    from batctl.demo.report import plot_heldout_by_gamma, render_table

    def row(adapter, strategy, gamma, loss):
        return {
            "adapter": adapter,
            "strategy": strategy,
            "gamma": gamma,
            "selected": 0 if gamma is None else 3,
            "target_share": None if gamma is None else 0.5,
            "heldout_loss": loss,
            "weight_diff_rel": 0.5,
        }

    results = {
        "family": "diffusion",
        "target": "seven",
        "n_adaptation": 8,
        "base_rate": 0.075,
        "pool": {"seven": 1, "other": 12},
        "seed": 0,
        "backbone_heldout_loss": 0.112701,
        "oracle_heldout_loss": 0.1105,
        "rows": [
            row("none", "none", None, 0.112666),
            row("random-g0.5", "random", 0.5, 0.112895),
            row("influence-g0.5", "influence", 0.5, 0.112652),
        ],
    }
    table = render_table(results)
    # 0.112666 and 0.112652 differ in the 5th decimal: both must show it
    assert "0.112666" in table and "0.112652" in table and "0.1105" in table
    lm = {**results, "backbone_heldout_loss": 4.5075, "oracle_heldout_loss": 4.3811}
    lm["rows"] = [row("none", "none", None, 4.52391), row("random-g0.5", "random", 0.5, 4.51903)]
    assert "| 4.5239 |" in render_table(lm)
    # the held-out plot's y range takes in the oracle's line, far below the adapters
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limits = []
    real = plt.Axes.set_ylim

    def spy(self, *args, **kwargs):
        if len(args) == 2:  # the plot's own call (matplotlib calls it with keywords)
            limits.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(plt.Axes, "set_ylim", spy)
    plot_heldout_by_gamma(results, tmp_path / "h.png")
    (low, high) = limits[-1]
    assert low < 0.1105 < 0.112895 < high


def test_demo_diffusion_runs_the_whole_pipeline_and_reports(cli, tmp_path, monkeypatch):
    """`batctl demo --task diffusion` end to end, with the recipe cut short (1 pretraining
    step, a few adapter steps): every stage's output, and the table's numbers read back."""
    real, real_clip = dd.pretrain, dd.pretrain_clip
    monkeypatch.setattr(dd, "pretrain", lambda *a, **kw: real(*a, **{**kw, "steps": 1}))
    monkeypatch.setattr(dd, "pretrain_clip", lambda *a, **kw: real_clip(*a, **{**kw, "steps": 1}))
    train = {**dd.TRAIN_FLAGS, "steps": 4, "warmup_steps": 1}
    monkeypatch.setitem(dd.RECIPE, "train_flags", train)
    monkeypatch.setitem(dd.RECIPE, "surrogate_flags", train)
    monkeypatch.setitem(dd.RECIPE, "oracle_flags", {**train, "steps": 8})
    monkeypatch.setitem(dd.RECIPE, "score_flags", {"loss_draws": 2})  # scoring is most of it
    monkeypatch.setenv("BATCTL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = cli(
        "demo",
        "--task",
        "diffusion",
        "--out",
        out,
        "--gamma",
        "0.5",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    table = json.loads(result.stdout)["table"]
    assert "BAT demo (diffusion): target domain 'seven'" in table
    for name in (
        "surrogate",
        "scores-mmr",
        "scores-influence",
        "scores-embed",
        "select-mmr",
        "select-influence",
        "select-embed",
        "select-random",
        "oracle",
    ):
        assert (out / name / "manifest.json").is_file(), name
    # batctl's default given a CLIP is mmr over CLIP retrieval with the world's CLIP; beside it
    # CLIP retrieval alone and the default without a CLIP: influence from the surrogate, with
    # the recipe's loss draws
    mmr = json.loads((out / "scores-mmr" / "manifest.json").read_text())
    assert mmr["params"]["fuse"] == ["embed"] and mmr["inputs"]["clip"]["path"].endswith("/clip")
    assert "surrogate" not in mmr["inputs"]
    embed = json.loads((out / "scores-embed" / "manifest.json").read_text())
    assert embed["inputs"]["clip"]["path"].endswith("/clip") and "surrogate" not in embed["inputs"]
    influence = json.loads((out / "scores-influence" / "manifest.json").read_text())
    assert influence["params"]["loss_draws"] == 2 and "surrogate" in influence["inputs"]
    assert "clip" not in influence["inputs"]
    results = json.loads((out / "report" / "results.json").read_text())
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["rows"]
    rows = {r["adapter"]: r for r in results["rows"]}
    assert set(rows) == {"none", "random-g0.5", "mmr-g0.5", "embed-g0.5", "influence-g0.5"}
    for label, row in rows.items():
        assert row["heldout_loss"] == pytest.approx(metrics[label]["heldout_loss"])
        assert (out / "train" / label / "pytorch_lora_weights.safetensors").is_file()
    chosen = json.loads((out / "select-embed" / "gamma-0.5" / "selection.json").read_text())[
        "chosen"
    ]
    assert rows["embed-g0.5"]["selected"] == len(chosen) == dd.N_ADAPTATION
    share = sum(World.domain_of(c["key"]) == dd.TARGET for c in chosen) / len(chosen)
    assert rows["embed-g0.5"]["target_share"] == pytest.approx(share)
    assert results["oracle_heldout_loss"] == pytest.approx(metrics["oracle"]["heldout_loss"])


def test_any_digit_can_be_the_target_with_any_number_of_dreambooth_images():
    digits = dd.render_all(0)
    parts = dd.split(digits, seed=0, target_name="two", n_adaptation=3)
    assert len(parts["adaptation"]) == 3 and len(parts["heldout"]) == dd.N_HELDOUT
    assert {d.domain for d in parts["adaptation"] + parts["heldout"]} == {"two"}
    twos = sum(d.domain == "two" for d in digits)
    assert sum(d.domain == "two" for d in parts["pool"]) == twos - 3 - dd.N_HELDOUT
    assert sum(d.domain == "seven" for d in parts["pool"]) == sum(
        d.domain == "seven" for d in digits
    )
    with pytest.raises(ValueError, match="target must be one of"):
        dd.split(digits, seed=0, target_name="eleven")
