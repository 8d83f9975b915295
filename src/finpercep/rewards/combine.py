"""Weighted sums of rewards and the spec language that names them.

A spec is terms joined by ``+``, each ``[w*]name[:K]``: ``finpercep+0.5*l1``,
``finpercep:2+0.1*ssim``, ``-1*niqe``. ``w`` is a float (negative allowed; write exponents without
a ``+``: ``1e3``, ``1e-3``), default 1; ``:K`` picks a curriculum stage where the reward has stages.
Whitespace around the parts is ignored.

:class:`WeightedSum` with ``normalize="batch"`` standardises each term over the batch before
weighting (:func:`batch_standardize`), so ``finpercep+0.5*l1`` means "half as much L1 as
FinPercep-RM" whatever the raw scales of the two (the RM's margin units vs. a mean absolute error).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch

from finpercep.types import Reward, RewardOutput

Normalize = Literal["batch", "none"]

DEFAULT_EPS = 1e-6
"""Floor of the batch standard deviation in :func:`batch_standardize` (score units)."""


def batch_standardize(score: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``(score - mean) / max(std, eps)`` over the batch, with the mean and the (population) std
    *detached*: the output's gradient is the score's gradient times ``1 / max(std, eps)``, and the
    batch statistics themselves get none (no pull of one sample's gradient onto the others).

    ``score`` ``(B,)``. For ``B == 1`` there is no batch to standardise over: the score is
    returned unchanged (mean 0, std 1). A constant batch gives zeros.
    """
    if score.ndim != 1:
        raise ValueError(f"batch_standardize: expected scores (B,), got shape {tuple(score.shape)}")
    if score.shape[0] == 1:
        return score
    d = score.detach()
    return (score - d.mean()) / d.std(correction=0).clamp_min(eps)


def format_weight(w: float) -> str:
    """Shortest text that parses back to ``w`` (``0.5``, ``-1``, ``1e-06``)."""
    short = f"{w:g}"
    return short if float(short) == w else repr(float(w))


def format_spec(terms: Sequence[tuple[float, str]]) -> str:
    """``[(w, name), ...]`` -> ``"name+w*name..."`` (a weight of 1 is left out)."""
    return "+".join(name if w == 1 else f"{format_weight(w)}*{name}" for w, name in terms)


_TERM = re.compile(r"^(?:(?P<w>[^*]*)\*)?(?P<name>[A-Za-z][\w.-]*?)(?::(?P<stage>.*))?$")


def parse_spec(spec: str) -> list[tuple[float, str, int | None]]:
    """``"finpercep:2+0.1*ssim"`` -> ``[(1.0, "finpercep", 2), (0.1, "ssim", None)]``.

    Checks only the syntax (names are checked against the catalogue by ``create_reward``).
    Raises ValueError for an empty spec or term, a weight that is not a finite float, or a stage
    that is not an integer >= 0, saying which term is wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec {spec!r}; write e.g. 'finpercep', 'finpercep+0.5*l1' or '-1*niqe'")
    out = []
    for raw in spec.split("+"):
        term = re.sub(r"\s+", "", raw)
        if not term:
            raise ValueError(f"reward spec {spec!r} has an empty term (a stray '+'?); terms are [w*]name[:K] joined by '+'")
        m = _TERM.match(term)
        if m is None:
            raise ValueError(f"reward spec {spec!r}: cannot read term {term!r}; expected [w*]name[:K], e.g. 0.5*l1 or finpercep:2")
        w_text, name, stage_text = m["w"], m["name"], m["stage"]
        try:
            w = 1.0 if w_text is None else float(w_text)
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: bad weight {w_text!r} in term {term!r} (a float such as 0.5, -1 or 1e-3)") from None
        if not math.isfinite(w):
            raise ValueError(f"reward spec {spec!r}: weight {w_text!r} in term {term!r} must be finite")
        stage = None
        if stage_text is not None:
            if not stage_text.isdigit():
                raise ValueError(f"reward spec {spec!r}: stage {stage_text!r} in term {term!r} must be an integer >= 0 (K of RM_K)")
            stage = int(stage_text)
        out.append((w, name, stage))
    return out


class WeightedSum:
    """``score = sum_i w_i * n(s_i)`` of the terms' scores ``s_i``, with ``n`` the identity
    (``normalize="none"``) or :func:`batch_standardize` (``"batch"``, default).

    Args:
        terms: the rewards (each a :class:`finpercep.types.Reward`).
        weights: one finite float per term (negative allowed).
        normalize: ``"batch"``: each term standardised over the batch with its detached mean and
            std (floored at ``eps``; ``B == 1``: unchanged), so weights act on comparable scales
            and each term's gradient is its own, times ``w_i / std_i``. Note the std of a term whose
            scores barely differ across the batch is small, and its gradient is scaled up by as
            much (only ``eps`` bounds it). ``"none"``: the raw weighted sum.
        eps: floor of the std (score units).
        name: the spec (default: built from the terms' names and weights).

    Metadata: ``needs_reference`` iff any term needs it (checked before any term runs);
    ``differentiable`` iff all terms are (otherwise the score is detached); ``has_map`` iff a term
    with weight > 0 has one, and the map (and map logits) are the first such term's; ``range``
    ``(-inf, inf)`` when normalised, else the weighted sum of the terms' ranges. Terms with weight
    0 are not run.
    """

    def __init__(
        self,
        terms: Sequence[Reward],
        weights: Sequence[float],
        normalize: Normalize = "batch",
        eps: float = DEFAULT_EPS,
        name: str | None = None,
    ) -> None:
        terms, weights = list(terms), [float(w) for w in weights]
        if not terms or len(terms) != len(weights):
            raise ValueError(f"WeightedSum: needs as many weights as terms (at least one), got {len(terms)} terms, {len(weights)} weights")
        for t in terms:
            if not isinstance(t, Reward):
                raise ValueError(f"WeightedSum: {t!r} is not a Reward (needs name, needs_reference, differentiable, range, has_map, __call__)")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"WeightedSum: weights must be finite, got {weights}")
        if normalize not in ("batch", "none"):
            raise ValueError(f"WeightedSum: normalize must be 'batch' or 'none', got {normalize!r}")
        if not eps > 0:
            raise ValueError(f"WeightedSum: eps must be > 0, got {eps!r}")
        self.terms, self.weights, self.normalize, self.eps = terms, weights, normalize, float(eps)
        self.name = name or format_spec([(w, t.name) for w, t in zip(weights, terms)])
        self.needs_reference = any(t.needs_reference for t in terms)
        self.differentiable = all(t.differentiable for t in terms)
        self._map_term = next((i for i, (t, w) in enumerate(zip(terms, weights)) if w > 0 and t.has_map), None)
        self.has_map = self._map_term is not None
        if normalize == "batch":
            self.range = (-math.inf, math.inf)
        else:
            lo = hi = 0.0
            for t, w in zip(terms, weights):
                if w != 0:  # skip 0 * inf
                    a, b = w * t.range[0], w * t.range[1]
                    lo, hi = lo + min(a, b), hi + max(a, b)
            self.range = (lo, hi)

    def to(self, device: str | torch.device) -> "WeightedSum":
        """Move every term that can move (``to`` is not part of the Reward protocol)."""
        for t in self.terms:
            if hasattr(t, "to"):
                t.to(device)
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        if self.needs_reference and hr is None:
            need = [t.name for t in self.terms if t.needs_reference]
            raise ValueError(f"reward {self.name!r} needs hr (full-reference terms {need}): call reward(sr, hr=hr)")
        score, map_out = None, None
        for i, (t, w) in enumerate(zip(self.terms, self.weights)):
            if w == 0:
                continue
            out = t(sr, lr, hr)
            s = out.score if self.normalize == "none" else batch_standardize(out.score, self.eps)
            score = w * s if score is None else score + w * s
            if i == self._map_term:
                map_out = out
        if score is None:  # every weight is 0
            score = torch.zeros(sr.shape[0], device=sr.device)
        if not self.differentiable:
            score = score.detach()
        if map_out is None:
            return RewardOutput(score=score)
        return RewardOutput(score=score, map=map_out.map, map_logits=map_out.map_logits)

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r}, normalize={self.normalize!r})"
