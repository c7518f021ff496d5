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
    "FUSE_DEFAULTS",
    "fuse_parts",
    "make_method",
    "reads_surrogate",
    "text_of",
]
