"""The co-evolutionary curriculum: scheduler transitions on scripted reward sequences (fixed and
automatic), state through save / resume, the Curriculum object on a tiny reward-model run (the
right stage's fused reward, lazy loading), and one online co-evolution refresh on 32x32 images."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from finpercep.curriculum import (
    CoevolveConfig,
    Curriculum,
    CurriculumConfig,
    CurriculumState,
    advance,
    heldout_from_dataset,
    make_triplets,
    resolve_config,
    trend,
)
from finpercep.reward.model import load_pretrained
from finpercep.rewards import FusedReward
from finpercep.types import Triplet


def run_schedule(cfg: CurriculumConfig, rewards, state: CurriculumState | None = None, first_step: int = 1):
    """Feed ``rewards`` to the scheduler from ``first_step`` on; returns the final state and the
    list of (step, reason) switches."""
    state = state or CurriculumState()
    switched = []
    for i, r in enumerate(rewards):
        step = first_step + i
        state, reason = advance(state, cfg, step, r)
        if reason is not None:
            switched.append((step, reason))
    return state, switched


def auto(**kw) -> CurriculumConfig:
    base = dict(mode="auto", window=10, min_steps=10, max_steps=1000)
    base.update(kw)
    return resolve_config(CurriculumConfig(**base), [0, 1, 2])


def noisy(n: int, mean: float, std: float, seed: int = 0) -> list[float]:
    return (mean + std * np.random.default_rng(seed).standard_normal(n)).tolist()


# ---------------------------------------------------------------------------------------------
# The scheduler (pure)


def test_fixed_schedule_switches_exactly_at_the_given_steps():
    cfg = resolve_config(CurriculumConfig(mode="fixed", schedule=(3, 5)), [0, 1, 2])
    state, switched = run_schedule(cfg, [0.0] * 30)
    assert [s for s, _ in switched] == [3, 8]
    assert [(s.from_stage, s.to_stage) for s in state.switches] == [(0, 1), (1, 2)]
    assert all("fixed schedule" in r for _, r in switched)
    assert state.stage_index == 2 and state.step_in_stage == 22  # the last stage runs to the end
    # one value = the same length for every stage; stage numbers are RM stages, not indices
    cfg = resolve_config(CurriculumConfig(mode="fixed", stages=(0, 2, 4), schedule=(4,)), range(5))
    state, switched = run_schedule(cfg, [1.0] * 12)
    assert [s for s, _ in switched] == [4, 8] and [sw.to_stage for sw in state.switches] == [2, 4]


def test_fixed_schedule_without_lengths_splits_the_run_evenly():
    cfg = resolve_config(CurriculumConfig(mode="fixed"), [0, 1, 2], total_steps=30)
    assert cfg.schedule == (10, 10)
    with pytest.raises(ValueError, match="schedule"):
        resolve_config(CurriculumConfig(mode="fixed"), [0, 1, 2])
    with pytest.raises(ValueError, match="one per stage but the last"):
        resolve_config(CurriculumConfig(mode="fixed", schedule=(3, 4, 5)), [0, 1, 2])


def test_auto_switches_on_a_plateaued_low_variance_reward():
    # rises for 20 steps, then flat with small noise (std 0.005 around 2.0)
    rewards = [0.1 * s for s in range(1, 21)] + noisy(40, 2.0, 0.005)
    state, switched = run_schedule(auto(), rewards)
    first = switched[0][0]
    # not while rising (window still sees the rise), but soon after the plateau is reached
    assert 21 <= first <= 30, switched
    assert switched[0][1].startswith("plateau")
    # the statistics at that point satisfy the documented thresholds
    assert trend(rewards[first - 10 : first], 1.0)[0] < 0.05


def test_auto_does_not_switch_on_a_rising_or_a_noisy_reward():
    # rises by 0.05 a step: over a 10-step window that is 0.45, >= 5 % of the reward up to 9
    _, switched = run_schedule(auto(), [0.05 * s for s in range(1, 150)])
    assert switched == []
    _, switched = run_schedule(auto(), noisy(200, 2.0, 0.5))  # flat mean, std 25 % of the scale
    assert switched == []
    _, switched = run_schedule(auto(), noisy(200, 2.0, 0.01))  # flat mean, std 0.5 %
    assert switched and switched[0][0] == 10  # as soon as the window is full


def test_auto_respects_min_and_max_steps_and_stops_at_the_last_stage():
    # min_steps: a constant reward switches exactly at min_steps, even with a shorter window
    _, switched = run_schedule(auto(window=5, min_steps=15), [1.0] * 16)
    assert [s for s, _ in switched] == [15]
    # the window must be full too
    _, switched = run_schedule(auto(window=12, min_steps=3), [1.0] * 13)
    assert [s for s, _ in switched] == [12]
    # max_steps: a reward that never plateaus still moves on at max_steps
    state, switched = run_schedule(auto(max_steps=25), [0.1 * s for s in range(1, 80)])
    assert [s for s, _ in switched] == [25, 50] and all(r.startswith("max_steps") for _, r in switched)
    assert state.stage_index == 2  # the last stage never ends, however long
    state, switched = run_schedule(auto(), [1.0] * 300)
    assert len(switched) == 2 and state.stage_index == 2 and state.step_in_stage == 280


def test_coevolve_switches_like_auto_and_none_never_switches():
    rewards = [0.1 * s for s in range(1, 21)] + noisy(60, 2.0, 0.005)
    a = run_schedule(auto(), rewards)[1]
    c = run_schedule(replace(auto(), mode="coevolve"), rewards)[1]
    assert a == c and len(a) == 2
    state, switched = run_schedule(resolve_config(CurriculumConfig(mode="none"), [0, 1, 2]), [1.0] * 300)
    assert switched == [] and state.stage_index == 0


def test_state_round_trip_and_resume_equals_uninterrupted():
    cfg = auto(window=6, min_steps=8, max_steps=30)
    rewards = [0.1 * s for s in range(1, 15)] + noisy(40, 1.4, 0.002) + [0.05 * s for s in range(60)]
    full, _ = run_schedule(cfg, rewards)
    cut = 37
    mid, _ = run_schedule(cfg, rewards[:cut])
    d = json.loads(json.dumps(mid.to_dict()))  # through JSON, as a checkpoint stores it
    restored = CurriculumState.from_dict(d)
    assert restored == mid
    resumed, _ = run_schedule(cfg, rewards[cut:], restored, first_step=cut + 1)
    assert resumed.to_dict() == full.to_dict()
    assert len(full.switches) == 2  # the sequence exercises switches on both sides of the cut
    with pytest.raises(ValueError, match="keys"):
        CurriculumState.from_dict({**d, "extra": 1})


def test_advance_is_pure_and_checks_its_input():
    cfg = auto()
    s0 = CurriculumState()
    s1, _ = advance(s0, cfg, 1, 0.5)
    assert s0 == CurriculumState() and s1.history == [0.5] and s1.last_step == 1
    with pytest.raises(ValueError, match="increase"):
        advance(s1, cfg, 1, 0.5)
    with pytest.raises(ValueError, match="finite"):
        advance(s1, cfg, 2, math.nan)
    with pytest.raises(ValueError, match="resolve"):
        advance(s0, CurriculumConfig(mode="auto"), 1, 0.5)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mode="sometimes"), "mode"),
        (dict(stages=(2, 1)), "increasing"),
        (dict(schedule=(0,)), "schedule"),
        (dict(window=1), "window"),
        (dict(min_steps=10, max_steps=5), "min_steps"),
        (dict(var_tol=0.0), "var_tol"),
        (dict(l1=(1.0, math.inf)), "l1"),
    ],
)
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        CurriculumConfig(**kw)


def test_per_stage_weights_must_match_the_stages():
    with pytest.raises(ValueError, match="l2 needs one value or one per stage"):
        resolve_config(CurriculumConfig(mode="auto", l2=(1.0, 0.5)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"not in the reward-model run"):
        resolve_config(CurriculumConfig(mode="auto", stages=(0, 3)), [0, 1, 2])


def test_config_from_yaml_dict_round_trip():
    from finpercep.config import from_dict, to_dict

    cfg = CurriculumConfig(mode="coevolve", stages=(0, 2), l1=(1.0, 0.5), coevolve=CoevolveConfig(rm_steps=3))
    assert from_dict(CurriculumConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(CurriculumConfig, {"mode": "auto", "windw": 3})


# ---------------------------------------------------------------------------------------------
# The Curriculum object on a tiny reward-model run


@pytest.fixture(scope="module")
def photos32() -> torch.Tensor:
    """Four 32x32 crops of real photos, (4, 3, 32, 32) in [0, 1]."""
    import skimage.data as sd

    crops = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = torch.from_numpy(getattr(sd, name)()).permute(2, 0, 1).float() / 255
        crops.append(torch.nn.functional.interpolate(img[None, :, 100:228, 100:228], size=32, mode="area")[0])
    return torch.stack(crops).clamp(0, 1)


def blur(x: torch.Tensor) -> torch.Tensor:
    """A stand-in policy output: a 4x down-up-sampled (blurry) copy of ``x``."""
    small = torch.nn.functional.interpolate(x, scale_factor=0.25, mode="area")
    return torch.nn.functional.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def test_curriculum_gives_the_current_stage_fused_reward_and_loads_lazily(tiny_rm_run, photos32):
    cfg = CurriculumConfig(mode="fixed", schedule=(2,), l1=(1.0, 2.0, 0.5), l2=0.3)
    cur = Curriculum(cfg, checkpoint=tiny_rm_run)
    assert cur.cfg.stages == (0, 1, 2) and cur.loaded_stages() == []
    x = photos32[:2]
    for step, k, l1 in [(1, 0, 1.0), (2, 0, 1.0), (3, 1, 2.0), (4, 1, 2.0), (5, 2, 0.5)]:
        reward = cur.reward
        assert isinstance(reward, FusedReward) and reward.stage == k == cur.stage
        assert (reward.l1, reward.l2, reward.tau) == (l1, 0.3, cfg.tau)
        ref = FusedReward(k, checkpoint=tiny_rm_run, l1=l1, l2=0.3)
        with torch.no_grad():
            torch.testing.assert_close(reward(x).score, ref(x).score)
        assert cur.loaded_stages() == list(range(k + 1))  # only the stages reached so far
        cur.observe(step, float(reward(x).score.mean()))
        logs = cur.logs()
        assert logs["curriculum/stage"] == cur.stage and "curriculum/step_in_stage" in logs
    assert [s.step for s in cur.state.switches] == [2, 4]
    assert cur.reward is cur.reward  # one reward object per stage, cached


def test_curriculum_state_dict_resumes_and_refuses_other_settings(tiny_rm_run):
    cfg = CurriculumConfig(mode="auto", window=3, min_steps=3, max_steps=4)
    cur = Curriculum(cfg, checkpoint=tiny_rm_run)
    for step in range(1, 6):
        cur.observe(step, float(step))
    buf = io.BytesIO()
    torch.save(cur.state_dict(), buf)
    d = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    again = Curriculum(cfg, checkpoint=tiny_rm_run)
    again.load_state_dict(d)
    assert again.state == cur.state and again.stage == cur.stage == 1
    for step in range(6, 12):
        assert again.observe(step, float(step)) == cur.observe(step, float(step))
    assert again.state == cur.state
    other = Curriculum(replace(cfg, max_steps=9), checkpoint=tiny_rm_run)
    with pytest.raises(ValueError, match="max_steps"):
        other.load_state_dict(d)


def test_mode_none_uses_the_last_stage_or_the_base_spec(tiny_rm_run):
    cur = Curriculum(CurriculumConfig(mode="none"), checkpoint=tiny_rm_run)
    assert cur.reward.stage == 2 and cur.logs()["curriculum/stage"] == 2
    base = Curriculum(CurriculumConfig(mode="none"), checkpoint=tiny_rm_run, base_spec="rm0")
    assert base.reward.name == "rm0" and base.logs()["curriculum/stage"] == -1
    assert base.observe(1, 0.3) is None
    single = Curriculum(CurriculumConfig(mode="none"), checkpoint=tiny_rm_run / "stage_1")
    assert single.reward.stage == 1
    with pytest.raises(ValueError, match="run folder with stage_K"):
        Curriculum(CurriculumConfig(mode="auto"), checkpoint=tiny_rm_run / "stage_1")
    with pytest.raises(ValueError, match="only for curriculum mode 'none'"):
        Curriculum(CurriculumConfig(mode="auto"), checkpoint=tiny_rm_run, base_spec="rm0")


# ---------------------------------------------------------------------------------------------
# Online co-evolution


def test_make_triplets_swaps_a_region_of_the_policy_output(photos32):
    from finpercep.data.gt_maps import GTMapConfig, GTMapper

    hr, sr = photos32, blur(photos32)
    t = make_triplets(hr, sr, np.random.default_rng(0), GTMapper(GTMapConfig(pixel_only=True)))
    assert isinstance(t, Triplet) and t.map_sr is None
    m = t.mask
    assert m.shape == (4, 1, 32, 32) and set(m.unique().tolist()) <= {0.0, 1.0}
    area = m.mean(dim=(1, 2, 3))
    assert ((area >= 0.03) & (area <= 0.3)).all()
    # 8-bit images, as the data engine stores them (the swap of arXiv 2512.22647, Sec. 2)
    assert torch.equal(t.hr, torch.round(hr * 255) / 255) and torch.equal(t.sr, torch.round(sr * 255) / 255)
    assert torch.equal(t.syn * 255, torch.round(t.syn * 255))
    torch.testing.assert_close(t.syn, m * t.sr + (1 - m) * t.hr, rtol=0, atol=0)
    assert t.map_syn.shape == (4, 1, 32, 32) and 0 <= t.map_syn.min() and t.map_syn.max() <= 1
    assert float(t.map_syn[m.bool().expand_as(t.map_syn) == 0].max()) == 0  # pixel-only map: 0 outside
    with pytest.raises(ValueError, match="shape of hr"):
        make_triplets(hr, sr[..., :16], np.random.default_rng(0), GTMapper(GTMapConfig(pixel_only=True)))


def _write_tiny_dataset(root: Path, hr: torch.Tensor, sr: torch.Tensor) -> None:
    from finpercep.io import save_png

    root.mkdir(parents=True)
    lines = []
    for i in range(hr.shape[0]):
        syn = hr[i].clone()
        syn[:, 8:20, 8:20] = sr[i, :, 8:20, 8:20]
        m = np.zeros((32, 32), np.float32)
        m[8:20, 8:20] = 1
        for key, img in (("hr", hr[i]), ("sr", sr[i]), ("syn", syn)):
            save_png(root / f"{key}{i}.png", img)
        np.save(root / f"map{i}.npy", m)
        lines.append(json.dumps({"id": f"s{i:03d}", "hr": f"hr{i}.png", "sr": f"sr{i}.png", "syn": f"syn{i}.png",
                                 "map_syn": f"map{i}.npy", "sr_family": "bicubic"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_heldout_set_from_a_data_set(tmp_path, photos32):
    _write_tiny_dataset(tmp_path / "d", photos32, blur(photos32))
    h = heldout_from_dataset(tmp_path / "d", 3)
    shapes = {k: tuple(getattr(h, k).shape) for k in ("hr", "syn", "sr", "map_syn")}
    assert shapes == {"hr": (3, 3, 32, 32), "syn": (3, 3, 32, 32), "sr": (3, 3, 32, 32), "map_syn": (3, 1, 32, 32)}
    assert h.mask is None and h.map_sr is None


def test_one_coevolution_refresh_changes_the_reward_model(tiny_rm_run, photos32, tmp_path):
    co = CoevolveConfig(refresh_every=2, rm_steps=2, batch=2, buffer=8, rollouts_per_step=0, heldout=3,
                        rm_lr=1e-2, mask_kinds=("blob", "ellipse"))
    cfg = CurriculumConfig(mode="coevolve", stages=(1, 2), window=3, min_steps=3, max_steps=50, coevolve=co)
    _write_tiny_dataset(tmp_path / "d", photos32, blur(photos32))
    cur = Curriculum(cfg, checkpoint=tiny_rm_run, data=tmp_path / "d")
    assert cur.loaded_stages() == []  # neither RM_0 (alignment target) nor any stage yet
    shipped = load_pretrained(tiny_rm_run / "stage_1").state_dict()
    reward = cur.reward
    x = photos32[:2]
    with torch.no_grad():
        before = reward(x).score.clone()
    hr, sr = photos32, blur(photos32)
    assert cur.add_rollout(hr, sr) == 4
    cur.observe(1, 0.1)
    assert "coevolve/rm_loss" not in cur.logs()  # not due yet
    cur.observe(2, 0.1)  # due: refresh RM_1 on the buffer
    logs = cur.logs()
    for key in ("coevolve/rm_loss", "coevolve/heldout_order_acc_before", "coevolve/heldout_order_acc_after",
                "coevolve/heldout_map_mae_before", "coevolve/heldout_map_mae_after", "coevolve/buffer",
                "coevolve/loss_map", "coevolve/loss_align"):
        assert key in logs and math.isfinite(logs[key]), key
    assert 0 <= logs["coevolve/heldout_order_acc_after"] <= 1 and logs["coevolve/buffer"] == 4
    live = cur.coevolver.model(1).state_dict()
    assert any(not torch.equal(live[k], shipped[k]) for k in shipped if shipped[k].is_floating_point())
    # the encoder is frozen by default; the base RM_0 and the shipped weights are untouched
    enc = [k for k in shipped if k.startswith("backbone.") and shipped[k].is_floating_point()]
    assert all(torch.equal(live[k], shipped[k]) for k in enc)
    assert cur.reward is reward and not any(p.requires_grad for p in reward.model.parameters())
    with torch.no_grad():
        assert not torch.allclose(reward(x).score, before)  # the policy's reward changed in place
    for k, v in cur.coevolver.base.state_dict().items():
        torch.testing.assert_close(v, load_pretrained(tiny_rm_run / "stage_0").state_dict()[k])
    # resume: the refreshed weights come back through torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(cur.state_dict(), buf)
    again = Curriculum(cfg, checkpoint=tiny_rm_run, data=tmp_path / "d")
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for k, v in again.coevolver.model(1).state_dict().items():
        torch.testing.assert_close(v, live[k])
    assert again.coevolver.refreshes == 1 and len(again.coevolver.buffer) == 0  # buffer is not saved


def test_add_rollout_is_a_no_op_outside_coevolve(tiny_rm_run, photos32):
    cur = Curriculum(CurriculumConfig(mode="fixed", schedule=(2,)), checkpoint=tiny_rm_run)
    assert cur.add_rollout(photos32, blur(photos32)) == 0 and cur.coevolver is None
