"""Selection methods (DESIGN §5b): each writes the same score store, one score per pool row.

| method | what ranks the pool | needs |
|---|---|---|
| `influence` | Σ_l r_l · ∇_l L(x) at the surrogate (DESIGN §5) | --surrogate |
| `bm25` | BM25 of each adaptation text as a query, summed | text / captions |
| `tfidf` | TF-IDF cosine to the adaptation centroid | text / captions |
| `dsir` | DSIR's hashed n-gram log importance weight | text / captions |
| `embed` | backbone embedding cosine to the adaptation centroid | the backbone |
| `hybrid` | the --prefilter's top --candidates, re-ranked by influence | --surrogate |
| `fusion` | the sum of the z-scores of the --fuse parts (influence, bm25, tfidf; or embed) | --surrogate if influence is a part |
| `mmr` | fusion's top --candidates, re-ranked for --diversity from D_A and each other | --surrogate if --fuse names influence |
"""

from __future__ import annotations

from collections.abc import Sequence

from batctl.methods.base import Method, Result, Scorer, text_of

METHODS = ("influence", "bm25", "tfidf", "dsir", "embed", "hybrid", "fusion", "mmr")
SURROGATE_METHODS = ("influence", "hybrid", "fusion")
"""Methods that read --surrogate (the others need no surrogate and no backward pass)."""


AUTO_METHODS: dict[tuple[str, bool, bool], tuple[str, tuple[str, ...]]] = {
    ("lm", False, False): ("mmr", ()),
    ("lm", False, True): ("mmr", ()),
    ("diffusion", False, False): ("influence", ()),
    ("diffusion", False, True): ("influence", ()),
    ("diffusion", True, False): ("mmr", ("embed",)),
    ("diffusion", True, True): ("mmr", ("embed",)),
}
"""What `score --method auto` runs, by (model family, --clip given, --surrogate given): the
method and its --fuse parts, the best measured on benchmarks/bat_quality.py's dev worlds. LMs:
mmr. Diffusion: a DreamBooth set's images come with the instance prompt only, which names no
subject a pool caption could match (caption bm25 and mmr rank the dev digit's pool images at
AUC 0.50 and 0.00), so the images decide: whenever a CLIP is given, mmr over CLIP retrieval
(`--fuse embed`: CLIP relevance, CLIP image cosine for redundancy), which on four dev digits
ended below CLIP retrieval alone on average and in 5 of 8 digit × γ cases (a lead inside the
seed-to-seed spread, taken by a rule written before the runs), and CLIP retrieval had beaten
the z-sum with influence in 7 of 8; else influence (which needs the surrogate)."""


def auto_method(family: str, clip: bool, surrogate: bool) -> tuple[str, tuple[str, ...]] | None:
    """The (method, --fuse parts) `--method auto` means for `family` with or without --clip
    and --surrogate; None when there is none (a CLIP model for an LM)."""
    return AUTO_METHODS.get((family, bool(clip), bool(surrogate)))


FUSE_DEFAULTS = {"fusion": ("influence", "bm25", "tfidf"), "mmr": ("bm25", "tfidf")}
"""The --fuse parts of each method that fuses, when the flag is not given."""


def fuse_parts(method: str, fuse: Sequence[str] = ()) -> tuple[str, ...]:
    """The parts `method` fuses: `fuse` when given, else the method's default (() for methods
    that fuse nothing)."""
    return tuple(fuse) or FUSE_DEFAULTS.get(method, ())


def reads_surrogate(method: str, fuse: Sequence[str] = ()) -> bool:
    """Whether `method` (with these --fuse parts; () for its default) needs the surrogate's
    gradients."""
    if method in FUSE_DEFAULTS:
        return "influence" in fuse_parts(method, fuse)
    return method in SURROGATE_METHODS


def make_method(name: str) -> Method:
    """The method called `name` (one of METHODS)."""
    if name == "influence":
        from batctl.methods.influence import Influence

        return Influence()
    if name == "fusion":
        from batctl.methods.fusion import Fusion

        return Fusion()
    if name == "mmr":
        from batctl.methods.mmr import Mmr

        return Mmr()
    if name == "hybrid":
        from batctl.methods.hybrid import Hybrid

        return Hybrid()
    if name == "embed":
        from batctl.methods.embed import Embed

        return Embed()
    from batctl.methods import lexical

    classes = {"bm25": lexical.Bm25, "tfidf": lexical.Tfidf, "dsir": lexical.Dsir}
    if name not in classes:
        raise ValueError(f"unknown method {name!r}")
    return classes[name]()


__all__ = [
    "METHODS",
    "SURROGATE_METHODS",
    "Method",
    "Result",
    "Scorer",
    "AUTO_METHODS",
    "FUSE_DEFAULTS",
    "auto_method",
    "fuse_parts",
    "make_method",
    "reads_surrogate",
    "text_of",
]
