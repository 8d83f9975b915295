"""LoRA adapters on the convolutions of an SR policy (Hu et al. 2022, "LoRA", eq. 3, applied to
``nn.Conv2d`` as in LoCon / LyCORIS).

A wrapped convolution computes ``y = conv_W(x) + (alpha / r) * up(down(x))`` where ``down`` is a
convolution with the base kernel's size, stride, padding and dilation to ``r`` channels, ``up`` a
1x1 convolution back to the output channels, initialised to zero, so a freshly wrapped policy
computes exactly what the base policy computes. Only ``down`` / ``up`` train; the base weights
are frozen.

Because the base weights are untouched, the **reference policy** of a KL or DPO term is the same
module with its adapters switched off (:func:`adapters_disabled`): no second copy is loaded.
:func:`merge_lora` folds the adapters into the base weights (``W + (alpha / r) * up @ down``) for
saving a plain checkpoint that loads wherever a policy name does.

Grouped convolutions and transposed convolutions (UpConv7's last layer) are left as they are.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn


class LoRAConv2d(nn.Module):
    """``base(x) + scale * up(down(x))`` with ``base`` frozen and ``up`` zero-initialised; ``down``
    is Kaiming-uniform initialised from ``generator`` (``None``: torch's global RNG)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError("LoRAConv2d supports groups == 1 only")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                              bias=False, padding_mode=base.padding_mode)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5, generator=generator)
        nn.init.zeros_(self.up.weight)
        self.down.to(base.weight)
        self.up.to(base.weight)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.scale * self.up(self.down(x))
        return y

    def merged_weight(self) -> torch.Tensor:
        """``W + scale * up @ down`` with the base kernel's shape."""
        w = self.base.weight
        delta = self.up.weight.flatten(1) @ self.down.weight.flatten(1)  # (out, r) @ (r, in*kh*kw)
        return w + self.scale * delta.view_as(w)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, *,
               generator: torch.Generator | None = None) -> list[str]:
    """Wrap every ``nn.Conv2d`` (groups 1) of ``model`` in place with a :class:`LoRAConv2d` and
    freeze everything else. ``alpha`` defaults to ``rank`` (scale 1). The adapters' ``down``
    weights are drawn from ``generator`` (a CPU ``torch.Generator``) in module order, so a seeded
    generator makes them a function of its seed; ``None`` draws from torch's global RNG.
    Returns the wrapped names. Raises ValueError for ``rank < 1`` or a model without convolutions."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Conv2d layers to put LoRA adapters on")
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRAConv2d(conv, rank, alpha, generator))
    return [n for n, _ in targets]


def lora_layers(model: nn.Module) -> list[LoRAConv2d]:
    return [m for m in model.modules() if isinstance(m, LoRAConv2d)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes the frozen base policy (the reference)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("adapters_disabled: the model has no LoRA adapters")
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every adapter folded into its base convolution (plain
    ``nn.Conv2d`` again, same state-dict keys as the base policy). The input is not changed."""
    merged = copy.deepcopy(model)
    for name, m in list(merged.named_modules()):
        if isinstance(m, LoRAConv2d):
            with torch.no_grad():
                m.base.weight.copy_(m.merged_weight())
            parent_name, _, child = name.rpartition(".")
            parent = merged.get_submodule(parent_name) if parent_name else merged
            setattr(parent, child, m.base)
    return merged.requires_grad_(True)
