"""Shared data types. Conventions used everywhere in finpercep:

- an image in the data engine is a float32 tensor ``(3, H, W)`` in [0, 1], RGB; batched code
  uses ``(B, 3, H, W)``;
- a mask is ``(H, W)`` float32 in {0, 1}; a map is ``(B, 1, H, W)`` (or ``(H, W)`` on disk) in
  [0, 1], higher = more degraded;
- randomness comes from an explicit ``numpy.random.Generator`` passed in, never from global state;
- every random choice is returned as a JSON-serialisable ``params`` dict so it can be recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch

Params = dict[str, Any]

# fn(lr (3,h,w), hr (3,h*s,w*s), scale, rng) -> (sr (3,h*s,w*s) in [0,1], params)
SRFn = Callable[[torch.Tensor, torch.Tensor, int, np.random.Generator], tuple[torch.Tensor, Params]]


@dataclass(frozen=True)
class SRFamily:
    """One entry of the SR zoo: something that turns an LR image into an SR image.

    ``kind`` says what it is: a real pretrained network (``real``), classic interpolation
    (``interpolation``), a procedural injector of a typical generative-SR artifact
    (``procedural``; it works on the HR image, so its only difference from HR is the artifact),
    or a user-supplied callable (``user``).
    """

    name: str
    kind: Literal["real", "interpolation", "procedural", "user"]
    description: str
    fn: SRFn = field(repr=False, compare=False)
    scales: tuple[int, ...] = (2, 4)
    uses_hr: bool = False
    cost: Literal["cheap", "expensive"] = "cheap"
    licence: str = ""
