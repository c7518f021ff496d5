"""The diffusion family through every stage: DreamBooth images + a LAION-layout tar pool."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from batctl.scorestore import SCORED, UNREADABLE, ScoreStore
from batctl.tiny import build_tiny_diffusion

PROMPT = "a photo of sks dog"


def noisy_square(rng, channel):
    pixels = rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)
    pixels[..., channel] += 200
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    rng = np.random.default_rng(0)
    (root / "instance").mkdir()
    for i in range(4):
        noisy_square(rng, 0).save(root / "instance" / f"dog{i}.png")
    with wds.TarWriter(str(root / "laion-000.tar")) as sink:
        for i in range(12):
            buf = io.BytesIO()
            noisy_square(rng, 0 if i % 2 == 0 else 2).save(buf, format="JPEG")
            sink.write(
                {
                    "__key__": f"{i:09d}",
                    "jpg": buf.getvalue() if i != 5 else b"\xff\xd8 not really a jpeg",
                    "txt": (b"a red square" if i % 2 == 0 else b"a blue square"),
                    "json": json.dumps({"url": f"http://example.invalid/{i}.jpg"}).encode(),
                }
            )
    return {"root": root, "sd": build_tiny_diffusion(root / "sd", seed=0)}


def test_surrogate_score_select_train_eval_on_a_tiny_stable_diffusion(cli, world, tmp_path):
    sd, root = world["sd"], world["root"]
    common = ["--model", sd, "--data", root / "instance", "--instance-prompt", PROMPT]
    result = cli(
        "surrogate",
        *common,
        "--out",
        tmp_path / "sur",
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--adapter",
        "locon",
    )
    assert result.exit_code == 0, result.stderr
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "pytorch_lora_weights.safetensors",
        "loss.png",
    ):
        assert (tmp_path / "sur" / name).is_file()

    result = cli(
        "score",
        "--method",
        "influence",
        *common,
        "--surrogate",
        tmp_path / "sur",
        "--pool",
        root / "laion-{000..000}.tar",
        "--out",
        tmp_path / "scores",
        "--chunk-size",
        "4",
        "--loss-draws",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"]["unreadable"] == 1 and summary["status"]["scored"] == 11
    store = ScoreStore.open(tmp_path / "scores")
    status = store.column("status")
    assert list(store.column("key")[status == UNREADABLE]) == ["000000005"]
    assert np.isfinite(store.column("score")[status == SCORED]).all()

    result = cli(
        "select", "--scores", tmp_path / "scores", "--gamma", "0.5", "--out", tmp_path / "sel"
    )
    assert result.exit_code == 0, result.stderr
    chosen = tmp_path / "sel" / "gamma-0.5"
    assert {"samples.tar", "selection.json", "contact_sheet.png", "manifest.json"} <= {
        p.name for p in chosen.iterdir()
    }
    assert len(json.loads((chosen / "selection.json").read_text())["chosen"]) == 4  # n = 4, γ = 0.5

    result = cli(
        "train",
        *common,
        "--selection",
        chosen,
        "--out",
        tmp_path / "bat",
        "--steps",
        "2",
        "--adapter",
        "locon",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["backbone_samples"] == 4

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks dog\na photo of sks dog on the beach\n")
    eval_args = [
        "--adapter",
        tmp_path / "bat",
        "--reference",
        tmp_path / "sur",
        "--prompts",
        prompts,
    ]
    result = cli("eval", *common, *eval_args, "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.stderr
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"]
    assert set(rows) == {"backbone", "bat"} and np.isfinite(rows["bat"]["heldout_loss"])
    assert (tmp_path / "ev" / "images-bat.png").is_file() and (
        tmp_path / "ev" / "images-backbone.png"
    ).is_file()
    assert "no --dino given" in (tmp_path / "ev" / "report.md").read_text()


def test_adaptation_images_need_an_instance_prompt(cli, world, tmp_path):
    result = cli(
        "surrogate",
        "--model",
        world["sd"],
        "--data",
        world["root"] / "instance",
        "--out",
        tmp_path / "o",
        "--steps",
        "1",
    )
    assert result.exit_code == 2 and "--instance-prompt" in result.stderr


def test_text_encoder_lora_through_surrogate_score_and_train(cli, world, tmp_path):
    from safetensors import safe_open

    sd, root = world["sd"], world["root"]
    common = ["--model", sd, "--data", root / "instance", "--instance-prompt", PROMPT]
    te = ["--train-text-encoder", "--steps", "2", "--lr", "1e-3"]
    result = cli("surrogate", *common, *te, "--out", tmp_path / "sur")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "sur" / "text_encoder" / "adapter_model.safetensors").is_file()
    with safe_open(str(tmp_path / "sur" / "pytorch_lora_weights.safetensors"), "pt") as fh:
        assert {k.split(".", 1)[0] for k in fh.keys()} == {"unet", "text_encoder"}

    result = cli(
        "score",
        "--method",
        "influence",
        *common,
        "--surrogate",
        tmp_path / "sur",
        "--pool",
        root / "laion-000.tar",
        "--out",
        tmp_path / "scores",
        "--loss-draws",
        "2",
    )
    assert result.exit_code == 0, result.stderr
    with safe_open(str(tmp_path / "scores" / "target.safetensors"), "pt") as fh:
        assert any(k.startswith("r/text_encoder.") for k in fh.keys())
    store = ScoreStore.open(tmp_path / "scores")
    assert np.isfinite(store.column("score")[store.column("status") == SCORED]).all()

    result = cli(
        "train",
        *common,
        *te,
        "--init",
        "surrogate",
        "--surrogate",
        tmp_path / "sur",
        "--out",
        tmp_path / "ad",
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "ad" / "text_encoder" / "adapter_config.json").is_file()
