"""`score --method embed --clip DIR`: CLIP retrieval of pool images, checked against CLIP
itself on a tiny CLIP (`batctl tiny clip`), and the digits world's CLIP training."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import CLIPModel

from batctl.methods.clip import features, load_processor
from batctl.scorestore import SCORED, ScoreStore
from batctl.tiny import build_tiny_diffusion

from .diffusion_fixtures import image, image_samples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny CLIP (built through the CLI), a tiny diffusion backbone, an adaptation folder of
    six caption-less images and a tar pool of eight captioned images and one caption-only
    sample."""
    from typer.testing import CliRunner

    from batctl.cli import app

    root = tmp_path_factory.mktemp("clip")
    built = CliRunner().invoke(app, ["tiny", "clip", str(root / "clip"), "--json"])
    assert built.exit_code == 0, built.stderr
    model = build_tiny_diffusion(root / "sd", seed=0, resolution=16)
    adaptation = root / "adaptation"
    adaptation.mkdir()
    for i in range(6):
        image(100 + i, 24, 24).save(adaptation / f"mine-{i}.png")
    pool = root / "pool.tar"
    samples = image_samples(8, seed=3, prefix="pool")
    with wds.TarWriter(str(pool)) as tar:
        for s in samples:
            tar.write({"__key__": s.key, **s.raw})
        tar.write({"__key__": "words-only", "txt": b"a red house by the sea"})
    return {"root": root, "clip": root / "clip", "model": model, "data": adaptation, "pool": pool}


def clip_by_hand(clip_dir, images=(), texts=()):
    """Unit CLIP features straight from transformers: images by the vision tower, texts by the
    text tower."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = load_processor(clip_dir)
    rows = []
    with torch.no_grad():
        if images:
            pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
            rows.append(features(model.get_image_features(pixel_values=pixels)))
        if texts:
            tokens = processor(text=list(texts), return_tensors="pt", padding=True)
            rows.append(features(model.get_text_features(**tokens)))
    out = torch.cat(rows).double().numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_tiny_clip_is_a_clip_model_with_its_processor(setup):
    config = json.loads((setup["clip"] / "config.json").read_text())
    assert config["projection_dim"] == 32 and config["vision_config"]["image_size"] == 16
    assert (setup["clip"] / "manifest.json").is_file()  # a batctl output, like `tiny lm`
    processor = load_processor(setup["clip"])
    pixels = processor(images=[image(0, 40, 30)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 16, 16)


def test_embed_with_clip_is_clip_cosine_to_the_adaptation_images_centroid(cli, setup, tmp_path):
    out = tmp_path / "scores"
    result = cli(
        "score", "--model", setup["model"], "--data", setup["data"], "--pool", setup["pool"],
        "--method", "embed", "--clip", setup["clip"], "--instance-prompt", "a photo of sks toy",
        "--resolution", "16", "--out", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    store = ScoreStore.open(out)
    keys, status = list(store.column("key")), store.column("status")
    assert keys[-1] == "words-only" and (status == SCORED).all()
    mine = [Image.open(setup["data"] / f"mine-{i}.png").convert("RGB") for i in range(6)]
    centroid = clip_by_hand(setup["clip"], images=mine).mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    pool = [Image.open(io.BytesIO(s.raw["png"])).convert("RGB") for s in image_samples(8, 3)]
    expected = (
        np.concatenate(
            [
                clip_by_hand(setup["clip"], images=pool),
                clip_by_hand(setup["clip"], texts=["a red house by the sea"]),
            ]
        )
        @ centroid
    )
    np.testing.assert_allclose(store.column("score"), expected, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["clip"]["kind"] == "artifact" and "clip" not in manifest["params"]


def test_clip_is_refused_by_methods_that_do_not_read_it(cli, setup, tmp_path):
    result = cli(
        "score", "--model", setup["model"], "--data", setup["data"], "--pool", setup["pool"],
        "--method", "bm25", "--clip", setup["clip"], "--out", tmp_path / "s",
    )  # fmt: skip
    assert (
        result.exit_code == 2
        and "--clip is read by --method embed (or a --fuse naming embed)" in result.stderr
    )
    assert not (tmp_path / "s").exists()


def test_the_digits_worlds_clip_learns_to_match_images_and_captions(tmp_path):
    """Contrastive training on 300 rendered digits: most images end nearest their own caption
    (a random CLIP gets about one in ten)."""
    from batctl.demo import digits as dd
    from batctl.tiny import build_tiny_clip

    digits = dd.render_all(0)[:300]
    clip = build_tiny_clip(tmp_path / "clip", seed=0, image_size=dd.RESOLUTION)
    before = dd.pretrain_clip(
        clip, [d.png for d in digits], [d.caption for d in digits], 0, steps=1
    )
    stats = dd.pretrain_clip(
        clip, [d.png for d in digits], [d.caption for d in digits], 0, steps=150
    )
    assert stats["last_loss"] < stats["first_loss"]
    assert stats["caption_accuracy"] > 0.6 > before["caption_accuracy"]
    assert CLIPModel.from_pretrained(clip).config.projection_dim == 32


def test_method_auto_is_the_familys_measured_default(cli, setup, tmp_path):
    """--method auto (the default): a diffusion model's pool is ranked by mmr over CLIP
    retrieval when --clip is given, else by influence, which needs the surrogate; the store
    records the method it ran."""
    base = (
        "score", "--model", setup["model"], "--data", setup["data"], "--pool", setup["pool"],
        "--instance-prompt", "a photo of sks toy", "--resolution", "16",
    )  # fmt: skip
    missing = cli(*base, "--out", tmp_path / "a")
    assert (
        missing.exit_code == 2
        and "--method auto runs influence for this model: give --surrogate DIR (or --clip DIR"
        in missing.stderr
    )
    ran = cli(*base, "--clip", setup["clip"], "--out", tmp_path / "b", "--json")
    assert ran.exit_code == 0, ran.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["params"]["method"] == "mmr" and manifest["params"]["fuse"] == ["embed"]
    # over embeddings mmr re-ranks the 256 rows it was measured with, and the store says so
    assert manifest["params"]["candidates"] == 256
    assert manifest["params"]["similarity"] == "embed"
    assert ScoreStore.open(tmp_path / "b").group.attrs["method"] == "mmr"
    # with the surrogate too: still no influence (CLIP retrieval beat the z-sum with influence
    # on the dev digits)
    trained = cli(
        "surrogate", "--model", setup["model"], "--data", setup["data"], "--resolution", "16",
        "--instance-prompt", "a photo of sks toy", "--steps", "2", "--batch-size", "2",
        "--out", tmp_path / "surrogate",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    both = cli(
        *base, "--clip", setup["clip"], "--surrogate", tmp_path / "surrogate", "--loss-draws", "1",
        "--out", tmp_path / "d",
    )  # fmt: skip
    assert both.exit_code == 0, both.stderr
    params = json.loads((tmp_path / "d" / "manifest.json").read_text())["params"]
    assert params["method"] == "mmr" and params["fuse"] == ["embed"]
    assert "surrogate" not in json.loads((tmp_path / "d" / "manifest.json").read_text())["inputs"]
    from batctl.tiny import build_tiny_lm

    lm = build_tiny_lm(tmp_path / "lm")
    words = tmp_path / "a.jsonl"
    words.write_text('{"text": "a red house"}\n{"text": "by the sea"}\n')
    refused = cli(
        "score",
        "--model",
        lm,
        "--data",
        words,
        "--pool",
        words,
        "--clip",
        setup["clip"],
        "--out",
        tmp_path / "c",
    )
    assert refused.exit_code == 2 and "--clip: CLIP retrieval is for image pools" in refused.stderr


def test_fusion_adds_the_z_scores_of_clip_retrieval_and_caption_bm25(cli, setup, tmp_path):
    """--fuse embed --fuse bm25 with --clip: each row's score is the sum of its two z-scores,
    each standardised over the pool, from the stores the two methods write alone."""
    base = (
        "score", "--model", setup["model"], "--data", setup["data"], "--pool", setup["pool"],
        "--instance-prompt", "a photo of sks toy", "--resolution", "16", "--clip", setup["clip"],
    )  # fmt: skip
    runs = {
        "fusion": ("--method", "fusion", "--fuse", "embed", "--fuse", "bm25"),
        "embed": ("--method", "embed"),
        "bm25": ("--method", "bm25"),
    }
    stores = {}
    for name, flags in runs.items():
        args = [*base, *flags, "--out", tmp_path / name]
        if name == "bm25":  # bm25 alone reads no CLIP
            args = [a for a in args if a not in ("--clip", setup["clip"])]
        result = cli(*args)
        assert result.exit_code == 0, result.stderr
        stores[name] = ScoreStore.open(tmp_path / name).column("score").astype(np.float64)

    def z(values):
        return (values - values.mean()) / (values.std() or 1.0)

    np.testing.assert_allclose(stores["fusion"], z(stores["embed"]) + z(stores["bm25"]), atol=1e-5)


def test_mmr_over_clip_retrieval_measures_redundancy_between_images(cli, setup, tmp_path):
    """--method mmr --fuse embed --clip: relevance is CLIP retrieval's z-score, redundancy the
    CLIP cosine between images (not caption TF-IDF): the store holds the hand-computed MMR
    order of the top --candidates above 2 and 1 / (1 + e^−z) below."""
    from .test_methods_mmr import hand_mmr

    out = tmp_path / "mmr"
    result = cli(
        "score", "--model", setup["model"], "--data", setup["data"], "--pool", setup["pool"],
        "--method", "mmr", "--fuse", "embed", "--clip", setup["clip"], "--candidates", "5",
        "--diversity", "0.8", "--instance-prompt", "a photo of sks toy", "--resolution", "16",
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    mine = [Image.open(setup["data"] / f"mine-{i}.png").convert("RGB") for i in range(6)]
    seen = clip_by_hand(setup["clip"], images=mine)
    centroid = seen.mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    pool = [Image.open(io.BytesIO(s.raw["png"])).convert("RGB") for s in image_samples(8, 3)]
    vectors = np.concatenate(
        [
            clip_by_hand(setup["clip"], images=pool),
            clip_by_hand(setup["clip"], texts=["a red house by the sea"]),
        ]
    )
    cosine = vectors @ centroid
    relevance = (cosine - cosine.mean()) / cosine.std()
    candidates = np.sort(np.argsort(-relevance, kind="stable")[:5])
    order = candidates[hand_mmr(relevance[candidates], vectors[candidates], seen, 0.8)]
    expected = 1 / (1 + np.exp(-relevance))
    expected[order] = 2 + (5 - np.arange(5)) / 5
    got = ScoreStore.open(out).column("score").astype(np.float64)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.argsort(-got, kind="stable")[:5].tolist() == order.tolist()
    # diversity changed the order: the picks are not simply the most relevant first
    assert order.tolist() != np.argsort(-relevance, kind="stable")[:5].tolist()
