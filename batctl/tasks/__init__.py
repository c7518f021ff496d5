"""Model families behind one protocol (`batctl.tasks.base.Task`).

`detect_family` reads only JSON files, so it is cheap; `load_task` imports the family's module
(and with it torch, transformers or diffusers) only when a stage needs a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from batctl.errors import BatctlError, UsageError

if TYPE_CHECKING:
    from batctl.tasks.base import Task, TaskSettings

FAMILIES = ("lm", "diffusion")


def detect_family(model: str) -> str:
    """ "diffusion" when the model dir has model_index.json, "lm" when its config.json names a
    *ForCausalLM architecture. Hub ids are resolved through the local cache only."""
    path = Path(model)
    if not path.is_dir():
        path = _cached_snapshot(model)
    if (path / "model_index.json").is_file():
        return "diffusion"
    config = path / "config.json"
    if config.is_file():
        from batctl.safeload import read_json_object

        architectures = read_json_object(config).get("architectures") or []
        if any(a.endswith("ForCausalLM") for a in architectures):
            return "lm"
    raise UsageError(
        f"--model {model}: cannot tell the model family (no model_index.json, no *ForCausalLM "
        "in config.json); pass --task lm or --task diffusion"
    )


def library_error(what: str, exc: BaseException) -> str:
    """A library's exception as one line (their messages span lines and carry advice for
    their own API), prefixed with what batctl was doing; names --trust-remote-code when the
    library says the model needs its own code."""
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    hint = ""
    if "trust_remote_code" in text or "does not recognize this architecture" in text:
        hint = "; if the model needs its own code, pass --trust-remote-code (only if you trust it)"
    return f"{what} ({type(exc).__name__}: {text}){hint}"


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["model_index.json", "config.json"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "cannot tell"
        raise BatctlError(
            f"--model {repo_id}: not a local directory and not reachable on the hub ({exc})"
        ) from None


def load_task(settings: TaskSettings, family: str = "auto") -> Task:
    """Load the backbone of `settings.model` as the right family's Task (frozen, no adapter yet).

    The model directory is checked first (safetensors only, sound files, remote code only with
    --trust-remote-code), so no library gets to unpickle or run anything on a bad one.
    """
    from batctl.safeload import check_model_dir

    check_model_dir(settings.model, settings.trust_remote_code)
    if family == "auto":
        family = detect_family(settings.model)
    if family == "lm":
        from batctl.tasks.lm import LMTask

        return LMTask(settings)
    if family == "diffusion":
        from batctl.tasks.diffusion import DiffusionTask

        return DiffusionTask(settings)
    raise UsageError(f"--task {family}: not implemented yet: see CHANGELOG")
