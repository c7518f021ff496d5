"""Influence through conv LoRA (LoCon) on the tiny Stable Diffusion UNet.

batctl has no diffusion Task yet, so ``DenoiseTask`` below is a minimal real one: the tiny
UNet of ``build_tiny_diffusion`` with peft LoRA injected into its convolutions (3x3 resnet
convs, the stride-2 downsampler, conv_in) and attention projections, and the DreamBooth
denoising MSE per sample, averaged over K = 2 (timestep, noise) draws seeded from the key.
Latents are drawn from the key's seed too (no VAE, to stay fast); the caption goes through the
tiny CLIP text encoder. The K draws of a sample are K consecutive rows of the UNet batch, which
exercises the hooks' k-rows-per-sample path.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings

import pytest
import torch

from batctl.data import open_pool
from batctl.influence.engines import FDEngine, HooksEngine
from batctl.influence.grads import per_sample_grads
from batctl.influence.layers import InfluenceError, discover_layers
from batctl.influence.target import build_target
from batctl.tasks.base import AdapterSettings, Task
from batctl.tiny import build_tiny_diffusion
from tests.test_influence_math import brute_force_grads, brute_force_scores, max_rel, spearman

TARGETS = ("conv_in", "conv1", "conv2", "conv", "to_q", "to_v")


class DenoiseTask(Task):
    """The DreamBooth loss of a tiny UNet with LoCon; ``order="draw"`` lays the K draws out
    draw-major (all samples' first draws, then the second...), which hooks must refuse."""

    family = "diffusion"

    def __init__(self, model_dir, draws=2, size=8, order="sample", lora_bias=False):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.device = torch.device("cpu")
        self.unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").requires_grad_(False)
        self.text = CLIPTextModel.from_pretrained(model_dir / "text_encoder").requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
        self.scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
        self.model = self.unet
        self.draws, self.size, self.order, self.lora_bias = draws, size, order, lora_bias

    def add_adapter(self, adapter, seed):
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", ".*lora_bias=True.*has no bias.*")  # to_q, to_v
        config = LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.rank,
            target_modules=list(adapter.targets),
            use_dora=adapter.kind == "dora",
            lora_bias=self.lora_bias,
        )
        inject_adapter_in_model(config, self.unet)

    def load_adapter(self, path, trainable=False):
        raise NotImplementedError

    def save_adapter(self, path):
        raise NotImplementedError

    def _rows(self, x):
        """Per-sample tensor [B, ...] -> UNet rows [B*K, ...] in this task's draw order."""
        if self.order == "sample":
            return x.repeat_interleave(self.draws, 0)
        return x.repeat(self.draws, *([1] * (x.dim() - 1)))

    def collate(self, samples, role):
        ids = self.tokenizer(
            [s.record["text"] for s in samples],
            padding="max_length",
            max_length=16,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            states = self.text(ids).last_hidden_state
        latents, noise, steps = [], [], []
        for s in samples:
            seed = int(hashlib.sha256(s.key.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            latents.append(torch.randn(4, self.size, self.size, generator=gen))
            noise.append(torch.randn(self.draws, 4, self.size, self.size, generator=gen))
            steps.append(torch.randint(0, 1000, (self.draws,), generator=gen))
        noise = torch.stack(noise)  # [B, K, ...]
        steps = torch.stack(steps)
        if self.order == "sample":
            noise, steps = noise.flatten(0, 1), steps.flatten()
        else:
            noise, steps = noise.transpose(0, 1).flatten(0, 1), steps.T.flatten()
        return {
            "latents": self._rows(torch.stack(latents)),
            "noise": noise,
            "t": steps,
            "states": self._rows(states),
            "n": len(samples),
        }

    def per_sample_loss(self, batch):
        dtype = self.unet.dtype
        noisy = self.scheduler.add_noise(batch["latents"], batch["noise"], batch["t"]).to(dtype)
        pred = self.unet(noisy, batch["t"], encoder_hidden_states=batch["states"].to(dtype)).sample
        mse = (pred - batch["noise"].to(dtype)).pow(2).mean((1, 2, 3))
        if self.order == "sample":
            return mse.reshape(batch["n"], self.draws).mean(1)
        return mse.reshape(self.draws, batch["n"]).mean(0)

    def to(self, dtype):
        self.unet.to(dtype)
        self.text.to(dtype)


WORDS = "a photo of sks dog cat with red hat house by the sea portrait painting".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence_conv")
    model = build_tiny_diffusion(root / "sd")
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(30)]
    (root / "c.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in captions))
    samples = list(open_pool([str(root / "c.jsonl")]))
    adaptation, pool = samples[:6], samples[6:]
    task = DenoiseTask(model, lora_bias=True)  # B gets a bias: hooked bias layers too
    task.add_adapter(AdapterSettings(kind="lora", rank=4, targets=TARGETS), seed=0)
    params = list(task.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=1e-2)
    batch = task.collate(adaptation, "adaptation")
    for _ in range(20):  # a surrogate: a few steps on the adaptation set
        loss = task.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    task.to(torch.float64)
    grads = per_sample_grads(task, adaptation, batch_size=3)
    target = build_target(grads, preconditioner="woodbury")
    pool_grads = brute_force_grads(task, pool, 12, "pool")
    scores, per_layer = brute_force_scores(pool_grads, target)
    return model, task, adaptation, pool, grads, target, scores, per_layer


def test_conv_lora_layers_are_hooked(setup):
    _, task, *_ = setup
    layers = discover_layers(task)
    kinds = {layer.kind for layer in layers.layers}
    assert kinds == {"conv2d", "linear"} and not layers.generic
    roles = {(layer.kind, layer.role) for layer in layers.layers}
    assert ("conv2d", "bias") in roles and ("linear", "bias") in roles
    strided = [m.module for m in layers.modules if m.kind == "conv2d" and m.module.stride != (1, 1)]
    assert strided  # the downsampler's LoRA A has stride 2


def test_conv_per_sample_gradients_equal_brute_force(setup):
    _, task, adaptation, _, grads, *_ = setup
    reference = brute_force_grads(task, adaptation, 3)
    errors = {name: max_rel(grads.grads[name], ref) for name, ref in reference.items() if ref.any()}
    assert len(errors) == len(reference)
    assert max(errors.values()) < 1e-8, errors


def test_conv_hooks_scores_equal_brute_force(setup):
    _, task, _, pool, _, target, expected, expected_layers = setup
    got = HooksEngine(task, target).score(task.collate(pool, "pool"), layer_scores=True)
    assert max_rel(got.scores, expected) < 1e-6
    assert max_rel(got.layer_scores, expected_layers) < 1e-6


def test_conv_fd_scores_in_float32_rank_like_the_exact_ones(setup):
    _, task, adaptation, pool, _, target, expected, _ = setup
    task.to(torch.float32)
    try:
        engine = FDEngine(task, target, calibration=task.collate(adaptation, "adaptation"))
        got = engine.score(task.collate(pool, "pool"))
        rho = spearman(got.scores, expected)
        assert rho > 0.999, (rho, engine.calibration)
    finally:
        task.to(torch.float64)


def test_conv_dora_magnitudes_take_the_exact_generic_path(setup):
    """DoRA on convolutions: magnitudes (shape [1, out, 1, 1]) by vmapped backward / jvp."""
    model, _, adaptation, pool, *_ = setup
    task = DenoiseTask(model)
    task.add_adapter(AdapterSettings(kind="dora", rank=2, targets=("conv1",)), seed=0)
    with torch.no_grad():
        for name, p in task.trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter without training it
    task.to(torch.float64)
    layers = discover_layers(task)
    assert layers.generic and all("magnitude" in x.name for x in layers.generic)
    grads = per_sample_grads(task, adaptation, batch_size=3)
    reference = brute_force_grads(task, adaptation, 3)
    assert max(max_rel(grads.grads[n], r) for n, r in reference.items()) < 1e-8
    target = build_target(grads)
    expected, _ = brute_force_scores(brute_force_grads(task, pool[:8], 8, "pool"), target)
    got = HooksEngine(task, target).score(task.collate(pool[:8], "pool"))
    assert max_rel(got.scores, expected) < 1e-6


def test_interleaved_draws_are_refused(setup):
    model, task, adaptation, *_ = setup
    draw_major = DenoiseTask(model, order="draw")
    draw_major.unet = draw_major.model = task.unet  # the same adapted UNet, other row order
    draw_major.text = task.text
    with pytest.raises(InfluenceError, match="other samples' rows"):
        per_sample_grads(draw_major, adaptation[:3], batch_size=3)
