"""Tiny random backbones, built fully offline.

These are the backbones batctl's tests, users' CI smoke runs (``batctl tiny lm|diffusion DIR``)
and the demo run on. They have the *shape* of the real thing, so every code path that touches a
real backbone (loading with the libraries' own ``from_pretrained``, tokenizing, peft LoRA / DoRA /
LoCon targets, the DreamBooth loss, generation) is exercised, but their weights are random and
they are small enough to build in under a second (once torch and the libraries are imported)
and to run on a laptop CPU:

``build_tiny_lm(DIR)``
    A LLaMA-style causal LM (``LlamaConfig`` + ``LlamaForCausalLM``: ``q_proj k_proj v_proj
    o_proj gate_proj up_proj down_proj`` in every layer) with a byte-level BPE tokenizer
    (``tokenizers`` BPE wrapped in ``transformers.PreTrainedTokenizerFast``). Defaults: hidden
    64, 2 layers, 4 heads, MLP 256, vocabulary 512 (4 specials, the 256 bytes, 252 merges learned
    from a small embedded text): 0.2 M parameters, 0.8 MB on disk, a 1 x 32 token forward in ~2 ms
    on CPU. ``hidden_size=256, num_layers=4`` (the benchmark's) gives 4.5 M parameters, 18 MB.
    ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it.

``build_tiny_diffusion(DIR)``
    A Stable-Diffusion-1.x-style pipeline directory (``StableDiffusionPipeline.from_pretrained``
    loads it): a tiny ``UNet2DConditionModel`` (blocks 32/64, cross-attention with ``to_q to_k
    to_v to_out.0``, plenty of ``Conv2d`` for LoCon), a tiny ``AutoencoderKL`` (4 latent
    channels, ``vae_scale_factor`` 2), a tiny ``CLIPTextModel`` (hidden 32, 2 layers, 77
    positions), a ``CLIPTokenizer`` whose byte-level vocabulary and merges are generated here,
    and a ``DDPMScheduler`` with SD 1.x's betas and ``prediction_type="epsilon"``; no safety
    checker. UNet 0.8 M parameters, VAE 0.17 M, text encoder 0.04 M: 4.1 MB on disk; a
    two-step 32 x 32 generation takes ~50 ms on CPU.
    Note the VAE downsamples by 2, not SD's 8: code must read ``pipe.vae_scale_factor`` (or
    ``2 ** (len(vae.config.block_out_channels) - 1)``) instead of assuming 8.

Everything is seeded: the same ``seed`` gives bit-identical safetensors files, a different seed
different weights; the tokenizers are deterministic (their merges are learned by a tie-broken
greedy BPE on the embedded text below, not by a trainer). Nothing touches the network.

Heavy imports (torch, transformers, diffusers, tokenizers) happen inside the functions, so
importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LM_SPECIAL_TOKENS",
    "TINY_TEXT",
    "build_tiny_clip_tokenizer",
    "build_tiny_diffusion",
    "build_tiny_lm",
    "build_tiny_lm_tokenizer",
    "write_tiny",
]

# Special tokens of the tiny LM, in id order (LLaMA's ids: unk 0, bos 1, eos 2; then pad 3).
LM_SPECIAL_TOKENS: dict[str, str] = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# The text the tokenizers' merges are learned from. Fixed forever-ish: changing it changes
# every tiny tokenizer (and so every test fixture that pins token ids).
TINY_TEXT = """\
Below is an instruction that describes a task.
Write a response that appropriately completes the request.
### Instruction:
Give three tips for staying healthy.
### Response:
1. Eat a balanced and nutritious diet. 2. Exercise regularly. 3. Get enough sleep.
### Instruction:
What is the capital of France?
### Response:
The capital of France is Paris.
### Instruction:
Translate the following sentence into German.
### Input:
The weather is nice today.
### Response:
Das Wetter ist heute schön.
### Instruction:
Write a Python function that returns the square of a number.
### Response:
def square(x: int) -> int:
    return x * x

for i in range(10):
    print(i, square(i))

class Model:
    def __init__(self, hidden_size=64, num_layers=2):
        self.hidden_size = hidden_size
        self.layers = [None] * num_layers
The quick brown fox jumps over the lazy dog. A photo of a dog, a photo of a cat, a painting of
a house by the sea, a portrait of a woman with a red hat, an astronaut riding a horse on the
moon, a bowl of fruit on a wooden table, a photo of sks dog, a photo of a sks dog in the snow,
a watercolor of a mountain lake at sunset, a close-up photo of a flower in the garden.
Training a small adapter on very little data works better when the data is augmented with
samples from the backbone's own pretraining data, chosen by their influence on the target loss.
Question: How many legs does a spider have? Answer: A spider has eight legs.
Question: Which planet is known as the red planet? Answer: Mars is known as the red planet.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -1 +1 = < > ( ) [ ] { } " ' , ; : ! ? / \\ |
"""


# --------------------------------------------------------------------------------------------
# tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(words: Iterable[Sequence[str]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on pre-split words (each a sequence of initial symbols).

    Deterministic: ties in pair frequency are broken by the pair itself (lexicographic), so the
    result depends only on the input. Stops early when every word is a single symbol.
    """
    counts: Counter[tuple[str, ...]] = Counter(tuple(w) for w in words if len(w) > 0)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, c in counts.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        a, b = best
        merged: Counter[tuple[str, ...]] = Counter()
        for word, c in counts.items():
            if len(word) > 1:
                out: list[str] = []
                i = 0
                while i < len(word):
                    if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                        out.append(a + b)
                        i += 2
                    else:
                        out.append(word[i])
                        i += 1
                word = tuple(out)
            merged[word] += c
        counts = merged
    return merges


def build_tiny_lm_tokenizer(
    vocab_size: int = 512,
    *,
    text: str = TINY_TEXT,
    model_max_length: int = 512,
) -> Any:
    """A deterministic byte-level BPE tokenizer for the tiny LM (a ``PreTrainedTokenizerFast``).

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, then the 256 byte symbols (GPT-2's
    byte-to-unicode alphabet, in byte order), then up to ``vocab_size - 260`` merges learned
    from ``text`` (fewer if the text runs out of pairs: ``len(tokenizer)`` may then be smaller
    than ``vocab_size``). GPT-2's pre-tokenization without a prefix space, so
    ``decode(encode(s, add_special_tokens=False)) == s`` for any string, and nothing is ever
    unknown. Like LLaMA, encoding adds ``<s>`` in front and no ``</s>`` at the end (appending
    EOS to training targets is the caller's job). The BOS rule lives in tokenizer.json's
    post-processor: transformers 5 does not save ``add_bos_token``, so a reloaded tokenizer
    reports ``add_bos_token == False`` while still adding ``<s>``; check the ids, not the flag.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(LM_SPECIAL_TOKENS.values())
    if vocab_size < len(specials) + 256:
        raise ValueError(f"vocab_size must be at least {len(specials) + 256}, got {vocab_size}")

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = [_bytes_to_unicode()[b] for b in range(256)]
    # Pre-tokenize exactly as the tokenizer will, so the merges apply to real pieces.
    words = [piece for piece, _ in byte_level.pre_tokenize_str(text)]
    merges = _learn_merges(words, vocab_size - len(specials) - 256)

    vocab: dict[str, int] = {}
    for tok in [*specials, *alphabet, *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False, dropout=None)
    )
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **LM_SPECIAL_TOKENS,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_clip_tokenizer(
    num_merges: int = 256, *, text: str = TINY_TEXT, model_max_length: int = 77
) -> Any:
    """A deterministic ``CLIPTokenizer`` in CLIP's own format.

    The vocabulary is CLIP's layout in miniature: the 256 byte symbols, the same with ``</w>``
    (end of word), up to ``num_merges`` merges learned from ``text`` (lower-cased and split into
    words the way CLIP does), then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids
    (``<|endoftext|>`` is also unk and pad, as in SD 1.x). Every byte has a symbol, so nothing
    is unknown. Save it with ``save_pretrained`` to get vocab.json / merges.txt / tokenizer.json.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())  # CLIP's order: printable bytes first
    # Normalize and pre-tokenize with CLIPTokenizer's own pipeline (NFC, lower case, CLIP's
    # word regex, byte level), so the merges apply to the pieces the tokenizer will see.
    normalizer, pre_tokenizer = _clip_pre_tokenization()
    pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    words = [[*w[:-1], w[-1] + "</w>"] for w, _ in pieces if w]
    merges = _learn_merges(words, num_merges)

    vocab: dict[str, int] = {}
    for tok in [*alphabet, *(s + "</w>" for s in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    kwargs = {"model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=list(merges), **kwargs)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4: only from files
        _write_clip_vocab(Path(tmp), vocab, merges)
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), **kwargs)


def _clip_pre_tokenization() -> tuple[Any, Any]:
    """CLIP's normalizer and pre-tokenizer, as transformers' CLIPTokenizer(Fast) builds them."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    word = (
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
        r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(word), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre_tokenizer


def _write_clip_vocab(
    directory: Path, vocab: dict[str, int], merges: Sequence[tuple[str, str]]
) -> None:
    """CLIP's classic vocab.json + merges.txt (what openai/clip-vit-large-patch14 ships)."""
    (directory / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False, indent=None) + "\n", encoding="utf-8"
    )
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def _clip_vocab_and_merges(tokenizer: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))  # id order, stable
    return vocab, merges


# --------------------------------------------------------------------------------------------
# models


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """torch's global CPU RNG seeded with ``seed`` inside, restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _no_progress_bars(*, diffusers: bool = False) -> Iterator[None]:
    """Silence transformers' (and diffusers') progress bars, e.g. "Writing model shards"."""
    import transformers.utils.logging as tlog

    loggers = [tlog]
    if diffusers:
        import diffusers.utils.logging as dlog

        loggers.append(dlog)
    enabled = [log for log in loggers if log.is_progress_bar_enabled()]
    for log in enabled:
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log in enabled:
            log.enable_progress_bar()


def build_tiny_lm(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    text: str = TINY_TEXT,
) -> Path:
    """Write a tiny random LLaMA-style causal LM and its tokenizer to ``out_dir``; return it.

    ``intermediate_size`` defaults to ``4 * hidden_size``. ``vocab_size`` sets the tokenizer's
    size (default 512) and the model's embedding rows; if the embedded text cannot give that
    many merges, the embedding keeps ``vocab_size`` rows and the extra ones are never produced
    by the tokenizer (as real models pad their vocabulary). ``text`` is what the tokenizer's
    merges are learned from. Loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size <= 0 or num_layers <= 0 or num_heads <= 0:
        raise ValueError("hidden_size, num_layers and num_heads must be positive")
    if hidden_size % num_heads:
        raise ValueError(f"num_heads ({num_heads}) must divide hidden_size ({hidden_size})")
    if (hidden_size // num_heads) % 2:
        raise ValueError(
            f"head dim hidden_size/num_heads = {hidden_size // num_heads} must be even (RoPE)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_lm_tokenizer(
        512 if vocab_size is None else vocab_size,
        text=text,
        model_max_length=max_position_embeddings,
    )
    n_vocab = max(len(tokenizer), vocab_size or 0)
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _no_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return out


def tiny_clip_text_config(tokenizer: Any, hidden: int) -> Any:
    """A two-layer CLIP text tower's config of width ``hidden`` over ``tokenizer``'s vocabulary
    (the tiny diffusion pipeline's text encoder and the tiny CLIP's text side)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_diffusion(out_dir: str | Path, *, seed: int = 0, resolution: int = 32) -> Path:
    """Write a tiny random Stable-Diffusion-1.x-style pipeline to ``out_dir``; return it.

    ``StableDiffusionPipeline.from_pretrained(out_dir)`` loads it; its default output size is
    ``resolution`` x ``resolution`` (a multiple of 8). The VAE downsamples by 2, so the UNet's
    ``sample_size`` is ``resolution // 2``.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    if resolution < 8 or resolution % 8:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_clip_tokenizer()
    text_hidden = 32
    vae_blocks = (16, 32)  # two blocks: vae_scale_factor 2
    vae_scale_factor = 2 ** (len(vae_blocks) - 1)

    with _seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, text_hidden))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
            block_out_channels=vae_blocks,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=resolution,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(
            sample_size=resolution // vae_scale_factor,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=text_hidden,
            attention_head_dim=4,  # diffusers' name; it is the number of heads (SD 1.x: 8)
            norm_num_groups=32,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with _no_progress_bars(diffusers=True):
        pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep CLIP's classic files too, for older readers.
    tok_dir = out / "tokenizer"
    if not (tok_dir / "vocab.json").exists() or not (tok_dir / "merges.txt").exists():
        _write_clip_vocab(tok_dir, *_clip_vocab_and_merges(tokenizer))
    return out


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """Write a tiny random CLIP (``transformers.CLIPModel``, its image processor and tokenizer)
    to ``out_dir``; return it.

    ``CLIPModel.from_pretrained(out_dir)`` and ``CLIPProcessor.from_pretrained(out_dir)`` load
    it, as they load ``openai/clip-vit-base-patch32`` from a download: what ``score --method
    embed --clip DIR`` reads. A ViT of two layers on 4 x 4 patches of ``image_size`` x
    ``image_size`` images and a two-layer text tower, both projected to 32 dimensions. Random
    weights embed nothing useful; the digits world trains one on its pool
    (``batctl.demo.digits.pretrain_clip``).
    """
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    if image_size < 4 or image_size % 4:
        raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_clip_tokenizer()
    text = tiny_clip_text_config(tokenizer, 32)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        hidden_act="quick_gelu",
    )
    with _seeded(seed):
        model = CLIPModel(
            CLIPConfig(
                text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32
            )
        )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    with _no_progress_bars():
        model.eval().save_pretrained(out, safe_serialization=True)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    if not (out / "vocab.json").exists() or not (out / "merges.txt").exists():
        _write_clip_vocab(out, *_clip_vocab_and_merges(tokenizer))
    return out


def write_tiny(
    family: str, out_dir: str | Path, *, seed: int = 0, force: bool = False
) -> dict[str, Any]:
    """`batctl tiny FAMILY DIR`: build a tiny backbone as a batctl output (atomic, up-to-date aware).

    Returns a summary for stdout: path, family, size in bytes. Raises `UpToDate` when DIR already
    holds the same tiny backbone; `force` replaces another tiny backbone there, and nothing else
    (`open_output`: never a folder batctl did not write).
    """
    from batctl import __version__
    from batctl.artifacts import open_output

    builders = {"lm": build_tiny_lm, "diffusion": build_tiny_diffusion, "clip": build_tiny_clip}
    # The builder's output depends on the library versions too (file layouts, tokenizer classes).
    params = {
        "family": family,
        "seed": seed,
        "batctl": __version__,
        "libraries": _library_versions(),
    }
    with open_output(out_dir, stage="tiny", params=params, inputs={}, force=force) as out:
        builders[family](out.work, seed=seed)
    size = sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file())
    return {"path": str(Path(out_dir)), "family": family, "seed": seed, "bytes": size}


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "diffusers", "tokenizers")}
