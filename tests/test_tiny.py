"""batctl.tiny: the tiny offline backbones, loaded and run with the real libraries."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batctl.tiny import (
    build_tiny_clip_tokenizer,
    build_tiny_diffusion,
    build_tiny_lm,
    build_tiny_lm_tokenizer,
)

MAX_DIR_BYTES = 5_000_000
PROMPT = "a photo of sks dog"


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def file_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def offline():
    """HF_HUB_OFFLINE=1 and, to be sure, no socket may connect anywhere."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, offline) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm")


@pytest.fixture(scope="module")
def lm(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    return model, AutoTokenizer.from_pretrained(lm_dir)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, offline) -> Path:
    return build_tiny_diffusion(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="module")
def pipe(sd_dir):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(sd_dir)
    p.set_progress_bar_config(disable=True)
    return p


# --------------------------------------------------------------------------------------------
# module


def test_import_is_light():
    code = (
        "import sys, batctl.tiny; "
        "heavy = {'torch', 'transformers', 'diffusers', 'tokenizers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# LM


def test_lm_loads_offline_and_forwards(lm_dir, lm):
    model, tok = lm
    assert isinstance(lm_dir, Path)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.vocab_size == len(tok) == 512
    assert tok.eos_token_id == cfg.eos_token_id == model.generation_config.eos_token_id
    assert tok.bos_token_id == cfg.bos_token_id and tok.pad_token_id == cfg.pad_token_id
    assert tok.unk_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4

    batch = tok(
        ["Give three tips for staying healthy.", "def f(x): return x"],
        padding=True,
        return_tensors="pt",
    )
    assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()  # LLaMA-style: <s> in front
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], cfg.vocab_size)
    assert torch.isfinite(out.loss)
    gen = model.generate(**tok("hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] >= 2

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names


def test_lm_small(lm_dir, lm):
    # The forward-pass time (< 100 ms) is measured by benchmarks/tiny_backbones.py, not here:
    # a timed test fails whenever another process shares the two cores.
    assert dir_bytes(lm_dir) < MAX_DIR_BYTES


def test_lm_seeded(lm_dir, tmp_path):
    again = file_bytes(build_tiny_lm(tmp_path / "again"))
    assert again == file_bytes(lm_dir)
    other = file_bytes(build_tiny_lm(tmp_path / "other", seed=1))
    assert other["model.safetensors"] != again["model.safetensors"]
    assert other["tokenizer.json"] == again["tokenizer.json"]  # the tokenizer ignores the seed


def test_lm_scales(tmp_path):
    from safetensors import safe_open

    d = build_tiny_lm(tmp_path / "bench", hidden_size=256, num_layers=4)
    with safe_open(d / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (256, 256)
    assert shapes["model.layers.3.mlp.gate_proj.weight"] == (1024, 256)
    assert not any(k.startswith("model.layers.4.") for k in shapes)

    with pytest.raises(ValueError, match="divide"):
        build_tiny_lm(tmp_path / "bad", hidden_size=64, num_heads=5)


def test_lm_vocab_size(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert len(build_tiny_lm_tokenizer(300)) == 300
    # More than the embedded text has merges for: the model's embedding is padded, as real ones are.
    d = build_tiny_lm(tmp_path / "v", vocab_size=1024, num_layers=1)
    tok = AutoTokenizer.from_pretrained(d)
    assert AutoConfig.from_pretrained(d).vocab_size == 1024 > len(tok) > 512
    with pytest.raises(ValueError):
        build_tiny_lm_tokenizer(100)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_lm_tokenizer_round_trips_any_text(lm, text):
    _, tok = lm
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if "<unk>" not in text:
        assert tok.unk_token_id not in ids


def test_lm_tokenizer_known_texts(lm):
    _, tok = lm
    for text in [
        "Ünïcödé 日本語 🤖🧪 ﬁ",
        "def f(x):\n\treturn x ** 2  # ok\r\n",
        "",
        "  lead",
        "\x00\x7f",
    ]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("the capital of France")["input_ids"]) < len("the capital of France")  # merges


def test_lm_lora(lm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tok = lm
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path).eval()
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * model.config.num_hidden_layers  # A and B, q and v, per layer
    batch = tok(["a photo of a dog"], return_tensors="pt")
    out = peft_model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    with torch.no_grad():
        ref = model(**batch).logits
    torch.testing.assert_close(out.logits.detach(), ref)  # LoRA B starts at zero


# --------------------------------------------------------------------------------------------
# diffusion


def test_diffusion_loads_offline(sd_dir, pipe):
    assert dir_bytes(sd_dir) < MAX_DIR_BYTES
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert pipe.vae.config.scaling_factor > 0
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (sd_dir / "tokenizer").iterdir()}


def test_diffusion_forward_and_generate(pipe):
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    ids = tok(
        [PROMPT, "a house"],
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (2, 77)
    g = torch.Generator().manual_seed(0)
    s = unet.config.sample_size
    latents = torch.randn(2, 4, s, s, generator=g)
    with torch.no_grad():
        hidden = te(ids)[0]
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert hidden.shape == (2, 77, te.config.hidden_size)
    assert out.shape == latents.shape
    assert decoded.shape == (2, 3, 32, 32)

    from PIL import Image

    def generate():
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPT, num_inference_steps=2, generator=gen).images[0]

    t = time.perf_counter()
    image = generate()
    assert time.perf_counter() - t < 3.0
    assert isinstance(image, Image.Image) and image.size == (32, 32)
    assert generate().tobytes() == image.tobytes()  # seeded generation is reproducible


def test_diffusion_seeded(sd_dir, tmp_path):
    weights = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    again = file_bytes(build_tiny_diffusion(tmp_path / "again"))
    assert again == file_bytes(sd_dir)
    other = file_bytes(build_tiny_diffusion(tmp_path / "other", seed=1))
    assert all(other[w] != again[w] for w in weights)
    assert other["tokenizer/tokenizer.json"] == again["tokenizer/tokenizer.json"]


def test_diffusion_resolution(tmp_path):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(build_tiny_diffusion(tmp_path / "r", resolution=48))
    p.set_progress_bar_config(disable=True)
    image = p("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 48)
    with pytest.raises(ValueError):
        build_tiny_diffusion(tmp_path / "bad", resolution=30)


def test_unet_lora_and_conv_targets(sd_dir):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").eval()
    names = {n for n, _ in unet.named_modules()}
    assert any(n.endswith("attn2.to_k") for n in names)  # cross-attention
    for suffix in ("to_q", "to_k", "to_v", "to_out.0"):
        assert any(n.endswith(suffix) for n in names)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules()) >= 10  # LoCon targets

    s = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, s, s, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 10, encoder_hidden_states=ctx).sample

    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        )
    )
    lora = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert any("conv1.lora_A" in n for n in lora)
    out = unet(x, 10, encoder_hidden_states=ctx).sample
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    torch.testing.assert_close(out.detach(), ref)  # gaussian init: A random, B zero


@pytest.fixture(scope="module")
def clip_tok():
    return build_tiny_clip_tokenizer()


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=100))
def test_clip_tokenizer_has_no_unknowns(clip_tok, text):
    tok = clip_tok
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if "<|endoftext|>" not in text.lower():  # unk is <|endoftext|>, as in SD 1.x
        assert tok.unk_token_id not in ids
    assert all(0 <= i < len(tok) for i in ids)


def test_clip_tokenizer_layout(clip_tok):
    tok = clip_tok
    vocab = tok.get_vocab()
    assert vocab["!"] == 0  # CLIP's byte order
    assert vocab["<|startoftext|>"] == len(tok) - 2 and vocab["<|endoftext|>"] == len(tok) - 1
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    pieces = tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"])
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    assert "photo</w>" in pieces and "dog</w>" in pieces
    assert tok.decode(tok("A Photo of SKS dog")["input_ids"], skip_special_tokens=True) == PROMPT
