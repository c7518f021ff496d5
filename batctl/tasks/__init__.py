"""Model families behind one protocol (`batctl.tasks.base.Task`).

`detect_family` reads only JSON files, so it is cheap; `load_task` imports the family's module
(and with it torch, transformers or diffusers) only when a stage needs a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batctl.errors import BatctlError, UsageError

if TYPE_CHECKING:
    from batctl.tasks.base import Task, TaskSettings

Choice = tuple[str, tuple[str, ...]]
"""A selection method and its --fuse parts (() for the method's own default)."""


@dataclass(frozen=True)
class FamilyTraits:
    """What a stage may know of a family before its model is loaded (no torch import)."""

    eval_flags: tuple[str, ...]
    """eval flags only this family reads; eval refuses them for a model of another family."""

    auto: Choice
    """What `score --method auto` runs without --clip."""

    auto_with_clip: Choice | None
    """What `score --method auto` runs with --clip (None: --clip is not for this family)."""


TRAITS: dict[str, FamilyTraits] = {
    "lm": FamilyTraits(eval_flags=("benchmark",), auto=("mmr", ()), auto_with_clip=None),
    "diffusion": FamilyTraits(
        eval_flags=("prompts", "dino", "clip"),
        auto=("influence", ()),
        auto_with_clip=("mmr", ("embed",)),
    ),
}
"""Each family's traits. The auto methods are the best measured on benchmarks/bat_quality.py's
dev worlds (benchmarks/SELECTION.md). LMs: mmr. Diffusion: a DreamBooth set's images come with
the instance prompt only, which names no subject a pool caption could match (caption bm25 and
mmr rank the dev digit's pool images at AUC 0.50 and 0.00), so the images decide: given a CLIP,
mmr over CLIP retrieval (`--fuse embed`: CLIP relevance, CLIP image cosine for redundancy),
which on four dev digits ended below CLIP retrieval alone on average and in 5 of 8 digit × γ
cases (a lead inside the seed-to-seed spread, taken by a rule written before the runs), CLIP
retrieval having beaten the z-sum with influence in 7 of 8; else influence (which needs the
surrogate)."""


FAMILIES = tuple(TRAITS)


def family_traits(family: str) -> FamilyTraits:
    """The traits of `family` (one of FAMILIES)."""
    try:
        return TRAITS[family]
    except KeyError:
        raise UsageError(f"--task {family}: not implemented yet: see CHANGELOG") from None


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
