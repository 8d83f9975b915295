"""Input checks shared by every public entry point that takes an image batch, and :func:`require`,
the one way optional third-party modules are imported (inside the function that needs them)."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def require(module: str, *, extra: str) -> ModuleType:
    """Import the optional third-party ``module`` (a dotted name such as ``"cv2"`` or
    ``"scipy.ndimage"``) and return it.

    ``extra``: the ``pip install 'finpercep[EXTRA]'`` extra that provides it (``data``, ``metrics``,
    ``report``, ...; see ``pyproject.toml``). Raises ImportError, naming the extra, when the module is
    not installed; an ImportError raised *inside* an installed module propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if not (module == missing or module.startswith(missing + ".")):
            raise  # the module is installed but itself imports something missing: not ours to rename
        raise ImportError(
            f"{module} is not installed and this feature needs it: pip install 'finpercep[{extra}]' "
            "(or pip install -r requirements.txt for everything)"
        ) from e


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes an image batch may have; anything else is refused with a hint (:func:`check_image_batch`)."""


def _dtype_problem(dtype: torch.dtype) -> str | None:
    """What is wrong with an image batch of ``dtype`` and how to fix it, or None when it is usable."""
    if dtype in FLOAT_DTYPES:
        return None
    if dtype == torch.bool:
        return "got a bool tensor (a mask?); pass the image as float in [0, 1] (x.float() for a 0/1 mask)"
    if dtype.is_complex:
        return f"got complex dtype {dtype}; pass real float values in [0, 1] (e.g. x.real or x.abs())"
    if dtype.is_floating_point:
        return f"got dtype {dtype}; cast it with x.float()"
    # Integer images are 8-bit (or 16-bit) pixel values: scale them, do not just cast.
    return f"got integer dtype {dtype}; divide by 255 (x.float() / 255 for 8-bit, / 65535 for 16-bit)"


def check_image_batch(
    x: object, who: str, *, min_size: int = 1, tol: float = 1e-3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Validate ``x`` as a ``(B, 3, H, W)`` float image batch in [0, 1] and return it.

    Accepted dtypes: :data:`FLOAT_DTYPES` (float16, bfloat16, float32, float64). Integer, bool,
    complex and other float dtypes (float8) are refused with what to do (an integer image: divide
    by 255). ``dtype``: cast the checked batch to it (e.g. the model's parameter dtype, so a
    float64 NumPy image works on a float32 network); the cast is differentiable; ``None`` keeps
    the input's dtype. ``min_size``: smallest allowed H and W. ``tol``: how far values may stray
    outside [0, 1] (e.g. 0.5 for a reward that must accept an SR generator's slight overshoot).

    Raises ValueError (message starts with ``who``, says what was wrong and what to do) for a
    non-tensor, a wrong shape, an empty batch, images below ``min_size``, a refused dtype, NaN /
    infinite values or values outside ``[-tol, 1 + tol]``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who}: expected a torch.Tensor (B, 3, H, W) in [0, 1], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"{who}: expected shape (B, 3, H, W) (RGB, batched; use x[None] for one image), got {tuple(x.shape)}"
        )
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{who}: empty batch or image, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{who}: needs images of at least {min_size}x{min_size}, got {tuple(x.shape[-2:])}")
    problem = _dtype_problem(x.dtype)
    if problem:
        raise ValueError(f"{who}: expected a float tensor in [0, 1], {problem}")
    lo, hi = torch.aminmax(x.detach())  # one pass; NaN propagates into both
    lo, hi = float(lo), float(hi)
    if not (lo == lo and hi == hi) or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError(f"{who}: input contains NaN or infinite values")
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"{who}: expected values in [0, 1], got range [{lo:.3g}, {hi:.3g}] (divide 8-bit images by 255)")
    return x if dtype is None or x.dtype == dtype else x.to(dtype)
