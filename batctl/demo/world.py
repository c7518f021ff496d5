"""A demo world: a backbone pretrained by batctl on a pool with known domains, and the target
domain's adaptation, held-out and oracle sets. Built once, cached in the user's cache dir.

The world directory is a batctl output (manifest written last, atomic rename), named by a hash
of everything that shapes it, so a cached world is either complete and right or rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from batctl.errors import BatctlError, UpToDate

log = logging.getLogger("batctl.demo")

WORLD_FILE = "world.json"
RECIPE_FIELDS = (
    "train_flags",
    "oracle_flags",
    "surrogate_flags",
    "score_flags",
    "demo_methods",
    "method_flags",
)
"""World fields that come from the family's RECIPE at load time, not from world.json."""


@dataclass(frozen=True)
class World:
    """Where a built world's parts are, and what the stages need to know about them."""

    family: str
    """"lm" or "diffusion"."""

    root: Path
    """The world's directory (in the cache)."""

    model: Path
    """The pretrained backbone (a model directory the stages load with --model)."""

    adaptation: Path
    """D_A: n samples of the target domain (--data of surrogate and train)."""

    heldout: Path
    """Held-out target-domain samples (--data of eval)."""

    oracle: Path
    """Plenty of target-domain samples: the oracle adapter θ* is trained on them."""

    pool: tuple[Path, ...]
    """The backbone's pretraining data, in parts (--pool of score)."""

    target: str
    """The target domain's name."""

    pool_domains: dict[str, int]
    """Pool samples per domain (the base rate of the target domain is one of them)."""

    data_flags: dict[str, Any] = field(default_factory=dict)
    """DataOptions every stage gets (max_length; instance_prompt, resolution)."""

    train_flags: dict[str, Any] = field(default_factory=dict)
    """TrainingOptions of train (adapter, rank, targets, steps, lr, ...)."""

    oracle_flags: dict[str, Any] = field(default_factory=dict)
    """TrainingOptions of the oracle adapter (more steps over the oracle set)."""

    surrogate_flags: dict[str, Any] = field(default_factory=dict)
    """TrainingOptions of the surrogate: cheaper than train's, so its target gradient on D_A
    still points at the domain (a surrogate fitted to D_A leaves v ≈ noise)."""

    score_flags: dict[str, Any] = field(default_factory=dict)
    """Extra score options (normalize, loss_draws, ...)."""

    pretraining: dict[str, Any] = field(default_factory=dict)
    """How the backbone was pretrained (steps, final loss, seconds)."""

    clip: Path | None = None
    """A CLIP model trained on the pool's image/caption pairs (image worlds), for `score
    --method embed --clip`: the world's stand-in for OpenAI's CLIP."""

    demo_methods: tuple[str, ...] = ()
    """What `batctl demo` compares by default: batctl's default method for the family and the
    strongest cheap baseline on it."""

    method_flags: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Score flags of a demo method beyond --method (e.g. mmr's --fuse parts on an image world)."""

    def with_recipe(self, recipe: Mapping[str, dict[str, Any]]) -> World:
        """This world with the stage flags of ``recipe`` (keys: the ``*_flags`` field names).

        The recipe is code, not part of the cached world: tuning a flag reruns the stages, it
        does not rebuild (re-pretrain) the world.
        """
        return replace(
            self,
            **{
                name: tuple(value) if name == "demo_methods" else dict(value)
                for name, value in recipe.items()
            },
        )

    def fuse_of(self, method: str) -> tuple[str, ...]:
        """The --fuse parts the demo gives `method` on this world (() for the method's own)."""
        return tuple(self.method_flags.get(method, {}).get("fuse", ()))

    def clip_flags(self, method: str, fuse: Sequence[str] = ()) -> dict[str, Any]:
        """{"clip": the world's CLIP} when `method` or one of its --fuse parts is embed and the
        world has a CLIP (CLIP retrieval, as LAION is searched), else {}."""
        if self.clip is None or "embed" not in (method, *fuse):
            return {}
        return {"clip": str(self.clip)}

    @staticmethod
    def domain_of(key: str) -> str:
        """A pool sample's domain: its key is ``DOMAIN-NNNNN``."""
        return key.split("-", 1)[0]

    @property
    def base_rate(self) -> float:
        """The target domain's share of the pool."""
        total = sum(self.pool_domains.values())
        return self.pool_domains.get(self.target, 0) / total if total else 0.0

    def save(self) -> None:
        """Write world.json (paths relative to the root, so a cache directory can move); the
        stage recipe is code (``with_recipe``), not saved."""
        data = asdict(self)
        for name in RECIPE_FIELDS:
            data.pop(name)
        for name in ("model", "adaptation", "heldout", "oracle"):
            data[name] = str(Path(data[name]).relative_to(self.root))
        if self.clip is not None:
            data["clip"] = str(Path(self.clip).relative_to(self.root))
        data["pool"] = [str(Path(p).relative_to(self.root)) for p in self.pool]
        data.pop("root")
        (self.root / WORLD_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> World:
        """Read a world saved under ``root``."""
        data = json.loads((Path(root) / WORLD_FILE).read_text())
        for name in RECIPE_FIELDS:
            data.pop(name, None)
        for name in ("model", "adaptation", "heldout", "oracle"):
            data[name] = Path(root) / data[name]
        if data.get("clip") is not None:
            data["clip"] = Path(root) / data["clip"]
        data["pool"] = tuple(Path(root) / p for p in data["pool"])
        return cls(root=Path(root), **data)


def cache_dir() -> Path:
    """$BATCTL_CACHE, else $XDG_CACHE_HOME/batctl, else ~/.cache/batctl."""
    explicit = os.environ.get("BATCTL_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "batctl"


def identity_hash(params: Mapping[str, Any]) -> str:
    """12 hex digits naming a world built with ``params``."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cached_world(
    name: str,
    params: Mapping[str, Any],
    build: Callable[[Path], World],
    cache: Path | None = None,
) -> tuple[World, bool]:
    """The world ``build`` makes for ``params``, from the cache or built now into it.

    ``build(work_dir)`` fills a fresh directory and returns the World rooted there. Returns the
    world (rooted at its final cache path) and whether it was built now. A cache entry that is
    not a complete batctl output (a crash mid-build, a foreign file) is rebuilt.
    """
    from batctl.artifacts import is_complete, open_output

    # As the manifest will hold them (tuples become lists), so a rerun compares equal.
    params = json.loads(json.dumps(params, sort_keys=True, default=str))
    path = (cache or cache_dir()) / "demo" / f"{name}-{identity_hash(params)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    for force in (False, True):
        building = False
        try:
            with open_output(
                path, stage="demo-world", params=dict(params), inputs={}, force=force
            ) as out:
                building = True
                log.info("building the %s demo world in %s (cached for later runs)", name, path)
                build(out.work).save()
            return World.load(path), True
        except UpToDate:
            return World.load(path), False
        except BatctlError:
            # Only a cache entry open_output refused is rebuilt; an error from the build itself
            # would only come back after a second full build.
            if force or building:
                raise
            log.warning("%s is not a complete demo world; rebuilding it", path)
            if not is_complete(path):
                # batctl's own cache entry, named by its params' hash: --force never removes a
                # folder batctl did not write, so the broken entry is cleared here.
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    raise AssertionError("unreachable")
