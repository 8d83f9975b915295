"""Hackability: how far can a reward be raised by moving pixels, and what happens to fidelity?
(beyond arXiv 2512.22647, which shows hacking only through RL training, Fig. 1).

Start from real SR outputs of test photos and take ``K`` steps of gradient *ascent on the reward*
directly in pixel space (no policy in between: the most direct attack an RL policy can approximate):

    sign:  x_{t+1} = clamp(x_t + eta * sign(grad_x R(x_t)), 0, 1)           (FGSM / PGD-style, L_inf)
    adam:  x_{t+1} = clamp(Adam_step(x_t, grad_x R(x_t), lr = eta), 0, 1)   (maximising R)

Both steps move every pixel by about ``eta`` whatever the reward's scale, so rewards with different
score scales get the same pixel budget (at most ``K * eta`` per pixel for ``sign``). Along the way
the reward and fidelity to HR (PSNR-Y, ST-LPIPS) are recorded. A reward that rises while PSNR falls
and ST-LPIPS grows can be *hacked*: the optimum it points to moves away from the clean photo.

``reward_fn``: ``fn(x (B, 3, H, W) in [0, 1]) -> (B,)``, differentiable w.r.t. ``x`` (for a
FinPercep-RM: ``lambda x: model(x).score``); a reward whose output does not depend on ``x`` gets a
zero gradient (no step). ``metrics``: ``{name: fn(x, hr) -> (B,)}``, e.g. ``{"psnr_y": psnr_y,
"stlpips": STLPIPS()}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from finpercep.checks import check_image_batch
from finpercep.eval.edit_checks import bootstrap_ci

RewardFn = Callable[[torch.Tensor], torch.Tensor]
"""``fn(x (B, 3, H, W) in [0, 1]) -> (B,)`` rewards, higher = better, differentiable w.r.t. ``x``."""
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(x, hr)`` both ``(B, 3, H, W)`` in [0, 1] -> ``(B,)``."""


@dataclass(frozen=True)
class AscentConfig:
    """Pixel-space gradient ascent on a reward.

    Attributes:
        steps: ``K``, the number of ascent steps (>= 1).
        step_size: ``eta`` in pixel units of [0, 1] (default 1/255: one 8-bit level per step).
        method: ``"sign"`` (signed gradient, each pixel moves by exactly ``eta`` unless clamped) or
            ``"adam"`` (Adam with learning rate ``eta``, maximising; betas (0.9, 0.999)).
        record_every: reward and metrics are recorded at steps ``0, r, 2r, .., K`` (``K`` must be a
            multiple of ``r``); ``1`` records every step. Metrics such as ST-LPIPS cost a forward
            pass each, so by default every 2nd step is recorded.
        init_noise: amplitude of a uniform random start ``U(-a, a)`` added before the first step
            (PGD's random start; drawn from the generator); 0 = start at the images themselves.
    """

    steps: int = 10
    step_size: float = 1.0 / 255
    method: Literal["sign", "adam"] = "sign"
    record_every: int = 2
    init_noise: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"AscentConfig: steps must be an integer >= 1, got {self.steps!r}")
        if not self.step_size > 0:
            raise ValueError(f"AscentConfig: step_size must be > 0, got {self.step_size!r}")
        if self.method not in ("sign", "adam"):
            raise ValueError(f"AscentConfig: method must be 'sign' or 'adam', got {self.method!r}")
        if not isinstance(self.record_every, int) or self.record_every < 1 or self.steps % self.record_every:
            raise ValueError(f"AscentConfig: record_every must be >= 1 and divide steps={self.steps}, "
                             f"got {self.record_every!r}")
        if not 0 <= self.init_noise < 1:
            raise ValueError(f"AscentConfig: init_noise must be in [0, 1), got {self.init_noise!r}")


@dataclass(frozen=True)
class AscentCurves:
    """What :func:`reward_ascent` recorded for ``B`` images at ``T = K / record_every + 1`` steps.

    ``steps``: ``(T,)`` int, the step indices (0 = the start). ``reward``: ``(T, B)`` float64.
    ``metrics``: ``{name: (T, B)}`` float64, each metric of ``x_t`` against HR. ``final``: the images
    after the last step, ``(B, 3, H, W)`` in [0, 1].
    """

    steps: torch.Tensor
    reward: torch.Tensor
    metrics: dict[str, torch.Tensor]
    final: torch.Tensor


def _gradient(reward_fn: RewardFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reward (B,) detached, d sum(reward) / dx)``; zero gradient where the reward ignores ``x``."""
    with torch.enable_grad():
        r = reward_fn(x)
        if not isinstance(r, torch.Tensor) or r.shape != (x.shape[0],):
            raise ValueError(f"reward_fn must return a ({x.shape[0]},) tensor for a batch of {x.shape[0]}, "
                             f"got {type(r).__name__} {tuple(getattr(r, 'shape', ()))}")
        if not r.requires_grad:
            return r.detach(), torch.zeros_like(x)
        (g,) = torch.autograd.grad(r.sum(), x, allow_unused=True)
    return r.detach(), torch.zeros_like(x) if g is None else g


def _measure(metrics: Mapping[str, MetricFn], x: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: torch.as_tensor(fn(x, hr)).detach().double().cpu() for name, fn in metrics.items()}


def reward_ascent(
    reward_fn: RewardFn,
    images: torch.Tensor,
    hr: torch.Tensor,
    metrics: Mapping[str, MetricFn],
    cfg: AscentConfig = AscentConfig(),
    generator: torch.Generator | None = None,
) -> AscentCurves:
    """``cfg.steps`` steps of pixel-space gradient ascent on ``reward_fn`` from ``images`` (module
    docstring), recording the reward and ``metrics(x_t, hr)`` every ``cfg.record_every`` steps.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1], the starting points (real SR outputs); not modified.
        hr: ``(B, 3, H, W)`` in [0, 1], the references of the metrics.
        generator: draws the random start (``cfg.init_noise > 0`` only).

    Returns :class:`AscentCurves`. Each image's trajectory depends only on its own reward (the
    gradient of ``sum_i R(x_i)`` w.r.t. ``x_i``), so chunks of a batch give the same curves as the
    whole batch. Raises ValueError for bad images, mismatched shapes or a reward of the wrong shape.
    """
    images = check_image_batch(images, "reward_ascent: images")
    hr = check_image_batch(hr, "reward_ascent: hr")
    if images.shape != hr.shape:
        raise ValueError(f"reward_ascent: images {tuple(images.shape)} and hr {tuple(hr.shape)} differ in shape")
    x = images.detach().clone().float()
    if cfg.init_noise > 0:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        x = (x + cfg.init_noise * noise.to(x.device)).clamp(0, 1)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.step_size, maximize=True) if cfg.method == "adam" else None

    steps: list[int] = []
    rewards: list[torch.Tensor] = []
    recorded: dict[str, list[torch.Tensor]] = {name: [] for name in metrics}
    for t in range(cfg.steps + 1):
        last = t == cfg.steps
        if last:
            with torch.no_grad():
                r = torch.as_tensor(reward_fn(x)).detach()
            g = None
        else:
            r, g = _gradient(reward_fn, x)
        if t % cfg.record_every == 0:
            steps.append(t)
            rewards.append(r.double().cpu())
            for name, v in _measure(metrics, x.detach(), hr).items():
                recorded[name].append(v)
        if g is None:
            break
        with torch.no_grad():
            if opt is None:
                x.add_(cfg.step_size * g.sign())
            else:
                x.grad = g
                opt.step()
            x.clamp_(0, 1)
    return AscentCurves(
        steps=torch.tensor(steps), reward=torch.stack(rewards),
        metrics={name: torch.stack(v) for name, v in recorded.items()}, final=x.detach(),
    )


def merge_curves(parts: Sequence[AscentCurves]) -> AscentCurves:
    """Join the curves of several chunks of images (same config) along the image axis."""
    if not parts:
        raise ValueError("merge_curves: no curves to merge")
    steps = parts[0].steps
    if any(not torch.equal(p.steps, steps) or p.metrics.keys() != parts[0].metrics.keys() for p in parts):
        raise ValueError("merge_curves: the parts were recorded at different steps or with different metrics")
    return AscentCurves(
        steps=steps, reward=torch.cat([p.reward for p in parts], dim=1),
        metrics={k: torch.cat([p.metrics[k] for p in parts], dim=1) for k in parts[0].metrics},
        final=torch.cat([p.final for p in parts]),
    )


def summarise_ascent(
    curves: AscentCurves,
    reward_hr: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    n_boot: int = 1000,
) -> dict[str, object]:
    """The changes from the start to the last recorded step, per image, as mean and 95 % bootstrap
    interval: ``{"steps": K, "n": B, "reward": {"start", "end", "change", "change_ci"}, <metric>: {...}}``.

    ``reward_hr`` ``(B,)``: the reward of each image's HR; adds ``"above_hr_start"`` and
    ``"above_hr_end"``, the fraction of images whose reward is above their clean photo's before and
    after the ascent (a hacked image ranked above the photo it should approach).
    """
    def change(values: torch.Tensor) -> dict[str, object]:
        d = values[-1] - values[0]
        return {"start": float(values[0].mean()), "end": float(values[-1].mean()), "change": float(d.mean()),
                "change_ci": list(bootstrap_ci(d, generator, n_boot))}

    out: dict[str, object] = {"steps": int(curves.steps[-1]), "n": int(curves.reward.shape[1]),
                              "reward": change(curves.reward)}
    for name, v in curves.metrics.items():
        out[name] = change(v)
    if reward_hr is not None:
        s_hr = torch.as_tensor(reward_hr, dtype=torch.float64).flatten()
        if s_hr.shape != (curves.reward.shape[1],):
            raise ValueError(f"summarise_ascent: reward_hr must be ({curves.reward.shape[1]},), got {tuple(s_hr.shape)}")
        out["above_hr_start"] = float((curves.reward[0] > s_hr).double().mean())
        out["above_hr_end"] = float((curves.reward[-1] > s_hr).double().mean())
    return out


__all__ = ["AscentConfig", "AscentCurves", "MetricFn", "RewardFn", "merge_curves", "reward_ascent",
           "summarise_ascent"]
