"""Text-to-image diffusion (Stable Diffusion 1.x / 2.x) with peft LoRA / DoRA / LoCon adapters
on the UNet and, optionally, LoRA / DoRA on the CLIP text encoder (DESIGN §4, diffusion).

Samples are an image and a caption (``record["image"]``, a PIL RGB image, and
``record["caption"]``). Adaptation samples are captioned with the DreamBooth instance prompt
(``TaskSettings.instance_prompt``, the ``--instance-prompt`` flag), pool samples keep their own
captions. ``collate`` resizes the shorter side to ``resolution`` (bilinear, as the diffusers
DreamBooth script's ``transforms.Resize``), center-crops to ``resolution`` x ``resolution``,
maps pixels to [-1, 1], VAE-encodes to latents (the latent distribution's mean, times the VAE's
``scaling_factor``: deterministic) and runs the frozen CLIP text encoder on the captions (77
tokens, padded and truncated as the pipeline does). When the text encoder carries an adapter
(``--train-text-encoder``), collate keeps the token ids instead and ``per_sample_loss`` runs the
text encoder itself, so its LoRA layers see the gradient (one row per sample; the states are then
repeated for the K draws).

The per-sample loss is DreamBooth's denoising MSE, averaged over K = ``loss_draws`` (timestep,
noise) draws. Every draw comes from a ``torch.Generator`` seeded with a hash of the sample's key,
drawn draw by draw (t_1, ε_1, t_2, ε_2, ...), so a sample's loss depends on nothing but the
sample: not on the batch, its order, the shard or the device; and the first k draws of K are the
draws of k. The target is ε (``prediction_type="epsilon"``) or the velocity
α_t ε − σ_t x_0 (``"v_prediction"``), as the pipeline's scheduler config says. The UNet runs on
B·K rows laid out sample-major (sample i's K draws are rows iK .. iK+K-1), which is what the
hooks score engine needs (see ``batctl.influence.capture``).

Saved adapters: peft's ``adapter_model.safetensors`` + ``adapter_config.json``
(``PeftModel.from_pretrained(unet, DIR)``; the text encoder's in ``DIR/text_encoder/``) and
diffusers' ``pytorch_lora_weights.safetensors`` (``StableDiffusionPipeline.load_lora_weights(DIR)``)
holding the same tensors under ``unet.`` and ``text_encoder.`` with each part's ``LoraConfig`` as
its ``lora_adapter_metadata``, so diffusers rebuilds exactly the peft layers batctl trained
(``lora_alpha`` != rank, DoRA magnitudes, LoCon convolutions).

``task.model`` is an ``AdaptableParts`` module holding the UNet and the text encoder, so the
training loop, the score engines' layer discovery and eval's mode switches see every adapted
parameter of both through one module tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from batctl.data import Sample
from batctl.errors import BadSampleError, BatctlError, UsageError
from batctl.tasks.base import AdapterSettings, Role, Task, TaskSettings, pick_device, torch_dtype

log = logging.getLogger("batctl.tasks.diffusion")

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""LoRA / DoRA default: the attention projections of every (self and cross) attention."""

CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")
"""LoCon adds the convolutions of the ResNet blocks (3x3 ``conv1``/``conv2``, the 1x1
``conv_shortcut`` where channels change) and of the down/upsamplers (``downsamplers.0.conv``,
``upsamplers.0.conv``): LyCORIS' LoCon scope (ResnetBlock2D, Downsample2D, Upsample2D)."""

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""--train-text-encoder: the CLIP attention projections (diffusers' DreamBooth LoRA script's)."""

TEXT_ENCODER_DIR = "text_encoder"
"""Subdirectory of a saved adapter holding the text encoder's peft adapter."""

ADAPTER_KINDS = ("lora", "dora", "locon")
PEFT_PREFIX = "base_model.model."
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
)
"""The LoraConfig fields stored as the diffusers file's adapter metadata."""


def draw_seed(key: str) -> int:
    """The seed of a sample's (timestep, noise) draws: the first 8 bytes of sha256(key)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (2**63 - 1)


def resize_and_crop(image: Any, size: int, flip: bool = False) -> Any:
    """Shorter side to ``size`` (bilinear), then a center crop to ``size`` x ``size``.

    The arithmetic of torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images, which
    the diffusers DreamBooth script uses, without depending on torchvision.
    """
    from PIL import Image

    w, h = image.size
    if (w, h) != (size, size):
        if w <= h:
            ow, oh = size, int(size * h / w)
        else:
            ow, oh = int(size * w / h), size
        if (ow, oh) != (w, h):
            image = image.resize((ow, oh), Image.BILINEAR)
        left = int(round((ow - size) / 2.0))
        top = int(round((oh - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def quiet_diffusion_libraries() -> None:
    """transformers' and diffusers' per-load progress bars and chatter off (see lm.quiet_libraries)."""
    from diffusers.utils import logging as df_logging

    from batctl.tasks.lm import quiet_libraries

    quiet_libraries()
    df_logging.disable_progress_bar()


class AdaptableParts(torch.nn.Module):
    """The pipeline parts an adapter may live on: ``unet`` and ``text_encoder`` (the task's
    ``model``). Each is the bare frozen part or a ``PeftModel`` wrapping it; no forward of its
    own (``DiffusionTask.per_sample_loss`` is the forward)."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def bare(part: torch.nn.Module) -> torch.nn.Module:
    """The part without its PeftModel wrapper (peft injects its layers into the part itself)."""
    from peft import PeftModel

    return part.get_base_model() if isinstance(part, PeftModel) else part


class DiffusionTask(Task):
    """A Stable Diffusion 1.x/2.x pipeline's parts, frozen; one peft adapter on the UNet (and the
    text encoder, with ``AdapterSettings.text_encoder``)."""

    family = "diffusion"

    def __init__(self, settings: TaskSettings) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        quiet_diffusion_libraries()
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.loss_draws < 1:
            raise UsageError(f"--loss-draws {settings.loss_draws}: must be at least 1")
        if settings.resolution is not None and (settings.resolution < 8 or settings.resolution % 8):
            raise UsageError(
                f"--resolution {settings.resolution}: must be a positive multiple of 8"
            )
        dtype = torch_dtype(settings, self.device)
        model = settings.model
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(
                model, subfolder="text_encoder", dtype=dtype, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(
                model, subfolder="vae", torch_dtype=dtype, use_safetensors=True
            )
            unet = UNet2DConditionModel.from_pretrained(
                model, subfolder="unet", torch_dtype=dtype, use_safetensors=True
            )
            # The training noise schedule, as the diffusers DreamBooth script reads it: DDPM with
            # the pipeline's betas and prediction type, whatever sampler the pipeline ships.
            self.scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
            self.scheduler_source = _scheduler_class(model)
        except (OSError, ValueError, KeyError) as exc:
            from batctl.tasks import library_error

            raise BatctlError(
                library_error(
                    f"--model {model}: cannot load a Stable Diffusion pipeline (unet, vae, "
                    "text_encoder, tokenizer, scheduler)",
                    exc,
                )
            ) from None
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise BatctlError(
                f"--model {model}: scheduler prediction_type {self.prediction_type!r} is not "
                "supported (epsilon or v_prediction)"
            )
        for part in (text_encoder, vae, unet):
            part.requires_grad_(False)
            part.eval()
        self.vae = vae.to(self.device)
        self.model: AdaptableParts = AdaptableParts(unet, text_encoder).to(self.device).eval()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        # None: the pipeline's native size (what StableDiffusionPipeline generates by default).
        self.resolution = settings.resolution or unet.config.sample_size * self.vae_scale_factor
        self.latent_size = self.resolution // self.vae_scale_factor
        self.latent_channels = unet.config.in_channels
        self.max_tokens = min(self.tokenizer.model_max_length, 77)
        self.truncated: set[tuple[int, str]] = set()

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet (a PeftModel when it carries an adapter)."""
        return self.model.unet

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The CLIP text encoder (a PeftModel when it carries an adapter)."""
        return self.model.text_encoder

    def text_encoder_adapted(self) -> bool:
        """Whether the text encoder carries an adapter (then it runs inside the loss)."""
        from peft import PeftModel

        return isinstance(self.model.text_encoder, PeftModel)

    def forward_modules(self) -> dict[str, torch.nn.Module]:
        parts = {"model.unet": self.model.unet}
        if self.text_encoder_adapted():
            parts["model.text_encoder"] = self.model.text_encoder
        return parts

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, adapter: AdapterSettings, seed: int) -> None:
        from peft import get_peft_model

        if adapter.kind not in ADAPTER_KINDS:
            raise UsageError(f"--adapter {adapter.kind}: must be one of {', '.join(ADAPTER_KINDS)}")
        targets = list(adapter.targets) or list(
            ATTENTION_TARGETS + CONV_TARGETS if adapter.kind == "locon" else ATTENTION_TARGETS
        )
        self.check_rank(adapter.rank, bare(self.model.unet))
        config = adapter.lora_config(targets, init_lora_weights=True)
        self.remove_adapter()
        torch.manual_seed(seed)
        try:
            unet = get_peft_model(self.model.unet, config)
        except ValueError as exc:
            if "not found in the base model" not in str(exc) and "Target module" not in str(exc):
                raise
            raise UsageError(
                f"--targets {' '.join(targets)}: no such module in the UNet of "
                f"{self.settings.model}; adaptable modules are: {', '.join(self._adaptable())}"
            ) from None
        unet.peft_config["default"].base_model_name_or_path = self.settings.model
        self.model.unet = unet
        if adapter.text_encoder:
            text_config = adapter.lora_config(list(TEXT_ENCODER_TARGETS), init_lora_weights=True)
            text_encoder = get_peft_model(self.model.text_encoder, text_config)
            text_encoder.peft_config["default"].base_model_name_or_path = self.settings.model
            self.model.text_encoder = text_encoder
        self.model.to(self.device)

    def _adaptable(self) -> list[str]:
        """Short names of the UNet's Linear and Conv2d modules (what --targets may name)."""
        names = set()
        for name, module in bare(self.unet).named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and "lora_" not in name:
                parts = name.split(".")
                names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
        return sorted(names)

    def load_adapter(self, path: Path, trainable: bool = False) -> None:
        from peft import PeftModel

        from batctl.safeload import check_adapter_dir
        from batctl.tasks import library_error

        check_adapter_dir(path, "adapter")
        self.remove_adapter()  # a second adapter replaces the first instead of stacking on it
        try:
            self.model.unet = PeftModel.from_pretrained(
                self.model.unet, str(path), is_trainable=trainable
            )
            text_dir = Path(path) / TEXT_ENCODER_DIR
            if (text_dir / "adapter_config.json").is_file():
                self.model.text_encoder = PeftModel.from_pretrained(
                    self.model.text_encoder, str(text_dir), is_trainable=trainable
                )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BatctlError(
                library_error(f"{path}: cannot load this adapter onto {self.settings.model}", exc)
            ) from None
        self.model.to(self.device)

    def remove_adapter(self) -> None:
        from peft import PeftModel

        for name in ("unet", "text_encoder"):
            part = getattr(self.model, name)
            if isinstance(part, PeftModel):
                setattr(self.model, name, part.unload())
        self.model.eval()

    def save_adapter(self, path: Path) -> None:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin
        from peft import PeftModel

        unet = self.model.unet
        if not isinstance(unet, PeftModel):
            raise BatctlError("save_adapter: no adapter on the UNet (add or load one first)")
        path = Path(path)
        unet.save_pretrained(str(path), save_embedding_layers=False)
        parts: dict[str, Any] = {
            "unet_lora_layers": diffusers_layers(unet),
            "unet_lora_adapter_metadata": diffusers_metadata(unet),
        }
        text_encoder = self.model.text_encoder
        if isinstance(text_encoder, PeftModel):
            text_encoder.save_pretrained(str(path / TEXT_ENCODER_DIR), save_embedding_layers=False)
            parts["text_encoder_lora_layers"] = transformers_magnitudes(
                diffusers_layers(text_encoder)
            )
            parts["text_encoder_lora_adapter_metadata"] = diffusers_metadata(text_encoder)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            save_directory=str(path),
            weight_name=DIFFUSERS_WEIGHTS,
            safe_serialization=True,
            **parts,
        )

    # ------------------------------------------------------------------ settings, counters

    def loss_settings(self) -> dict[str, str]:
        return {
            "family": "diffusion",
            "loss": "DreamBooth denoising MSE on VAE latents (latent mean x scaling_factor)",
            "prediction_type": str(self.prediction_type),
            "loss_draws": str(self.settings.loss_draws),
            "draw_seed": "sha256(key)[:8] little-endian; t then noise, draw by draw",
            "resolution": str(self.resolution),
            "crop": "center",
            "flip": str(bool(self.settings.flip)).lower(),
            "scheduler": type(self.scheduler).__name__,
            "scheduler_source": self.scheduler_source,
            "num_train_timesteps": str(self.scheduler.config.num_train_timesteps),
            "instance_prompt": self.settings.instance_prompt or "",
            "text_encoder": "adapted" if self.text_encoder_adapted() else "frozen",
        }

    def counters(self) -> dict[str, int]:
        return {"truncated_captions": len(self.truncated)}

    # ------------------------------------------------------------------ batches

    def caption(self, sample: Sample, role: Role) -> str:
        if role == "adaptation":
            prompt = self.settings.instance_prompt
            if not prompt:
                raise UsageError(
                    "--instance-prompt is required for diffusion adaptation images "
                    '(the DreamBooth prompt, e.g. --instance-prompt "a photo of sks dog")'
                )
            return prompt
        caption = sample.record.get("caption")
        if not isinstance(caption, str):
            raise BadSampleError(
                f"data part {sample.part}",
                sample.key,
                "a pool sample for a diffusion model needs a caption",
                "give a .txt member or a 'caption' field",
            )
        return caption

    def pixels(self, sample: Sample) -> torch.Tensor:
        """[3, R, R] in [-1, 1], float32."""
        import numpy as np

        image = sample.record.get("image")
        if image is None:
            raise BadSampleError(
                f"data part {sample.part}",
                sample.key,
                "a diffusion sample needs an image",
                "give a jpg/png/webp member or image file",
            )
        flip = bool(self.settings.flip) and bool(draw_seed("flip:" + sample.key) & 1)
        image = resize_and_crop(image.convert("RGB"), self.resolution, flip)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def draws(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's K timesteps [K] (int64) and noises [K, C, h, w] (float32), on CPU.

        Scoring and evaluation (model in eval mode) seed them from the key, so a sample's loss
        never depends on its batch, order or shard. Training (model in train mode) draws fresh
        ones from torch's RNG, which the training loop seeds: fixed draws would let the adapter
        fit those particular noises and drive the surrogate's target gradient towards zero.
        """
        if self.model.training:
            seed = int(torch.randint(0, 2**62, (1,)))
        else:
            seed = draw_seed(key)
        gen = torch.Generator().manual_seed(seed)
        steps, noises = [], []
        n = self.scheduler.config.num_train_timesteps
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        for _ in range(self.settings.loss_draws):
            steps.append(torch.randint(0, n, (1,), generator=gen))
            noises.append(torch.randn(shape, generator=gen))
        return torch.cat(steps), torch.stack(noises)

    def collate(self, samples: Sequence[Sample], role: Role) -> dict[str, Any]:
        captions = [self.caption(s, role) for s in samples]
        pixels = torch.stack([self.pixels(s) for s in samples])
        full = self.tokenizer(captions, truncation=False).input_ids
        for sample, ids in zip(samples, full, strict=True):
            if len(ids) > self.max_tokens and (sample.part, sample.key) not in self.truncated:
                if not self.truncated:
                    log.warning(
                        "%s: caption of %d tokens cut to %d (further cuts are counted in the "
                        "summary)",
                        sample.key,
                        len(ids),
                        self.max_tokens,
                    )
                self.truncated.add((sample.part, sample.key))
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        draws = [self.draws(s.key) for s in samples]
        batch: dict[str, Any] = {
            "timesteps": torch.cat([t for t, _ in draws]).to(self.device),  # [B*K], sample-major
            "noise": torch.cat([e for _, e in draws]).to(self.device),  # [B*K, C, h, w]
            "keys": [s.key for s in samples],
        }
        with torch.no_grad():
            vae_dtype = next(self.vae.parameters()).dtype
            dist = self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist
            latents = dist.mean
            shift = getattr(self.vae.config, "shift_factor", None)
            if shift is not None:
                latents = latents - shift
            batch["latents"] = latents * self.vae.config.scaling_factor  # [B, C, h, w]
            if self.text_encoder_adapted():
                batch["ids"] = ids.to(self.device)  # [B, 77]: encoded in the loss, with grad
            else:
                batch["states"] = self.text_encoder(ids.to(self.device))[0]  # [B, 77, D]
        return batch

    def _unet_dtype(self) -> torch.dtype:
        for p in self.model.unet.parameters():
            if not p.requires_grad:
                return p.dtype
        return next(self.unet.parameters()).dtype

    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        k = self.settings.loss_draws
        n = batch["latents"].shape[0]
        dtype = self._unet_dtype()
        work = torch.promote_types(dtype, torch.float32)  # fp16/bf16 UNet: targets and MSE in fp32
        latents = batch["latents"].to(work).repeat_interleave(k, dim=0)
        noise = batch["noise"].to(work)
        steps = batch["timesteps"]
        noisy = self.scheduler.add_noise(latents, noise, steps)
        states = batch.get("states")
        if states is None:
            states = self.model.text_encoder(batch["ids"])[0]
        states = states.to(dtype).repeat_interleave(k, dim=0)
        pred = self.model.unet(noisy.to(dtype), steps, encoder_hidden_states=states).sample
        pred = pred.to(work)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        mse = (pred - target).pow(2).mean(dim=(1, 2, 3))
        return mse.reshape(n, k).mean(dim=1)

    # ------------------------------------------------------------------ eval

    def family_metrics(
        self, heldout: Sequence[Sample], options: Any, out_dir: Path, label: str
    ) -> dict[str, float]:
        """Images for --prompts and the personalisation metrics (``batctl.metrics.diffusion``).

        With --prompts: one image per prompt at seeds 42, 43, ... from a StableDiffusionPipeline
        assembled from this task's parts and the current UNet (with its adapter, if any), at
        ``resolution``, ``INFERENCE_STEPS`` steps, guidance ``GUIDANCE_SCALE``; the shipped
        sampler, or DDIM on the same config when the pipeline ships DDPM (ancestral, meant for
        1000 steps). The images go to ``images-<label>.png`` in ``out_dir`` (a near-square grid,
        prompts row-major). Against the held-out images: DINO with --dino; CLIP-I, CLIP-T and the
        centroid distance with --clip; the Vendi Score of the generated images with either.
        Metrics whose model is not given are left out; why is in ``self.metric_notes`` (strings
        for the report's notes, the same for every row).
        """
        import re

        import diffusers
        from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

        from batctl.metrics import diffusion as dm

        prompts = dm.read_prompts(options.prompts) if options.prompts is not None else []
        self.metric_notes = dm.metric_notes(
            options.prompts, options.dino, options.clip, len(prompts)
        )
        if not prompts:
            return {}
        cache = getattr(self, "_eval_cache", None)
        if cache is None:
            cache = self._eval_cache = {"features": {}, "references": {}}
        sampler = cache.get("sampler")
        if sampler is None:
            shipped = getattr(diffusers, self.scheduler_source, None)
            if shipped is None or shipped is DDPMScheduler:
                sampler = DDIMScheduler.from_config(self.scheduler.config)
            else:
                sampler = shipped.from_pretrained(self.settings.model, subfolder="scheduler")
            cache["sampler"] = sampler
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=bare(self.text_encoder),
            tokenizer=self.tokenizer,
            unet=bare(self.unet),
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        images = dm.generate_images(pipe, prompts, size=self.resolution)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        labels = [f"{prompt} (seed {dm.FIRST_SEED + i})" for i, prompt in enumerate(prompts)]
        dm.write_grid(
            images,
            Path(out_dir) / f"images-{safe}.png",
            labels=labels,
            title=f"{label}: {len(images)} prompts at {images[0].width}x{images[0].height} px",
        )

        features = cache["features"]
        dino = clip = None
        if options.dino is not None:
            key = ("dino", str(options.dino))
            if key not in features:
                features[key] = dm.DinoFeatures(options.dino, self.device)
            dino = features[key]
        if options.clip is not None:
            key = ("clip", str(options.clip))
            if key not in features:
                features[key] = dm.ClipFeatures(options.clip, self.device)
            clip = features[key]
        references = [s.record["image"] for s in heldout if s.record.get("image") is not None]
        ref_key = (str(options.dino), str(options.clip), tuple((s.part, s.key) for s in heldout))
        return dm.personalisation_metrics(
            images,
            prompts,
            references,
            dino=dino,
            clip=clip,
            batch_size=options.batch_size,
            reference_cache=cache["references"].setdefault(ref_key, {}),
        )


def diffusers_layers(part: Any) -> dict[str, torch.Tensor]:
    """A PeftModel's adapter tensors under the part's own module names (diffusers' layout)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(part, save_embedding_layers=False)
    return {
        (k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k): v.detach().cpu().contiguous()
        for k, v in state.items()
    }


def transformers_magnitudes(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DoRA magnitudes keyed ``...lora_magnitude_vector.weight`` (peft writes them without it).

    diffusers hands the text encoder's tensors to transformers' ``load_adapter``, which inserts
    the adapter name before the last key component and so expects the parameter's own name:
    peft's bare ``lora_magnitude_vector`` key would load as an unexpected key, leaving the
    magnitudes at their init (tested: 0.42 max difference in text states on the tiny model).
    """
    return {
        (f"{k}.weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in layers.items()
    }


def diffusers_metadata(part: Any) -> dict[str, Any]:
    """The LoraConfig fields diffusers needs to rebuild a PeftModel's layers exactly.

    Only the fields that shape the layers: ``LoraConfig(**metadata)`` is how diffusers rebuilds
    them, and a field an older peft does not know would make that call fail.
    """
    config = part.peft_config[part.active_adapter]
    full = json.loads(json.dumps(config.to_dict(), default=_jsonable))
    metadata = {k: full[k] for k in DIFFUSERS_METADATA if k in full}
    if full.get("lora_bias"):
        metadata["lora_bias"] = True
    return metadata


def _scheduler_class(model: str) -> str:
    """The scheduler class the pipeline ships (its training schedule is read as DDPM)."""
    try:
        from diffusers import DDPMScheduler

        config = DDPMScheduler.load_config(model, subfolder="scheduler")
        return str(config.get("_class_name", "DDPMScheduler"))
    except (OSError, ValueError):
        return "unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)
