"""finpercep.rewards: every catalogue entry meets the Reward contract; softmax_max, the fused
reward, weighted sums and the spec parser behave as documented."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import skimage.data as sd
import torch
import torch.nn.functional as F

import finpercep.reward.api as rm_api
from finpercep.rewards import (
    REWARDS,
    FinPercepReward,
    FusedReward,
    L1Reward,
    SSIMReward,
    WeightedSum,
    batch_standardize,
    create_reward,
    list_rewards,
    parse_spec,
    softmax_max,
    ssim,
)
from finpercep.rewards.fused import DEFAULT_TAU
from finpercep.types import Reward, RewardOutput

# Catalogue entries plus a few specs that exercise stages and sums.
SPECS = list(REWARDS) + ["finpercep:1", "fused:0", "finpercep+0.5*l1", "-1*niqe+2*ssim", "finpercep+niqe"]


def _photo_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A 96x192 crop of a real photo (the smallest size NIQE accepts) and a blurred + noisy copy."""
    img = torch.from_numpy(sd.astronaut()[100:196, 100:292].astype(np.float32) / 255).permute(2, 0, 1)[None]
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    k = k[None, None].repeat(3, 1, 1, 1)
    blur = img
    for _ in range(2):
        blur = F.conv2d(F.pad(blur, (2, 2, 2, 2), mode="reflect"), k, groups=3)
    noisy = (blur + 0.1 * torch.randn(blur.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return img, noisy


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    clean, bad = _photo_pair()
    return torch.cat([clean, bad]), torch.cat([clean, clean])  # sr = [clean, degraded], hr = clean


@pytest.fixture(scope="module")
def built() -> dict[str, Reward]:
    cache: dict[str, Reward] = {}

    def get(spec: str) -> Reward:
        if spec not in cache:
            cache[spec] = create_reward(spec)
        return cache[spec]

    return get


# ---------------------------------------------------------------------------------------------
# The contract, over the whole catalogue


@pytest.mark.parametrize("spec", SPECS)
def test_reward_contract(spec, built, images):
    r = built(spec)
    sr, hr = images
    assert isinstance(r, Reward) and r.name == spec
    lo, hi = r.range
    assert lo < hi and isinstance(r.has_map, bool) and r.to("cpu") is r

    x = sr.clone().requires_grad_(True)
    out = r(x, hr=hr)
    assert isinstance(out, RewardOutput)
    assert out.score.shape == (2,) and bool(torch.isfinite(out.score).all())
    assert bool(((out.score >= lo) & (out.score <= hi)).all())
    if r.has_map:
        assert out.map is not None and out.map.shape == (2, 1, *sr.shape[-2:])
        assert float(out.map.detach().min()) >= 0 and float(out.map.detach().max()) <= 1
    else:
        assert out.map is None
    # Higher is better: the clean photo beats its blurred + noisy copy.
    assert out.score[0] > out.score[1], f"{spec}: clean {out.score[0]:.4g} <= degraded {out.score[1]:.4g}"

    if r.differentiable:
        (out.score * torch.tensor([1.0, 2.0])).sum().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
    else:
        assert not out.score.requires_grad

    if r.needs_reference:
        with pytest.raises(ValueError, match=re.escape(f"reward {r.name!r}")):
            r(sr)
    else:
        r(sr)  # no hr needed


def test_catalogue_lists_the_required_names():
    required = {"finpercep", "rm0", "fused", "niqe", "brisque", "piqe", "stlpips", "l1", "ssim"}
    assert required <= set(list_rewards()) and list_rewards() == list(REWARDS)


def test_rm0_is_stage_0_without_map(built):
    r = built("rm0")
    assert isinstance(r, FinPercepReward) and r.stage == 0 and not r.has_map
    assert built("finpercep").stage == max(rm_api.list_stages(rm_api.embedded_checkpoint_dir()))


def test_bad_input_is_refused(built):
    r = built("l1")
    with pytest.raises(ValueError, match="shape"):
        r(torch.rand(1, 3, 32, 32), hr=torch.rand(1, 3, 32, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        built("finpercep")(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="96x96 blocks"):
        built("niqe")(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# softmax_max and the fused reward


def test_softmax_max_of_a_constant_map_is_the_constant():
    m = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(softmax_max(m), torch.full((2,), 0.3))


def test_softmax_max_lies_between_mean_and_max_and_tends_to_max():
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 3, 5] = 1.0  # one hot pixel
    mean, mx = float(m.mean()), float(m.max())
    values = [float(softmax_max(m, tau)) for tau in (10.0, 1.0, 0.3, 0.1, 0.05, 0.01)]
    assert all(mean < v < mx for v in values[:-1])
    assert values == sorted(values)  # smaller tau, closer to the max
    assert values[-1] == pytest.approx(mx, abs=1e-6)
    assert float(softmax_max(m, 1e4)) == pytest.approx(mean, abs=1e-4)  # large tau -> mean
    rnd = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    s = softmax_max(rnd)
    assert bool((s >= rnd.mean(dim=(1, 2, 3)) - 1e-6).all() and (s <= rnd.amax(dim=(1, 2, 3)) + 1e-6).all())


def test_softmax_max_is_differentiable_and_checks_input():
    m = torch.rand(1, 1, 8, 8, requires_grad=True)
    softmax_max(m).sum().backward()
    assert m.grad is not None and float(m.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="tau"):
        softmax_max(m.detach(), tau=0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        softmax_max(torch.rand(8, 8))


def test_fused_reward_at_stage_0_is_l1_s0_plus_l2(built, images):
    sr, _ = images
    rm0 = built("rm0")
    fused = FusedReward(model=rm0.model, l1=2.0, l2=3.0)
    assert fused.stage == 0 and not fused.has_map
    with torch.no_grad():
        s0 = rm0(sr).score
        out = fused(sr)
    assert out.map is None and torch.allclose(out.score, 2 * s0 + 3)


def test_fused_reward_at_a_mapped_stage_reads_the_worst_defect(built, images):
    sr, _ = images
    rm = built("finpercep")
    fused = FusedReward(model=rm.model, l1=0.5, l2=2.0, tau=0.1)
    with torch.no_grad():
        ref = rm(sr)
        out = fused(sr)
    assert torch.allclose(out.score, 0.5 * ref.score + 2 * (1 - softmax_max(ref.map, 0.1)))
    assert torch.equal(out.map, ref.map) and fused.tau == 0.1 and DEFAULT_TAU > 0


# ---------------------------------------------------------------------------------------------
# Full-reference terms


def test_ssim_matches_skimage(images):
    from skimage.metrics import structural_similarity

    sr, hr = images
    ours = ssim(sr.double(), hr.double())
    for i in range(2):
        ref = structural_similarity(
            sr[i].permute(1, 2, 0).double().numpy(),
            hr[i].permute(1, 2, 0).double().numpy(),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)
    assert float(SSIMReward()(sr[:1], hr=hr[:1]).score) == pytest.approx(1.0, abs=1e-5)


def test_l1_reward_is_minus_mean_absolute_error():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25)
    assert float(L1Reward()(a, hr=b).score) == pytest.approx(-0.25)


# ---------------------------------------------------------------------------------------------
# Weighted sums


class _Affine:
    """A test reward: ``a * base.score + b`` (same metadata as ``base``)."""

    def __init__(self, base: Reward, a: float, b: float) -> None:
        self.base, self.a, self.b = base, a, b
        self.name, self.needs_reference, self.differentiable = f"affine_{base.name}", base.needs_reference, base.differentiable
        self.range, self.has_map = (-math.inf, math.inf), base.has_map

    def __call__(self, sr, lr=None, hr=None):
        return RewardOutput(score=self.a * self.base(sr, lr, hr).score + self.b)

    def to(self, device):
        self.base.to(device)
        return self


def _batch(b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, 16, 16, generator=g)
    sr = (hr + 0.3 * torch.rand(b, 3, 16, 16, generator=g) * torch.arange(1, b + 1).view(-1, 1, 1, 1) / b).clamp(0, 1)
    return sr, hr


def test_weighted_sum_with_one_image_is_the_raw_weighted_sum():
    sr, hr = _batch(1)
    ws = WeightedSum([L1Reward(), SSIMReward()], [1.0, 0.5])
    raw = L1Reward()(sr, hr=hr).score + 0.5 * SSIMReward()(sr, hr=hr).score
    assert torch.allclose(ws(sr, hr=hr).score, raw)


def test_batch_normalisation_makes_a_term_scale_invariant():
    sr, hr = _batch(4)
    plain = WeightedSum([L1Reward(), SSIMReward()], [1.0, 0.5])(sr, hr=hr).score
    scaled = WeightedSum([_Affine(L1Reward(), 37.0, -5.0), SSIMReward()], [1.0, 0.5])(sr, hr=hr).score
    assert torch.allclose(plain, scaled, atol=1e-5)
    raw = WeightedSum([L1Reward(), SSIMReward()], [1.0, 0.5], normalize="none")(sr, hr=hr).score
    raw_scaled = WeightedSum([_Affine(L1Reward(), 37.0, -5.0), SSIMReward()], [1.0, 0.5], normalize="none")(sr, hr=hr).score
    assert not torch.allclose(raw, raw_scaled, atol=1e-3)


def test_batch_normalised_gradient_is_the_term_gradient_times_w_over_std():
    sr, hr = _batch(3)
    w = 0.7
    term = L1Reward()
    for i in range(3):
        x = sr.clone().requires_grad_(True)
        WeightedSum([term], [w])(x, hr=hr).score[i].backward()
        y = sr.clone().requires_grad_(True)
        s = term(y, hr=hr).score
        s[i].backward()
        std = float(s.detach().std(correction=0))
        assert torch.allclose(x.grad, w / std * y.grad, atol=1e-6)


def test_batch_standardize_floors_the_std():
    z = batch_standardize(torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(z, torch.zeros(3))
    z = batch_standardize(torch.tensor([1.0, 3.0]))
    assert torch.allclose(z, torch.tensor([-1.0, 1.0]))


def test_weighted_sum_metadata():
    l1, ssim_r = L1Reward(), SSIMReward()
    ws = WeightedSum([l1, ssim_r], [2.0, -1.0], normalize="none")
    assert ws.range == (-3.0, 1.0) and ws.needs_reference and ws.differentiable and not ws.has_map
    assert ws.name == "2*l1+-1*ssim"
    assert WeightedSum([l1], [1.0]).range == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="weights"):
        WeightedSum([l1], [1.0, 2.0])
    with pytest.raises(ValueError, match="normalize"):
        WeightedSum([l1], [1.0], normalize="z")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a Reward"):
        WeightedSum([object()], [1.0])  # type: ignore[list-item]


def test_weighted_sum_map_comes_from_the_first_weighted_term_with_one(built, images):
    sr, hr = images
    rm = built("finpercep")
    assert not WeightedSum([L1Reward(), rm], [1.0, 0.0]).has_map
    ws = WeightedSum([L1Reward(), rm], [1.0, 0.5])
    assert ws.has_map
    with torch.no_grad():
        assert torch.equal(ws(sr, hr=hr).map, rm(sr).map)


# ---------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("finpercep", [(1.0, "finpercep", None)]),
        ("finpercep+0.5*l1", [(1.0, "finpercep", None), (0.5, "l1", None)]),
        (" finpercep:2 + 0.1 * ssim ", [(1.0, "finpercep", 2), (0.1, "ssim", None)]),
        ("-1*niqe", [(-1.0, "niqe", None)]),
        ("1e-3*l1+fused:0", [(1e-3, "l1", None), (1.0, "fused", 0)]),
    ],
)
def test_parse_spec_good(spec, parsed):
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("finpercep+", "empty term"),
        ("nosuch", r"unknown reward 'nosuch'; known: finpercep, rm0"),
        ("abc*l1", "bad weight 'abc'"),
        ("inf*l1", "finite"),
        ("0.5l1", "cannot read term"),
        ("finpercep:x", "integer >= 0"),
        ("finpercep:-1", "integer >= 0"),
        ("finpercep:99", r"available stages \[0, 1"),
        ("niqe:1", "has no stages"),
        ("rm0:0", "has no stages"),
    ],
)
def test_create_reward_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        create_reward(spec)


def test_create_reward_wraps_only_sums_and_names_them_canonically(built):
    assert isinstance(built("finpercep"), FinPercepReward) and built("finpercep").name == "finpercep"
    r = create_reward(" finpercep:2 + 0.10 * ssim ")
    assert isinstance(r, WeightedSum) and r.name == "finpercep:2+0.1*ssim" and r.weights == [1.0, 0.1]
    assert create_reward(r.name).name == r.name
    assert isinstance(create_reward("-1*niqe"), WeightedSum)
    assert create_reward("l1+l1", normalize="none").range == (-2.0, 0.0)


def test_the_rm_is_loaded_once_per_create_reward_call(monkeypatch):
    calls = []
    real = rm_api.load_reward

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(rm_api, "load_reward", counting)
    r = create_reward("finpercep+fused")
    assert len(calls) == 1 and r.terms[0].model is r.terms[1].model
    calls.clear()
    r = create_reward("rm0+fused:0+finpercep:0")
    assert len(calls) == 1
    calls.clear()
    create_reward("finpercep:1+finpercep:2")
    assert len(calls) == 2
