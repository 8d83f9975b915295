"""One reward interface: every reward is a :class:`finpercep.types.Reward`.

``reward(sr, lr=None, hr=None) -> RewardOutput(score (B,), map (B, 1, H, W) | None, map_logits)``,
``score`` higher = better, plus metadata: ``name`` (the spec that builds it), ``needs_reference``,
``differentiable``, ``range``, ``has_map``. Rewards are plain objects, not ``nn.Module``s: the
learned ones wrap frozen networks (``.model`` for FinPercep-RM). Every reward here also has
``to(device) -> self`` (a no-op for the NumPy metrics).

The catalogue, :data:`REWARDS` (``create_reward`` and the CLI read it; ``tests/test_rewards.py``
checks every entry against the contract):

==============  =========  ==============  ===============  ====  =====================================
name            reference  differentiable  score range      map   what
==============  =========  ==============  ===============  ====  =====================================
finpercep[:K]   no         yes             (-inf, inf)      K>=1  FinPercep-RM RM_K (default: last stage)
rm0             no         yes             (-inf, inf)      no    RM_0, the global-only stage (finpercep:0)
fused[:K]       no         yes             (-inf, inf)      K>=1  l1*S_K + l2*(1 - softmax_max(M_K))
niqe            no         no              (-inf, 0]        no    -NIQE (>= 96x192 px)
brisque         no         no              (-inf, inf)      no    -BRISQUE
piqe            no         no              (-inf, 0)        no    -PIQE
l1              yes        yes             [-1, 0]          no    -mean |sr - hr|
ssim            yes        yes             [-1, 1]          no    SSIM on RGB, Gaussian 11 / 1.5
stlpips         yes        yes             (-inf, 0]        no    -ST-LPIPS (AlexNet)
==============  =========  ==============  ===============  ====  =====================================

(:mod:`finpercep.rewards.metrics` and :mod:`finpercep.rewards.fused` say more about each.)
Sums: ``create_reward("finpercep+0.5*l1")`` is a :class:`WeightedSum` (spec language in
:mod:`finpercep.rewards.combine`), standardised over the batch by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from finpercep.rewards.combine import Normalize, WeightedSum, batch_standardize, format_spec, parse_spec
from finpercep.rewards.finpercep_rm import FinPercepReward, load_rm
from finpercep.rewards.fused import FusedReward, softmax_max
from finpercep.rewards.metrics import L1Reward, NRMetricReward, SSIMReward, STLPIPSReward, ssim
from finpercep.types import Reward, RewardOutput

RewardFactory = Callable[..., Reward]
"""``factory(*, stage=None, checkpoint=None, device="cpu", rm_cache=None) -> Reward``: ``stage``
is the ``:K`` of the spec (only staged rewards accept one), ``checkpoint`` the FinPercep-RM to use
(ignored by the metrics), ``rm_cache`` a dict shared by one ``create_reward`` call (see
:func:`finpercep.rewards.finpercep_rm.load_rm`)."""


def _no_stage(name: str, stage: int | None) -> None:
    if stage is not None:
        raise ValueError(f"reward {name!r} has no stages; only 'finpercep:K' and 'fused:K' take one")


def _finpercep(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    return FinPercepReward(stage, model=load_rm(checkpoint, stage, device, rm_cache))


def _rm0(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    _no_stage("rm0", stage)
    return FinPercepReward(0, model=load_rm(checkpoint, 0, device, rm_cache), name="rm0")


def _fused(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    return FusedReward(stage, model=load_rm(checkpoint, stage, device, rm_cache))


def _nr(metric: str) -> RewardFactory:
    def factory(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
        _no_stage(metric, stage)
        return NRMetricReward(metric)

    return factory


def _l1(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    _no_stage("l1", stage)
    return L1Reward()


def _ssim(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    _no_stage("ssim", stage)
    return SSIMReward()


def _stlpips(*, stage: int | None = None, checkpoint: Any = None, device: Any = "cpu", rm_cache: dict | None = None) -> Reward:
    _no_stage("stlpips", stage)
    return STLPIPSReward("alex", device=device)


REWARDS: dict[str, RewardFactory] = {
    "finpercep": _finpercep,
    "rm0": _rm0,
    "fused": _fused,
    "niqe": _nr("niqe"),
    "brisque": _nr("brisque"),
    "piqe": _nr("piqe"),
    "l1": _l1,
    "ssim": _ssim,
    "stlpips": _stlpips,
}
"""Reward name -> factory (see :data:`RewardFactory` and the table in the module docstring)."""


def list_rewards() -> list[str]:
    """The names :func:`create_reward` knows, in catalogue order (``finpercep`` and ``fused`` also
    take a ``:K`` stage suffix)."""
    return list(REWARDS)


def create_reward(
    spec: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    normalize: Normalize = "batch",
) -> Reward:
    """The reward a spec names: ``"finpercep"``, ``"finpercep:2+0.1*ssim"``, ``"-1*niqe"`` ...

    Args:
        spec: terms ``[w*]name[:K]`` joined by ``+`` (:mod:`finpercep.rewards.combine`).
        checkpoint: the FinPercep-RM for ``finpercep`` / ``rm0`` / ``fused`` terms: a training run
            folder, a checkpoint folder, or ``None`` for the embedded default.
        device: where the rewards run.
        normalize: for a sum, how terms are combined (:class:`WeightedSum`).

    Returns a single term without a weight as the term itself, anything else as a
    :class:`WeightedSum` named by the canonical spec. Terms that use the same FinPercep-RM
    checkpoint and stage share one loaded model.

    Raises ValueError for an empty or malformed spec, an unknown name (listing the known ones), a
    bad weight, or a stage that does not exist (listing the stages that do);
    FileNotFoundError when ``checkpoint`` holds no FinPercep-RM.
    """
    parsed = parse_spec(spec)
    rm_cache: dict = {}
    terms = []
    for w, name, stage in parsed:
        if name not in REWARDS:
            raise ValueError(
                f"reward spec {spec!r}: unknown reward {name!r}; known: {', '.join(list_rewards())} "
                "(finpercep and fused take a stage, e.g. finpercep:2)"
            )
        try:
            terms.append(REWARDS[name](stage=stage, checkpoint=checkpoint, device=device, rm_cache=rm_cache))
        except ValueError as e:
            raise ValueError(f"reward spec {spec!r}, term {name if stage is None else f'{name}:{stage}'!r}: {e}") from None
    if len(parsed) == 1 and parsed[0][0] == 1.0:
        return terms[0]
    weights = [w for w, _, _ in parsed]
    return WeightedSum(terms, weights, normalize=normalize, name=format_spec([(w, t.name) for w, t in zip(weights, terms)]))


__all__ = [
    "REWARDS",
    "FinPercepReward",
    "FusedReward",
    "L1Reward",
    "NRMetricReward",
    "Reward",
    "RewardOutput",
    "SSIMReward",
    "STLPIPSReward",
    "WeightedSum",
    "batch_standardize",
    "create_reward",
    "list_rewards",
    "parse_spec",
    "softmax_max",
    "ssim",
]
