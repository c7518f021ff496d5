"""demo: the whole pipeline on the embedded default data, with no arguments and no network.

A recipe over the other stages: build (or find in the cache) the demo world, train the surrogate
on D_A when a --method reads one, score the pool with every --method (batctl's default and the
strongest cheap baseline), select at every γ (each method's top, and random), train the plain,
random and per-method adapters and the oracle θ*, evaluate them all on held-out target data,
and report. Every step is
an ordinary stage output under --out, so a second run finds them up to date and only redraws the
report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.stages.select import parse_gammas

from batctl.config import OutputOptions

log = logging.getLogger("batctl.demo")

PRECONDITIONERS = ("woodbury", "datainf", "identity")


@dataclass(frozen=True)
class DemoConfig(OutputOptions):
    """Run surrogate, score, select, train and eval on the embedded default."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def shared_fields(cls) -> set[str]:
        """None: the demo reads only its own [demo] table of a pipeline TOML."""
        return set()

    out: Path | None = Path("runs/demo")
    """Output directory for the demo's artifacts and report."""

    task: Literal["lm", "diffusion"] = "lm"
    """Which family's demo to run."""

    gamma: tuple[str, ...] = ("0.5", "0.75", "0.9")
    """γ = n / (n + m) of each augmented training set, D_A's share (m pool samples added; comma lists allowed)."""

    method: tuple[str, ...] = ()
    """Selection methods to compare (batctl score --method), each beside random and none; default: batctl's default for the family and the strongest cheap baseline (lm: mmr, bm25; diffusion: mmr over CLIP retrieval with the world's CLIP, which the world gives --fuse embed whenever mmr is named, embed (CLIP retrieval alone) and influence, batctl's default without a CLIP)."""

    preconditioner: str = "woodbury"
    """Preconditioner of the gradient methods (influence, hybrid, fusion): woodbury, datainf, identity."""

    seed: int = 0
    """Seed of the surrogate, every adapter and the random selection (the data stay fixed)."""

    reselect_every: int = 0
    """Also train the first --method's selection with the paper's ALBAT loop (train --reselect-every N, candidates its store's top 128), as METHOD-dynamic rows; 0: off."""

    def problems(self) -> list[str]:
        out = super().problems()
        gammas, auto, gamma_problems = parse_gammas(self.gamma)
        out += gamma_problems
        if auto or (not gammas and not gamma_problems):
            out.append("--gamma: give one or more numbers in (0, 1) ('auto' is for select)")
        from batctl.methods import METHODS

        if self.preconditioner not in PRECONDITIONERS:
            out.append(
                f"--preconditioner {self.preconditioner}: must be one of {', '.join(PRECONDITIONERS)}"
            )
        for name in self.method:
            if name not in METHODS:
                out.append(f"--method {name}: must be one of {', '.join(METHODS)}")
        if self.reselect_every < 0:
            out.append(f"--reselect-every must be >= 0, got {self.reselect_every}")
        return out


def run(config: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end into --out; returns the results table and where the report is."""
    from batctl.demo import build_world
    from batctl.demo.report import collect, write_report
    from batctl.selection import value_name  # numpy: not at import, so --help starts fast

    # setup
    out = Path(config.out or "runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    gammas = parse_gammas(config.gamma)[0]
    world, built = build_world(config.task)
    methods = config.method or world.demo_methods
    log.info(
        "demo world: %s (%s); target domain %r, %.1f%% of %d pool samples",
        world.root,
        "built now" if built else "cached",
        world.target,
        100 * world.base_rate,
        sum(world.pool_domains.values()),
    )
    common = {"model": str(world.model), "force": config.force, **world.data_flags}
    on_adaptation = {**common, "data": str(world.adaptation), "seed": config.seed}
    training = {**on_adaptation, **world.train_flags}
    save_every = max(1, int(world.train_flags.get("steps", 8)) // 8)

    # surrogate (when a method reads one), score, select
    from batctl.methods import reads_surrogate

    surrogate = out / "surrogate"
    if any(reads_surrogate(name, world.fuse_of(name)) for name in methods):
        run_stage("surrogate", out=surrogate, **on_adaptation, **world.surrogate_flags)
    scores = {name: score_with(name, world, out, surrogate, config, common) for name in methods}
    for name, store in scores.items():
        run_stage(
            "select",
            out=out / f"select-{name}",
            scores=store,
            gamma=tuple(str(g) for g in gammas),
            strategy="albat",
            force=config.force,
        )
    run_stage(
        "select",
        out=out / "select-random",
        scores=scores[methods[0]],
        gamma=tuple(str(g) for g in gammas),
        strategy="random",
        seed=config.seed,
        force=config.force,
    )

    # train: plain, random, each method's, and the oracle θ*
    adapters: dict[str, Any] = {"none": None}
    strategies = list(methods)
    dynamic = {}
    if config.reselect_every:
        # The ALBAT loop starts from the first method's selection and re-selects from its store.
        first = methods[0]
        strategies.append(f"{first}-dynamic")
        dynamic[f"{first}-dynamic"] = {
            "reselect_every": config.reselect_every,
            "scores": scores[first],
            "candidate_count": 128,
        }
    for g in gammas:
        value = value_name("gamma", g)
        adapters[f"random-g{g}"] = out / "select-random" / value
        for name in strategies:
            adapters[f"{name}-g{g}"] = out / f"select-{name.removesuffix('-dynamic')}" / value
    trained = []
    for label, selection in adapters.items():
        path = out / "train" / label
        extra = dynamic.get(label.rsplit("-g", 1)[0], {}) if selection is not None else {}
        run_stage(
            "train", out=path, selection=selection, save_every=save_every, **training, **extra
        )
        trained.append(path)
    oracle = out / "oracle"
    oracle_flags = {**training, **world.oracle_flags, "data": str(world.oracle)}
    run_stage("train", out=oracle, **oracle_flags)

    # eval
    run_stage(
        "eval",
        out=out / "eval",
        data=str(world.heldout),
        adapter=(*trained, oracle),
        reference=oracle,
        **common,
    )

    # report
    results = collect(world, out, gammas, strategies, config.seed)
    table = write_report(results, out / "report")
    return {"report": str(out / "report"), "table": table}


def score_with(
    method: str, world: Any, out: Path, surrogate: Path, config: DemoConfig, common: dict[str, Any]
) -> Path:
    """The score store of `method` on the world's pool (the gradient methods read the surrogate
    and the world's score recipe); returns its directory."""
    from batctl.methods import reads_surrogate

    extra: dict[str, Any] = dict(world.method_flags.get(method, {}))
    fuse = world.fuse_of(method)
    if reads_surrogate(method, fuse):
        extra.update(surrogate=surrogate, preconditioner=config.preconditioner, **world.score_flags)
    extra.update(world.clip_flags(method, fuse))
    path = out / f"scores-{method}"
    run_stage(
        "score",
        out=path,
        data=str(world.adaptation),
        pool=tuple(str(p) for p in world.pool),
        method=method,
        **common,
        **extra,
    )
    return path


def run_stage(stage: str, **flags: Any) -> None:
    """Run one stage with ``flags`` (its config's field names); an up-to-date output is fine.

    The flags are checked as the CLI checks them, so a bad demo recipe fails with the stage's
    own messages rather than deep inside it.
    """
    import importlib

    from batctl.cli import STAGES
    from batctl.errors import UpToDate, UsageError

    module = importlib.import_module(f"batctl.stages.{stage}")
    config = STAGES[stage][0](**{k: v for k, v in flags.items() if v is not None})
    problems = config.problems()
    if problems:
        raise UsageError(f"demo: {stage}: " + "; ".join(problems))
    log.info("demo: %s -> %s", stage, flags.get("out"))
    try:
        module.run(config)
    except UpToDate:
        log.info("demo: %s is up to date", flags.get("out"))
