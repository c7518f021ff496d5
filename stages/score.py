"""score: stream the backbone pool once and give every sample a score (DESIGN §5, §5b).

The method (mmr by default; influence, fusion, hybrid; the cheap baselines bm25, tfidf, dsir,
embed) is one interface that writes one store layout; this stage only streams, shards, resumes
and publishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import DataOptions, operational, parse_shard
from batctl.errors import BatctlError, UsageError

log = logging.getLogger("batctl.score")


INFLUENCE_FLAGS = ("surrogate", "preconditioner", "damping", "engine", "normalize", "layer_scores")
"""Flags only the gradient methods read."""
HYBRID_FLAGS = ("prefilter", "candidates")
MMR_FLAGS = ("candidates", "diversity", "fuse")
CANDIDATE_DEFAULTS = {"hybrid": 256, "mmr": 1024, "mmr over embeddings": 256}
"""--candidates when not given: hybrid's; mmr's over text (chosen on the twelve LM dev worlds);
mmr's over embeddings alone (the count it was measured with on the dev digits)."""


@dataclass(frozen=True)
class ScoreConfig(DataOptions):
    """Score every pool sample against the adaptation set, resumably."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "data", "pool", "out")
    UNSHARED: ClassVar[tuple[str, ...]] = ("out", "force", "batch_size")
    REMOTE_OUT: ClassVar[bool] = True

    out: str | None = None
    """Output directory, or an s3:// (gs://, az://) URL that every shard writes into; manifest.json inside marks it complete."""

    method: Literal[
        "auto", "mmr", "fusion", "influence", "bm25", "tfidf", "dsir", "embed", "hybrid"
    ] = "auto"
    """What ranks the pool. auto: the best measured for the --model's family (benchmarks/bat_quality.py): mmr for LMs; for diffusion models mmr over CLIP retrieval (--fuse embed) with --clip, else influence (which needs --surrogate). mmr: the --fuse z-score sum (bm25 + tfidf by default), its top --candidates re-ranked for --diversity from D_A and from each other; fusion: the z-score sum alone (influence, bm25, tfidf by default); influence at the surrogate alone; a baseline: bm25 / tfidf / dsir over the text or captions, embed (backbone embedding cosine, or CLIP's with --clip); hybrid (the --prefilter's top --candidates re-ranked by influence)."""

    prefilter: Literal["bm25", "tfidf"] = "bm25"
    """--method hybrid: the cheap method whose top candidates influence re-ranks."""

    candidates: int | None = None
    """--method hybrid: how many of the prefilter's top rows get a gradient (default 256); --method mmr: how many of the most relevant rows are re-ranked for diversity, the rest keep their order below them (default 1024 over text: on twelve dev worlds 106% of perfect-target's mean gain against 103% for 256, 102% for 512 and 94% for 64; 256 when --fuse names embed and neither bm25 nor tfidf, as measured on the dev digits)."""

    diversity: float = 0.5
    """--method mmr: λ in [0, 1), the weight of a row's highest TF-IDF cosine (the embedding's when --fuse names embed and neither bm25 nor tfidf) to the adaptation set and to the rows picked before it, against (1 − λ) for its relevance (0.5: the highest mean share of perfect-target's gain on the five dev worlds at the demo's train recipe, 86% against 79% for 0.7 and 56% for 0.85, kept on twelve dev worlds: 103% against 83, 82 and 53% for 0.3, 0.7, 0.85; 0.7 led under an overfitting recipe)."""

    fuse: tuple[str, ...] = ()
    """--method fusion and mmr: the methods whose z-scores are added, of influence, bm25, tfidf, embed (repeat the flag): two or more for fusion, one or more for mmr (one: that method's relevance alone); default: influence, bm25, tfidf for fusion; bm25, tfidf for mmr."""

    clip: str | None = None
    """--method embed: a CLIP model (a directory, e.g. a local copy of openai/clip-vit-base-patch32, or `batctl tiny clip DIR`) whose image features replace the backbone's embedding: pool images are ranked by CLIP cosine to the adaptation images' centroid (samples without an image by their text's)."""

    surrogate: Path | None = None
    """Surrogate adapter directory (the output of `batctl surrogate`), read by the gradient methods (influence, hybrid, and fusion or mmr when --fuse names influence); any other method ignores it with a warning."""

    pool: tuple[str, ...] = ()
    """Backbone pool parts: tars, JSON/JSONL, text; braces like laion-{000..099}.tar are expanded by batctl."""

    target: str | None = None
    """Validation set whose mean gradient is the target; default: the adaptation set itself."""

    preconditioner: Literal["auto", "woodbury", "datainf", "identity"] = "auto"
    """How H⁻¹ is applied to the target: exact Woodbury, DataInf's approximation, or none (gradient alignment)."""

    damping: float = 0.1
    """c in λ_l = c · mean ||g_i||² / D_l."""

    engine: Literal["hooks", "fd"] = "hooks"
    """hooks: one batched backward with per-layer contractions; fd: central finite difference along r."""

    batch_size: int = operational(32)
    """Pool samples per batch (at most; an out-of-memory batch is halved). Scores are per sample, so a run may resume with another batch size."""

    max_batch_tokens: int | None = operational(None)
    """Also cap each batch at this many padded tokens (samples x longest sample; LM only), e.g. 16384; the costliest batch runs first."""

    chunk_size: int = 4096
    """Rows per zarr chunk: the unit of resumption."""

    shard: str | None = operational(None)
    """Score only shard i of N (a contiguous range of chunks), e.g. 3/8; default from torchrun's / accelerate's RANK and WORLD_SIZE, else all. Every shard of one store must use the same N."""

    normalize: bool = False
    """Divide each score by the pool sample's gradient norm ||∇L(x)|| (LESS's cosine): stops high-loss samples with large gradients filling the top; hooks engine only."""

    layer_scores: bool = False
    """Also store each layer's contribution (layer_score f32[N, L])."""

    loss_draws: int = 4
    """Diffusion: (timestep, noise) draws per sample, seeded from the sample key."""

    def resolved(self) -> ScoreConfig:
        """This config with --method auto replaced by the method it means for the --model's
        family (raises UsageError when the family cannot be told or has no auto method)."""
        if self.method != "auto":
            return self
        from batctl.tasks import family_traits

        family = self.family()
        traits = family_traits(family)
        chosen = traits.auto if self.clip is None else traits.auto_with_clip
        if chosen is None:
            raise UsageError(
                f"--clip: CLIP retrieval is for image pools; give --method embed to use it with "
                f"an {family} model"
            )
        method, fuse = chosen
        return dataclasses.replace(self, method=method, fuse=fuse or self.fuse)

    def problems(self) -> list[str]:
        from batctl.methods.fusion import PARTS

        # auto is checked as the method it means when the family can be told offline; a hub
        # id is resolved (downloading its config) when the run starts
        if self.method == "auto" and self.model is not None and Path(str(self.model)).is_dir():
            try:
                resolved = self.resolved()
            except BatctlError as exc:
                return [*super().problems(), str(exc)]
            return [
                f"--method auto runs {resolved.method} for this model: give --surrogate DIR (or "
                "--clip DIR for CLIP retrieval)"
                if p.startswith("--surrogate is required")
                else p
                for p in resolved.problems()
            ]
        out = super().problems()
        if self.reads_surrogate and self.surrogate is None:
            out.append(f"--surrogate is required with --method {self.method}")
        unknown = [m for m in self.fuse if m not in PARTS]
        least = 1 if self.method == "mmr" else 2  # mmr re-ranks one relevance; fusion adds
        if self.fuse and (unknown or len(set(self.fuse)) < least):
            count = "one" if least == 1 else "two"
            out.append(
                f"--fuse: give {count} or more of {', '.join(PARTS)} with --method "
                f"{self.method}, got {','.join(self.fuse)}"
            )
        if not (math.isfinite(self.diversity) and 0 <= self.diversity < 1):
            out.append(f"--diversity must be in [0, 1), got {self.diversity}")
        if self.damping <= 0:
            out.append(f"--damping must be > 0, got {self.damping}")
        for name in ("batch_size", "chunk_size", "loss_draws", "candidates"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            out.append(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        try:
            parse_shard(self.shard)
        except ValueError as exc:
            out.append(f"--shard: {exc}")
        if self.clip is not None and self.method != "embed" and "embed" not in self.fuse_parts:
            out.append(
                f"--clip is read by --method embed (or a --fuse naming embed), not {self.method}"
            )
        if self.layer_scores and self.method != "influence":
            out.append("--layer-scores needs --method influence (the others have no layers)")
        if self.layer_scores and self.engine == "fd":
            out.append("--layer-scores needs --engine hooks (fd only measures the total)")
        if self.normalize and self.engine == "fd":
            out.append("--normalize needs --engine hooks (fd never sees a per-sample gradient)")
        from batctl.remote import url_problem

        found = [url_problem(s, "--pool", True) for s in self.pool]
        return out + [p for p in found if p]

    def params(self) -> dict[str, Any]:
        """The run's identity: only the flags the method reads (a bm25 store does not depend on
        --damping, nor an influence store on --candidates)."""
        out = super().params()
        if not self.reads_surrogate:
            for name in INFLUENCE_FLAGS:
                out.pop(name, None)
        kept = {"hybrid": HYBRID_FLAGS, "mmr": MMR_FLAGS}.get(self.method, ())
        for name in sorted({*HYBRID_FLAGS, *MMR_FLAGS} - {*kept, "fuse"}):
            out.pop(name, None)
        if "candidates" in kept:
            out["candidates"] = self.candidate_count
        if self.method == "mmr" and self.similarity == "embed":
            # stores from before the embedding cosine measured TF-IDF redundancy: not reused
            out["similarity"] = "embed"
        out.pop("clip", None)  # an input (fingerprinted), not a setting
        from batctl.methods import FUSE_DEFAULTS

        if self.method == "mmr" or (
            self.method == "fusion" and self.fuse_parts != FUSE_DEFAULTS["fusion"]
        ):
            out["fuse"] = list(self.fuse_parts)
        else:
            out.pop("fuse", None)  # fusion's default parts are implied (stores before --fuse)
        return out

    @property
    def similarity(self) -> str:
        """Where mmr measures redundancy for the --fuse parts: "embed" or "tfidf"."""
        from batctl.methods.mmr import similarity_space

        return similarity_space(self.fuse_parts)

    @property
    def candidate_count(self) -> int:
        """--candidates, else the default of the method that reads it (CANDIDATE_DEFAULTS)."""
        if self.candidates is not None:
            return self.candidates
        if self.method == "mmr" and self.similarity == "embed":
            return CANDIDATE_DEFAULTS["mmr over embeddings"]
        return CANDIDATE_DEFAULTS.get(self.method, CANDIDATE_DEFAULTS["hybrid"])

    @property
    def reads_surrogate(self) -> bool:
        """Whether the method needs the surrogate (influence, hybrid, fusion with influence)."""
        from batctl.methods import reads_surrogate

        return reads_surrogate(self.method, self.fuse)

    def open_pool(self) -> Any:
        """This run's --pool (remote parts through their local mirror), decoded lazily: the
        store's rows in order, as every shard and the method's prepare see them."""
        from batctl.data import open_pool
        from batctl.remote import local_specs

        return open_pool(
            local_specs(self.pool),
            strict=self.strict,
            paragraphs=self.paragraphs,
            max_sample_bytes=self.max_sample_bytes(),
            decode=False,
        )

    @property
    def fuse_parts(self) -> tuple[str, ...]:
        """The parts fusion and mmr add: --fuse, else the method's default."""
        from batctl.methods import fuse_parts

        return fuse_parts(self.method, self.fuse)

    def shard_of(self, env: dict[str, str]) -> tuple[int, int]:
        """(i, N) from --shard, else torchrun's RANK and WORLD_SIZE, else (0, 1)."""
        explicit = parse_shard(self.shard)
        if explicit is not None:
            return explicit
        if "RANK" in env and "WORLD_SIZE" in env:
            try:
                return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")  # type: ignore[return-value]
            except ValueError as exc:
                raise UsageError(
                    f"RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r} from the environment: "
                    f"{exc}; set them as torchrun does (0 <= RANK < WORLD_SIZE) or pass --shard i/N"
                ) from None
        return 0, 1


def run(config: ScoreConfig) -> dict[str, Any]:
    """Score this shard's chunks of the pool into the store; the last shard to finish publishes it.

    Returns a summary: rows, chunks scored now and skipped as done, status counts, samples/s.
    """
    import os

    from batctl.artifacts import (
        check_existing,
        check_out_path,
        check_same_model,
        describe_input,
        describe_model,
        finish_output,
        naming_os_errors,
        output_lock,
        require_stage,
        run_identity,
    )
    from batctl.methods import make_method
    from batctl.remote import is_url
    from batctl.remote_score import run_remote
    from batctl.safeload import check_adapter_dir
    from batctl.samples import describe_data
    from batctl.scorestore import ScoreStore
    from batctl.shards import describe_pool, normalise_params, open_score_partial

    # setup: every input checked before any model is loaded
    config = config.resolved()  # --method auto: the family's method, recorded as itself
    shard, shards = config.shard_of(dict(os.environ))
    fp = config.strict_fingerprints
    method = make_method(config.method)
    # Content, not mtime: each node of a sharded run may hold its own copy of every input.
    model = describe_model(config.model, fp)
    inputs: dict[str, Any] = {"model": model}
    if config.reads_surrogate:
        surrogate = require_stage(config.surrogate, "surrogate", "--surrogate")
        check_same_model(surrogate, model, "--surrogate")
        check_adapter_dir(surrogate, "--surrogate")
        inputs["surrogate"] = describe_input(surrogate)
    elif config.surrogate is not None:
        # Not an error: `score --surrogate S` without --method is DESIGN §7's command line,
        # written when the default method read the surrogate.
        log.warning(
            "--method %s does not read --surrogate (relevance: %s); it is ignored. For the gradient, "
            "add --fuse influence --fuse bm25 --fuse tfidf, or use --method fusion or influence",
            config.method, ", ".join(config.fuse_parts) or config.method,
        )  # fmt: skip
    if config.clip is not None:
        inputs["clip"] = describe_input(config.clip, fp, content_only=True)
    inputs["data"] = describe_data(config.data, fp, content_only=True)
    inputs["pool"] = describe_pool(config.pool, fp)
    if config.target is not None:
        inputs["target"] = describe_data(config.target, fp, content_only=True)
    identity = run_identity("score", normalise_params(config.params()), inputs)
    if is_url(config.out):
        return run_remote(config, str(config.out), identity, shard, shards)
    out = Path(config.out).absolute()
    check_out_path(out, inputs)
    with naming_os_errors(out), output_lock(out, f"{out.name}.shard-{shard}-of-{shards}"):
        check_existing(out, identity, config.force)
        # load: one process at a time lays out the store and computes the target
        with output_lock(out, wait=True):
            check_existing(
                out, identity, config.force
            )  # another shard may have published meanwhile
            if config.force or not partial_matches(out, identity):
                refuse_while_scoring(out)  # wiping a store other shards write would mix two runs
            work = open_score_partial(out, identity, config.force, shards)
            started = json.loads((work / "partial.json").read_text(encoding="utf-8"))["started"]
            pool = config.open_pool()
            n_rows = None if ScoreStore.exists(work) else count_rows(pool, config)
            scorer = method.prepare(work, pool, config)
            if n_rows is not None:
                attrs = {
                    "method": method.name,
                    "n_adaptation": scorer.n_adaptation,
                    **scorer.attrs(),
                }
                lay_out_store(work, pool, n_rows, config, scorer.layer_names, attrs)
            scoring = scoring_lock(out)  # taken before the set-up lock is released: no gap
        # loop
        with scoring:
            summary = score_shard(work, pool, scorer, config, shard, shards)
        # save: whoever completes the last chunk publishes the store
        with output_lock(out, wait=True):
            summary["published"] = False
            if not work.exists():
                log.info(
                    "shard %d/%d finished; another shard already published %s", shard, shards, out
                )
            elif ScoreStore.open(work).is_complete():
                refuse_if_nothing_scored(work, ScoreStore.open(work).progress())
                ScoreStore.drop_clock(work)
                finish_output(
                    work, out, identity, started, {"summary": ScoreStore.open(work).progress()}
                )
                summary["published"] = True
            else:
                progress = ScoreStore.open(work).progress()
                log.info(
                    "shard %d/%d finished; %d of %d chunks done overall (the last shard to finish publishes %s)",
                    shard,
                    shards,
                    progress["done"],
                    progress["total"],
                    out,
                )
    return {"out": str(config.out), **summary}


def refuse_if_nothing_scored(work: Path, progress: dict[str, Any]) -> None:
    """A store without one finite score is not a result: it stays unpublished, for inspection."""
    status = progress["status"]
    if status["scored"] == 0:
        counts = ", ".join(f"{n} {name}" for name, n in status.items() if n)
        raise BatctlError(
            f"--pool: no sample got a finite score ({counts}); nothing was published, the store "
            f"is kept in {work} for inspection (see the warnings above, or batctl info)"
        )


def partial_matches(out: Path, identity: dict[str, Any]) -> bool:
    """True when `out` has unfinished work from this very run (it will be resumed, not wiped)."""
    from batctl.artifacts import PARTIAL, diff_runs, partial_dir

    try:
        recorded = json.loads((partial_dir(out) / PARTIAL).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return not partial_dir(out).exists()
    return not diff_runs(recorded, identity)


def scoring_lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.scoring.lock"


def scoring_lock(out: Path) -> Any:
    """A shared lock every scoring process holds while it writes chunks (returned already held)."""
    import contextlib

    from batctl.artifacts import acquire_lock, release_lock

    path = scoring_lock_path(out)
    fd = acquire_lock(path, shared=True, wait=True)

    @contextlib.contextmanager
    def held() -> Any:
        try:
            yield
        finally:
            release_lock(path, fd)

    return held()


def refuse_while_scoring(out: Path) -> None:
    """BatctlError when any process is scoring into `out`'s partial store."""
    from batctl.artifacts import acquire_lock, release_lock

    path = scoring_lock_path(out)
    try:
        fd = acquire_lock(path)
    except BlockingIOError:
        raise BatctlError(
            f"{out}: other score processes (shards) are writing its unfinished store; "
            "wait for them or stop them before starting over with other params or --force"
        ) from None
    release_lock(path, fd)


def count_rows(pool: Any, config: ScoreConfig) -> int:
    """Rows the store needs (a fast scan); an empty pool is an error before any model loads."""
    n_rows = sum(pool.row_counts())
    if n_rows == 0:
        parts = ", ".join(str(p.path) for p in pool.parts)
        raise BatctlError(f"--pool {parts}: no samples to score")
    return n_rows


def lay_out_store(
    work: Path,
    pool: Any,
    n_rows: int,
    config: ScoreConfig,
    layers: list[str] | None,
    attrs: dict[str, Any],
) -> None:
    """Lay out scores.zarr (one pending row per pool sample) in a temporary name, then rename it,
    so a kill mid-layout leaves no store that looks laid out."""
    import os
    import shutil

    from batctl.scorestore import STORE, ScoreStore

    staging = work / "layout.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    rows = ((row.key, row.part, row.offset) for row in pool.iter_rows())
    ScoreStore.create(
        staging,
        rows,
        n_rows,
        config.chunk_size,
        layer_names=layers,
        attrs={"pool": [str(p.path) for p in pool.parts], **attrs},
    )
    os.replace(staging / STORE, work / STORE)
    staging.rmdir()
    log.info(
        "laid out %s: %d rows in %d chunks", work / STORE, n_rows, -(-n_rows // config.chunk_size)
    )


def score_shard(
    work: Path, pool: Any, scorer: Any, config: ScoreConfig, shard: int, shards: int
) -> dict[str, Any]:
    """Score every pending chunk this shard owns, streaming only the parts those chunks cover."""
    import time

    import numpy as np

    from batctl.console import progress_bar
    from batctl.scorestore import ScoreStore, chunk_owner

    store = ScoreStore.open(work, mode="r+")
    owners = chunk_owner(store.n_chunks, shards)
    mine = np.flatnonzero(owners == shard)
    done = store.done()
    todo = [int(c) for c in mine if not done[c]]
    skipped = len(mine) - len(todo)
    log.info(
        "shard %d/%d: %d chunks of %d rows; %d already done and skipped, %d to score",
        shard,
        shards,
        len(mine),
        store.chunk_size,
        skipped,
        len(todo),
    )
    summary = {
        "rows": store.n_rows,
        "chunks_scored": 0,
        "chunks_skipped": skipped,
        "samples_per_s": None,
    }
    if not todo:
        summary["status"] = store.progress()["status"]
        return summary
    parts = store.column("part")
    first_part = int(parts[store.chunk_rows(todo[0]).start])
    last_part = int(parts[store.chunk_rows(todo[-1]).stop - 1])
    row = int(np.searchsorted(parts, first_part, side="left"))
    pending = set(todo)
    buffer: list[Any] = []
    scored_rows = 0
    began = time.perf_counter()
    total_rows = sum(len(store.chunk_rows(c)) for c in todo)
    with progress_bar(f"scoring (shard {shard}/{shards})", total_rows) as advance:
        for item in pool.iter_rows(range(first_part, last_part + 1)):
            chunk = row // store.chunk_size
            if chunk > todo[-1]:
                break
            if chunk in pending:
                buffer.append(item)
                if row == store.chunk_rows(chunk).stop - 1:
                    score_chunk(store, chunk, buffer, pool, scorer)
                    scored_rows += len(buffer)
                    advance(len(buffer))
                    summary["chunks_scored"] += 1
                    buffer = []
            row += 1
    if summary["chunks_scored"] != len(todo):
        raise BatctlError(
            f"--pool: streamed {row} rows but the store expects {store.n_rows}; the pool changed "
            f"since the store was laid out: delete {work} to start over"
        )
    elapsed = time.perf_counter() - began
    summary["samples_per_s"] = round(scored_rows / elapsed, 2) if elapsed > 0 else None
    summary["status"] = store.progress()["status"]
    if summary["status"]["unreadable"]:
        log.warning(
            "%d unreadable pool samples were skipped (status 2)", summary["status"]["unreadable"]
        )
    return summary


def score_chunk(store: Any, chunk: int, rows: list[Any], pool: Any, scorer: Any) -> None:
    """Decode and score one chunk's rows, then write the chunk (done flag last)."""
    import numpy as np

    from batctl.data import BadSample
    from batctl.scorestore import NON_FINITE, SCORED, UNREADABLE

    span = store.chunk_rows(chunk)
    expected = store.column("key", slice(span.start, span.stop))
    found = np.array([r.key for r in rows], dtype=str)
    if len(found) != len(expected) or not (found == expected).all():
        raise BatctlError(
            f"--pool: chunk {chunk} no longer matches the store (keys differ); the pool changed "
            "since the store was laid out: delete the .partial directory beside --out to start over"
        )
    scores = np.full(len(rows), np.nan)
    status = np.full(len(rows), UNREADABLE, dtype=np.uint8)
    layer_scores = (
        np.full((len(rows), len(store.layer_names)), np.nan) if store.layer_names else None
    )
    decoded = [(i, pool.decoded(r)) for i, r in enumerate(rows) if type(r) is not BadSample]
    good = [(i, s) for i, s in decoded if type(s) is not BadSample]
    results = scorer.score([s for _, s in good], [span.start + i for i, _ in good])
    for (i, _), result in zip(good, results, strict=True):
        if result is None:
            continue  # a sample the method cannot take: stays unreadable
        value, per_layer = result
        scores[i] = value
        status[i] = SCORED if np.isfinite(value) else NON_FINITE
        if layer_scores is not None and per_layer is not None:
            layer_scores[i] = per_layer
    store.write_chunk(chunk, scores, status, layer_scores)
