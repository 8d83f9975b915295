"""FinPercep-RM losses (arXiv 2512.22647: L_map, L_rank, L_align) on hand-made cases with known values."""

from __future__ import annotations

import pytest
import torch

from finpercep.reward.losses import LossNormalizer, RMLossConfig, align_loss, map_loss, rank_loss, total_loss
from finpercep.reward.model import RewardOutput


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_map_loss_is_the_mean_absolute_difference() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    gt = torch.zeros(2, 1, 2, 2)
    gt[0, 0, 0, 0] = 1.0  # one pixel fully wrong
    gt[1, 0, 1, 1] = 0.5  # one pixel half wrong
    assert float(map_loss(pred, gt)) == pytest.approx(1.5 / 8)
    assert float(map_loss(gt, gt)) == 0.0
    # A (B, H, W) ground truth is accepted.
    assert float(map_loss(pred, gt[:, 0])) == pytest.approx(1.5 / 8)


def test_map_loss_gradient_is_sign_over_n() -> None:
    pred = torch.full((1, 1, 2, 2), 0.5, requires_grad=True)
    gt = _t(0.0, 1.0, 0.0, 1.0).view(1, 1, 2, 2)
    map_loss(pred, gt).backward()
    assert torch.allclose(pred.grad.flatten(), _t(0.25, -0.25, 0.25, -0.25))


def test_rank_loss_is_zero_when_margins_are_satisfied() -> None:
    # S_SR = 0, S_syn = 1, S_GT = 2 with margins 1: exactly satisfied.
    assert float(rank_loss(_t(2.0), _t(1.0), _t(0.0), m1=1.0, m2=1.0)) == 0.0
    assert float(rank_loss(_t(5.0, 3.0), _t(2.0, 1.5), _t(-1.0, 0.0), m1=1.0, m2=1.0)) == 0.0


def test_rank_loss_exact_values_when_violated() -> None:
    # syn - sr = 0.3 -> 1 - 0.3 = 0.7; gt - syn = 0.5 -> 1 - 0.5 = 0.5: total 1.2.
    assert float(rank_loss(_t(1.0), _t(0.5), _t(0.2), m1=1.0, m2=1.0)) == pytest.approx(1.2)
    # Reversed order: syn - sr = -1 -> 0.5 + 1 = 1.5; gt - syn = -2 -> 0.25 + 2 = 2.25: total 3.75.
    assert float(rank_loss(_t(0.0), _t(2.0), _t(3.0), m1=0.5, m2=0.25)) == pytest.approx(3.75)
    # Batch mean: (1.2 + 0) / 2.
    assert float(rank_loss(_t(1.0, 2.0), _t(0.5, 1.0), _t(0.2, 0.0), 1.0, 1.0)) == pytest.approx(0.6)


def test_rank_loss_gradients_push_scores_apart() -> None:
    s_gt, s_syn, s_sr = (_t(v).requires_grad_() for v in (0.0, 0.0, 0.0))
    rank_loss(s_gt, s_syn, s_sr, 1.0, 1.0).backward()
    assert float(s_gt.grad) < 0 and float(s_sr.grad) > 0  # raise GT, lower SR
    assert float(s_syn.grad) == 0.0  # pushed up by one hinge, down by the other


def test_align_loss_value_and_target_is_detached() -> None:
    s = _t(1.0, -1.0).requires_grad_()
    base = _t(0.5, 0.0).requires_grad_()
    loss = align_loss(s, base)
    assert float(loss.detach()) == pytest.approx((0.5 + 1.0) / 2)
    loss.backward()
    assert base.grad is None and torch.allclose(s.grad, _t(0.5, -0.5))


def test_balanced_map_loss_weighs_degraded_and_clean_pixels_equally() -> None:
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one degraded pixel of four
    zero = torch.zeros_like(gt)
    assert float(map_loss(zero, gt)) == pytest.approx(0.25)  # plain L1: predicting 0 looks good
    assert float(map_loss(zero, gt, balance_threshold=0.1)) == pytest.approx(0.5)  # balanced: it does not
    assert float(map_loss(gt, gt, balance_threshold=0.1)) == 0.0
    ones = torch.ones_like(gt)
    assert float(map_loss(ones, gt, balance_threshold=0.1)) == pytest.approx(0.5)
    # one class only: the plain mean
    flat = torch.full_like(gt, 0.5)
    assert float(map_loss(zero, flat, balance_threshold=0.1)) == pytest.approx(0.5)
    assert float(map_loss(ones, zero, balance_threshold=0.1)) == pytest.approx(1.0)


def _out(score: torch.Tensor, m: torch.Tensor | None = None) -> RewardOutput:
    return RewardOutput(score=score, map=m, map_logits=None if m is None else torch.logit(m.clamp(1e-4, 1 - 1e-4)))


def test_total_loss_combines_weighted_terms() -> None:
    cfg = RMLossConfig(l_map=2.0, l_rank=1.0, l_align=0.5, m1=1.0, m2=1.0)
    pred = torch.zeros(1, 1, 2, 2)
    gt_map = torch.ones(1, 1, 2, 2) * 0.25  # L_map = 0.25
    out_gt, out_syn, out_sr = _out(_t(1.0), pred), _out(_t(0.5), pred), _out(_t(0.2), pred)  # L_rank = 1.2
    loss, logs = total_loss(out_gt, out_syn, out_sr, gt_map, _t(2.0), cfg)  # L_align = 1.0
    assert float(loss) == pytest.approx(2.0 * 0.25 + 1.2 + 0.5 * 1.0)
    assert logs["loss/map"] == pytest.approx(0.25) and logs["loss/rank"] == pytest.approx(1.2)
    assert logs["loss/align"] == pytest.approx(1.0) and logs["loss/total"] == pytest.approx(float(loss))
    assert logs["rank/ordered"] == 1.0 and logs["score/syn"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in logs.values())


def test_total_loss_at_stage_0_has_no_map_term() -> None:
    # RM_0: no map, and no base model to align to (it is the base).
    loss, logs = total_loss(_out(_t(0.0, 3.0)), _out(_t(0.5, 2.0)), _out(_t(1.0, 1.0)), None, None)
    # Triplet 1: syn - sr = -0.5 -> 1.5, gt - syn = -0.5 -> 1.5; triplet 2 satisfied: mean 1.5.
    assert float(loss) == pytest.approx(1.5)
    assert "loss/map" not in logs and "loss/align" not in logs
    assert logs["rank/ordered"] == 0.5


def test_total_loss_needs_gt_map_when_the_model_has_a_map() -> None:
    m = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="gt_map_syn is None"):
        total_loss(_out(_t(1.0), m), _out(_t(0.0), m), _out(_t(-1.0), m), None, None)


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"equal shape \(B, 1, H, W\)"):
        map_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"equal shape \(B,\)"):
        rank_loss(_t(1.0, 2.0), _t(1.0), _t(0.0), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"equal shape \(B,\)"):
        align_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="must be >= 0"):
        RMLossConfig(m1=-1.0)


def test_total_loss_divides_each_term_by_its_scale() -> None:
    # Same triplet as test_total_loss_combines_weighted_terms: L_map 0.25, L_rank 1.2, L_align 1.0.
    cfg = RMLossConfig(l_map=2.0, l_rank=1.0, l_align=0.5)
    pred, gt_map = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.25)
    outs = _out(_t(1.0), pred), _out(_t(0.5), pred), _out(_t(0.2), pred)
    loss, logs = total_loss(*outs, gt_map, _t(2.0), cfg, scales={"map": 0.5, "rank": 0.6, "align": 2.0})
    assert float(loss) == pytest.approx(2.0 * 0.25 / 0.5 + 1.2 / 0.6 + 0.5 * 1.0 / 2.0)
    assert logs["loss/map"] == pytest.approx(0.25) and logs["loss/rank"] == pytest.approx(1.2)  # logged unscaled
    assert logs["loss_scale/map"] == 0.5 and logs["loss/total"] == pytest.approx(float(loss))
    # A missing scale is 1; no scales at all is bit-identical to the plain weighted sum.
    plain, plain_logs = total_loss(*outs, gt_map, _t(2.0), cfg)
    assert float(total_loss(*outs, gt_map, _t(2.0), cfg, scales={})[0]) == float(plain)
    assert "loss_scale/map" not in plain_logs
    with pytest.raises(ValueError, match="scales must be > 0"):
        total_loss(*outs, gt_map, _t(2.0), cfg, scales={"map": 0.0})


def test_loss_normalizer_tracks_bias_corrected_running_means() -> None:
    norm = LossNormalizer(decay=0.5, floor=0.01)
    assert norm.scales() == {}  # nothing seen yet: every divisor is 1 in total_loss
    norm.update({"loss/rank": 2.0, "loss/total": 9.0})
    assert norm.scales() == pytest.approx({"rank": 2.0})  # bias-corrected: the first value itself
    norm.update({"loss/rank": 1.0, "loss/map": 0.004})
    # rank: biased mean 0.5 * 1.0 + 0.5 * 1.0 = 1.0, corrected by 1 - 0.5^2 -> 4/3; map below the floor.
    assert norm.scales() == pytest.approx({"rank": 4 / 3, "map": 0.01})
    again = LossNormalizer(decay=0.5, floor=0.01)
    again.load_state_dict(norm.state_dict())
    assert again.scales() == norm.scales()
    with pytest.raises(ValueError, match="decay must be in"):
        LossNormalizer(decay=1.0)
    with pytest.raises(ValueError, match="floor > 0"):
        LossNormalizer(floor=0.0)


def test_normalised_terms_pull_with_their_weights() -> None:
    """With scales at the terms' running means, a ranking loss 10x larger than the map loss no longer
    weighs 10x more: each term adds about its weight, and its gradient is divided by its scale."""
    s_gt, s_syn, s_sr = (_t(v).requires_grad_() for v in (0.5, 0.25, 0.0))  # L_rank = 0.75 + 0.75 = 1.5
    pred = torch.full((1, 1, 2, 2), 0.0, requires_grad=True)
    gt_map = torch.full((1, 1, 2, 2), 0.15)  # L_map = 0.15
    cfg = RMLossConfig(map_balance=None)
    loss, _ = total_loss(_out(s_gt, pred), _out(s_syn, pred), _out(s_sr, pred), gt_map, None, cfg,
                         scales={"rank": 1.5, "map": 0.15})
    assert float(loss.detach()) == pytest.approx(2.0)  # each term ~ 1 x its weight
    loss.backward()
    assert float(s_gt.grad) == pytest.approx(-1 / 1.5) and float(pred.grad.sum()) == pytest.approx(-1 / 0.15)
