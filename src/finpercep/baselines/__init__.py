"""Global baseline image-quality metrics: classic no-reference IQA and shift-tolerant LPIPS.

Each metric is a plain callable on ``(B, 3, H, W)`` float RGB in [0, 1] returning ``(B,)``:

- no reference: ``niqe(img)``, ``brisque(img)``, ``piqe(img)`` (NumPy, not differentiable);
- full reference: ``STLPIPS(net)(x, y)`` (an ``nn.Module``; differentiable w.r.t. the inputs).

These are the *raw* metrics with their own direction (all four: lower = better). The reward
interface turns them into higher-is-better rewards; :data:`METRICS` says for each one what it
needs, which way is better, its nominal range and whether gradients flow, so that code never
has to guess.

NIQE, BRISQUE and PIQE need scipy and ST-LPIPS its weights package: the ``metrics`` extra. Importing
this package without scipy raises an ImportError that names it; callers import it where a metric is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from finpercep.baselines.brisque import brisque
from finpercep.baselines.niqe import niqe
from finpercep.baselines.piqe import piqe
from finpercep.baselines.stlpips import STLPIPS


@dataclass(frozen=True)
class MetricInfo:
    """What a baseline metric is and how to call it.

    Attributes:
        name: key in :data:`METRICS`.
        fn: the metric function (``fn(img) -> (B,)``) or, when ``is_factory``, a factory
            (``fn(**kwargs) -> callable``, e.g. an ``nn.Module`` with ``(x, y) -> (B,)``).
        needs_reference: called as ``metric(x, y)`` with a reference ``y``; else ``metric(img)``.
        higher_is_better: direction of the raw value (False for all current entries).
        range: nominal ``(low, high)`` of the raw value; values are not clipped to it, and
            ``math.inf`` marks an open end.
        differentiable: gradients flow from the value to the input image(s).
        is_factory: ``fn`` must be called (once) to build the metric; see :meth:`create`.
        description: one line for listings.
    """

    name: str
    fn: Callable[..., Any]
    needs_reference: bool
    higher_is_better: bool
    range: tuple[float, float]
    differentiable: bool
    is_factory: bool
    description: str

    def create(self, **kwargs: Any) -> Callable[..., Any]:
        """The ready-to-call metric: ``fn`` itself, or ``fn(**kwargs)`` for a factory."""
        if not self.is_factory:
            if kwargs:
                raise TypeError(f"metric {self.name!r} takes no options, got {sorted(kwargs)}")
            return self.fn
        return self.fn(**kwargs)


def _stlpips_vgg(**kwargs: Any) -> STLPIPS:
    return STLPIPS(net="vgg", **kwargs)


METRICS: dict[str, MetricInfo] = {
    "niqe": MetricInfo(
        name="niqe",
        fn=niqe,
        needs_reference=False,
        higher_is_better=False,
        range=(0.0, math.inf),
        differentiable=False,
        is_factory=False,
        description="NIQE (Mittal et al. 2013), BasicSR/MATLAB parameters; Y channel, 96x96 blocks",
    ),
    "brisque": MetricInfo(
        name="brisque",
        fn=brisque,
        needs_reference=False,
        higher_is_better=False,
        range=(0.0, 100.0),
        differentiable=False,
        is_factory=False,
        description="BRISQUE (Mittal et al. 2012), the authors' MATLAB release and its LIVE model",
    ),
    "piqe": MetricInfo(
        name="piqe",
        fn=piqe,
        needs_reference=False,
        higher_is_better=False,
        range=(0.0, 100.0),
        differentiable=False,
        is_factory=False,
        description="PIQE (Venkatanath et al. 2015), as MATLAB's piqe",
    ),
    "stlpips": MetricInfo(
        name="stlpips",
        fn=STLPIPS,
        needs_reference=True,
        higher_is_better=False,
        range=(0.0, math.inf),
        differentiable=True,
        is_factory=True,
        description="shift-tolerant LPIPS distance (Ghildyal & Liu 2022), AlexNet",
    ),
    "stlpips-vgg": MetricInfo(
        name="stlpips-vgg",
        fn=_stlpips_vgg,
        needs_reference=True,
        higher_is_better=False,
        range=(0.0, math.inf),
        differentiable=True,
        is_factory=True,
        description="shift-tolerant LPIPS distance (Ghildyal & Liu 2022), VGG16",
    ),
}

__all__ = ["METRICS", "MetricInfo", "STLPIPS", "brisque", "niqe", "piqe"]
