"""Online co-evolution of the reward model with the policy (beyond the offline stages of arXiv
2512.22647; curriculum mode ``coevolve``).

While the policy trains, its own outputs become reward-model training data, built exactly like the
data engine's (arXiv 2512.22647, Sec. 2): for a training pair ``(LR, HR)`` and the policy's ``SR``,
both rounded to 8 bits as the data set stores its images,

    I_syn = B * SR + (1 - B) * HR          B a random swap mask (finpercep.data.masks; the swap
                                           is finpercep.data.dataset.swap, 8-bit like the data set)
    M_gt  = GTMapper(HR, I_syn)            the same ground-truth recipe (finpercep.data.gt_maps)

(:func:`make_triplets`). A :class:`Coevolver` keeps the most recent triplets in a replay buffer
and, every ``refresh_every`` policy steps, trains the current stage's reward model for
``rm_steps`` steps on them with the reward model's own loss (:func:`finpercep.reward.losses.
total_loss`: ranking ``S_HR > S_syn > S_SR``, the map L1 at stages >= 1, and the alignment of
clean-image scores to the original, frozen ``RM_0``, so score scales stay where the policy's
reward expects them). Artifacts the policy invents thus become negatives of the reward it is
trained on, instead of staying invisible to a frozen reward (reward hacking).

A refresh can also make the reward model worse (few, correlated samples). Each refresh measures
the model's ordering accuracy ``S_HR > S_syn > S_SR`` on a small fixed held-out triplet set
before and after, and logs both (``coevolve/heldout_order_acc_before`` / ``_after``), so such a
refresh is visible; ``revert_if_worse`` undoes it.

Each RM stage gets its own trainable float32 copy, made from the shipped weights of that stage the
first time the stage is refreshed; a new stage does not inherit the previous stage's refreshes
(its architecture differs), but the replay buffer carries over.

Resume: :meth:`Coevolver.state_dict` holds the updated weights of each refreshed stage, its
optimiser state and the counters, as tensors and plain numbers that ``torch.save`` /
``torch.load(weights_only=True)`` accept. The replay buffer is **not** saved (it is refilled by
the next rollouts; a refresh waits until it holds ``batch`` triplets), so a resumed run's
reward models match an uninterrupted run's only up to the refreshes that follow a resume.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finpercep.reward.losses import RMLossConfig
from finpercep.types import Triplet

log = logging.getLogger(__name__)

DEFAULT_AREA: tuple[float, float] = (0.03, 0.30)
"""Swap-mask area bounds, as the data engine's default (``BuildConfig.mask_area``)."""
DEFAULT_MASK_KINDS: tuple[str, ...] = ("blob", "ellipse", "stroke", "superpixel", "segment")
"""Mask kinds drawn from, in turn (every kind of :data:`finpercep.data.masks.MASK_KINDS`)."""


@dataclass(frozen=True)
class CoevolveConfig:
    """Online reward-model training in curriculum mode ``coevolve`` (module docstring). The
    defaults are our choice, not tuned on a measurement."""

    refresh_every: int = 10
    """Policy steps between two reward-model refreshes."""
    rm_steps: int = 5
    """Reward-model optimiser steps per refresh."""
    rm_lr: float = 1e-4
    """AdamW learning rate of the refreshes (the embedded recipe's encoder rate; a tenth of its
    head rate, since each refresh sees few and correlated samples)."""
    batch: int = 4
    """Triplets per reward-model step, drawn from the replay buffer (with replacement). A refresh
    waits until the buffer holds at least this many."""
    buffer: int = 64
    """Replay-buffer size: the most recent triplets are kept, older ones dropped."""
    rollouts_per_step: int = 2
    """Images of each policy batch turned into triplets by ``Curriculum.add_rollout`` (the first
    ones; 0 = all). Building a triplet runs the ground-truth mapper, so this bounds its cost."""
    heldout: int = 8
    """Size of the fixed held-out triplet set for the before / after ordering accuracy (0 = off).
    Taken from the data set given to the curriculum (its last samples by id), or else from the
    first rollouts, which are then kept out of the buffer."""
    train_backbone: bool = False
    """Also train the encoder. Off by default, as the embedded recipe freezes it after ``RM_0``;
    at stage 0 (no decoder) only the score head then trains."""
    revert_if_worse: bool = False
    """Undo a refresh whose held-out ordering accuracy after it is below the one before it."""
    area: tuple[float, float] = DEFAULT_AREA
    """Swap-mask area bounds ``(lo, hi)`` (fractions of the image)."""
    mask_kinds: tuple[str, ...] = DEFAULT_MASK_KINDS
    """Mask kinds (:data:`finpercep.data.masks.MASK_KINDS`), drawn uniformly per triplet."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """Loss weights and margins; the reward model's own defaults (``l_align`` keeps the scale)."""
    max_grad_norm: float = 5.0
    """Gradient-norm clip of each reward-model step (as in ``finpercep rm train``)."""
    seed: int = 0
    """Seeds the masks and the buffer draws (a function of seed and rollout / refresh count)."""

    def __post_init__(self) -> None:
        for name in ("refresh_every", "rm_steps", "batch", "buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"curriculum.coevolve.{name} must be >= 1, got {getattr(self, name)}")
        if self.rollouts_per_step < 0 or self.heldout < 0:
            raise ValueError("curriculum.coevolve.rollouts_per_step and heldout must be >= 0")
        if self.buffer < self.batch:
            raise ValueError(f"curriculum.coevolve.buffer ({self.buffer}) must hold at least one batch ({self.batch})")
        if not (self.rm_lr > 0 and math.isfinite(self.rm_lr)) or not self.max_grad_norm > 0:
            raise ValueError("curriculum.coevolve.rm_lr and max_grad_norm must be > 0")
        lo, hi = self.area
        if not 0 < lo <= hi <= 0.9:
            raise ValueError(f"curriculum.coevolve.area must satisfy 0 < lo <= hi <= 0.9, got {self.area}")
        from finpercep.data.masks import MASK_KINDS

        bad = [k for k in self.mask_kinds if k not in MASK_KINDS]
        if bad or not self.mask_kinds:
            raise ValueError(f"curriculum.coevolve.mask_kinds: unknown {bad or 'empty'}; "
                             f"valid: {', '.join(MASK_KINDS)}")


# ---------------------------------------------------------------------------------------------
# Triplets from the policy's outputs


def make_triplets(
    hr: torch.Tensor,
    sr: torch.Tensor,
    rng: np.random.Generator,
    mapper: Any,
    area: tuple[float, float] = DEFAULT_AREA,
    kinds: tuple[str, ...] = DEFAULT_MASK_KINDS,
) -> Triplet:
    """Reward-model triplets from a policy's outputs, built like the data engine's (module docstring).

    Args:
        hr: ``(B, 3, H, W)`` in [0, 1], the training HR images.
        sr: ``(B, 3, H, W)``, the policy's outputs for their LR images (detached and clamped to
            [0, 1] here).
        rng: the only randomness (mask kind and shape).
        mapper: a :class:`finpercep.data.gt_maps.GTMapper` (``mapper(hr, syn) -> (B, 1, H, W)``).
        area: swap-mask area bounds.
        kinds: mask kinds to draw from.

    Returns a :class:`~finpercep.types.Triplet` with ``mask``, float32 on ``hr``'s device, detached:
    ``hr`` and ``sr`` rounded to 8 bits (:func:`~finpercep.data.dataset.quantise`, as the data set
    stores them), ``syn = swap(hr, sr, mask)`` (so ``syn = mask * sr + (1 - mask) * hr`` exactly),
    ``mask`` in {0, 1} and ``map_syn`` in [0, 1] computed on them.
    """
    from finpercep.checks import check_image_batch
    from finpercep.data.dataset import quantise, swap
    from finpercep.data.masks import make_mask

    hr = check_image_batch(hr, "make_triplets: hr")
    sr = check_image_batch(sr, "make_triplets: sr", tol=0.5)
    if sr.shape != hr.shape:
        raise ValueError(f"make_triplets: sr {tuple(sr.shape)} must have the shape of hr {tuple(hr.shape)}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"make_triplets: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    hr, sr = quantise(hr), quantise(sr.to(hr.device))
    masks = []
    for i in range(hr.shape[0]):
        kind = kinds[int(rng.integers(len(kinds)))]
        m, _ = make_mask(kind, hr[i].cpu(), rng, area)
        masks.append(m)
    mask = torch.stack(masks)[:, None].to(hr.device)  # (B, 1, H, W)
    syn = swap(hr, sr, mask)  # arXiv 2512.22647, Sec. 2: I_syn = B * I_SR + (1 - B) * I_GT
    return Triplet(hr=hr, syn=syn, sr=sr, map_syn=mapper(hr, syn).float(), mask=mask)


def heldout_from_dataset(root: str | Path, n: int) -> Triplet:
    """``n`` fixed triplets (``hr, syn, sr, map_syn``, one batch) from an FGR data set (``finpercep
    data build``): its last ``n`` samples by id, so the set does not depend on the seed. All samples
    must share one size (the builder's crops do); ``ValueError`` otherwise or when it is empty."""
    from finpercep.data.dataset import FGRDataset

    ds = FGRDataset(root, keys=("hr", "syn", "sr", "map_syn"))
    if len(ds) == 0:
        raise ValueError(f"{root}: the data set is empty")
    return ds.load_triplets(sorted(range(len(ds)), key=lambda i: ds.records[i]["id"])[-n:])


@torch.no_grad()
def order_accuracy_of(
    model: torch.nn.Module, trip: Triplet, batch: int = 8
) -> tuple[float, float | None]:
    """``(order accuracy, map MAE)`` of a FinPercep-RM on triplets: the fraction with
    ``S_HR > S_syn > S_SR`` and the mean ``|M(syn) - M_gt|`` (``None`` at stage 0). The model is
    evaluated in eval mode and left in the mode it had."""
    from finpercep.metrics import order_accuracy

    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {"hr": [], "syn": [], "sr": []}
    err, n_pix = 0.0, 0
    for a in range(0, len(trip), batch):
        part = trip[a : a + batch]
        for k in scores:
            out = model(getattr(part, k).to(dev))
            scores[k].append(out.score.float().cpu())
            if k == "syn" and out.map is not None:
                gt = part.map_syn.to(dev)
                err += float((out.map.float() - gt).abs().sum())
                n_pix += gt.numel()
    model.train(was_training)
    acc = order_accuracy(*(torch.cat(scores[k]) for k in ("hr", "syn", "sr")))
    return acc, (err / n_pix if n_pix else None)


# ---------------------------------------------------------------------------------------------
# The co-evolver


class Coevolver:
    """Keeps the replay buffer and the trainable reward models of mode ``coevolve`` (module docstring).

    Args:
        cfg: the settings.
        base: the original, frozen ``RM_0`` (target of the alignment loss; never trained), or a
            function returning it (called at the first refresh).
        load_stage: ``load_stage(k) -> FinPercepRM``, the shipped model of stage ``k`` (copied,
            not modified); called once per stage, when the stage is first needed.
        device: where the reward models train.

    ``model(k)`` is stage ``k``'s live model (a float32 copy, frozen between refreshes): the
    reward the policy sees wraps it, so a refresh changes that reward in place.
    """

    def __init__(
        self, cfg: CoevolveConfig, base: Any, load_stage: Any, device: str | torch.device = "cpu"
    ) -> None:
        self.cfg = cfg
        self._base = base
        self.load_stage = load_stage
        self.device = torch.device(device)
        self.buffer: deque[Triplet] = deque(maxlen=cfg.buffer)
        """One triplet (``B = 1``, on the CPU) per item."""
        self.heldout: Triplet | None = None
        self._heldout_pending: list[Triplet] = []
        self._models: dict[int, torch.nn.Module] = {}
        self._opts: dict[int, torch.optim.Optimizer] = {}
        self._opt_states: dict[int, dict] = {}
        self.rollouts = 0
        """Triplet batches built so far (seeds the masks)."""
        self.refreshes = 0
        """Refreshes done so far (seeds the buffer draws)."""
        self._mapper: Any = None

    # -- models -------------------------------------------------------------------------------

    @property
    def base(self) -> torch.nn.Module:
        """The frozen original ``RM_0`` (loaded on first use when given as a function)."""
        if not isinstance(self._base, torch.nn.Module):
            self._base = self._base()
        return self._base

    def model(self, k: int) -> torch.nn.Module:
        """Stage ``k``'s live model (made from the shipped one on first use)."""
        if k not in self._models:
            m = copy.deepcopy(self.load_stage(k)).float().to(self.device)
            self._models[k] = m.eval().requires_grad_(False)
        return self._models[k]

    def _trainable(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for n, p in model.named_parameters() if self.cfg.train_backbone or not n.startswith("backbone.")]

    def _optimizer(self, k: int) -> torch.optim.Optimizer:
        if k not in self._opts:
            opt = torch.optim.AdamW(self._trainable(self.model(k)), lr=self.cfg.rm_lr, weight_decay=1e-4)
            if k in self._opt_states:
                opt.load_state_dict(self._opt_states.pop(k))
            self._opts[k] = opt
        return self._opts[k]

    # -- data ---------------------------------------------------------------------------------

    def set_heldout(self, trip: Triplet) -> None:
        """Use ``trip`` (its ``hr, syn, sr, map_syn``, kept on the CPU) as the held-out set."""
        if not isinstance(trip, Triplet):
            raise TypeError(f"held-out triplets must be a finpercep.types.Triplet, got {type(trip).__name__}")
        self.heldout = Triplet(**{k: getattr(trip, k).detach().float().cpu() for k in ("hr", "syn", "sr", "map_syn")})

    def add(self, hr: torch.Tensor, sr: torch.Tensor) -> int:
        """Turn policy outputs ``sr`` on training images ``hr`` (``(B, 3, H, W)`` each) into triplets
        (the first ``rollouts_per_step`` images) and add them; the first ones fill the held-out set
        when it is still empty and ``heldout > 0``. Returns how many went into the buffer."""
        from finpercep.data.gt_maps import GTMapper

        n = self.cfg.rollouts_per_step or hr.shape[0]
        hr, sr = hr[:n], sr[:n]
        if self._mapper is None:
            self._mapper = GTMapper(device=self.device)
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, 1, self.rollouts]))
        self.rollouts += 1
        trip = make_triplets(hr.to(self.device), sr.to(self.device), rng, self._mapper,
                             self.cfg.area, self.cfg.mask_kinds)
        trip = trip.to("cpu")
        items = [trip[i] for i in range(len(trip))]
        if self.heldout is None and self.cfg.heldout > 0:
            take = self.cfg.heldout - len(self._heldout_pending)
            self._heldout_pending += items[:take]
            items = items[take:]
            if len(self._heldout_pending) >= self.cfg.heldout:
                self.set_heldout(Triplet.cat(self._heldout_pending))
                self._heldout_pending = []
        self.buffer.extend(items)
        return len(items)

    def _batch(self, rng: np.random.Generator) -> Triplet:
        idx = rng.integers(len(self.buffer), size=self.cfg.batch)
        # Buffer items may differ in size (whole images vs crops): draw one size, keep its items.
        items = [self.buffer[int(i)] for i in idx]
        size = items[0].hr.shape
        return Triplet.cat([it for it in items if it.hr.shape == size]).to(self.device)

    # -- the refresh --------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the buffer holds a batch."""
        return len(self.buffer) >= self.cfg.batch

    def refresh(self, k: int, step: int) -> dict[str, float]:
        """Train stage ``k``'s live model for ``rm_steps`` steps on the buffer (module docstring);
        returns ``coevolve/*`` logs: ``rm_loss`` (mean over the steps), the loss terms,
        ``heldout_order_acc_before`` / ``_after`` (and ``heldout_map_mae_*`` at stages >= 1) when a
        held-out set exists, ``reverted``, ``buffer``, ``refreshes``. ``step`` (the policy step)
        is only logged. Each step is the reward model's own training step
        (:func:`finpercep.reward.train.rm_train_step`). Raises :class:`finpercep.types.NonFiniteError`
        (a FloatingPointError) on a non-finite loss (the model is left as before the failing step)."""
        from finpercep.reward.train import rm_train_step
        from finpercep.types import NonFiniteError

        if not self.ready():
            raise ValueError(f"refresh: the buffer holds {len(self.buffer)} triplets, "
                             f"fewer than one batch ({self.cfg.batch})")
        model = self.model(k)
        opt = self._optimizer(k)
        logs: dict[str, float] = {}
        if self.heldout is not None:
            acc, mae = order_accuracy_of(model, self.heldout)
            logs["coevolve/heldout_order_acc_before"] = acc
            if mae is not None:
                logs["coevolve/heldout_map_mae_before"] = mae
        backup = {n: t.detach().clone() for n, t in model.state_dict().items()} if self.cfg.revert_if_worse else None
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, 2, self.refreshes]))
        self.refreshes += 1
        for p in self._trainable(model):
            p.requires_grad_(True)
        model.train()
        sums: dict[str, float] = {}
        try:
            for _ in range(self.cfg.rm_steps):
                # The alignment target is the original, frozen RM_0's scale, as in `rm train`.
                try:
                    step_logs = rm_train_step(model, self._batch(rng), self.cfg.loss, opt, base=self.base,
                                              max_grad_norm=self.cfg.max_grad_norm)
                except NonFiniteError as e:
                    raise NonFiniteError(f"co-evolution: {e} of the reward model at policy step {step} (stage {k})") from None
                for key, v in step_logs.items():
                    sums[key] = sums.get(key, 0.0) + v
        finally:
            model.eval().requires_grad_(False)
        logs["coevolve/rm_loss"] = sums["loss/total"] / self.cfg.rm_steps
        for key in ("loss/rank", "loss/map", "loss/align", "rank/ordered"):
            if key in sums:
                logs[f"coevolve/{key.replace('/', '_')}"] = sums[key] / self.cfg.rm_steps
        reverted = 0.0
        if self.heldout is not None:
            acc, mae = order_accuracy_of(model, self.heldout)
            logs["coevolve/heldout_order_acc_after"] = acc
            if mae is not None:
                logs["coevolve/heldout_map_mae_after"] = mae
            if backup is not None and acc < logs["coevolve/heldout_order_acc_before"]:
                model.load_state_dict(backup)
                reverted = 1.0
                log.info("co-evolution refresh at step %d made the held-out ordering worse; reverted", step)
        logs.update({"coevolve/reverted": reverted, "coevolve/buffer": float(len(self.buffer)),
                     "coevolve/refreshes": float(self.refreshes), "coevolve/stage": float(k)})
        return logs

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"rollouts", "refreshes", "models": {k: state_dict}, "optimizers": {k: state}}`` for every
        refreshed stage (string keys ``"k"``); loadable with ``torch.load(weights_only=True)``. The
        buffer and the held-out set are not included (module docstring)."""
        opts = {str(k): o.state_dict() for k, o in self._opts.items()}
        opts.update({str(k): s for k, s in self._opt_states.items()})
        return {
            "rollouts": self.rollouts,
            "refreshes": self.refreshes,
            "models": {k: {n: t.detach().cpu().clone() for n, t in self._models[int(k)].state_dict().items()}
                       for k in opts},
            "optimizers": opts,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the live models of the saved stages are rebuilt
        from the shipped weights and overwritten)."""
        missing = [k for k in ("rollouts", "refreshes", "models", "optimizers") if k not in d]
        if missing:
            raise ValueError(f"co-evolution state: missing {missing}")
        self.rollouts, self.refreshes = int(d["rollouts"]), int(d["refreshes"])
        self._opts, self._opt_states = {}, {}
        for k, sd in d["models"].items():
            self.model(int(k)).load_state_dict(sd)
        for k, s in d["optimizers"].items():
            self._opt_states[int(k)] = s
