"""The diffusion Task (batctl.tasks.diffusion) on the tiny Stable Diffusion pipeline.

Real libraries throughout (diffusers, transformers, peft), no mocks: per-sample losses that
depend only on the sample, the DreamBooth instance prompt, LoRA (alpha != rank) / DoRA / LoCon
adapters whose saved files load in peft and in diffusers to the same UNet, and the hooks score
engine against brute-force per-sample autograd through this task.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from batctl.errors import UsageError
from batctl.influence.engines import HooksEngine
from batctl.influence.grads import per_sample_grads
from batctl.influence.target import build_target
from batctl.tasks import load_task
from batctl.tasks.base import AdapterSettings, TaskSettings
from batctl.tasks.diffusion import DIFFUSERS_WEIGHTS, DiffusionTask, draw_seed, resize_and_crop
from batctl.tiny import build_tiny_diffusion
from tests.diffusion_fixtures import image, image_samples
from tests.test_influence_math import brute_force_grads, brute_force_scores, max_rel

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_diffusion(tmp_path_factory.mktemp("diffusion") / "sd", resolution=32)


@pytest.fixture(scope="module")
def samples():
    return image_samples(8, seed=0)


def make_task(model, **kwargs) -> DiffusionTask:
    settings = {"resolution": 32, "loss_draws": 2, "instance_prompt": PROMPT, "device": "cpu"}
    settings.update(kwargs)
    return DiffusionTask(TaskSettings(model=str(model), **settings))


def train(task, samples, steps=3, lr=1e-2):
    """A few Adam steps on the adaptation loss, so every adapter tensor moves off its init."""
    params = list(task.trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=lr)
    batch = task.collate(samples, "adaptation")
    task.model.train()
    for _ in range(steps):
        loss = task.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    task.model.eval()


# ----------------------------------------------------------------------------- loading, batches


def test_load_task_detects_the_pipeline_and_reads_its_config(tiny):
    task = load_task(TaskSettings(model=str(tiny), resolution=32, loss_draws=3, device="cpu"))
    assert isinstance(task, DiffusionTask) and task.family == "diffusion"
    assert task.model.unet is task.unet and task.model.text_encoder is task.text_encoder
    assert not task.trainable_parameters() and not task.text_encoder_adapted()
    assert task.vae_scale_factor == 2 and task.latent_size == 16  # the tiny VAE's, not SD's 8
    settings = task.loss_settings()
    assert settings["prediction_type"] == "epsilon" and settings["loss_draws"] == "3"
    assert settings["scheduler"] == "DDPMScheduler" and settings["resolution"] == "32"
    native = DiffusionTask(TaskSettings(model=str(tiny), resolution=None, device="cpu"))
    assert native.resolution == 32  # unet.sample_size x vae_scale_factor


def test_resize_then_center_crop():
    # Left third red, middle third green, right third blue, 96 x 32: the crop keeps the middle.
    img = image(0, 96, 32)
    for x0, color in ((0, (255, 0, 0)), (32, (0, 255, 0)), (64, (0, 0, 255))):
        img.paste(color, (x0, 0, x0 + 32, 32))
    out = resize_and_crop(img, 16)
    assert out.size == (16, 16)
    assert {out.getpixel((x, y)) for x in range(2, 14) for y in range(16)} == {(0, 255, 0)}
    assert resize_and_crop(image(1, 24, 50), 16).size == (16, 16)


def test_a_samples_loss_is_the_same_alone_in_any_batch_and_any_order(tiny, samples):
    task = make_task(tiny)
    task.add_adapter(AdapterSettings(kind="lora", rank=4), seed=0)
    task.model.eval()  # as score and eval run it
    with torch.no_grad():
        for name, p in task.trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a non-zero adapter
        together = task.per_sample_loss(task.collate(samples, "pool"))
        order = [5, 2, 7, 0, 3, 1, 6, 4]
        shuffled = task.per_sample_loss(task.collate([samples[i] for i in order], "pool"))
        alone = torch.cat([task.per_sample_loss(task.collate([s], "pool")) for s in samples])
    assert together.shape == (8,) and together.dtype == torch.float32
    assert torch.isfinite(together).all() and together.unique().numel() == 8
    assert (together[order] - shuffled).abs().max() < 1e-6
    assert (together - alone).abs().max() < 1e-6
    # The draws come from the key alone: the first draw of K = 2 is the draw of K = 1.
    t2, e2 = task.draws(samples[0].key)
    one = make_task(tiny, loss_draws=1)
    t1, e1 = one.draws(samples[0].key)
    assert torch.equal(t1, t2[:1]) and torch.equal(e1, e2[:1])
    assert not torch.equal(t2, task.draws(samples[1].key)[0])
    assert draw_seed("a") == draw_seed("a") != draw_seed("b")


def test_training_draws_fresh_noise_each_step_from_the_seeded_rng(tiny, samples):
    task = make_task(tiny)
    task.add_adapter(AdapterSettings(kind="lora", rank=4), seed=0)
    task.model.train()
    torch.manual_seed(0)
    first, second = task.draws(samples[0].key), task.draws(samples[0].key)
    assert not torch.equal(first[1], second[1])  # a new (timestep, noise) pair every step
    torch.manual_seed(0)
    assert torch.equal(task.draws(samples[0].key)[1], first[1])  # but reproducible per seed


def test_loss_is_the_denoising_mse_of_the_scheduler_target(tiny, samples):
    """Recomputed here from the pieces: epsilon and v-prediction targets."""
    for prediction in ("epsilon", "v_prediction"):
        task = make_task(tiny)
        task.scheduler.register_to_config(prediction_type=prediction)
        task.prediction_type = prediction
        batch = task.collate(samples[:2], "pool")
        with torch.no_grad():
            got = task.per_sample_loss(batch)
            acp = task.scheduler.alphas_cumprod
            expected = []
            for i, sample in enumerate(samples[:2]):
                steps, noise = task.draws(sample.key)
                x0 = batch["latents"][i : i + 1].expand(len(steps), -1, -1, -1)
                a = acp[steps].sqrt().view(-1, 1, 1, 1)
                s = (1 - acp[steps]).sqrt().view(-1, 1, 1, 1)
                states = batch["states"][i : i + 1].expand(len(steps), -1, -1)
                pred = task.unet(a * x0 + s * noise, steps, encoder_hidden_states=states).sample
                target = noise if prediction == "epsilon" else a * noise - s * x0
                expected.append((pred - target).pow(2).mean())
        assert (got - torch.stack(expected)).abs().max() < 1e-5, prediction


def test_adaptation_samples_take_the_instance_prompt(tiny, samples):
    task = make_task(tiny)
    states = task.collate(samples[:2], "adaptation")["states"]
    assert samples[0].record["caption"] != samples[1].record["caption"]
    assert torch.equal(states[0], states[1])  # both captioned with the instance prompt
    pool = task.collate(samples[:2], "pool")["states"]
    assert not torch.equal(pool[0], pool[1])


def test_adaptation_without_instance_prompt_is_a_usage_error(tiny, samples):
    task = make_task(tiny, instance_prompt=None)
    with pytest.raises(UsageError, match="--instance-prompt"):
        task.collate(samples[:1], "adaptation")
    task.collate(samples[:1], "pool")  # pool samples keep their own captions


def test_unknown_targets_are_a_usage_error(tiny):
    task = make_task(tiny)
    with pytest.raises(UsageError, match="--targets q_proj.*to_q"):
        task.add_adapter(AdapterSettings(kind="lora", targets=("q_proj",)), seed=0)


def test_half_precision_backbone_keeps_an_fp32_adapter_and_loss(tiny, samples):
    task = make_task(tiny, dtype="bf16")
    task.add_adapter(AdapterSettings(kind="locon", rank=2), seed=0)
    assert {p.dtype for p in task.trainable_parameters().values()} == {torch.float32}
    assert task.unet.conv_in.weight.dtype == torch.bfloat16
    loss = task.per_sample_loss(task.collate(samples[:2], "pool"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(p.grad is not None for p in task.trainable_parameters().values())


# ----------------------------------------------------------------------------- adapters


ADAPTERS = {
    "lora": AdapterSettings(kind="lora", rank=4, alpha=8),
    "dora": AdapterSettings(kind="dora", rank=4, alpha=2),
    "locon": AdapterSettings(kind="locon", rank=4, alpha=8),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_saved_adapter_loads_the_same_in_batctl_peft_and_diffusers(tiny, samples, tmp_path, kind):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel
    from safetensors import safe_open

    settings = ADAPTERS[kind]
    task = make_task(tiny)
    task.add_adapter(settings, seed=0)
    names = list(task.trainable_parameters())
    if kind == "locon":
        assert any(".conv1." in n for n in names) and any("conv_shortcut" in n for n in names)
        assert any("downsamplers.0.conv." in n for n in names)
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n in names)
    train(task, samples[:4])
    task.save_adapter(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", DIFFUSERS_WEIGHTS} <= files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == settings.alpha
    with safe_open(str(tmp_path / "adapter" / DIFFUSERS_WEIGHTS), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.") for k in fh.keys())
    assert meta["unet.lora_alpha"] == settings.alpha and meta["unet.use_dora"] == (kind == "dora")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([7, 640])
    states = torch.randn(2, 77, 32, generator=gen)

    def run(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=states).sample

    trained = run(task.unet)
    mine = make_task(tiny)
    bare = run(mine.unet)
    mine.load_adapter(tmp_path / "adapter")
    ours = run(mine.unet)
    assert (trained - ours).abs().max() < 1e-6
    assert (ours - bare).abs().max() > 1e-3  # the adapter does something

    fresh = UNet2DConditionModel.from_pretrained(tiny / "unet")
    peft_out = run(PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")))
    assert (peft_out - ours).abs().max() < 1e-5

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(str(tmp_path / "adapter"), adapter_name="batctl")
    diffusers_out = run(pipe.unet)
    assert (diffusers_out - ours).abs().max() < 1e-5


TEXT_ENCODER_ADAPTERS = {
    "lora": AdapterSettings(kind="lora", rank=4, alpha=8, text_encoder=True),
    "dora": AdapterSettings(kind="dora", rank=2, alpha=4, text_encoder=True),
}


@pytest.mark.parametrize("kind", list(TEXT_ENCODER_ADAPTERS))
def test_text_encoder_adapter_loads_the_same_in_batctl_peft_and_diffusers(
    tiny, samples, tmp_path, kind
):
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    task = make_task(tiny)
    task.add_adapter(TEXT_ENCODER_ADAPTERS[kind], seed=0)
    assert task.text_encoder_adapted()
    names = list(task.trainable_parameters())
    assert any(n.startswith("text_encoder.") and ".q_proj.lora_A." in n for n in names)
    assert any(n.startswith("unet.") for n in names)
    batch = task.collate(samples[:2], "adaptation")
    assert "ids" in batch and "states" not in batch  # encoded inside the loss, with grad
    train(task, samples[:4])
    task.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "text_encoder" / "adapter_config.json").read_text())
    assert config["r"] == TEXT_ENCODER_ADAPTERS[kind].rank and config["lora_alpha"] != config["r"]
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    with safe_open(str(tmp_path / "adapter" / DIFFUSERS_WEIGHTS), "pt") as fh:
        prefixes = {k.split(".", 1)[0] for k in fh.keys()}
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert prefixes == {"unet", "text_encoder"}
    assert meta["text_encoder.lora_alpha"] == TEXT_ENCODER_ADAPTERS[kind].alpha

    ids = task.tokenizer(
        ["a photo of sks dog", "red"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids

    def encode(text_encoder):
        with torch.no_grad():
            return text_encoder(ids)[0]

    trained = encode(task.text_encoder)
    mine = make_task(tiny)
    plain = encode(mine.text_encoder)
    mine.load_adapter(tmp_path / "adapter")
    assert mine.text_encoder_adapted()
    ours = encode(mine.text_encoder)
    assert (trained - ours).abs().max() < 1e-6
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something

    fresh = CLIPTextModel.from_pretrained(tiny / "text_encoder")
    peft_out = encode(PeftModel.from_pretrained(fresh, str(tmp_path / "adapter" / "text_encoder")))
    assert (peft_out - ours).abs().max() < 1e-5

    pipe = StableDiffusionPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(str(tmp_path / "adapter"), adapter_name="batctl")
    assert (encode(pipe.text_encoder) - ours).abs().max() < 1e-5
    # And the whole conditional UNet output, text encoder included, agrees with batctl's loss.
    mine.model.eval()
    with torch.no_grad():
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([3, 500])
        ref = pipe.unet(x, t, encoder_hidden_states=encode(pipe.text_encoder)).sample
        got = mine.unet(x, t, encoder_hidden_states=ours).sample
    assert (ref - got).abs().max() < 1e-5


def test_text_encoder_adapter_is_removed_and_replaced(tiny, samples, tmp_path):
    task = make_task(tiny)
    task.add_adapter(TEXT_ENCODER_ADAPTERS["lora"], seed=0)
    task.save_adapter(tmp_path / "both")
    task.add_adapter(ADAPTERS["lora"], seed=0)  # a UNet-only adapter replaces both
    assert not task.text_encoder_adapted()
    assert not any(n.startswith("text_encoder.") for n in task.trainable_parameters())
    assert "states" in task.collate(samples[:1], "pool")
    task.load_adapter(tmp_path / "both", trainable=True)
    assert any(n.startswith("text_encoder.") for n in task.trainable_parameters())
    task.remove_adapter()
    assert not any("lora" in n for n, _ in task.model.named_modules())


def test_hooks_scores_with_a_text_encoder_adapter_equal_brute_force(tiny, samples):
    task = make_task(tiny)
    task.add_adapter(AdapterSettings(kind="lora", rank=2, alpha=4, text_encoder=True), seed=0)
    adaptation, pool = samples[:4], samples[4:]
    train(task, adaptation, steps=3)
    task.model.to(torch.float64)  # UNet and text encoder (both adapted); the VAE stays fp32
    grads = per_sample_grads(task, adaptation, batch_size=2)  # verify=True: rows per sample
    target = build_target(grads, preconditioner="woodbury")
    assert any(name.startswith("text_encoder.") for name in target.r)
    expected, expected_layers = brute_force_scores(brute_force_grads(task, pool, 4, "pool"), target)
    got = HooksEngine(task, target).score(task.collate(pool, "pool"), layer_scores=True)
    assert max_rel(got.scores, expected) < 1e-6
    assert max_rel(got.layer_scores, expected_layers) < 1e-6
    text = [i for i, name in enumerate(target.layers) if name.startswith("text_encoder.")]
    assert float(got.layer_scores[:, text].abs().max()) > 0  # the text encoder's layers count


def test_load_adapter_trainable_and_remove(tiny, samples, tmp_path):
    task = make_task(tiny)
    task.add_adapter(ADAPTERS["lora"], seed=3)
    train(task, samples[:2], steps=1)
    task.save_adapter(tmp_path / "a")
    before = task.adapter_state()
    other = make_task(tiny)
    other.load_adapter(tmp_path / "a", trainable=True)
    after = other.adapter_state()
    assert list(before) == list(after)
    assert all(torch.equal(before[n], after[n]) for n in before)
    other.load_adapter(tmp_path / "a")  # replaces, does not stack
    assert not other.trainable_parameters()
    other.remove_adapter()
    assert other.model.unet is other.unet and not any(
        "lora" in n for n, _ in other.model.named_modules()
    )


def test_adapter_init_is_seeded(tiny):
    a, b = make_task(tiny), make_task(tiny)
    a.add_adapter(ADAPTERS["locon"], seed=5)
    b.add_adapter(ADAPTERS["locon"], seed=5)
    sa, sb = a.adapter_state(), b.adapter_state()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    b.add_adapter(ADAPTERS["locon"], seed=6)  # replaces the first adapter
    assert not all(torch.equal(sa[n], v) for n, v in b.adapter_state().items())


# ----------------------------------------------------------------------------- influence


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_hooks_scores_equal_brute_force_through_the_task(tiny, samples, kind):
    task = make_task(tiny)
    task.add_adapter(AdapterSettings(kind=kind, rank=2, alpha=4), seed=0)
    adaptation, pool = samples[:4], samples[4:]
    train(task, adaptation, steps=3)
    task.unet.to(torch.float64)  # the adapted UNet; VAE and text encoder stay fp32 (constants)
    grads = per_sample_grads(task, adaptation, batch_size=2)  # verify=True: rows per sample
    target = build_target(grads, preconditioner="woodbury")
    expected, expected_layers = brute_force_scores(brute_force_grads(task, pool, 4, "pool"), target)
    got = HooksEngine(task, target).score(task.collate(pool, "pool"), layer_scores=True)
    assert got.scores.dtype == torch.float64 and math.isfinite(float(got.scores.abs().max()))
    assert max_rel(got.scores, expected) < 1e-6
    assert max_rel(got.layer_scores, expected_layers) < 1e-6


def test_flip_mirrors_the_images_chosen_by_key_and_only_those(tiny, samples):
    from batctl.tasks.diffusion import draw_seed

    plain, flipped = make_task(tiny), make_task(tiny, flip=True)
    a = plain.collate(samples, "pool")["latents"]
    b = flipped.collate(samples, "pool")["latents"]
    chosen = [bool(draw_seed("flip:" + s.key) & 1) for s in samples]
    assert any(chosen) and not all(chosen)  # the fixture has both kinds
    for i, mirrored in enumerate(chosen):
        same = torch.equal(a[i], b[i])
        assert same != mirrored, samples[i].key


@pytest.mark.parametrize("kind", ["lora", "locon"])
def test_fd_scores_rank_like_brute_force_through_the_task(tiny, samples, kind):
    from batctl.influence.engines import FDEngine

    task = make_task(tiny)
    task.add_adapter(AdapterSettings(kind=kind, rank=2, alpha=4), seed=0)
    adaptation, pool = samples[:4], samples
    train(task, adaptation, steps=3)
    task.model.eval()
    target = build_target(
        per_sample_grads(task, adaptation, batch_size=2), preconditioner="woodbury"
    )
    expected, _ = brute_force_scores(brute_force_grads(task, pool, 4, "pool"), target)
    fd = FDEngine(task, target, calibration=task.collate(adaptation, "adaptation"))
    got = fd.score(task.collate(pool, "pool")).scores  # float32 model, two forwards
    ranks = [torch.argsort(torch.argsort(x)).double() for x in (got, expected.double())]
    assert torch.corrcoef(torch.stack(ranks))[0, 1] > 0.999  # Spearman's rho
