"""Checks a model or adapter directory passes before any library loads it.

Libraries fall back to `torch.load` (unpickling, which runs code) when a `.bin` sits where a
`.safetensors` is missing, run a model's own Python when its config asks for it, and fail on a
damaged file with a traceback minutes into a run. These checks read only JSON and safetensors
headers, so every stage can afford them up front, and each failure is one line naming the
file and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from batctl.errors import BatctlError, UsageError

#: suffixes of pickled weights (torch.save, .ckpt checkpoints): batctl never unpickles
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: diffusers pipeline parts that hold weights
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
#: bytes per element of the safetensors dtypes
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 << 20


def _damaged(path: Path, why: str) -> BatctlError:
    return BatctlError(f"{path}: damaged safetensors file ({why}); fetch or write it again")


def check_safetensors(path: Path) -> None:
    """BatctlError naming `path` unless its header parses and its tensors fill the file exactly.

    Reads the header only (a few KB), as the safetensors library itself validates it: an
    8-byte little-endian length, a JSON object of tensors with dtype, shape and data offsets
    that tile the data section.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _damaged(path, f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise _damaged(path, f"tensor {name!r} has no valid dtype/shape/offsets") from None
        if not 0 <= begin <= stop or stop - begin != expected:
            raise _damaged(path, f"tensor {name!r} offsets do not match its shape")
        end = max(end, stop)
    if 8 + n + end != size:
        raise _damaged(path, f"{size} bytes where the header describes {8 + n + end} (truncated?)")


def _pickle_error(path: Path) -> BatctlError:
    return BatctlError(
        f"{path}: pickled weights; batctl loads safetensors only (unpickling can run code): "
        "convert it to safetensors (e.g. safetensors.torch.save_file(torch.load(f, "
        "weights_only=True), 'model.safetensors') once, with code you trust)"
    )


def check_weights(directory: Path) -> None:
    """Weights in `directory` are safetensors and sound; pickles alone are refused."""
    tensors = sorted(directory.glob("*.safetensors"))
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not tensors:
        raise _pickle_error(pickles[0])
    for file in tensors:
        check_safetensors(file)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in file `path`; one BatctlError naming the file when it is not valid
    JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BatctlError(f"{path}: not valid JSON ({exc}); fetch or write it again") from None
    if not isinstance(value, dict):
        raise BatctlError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def check_model_dir(model: str, trust_remote_code: bool) -> None:
    """A local model directory (or diffusers pipeline) is safe to hand to from_pretrained.

    Refuses: a config or tokenizer config that asks for the model's own code (`auto_map`)
    without `--trust-remote-code`; pickled weights without safetensors; a damaged safetensors
    file; a config.json that is not a JSON object. Hub ids pass through (the loaders are called
    with `use_safetensors=True` and the flag as given).
    """
    root = Path(model)
    if not root.is_dir():
        return
    dirs = [root] + [root / p for p in PIPELINE_PARTS if (root / p).is_dir()]
    for directory in dirs:
        for name in ("config.json", "tokenizer_config.json"):
            config_path = directory / name
            if not config_path.is_file():
                continue
            config = read_json_object(config_path)
            if "auto_map" in config and not trust_remote_code:
                raise UsageError(
                    f"--model {model}: {config_path} asks to run the model's own Python code "
                    "(auto_map); pass --trust-remote-code if you trust its authors"
                )
        check_weights(directory)


def check_adapter_dir(path: Path, flag: str) -> None:
    """An adapter directory (ours or peft's) loads from safetensors, and they are sound.

    Checked by every stage before the backbone loads, so a bad `--adapter` fails in a second,
    not after minutes of evaluating the rows before it.
    """
    path = Path(path)
    dirs = [path] + [p for p in (path / "text_encoder",) if (p / "adapter_config.json").is_file()]
    for directory in dirs:
        config = directory / "adapter_config.json"
        if not config.is_file():
            raise BatctlError(
                f"{flag} {directory}: no adapter_config.json; expected an adapter directory "
                "(the output of batctl surrogate or train, or a peft save_pretrained directory)"
            )
        read_json_object(config)
        weights = directory / "adapter_model.safetensors"
        if not weights.is_file():
            pickled = directory / "adapter_model.bin"
            if pickled.is_file():
                raise _pickle_error(pickled)
            raise BatctlError(f"{flag} {directory}: no adapter_model.safetensors")
        check_safetensors(weights)
