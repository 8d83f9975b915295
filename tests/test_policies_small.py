"""tiny-x4 (TinySR) and flow-x4 (FlowSR): contracts, sampler log-probabilities, recipes, shipped weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finpercep.config import load_config, to_dict
from finpercep.policies import load_policy, load_policy_checkpoint, save_policy
from finpercep.policies.flow import FlowConfig, FlowSR, FlowTrainConfig, load_flow, train_flow
from finpercep.policies.recipe_data import eval_pairs, sample_batch
from finpercep.policies.tiny import (
    TinyConfig,
    TinySR,
    TinyTrainConfig,
    bicubic_upscale,
    clamp01_st,
    load_tiny,
    train_tiny,
)
from finpercep.runs import read_metrics
from finpercep.types import Policy, StochasticPolicy, Trajectory

ROOT = Path(__file__).resolve().parent.parent
K = 3


def tiny_model(seed: int = 0) -> TinySR:
    torch.manual_seed(seed)
    m = TinySR(TinyConfig(channels=8, num_layers=2))
    for p in m.parameters():  # the tail starts at zero (= bicubic); give it weights to test something
        torch.nn.init.normal_(p, std=0.1)
    return m


def flow_model(seed: int = 0) -> FlowSR:
    torch.manual_seed(seed)
    m = FlowSR(FlowConfig(channels=16, num_blocks=1, time_dim=16, num_steps=K))
    for blk in m.blocks:  # FiLM starts at zero; make the time path matter
        torch.nn.init.normal_(blk.film.weight, std=0.1)
    return m


def lr_batch(b: int = 2, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Shapes, ranges, protocols


@pytest.mark.parametrize("make", [tiny_model, flow_model])
@pytest.mark.parametrize("hw", [(16, 16), (7, 11)])
def test_forward_shape_and_range(make, hw):
    m = make()
    sr = m(lr_batch(2, *hw)).detach()
    assert sr.shape == (2, 3, 4 * hw[0], 4 * hw[1])
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0
    assert isinstance(m, Policy) and m.scale == 4


def test_flow_is_a_stochastic_policy_with_trajectory_shapes():
    m = flow_model()
    assert isinstance(m, StochasticPolicy) and m.num_steps == K and m.name == "flow-x4"
    tr = m.sample(lr_batch(2, 7, 11), gen(0))
    assert isinstance(tr, Trajectory)
    assert tr.states.shape == (2, K + 1, 3, 28, 44) and tr.log_probs.shape == (2, K) and tr.sr.shape == (2, 3, 28, 44)
    assert not tr.states.requires_grad and not tr.log_probs.requires_grad
    assert float(tr.sr.min()) >= 0.0 and float(tr.sr.max()) <= 1.0
    assert torch.isfinite(tr.log_probs).all()


def test_untrained_tiny_is_bicubic():
    """The zero-initialised tail makes a fresh TinySR exactly (clamped) bicubic upscaling."""
    lr = lr_batch()
    assert torch.equal(TinySR(TinyConfig(channels=8, num_layers=1))(lr), bicubic_upscale(lr, 4).clamp(0, 1))


def test_straight_through_clamp_keeps_gradient():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = clamp01_st(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.5, 1.0]
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# The sampler


def test_sample_is_deterministic_given_the_generator():
    m, lr = flow_model(), lr_batch()
    a, b, c = m.sample(lr, gen(3)), m.sample(lr, gen(3)), m.sample(lr, gen(4))
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs) and torch.equal(a.sr, b.sr)
    assert not torch.equal(a.sr, c.sr)
    assert torch.equal(m(lr), m(lr))  # the mean path needs no generator
    assert not torch.equal(m(lr), a.sr)


def test_sample_log_probs_equal_step_log_prob():
    m, lr = flow_model(), lr_batch(3, 9, 13)
    tr = m.sample(lr, gen(0))
    for k in range(K):
        lp = m.step_log_prob(lr, tr.states[:, k], k, tr.states[:, k + 1])
        assert lp.shape == (3,)
        torch.testing.assert_close(lp, tr.log_probs[:, k], atol=1e-5, rtol=0)


def test_log_prob_is_the_gaussian_density_and_every_step_is_stochastic():
    """At x_next = mean the per-pixel log-density is -log s_k - log(2 pi)/2, with s_k > 0."""
    m, lr = flow_model(), lr_batch()
    u = bicubic_upscale(lr, 4)
    x = torch.randn(u.shape, generator=gen(1))
    for k in range(K):
        mean, std = m.transition(u, x, k)
        assert std > 0
        lp = m.step_log_prob(lr, x, k, mean)
        torch.testing.assert_close(lp, torch.full((2,), -math.log(std) - 0.5 * math.log(2 * math.pi)), atol=1e-5, rtol=0)
        far = m.step_log_prob(lr, x, k, mean + 3 * std)  # 3 sigma away: exactly 4.5 nats lower per pixel
        torch.testing.assert_close(lp - far, torch.full((2,), 4.5), atol=1e-4, rtol=0)
        x = mean


def test_pixel_weight():
    m, lr = flow_model(), lr_batch()
    tr = m.sample(lr, gen(0))
    x, nxt = tr.states[:, 1], tr.states[:, 2]
    plain = m.step_log_prob(lr, x, 1, nxt)
    ones = torch.ones(2, 1, 64, 64)
    torch.testing.assert_close(m.step_log_prob(lr, x, 1, nxt, pixel_weight=ones), plain, atol=1e-6, rtol=0)
    w = torch.rand(2, 1, 64, 64, generator=gen(5))
    weighted = m.step_log_prob(lr, x, 1, nxt, pixel_weight=w)
    torch.testing.assert_close(m.step_log_prob(lr, x, 1, nxt, pixel_weight=7 * w), weighted, atol=1e-5, rtol=0)
    # A weight on one pixel gives that pixel's channel-mean log-density.
    one = torch.zeros(2, 1, 64, 64)
    one[:, :, 10, 20] = 1.0
    mean, std = m.transition(bicubic_upscale(lr, 4), x, 1)
    lp_pix = (-((nxt - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))[:, :, 10, 20].mean(1)
    torch.testing.assert_close(m.step_log_prob(lr, x, 1, nxt, pixel_weight=one), lp_pix, atol=1e-5, rtol=0)


def test_predict_sr_at_the_final_state_is_the_sample():
    """At k = K (t = 1) the one-step estimate x1_hat = x_K, so it decodes to the trajectory's sr."""
    m, lr = flow_model(), lr_batch()
    tr = m.sample(lr, gen(0))
    torch.testing.assert_close(m.predict_sr(lr, tr.states[:, K], K), tr.sr, atol=1e-6, rtol=0)
    mid = m.predict_sr(lr, tr.states[:, 1], 1).detach()
    assert mid.shape == tr.sr.shape and float(mid.min()) >= 0 and float(mid.max()) <= 1


def test_gradients_flow_through_log_prob_predict_sr_and_denoising_error():
    m, lr = flow_model(), lr_batch()
    tr = m.sample(lr, gen(0))
    hr = torch.rand(2, 3, 64, 64, generator=gen(2))
    err = m.denoising_error(lr, hr, torch.tensor([0.2, 0.9]), torch.randn(2, 3, 64, 64, generator=gen(3)))
    assert err.shape == (2,) and bool((err >= 0).all())
    outputs = {
        "step_log_prob": m.step_log_prob(lr, tr.states[:, K - 1], K - 1, tr.states[:, K]).sum(),
        "predict_sr": m.predict_sr(lr, tr.states[:, K - 1], K - 1).mean(),
        "denoising_error": err.sum(),
    }
    for what, out in outputs.items():
        m.zero_grad(set_to_none=True)
        out.backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None for g in grads), what
        assert sum(float(g.abs().sum()) for g in grads) > 0, what


def test_denoising_error_is_the_flow_matching_loss():
    """At t = 0 the state is the noise itself, so the error is mean (v(noise, 0, u) - (r - noise))^2."""
    m, lr = flow_model(), lr_batch()
    hr = torch.rand(2, 3, 64, 64, generator=gen(2))
    noise = torch.randn(2, 3, 64, 64, generator=gen(3))
    u = bicubic_upscale(lr, 4)
    r = (hr - u) / m.cfg.res_scale
    want = ((m.velocity(noise, 0.0, u) - (r - noise)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(m.denoising_error(lr, hr, torch.zeros(2), noise), want)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("make", [tiny_model, flow_model])
def test_bad_lr_is_a_value_error(make):
    m = make()
    with pytest.raises(ValueError, match="shape"):
        m(torch.rand(3, 16, 16))
    nan = lr_batch()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m(nan)


def test_flow_bad_arguments():
    m, lr = flow_model(), lr_batch()
    x = torch.zeros(2, 3, 64, 64)
    with pytest.raises(ValueError, match="k must be"):
        m.step_log_prob(lr, x, K, x)  # transitions are 0 .. K-1
    with pytest.raises(ValueError, match="state of shape"):
        m.step_log_prob(lr, x[..., :32], 0, x)
    with pytest.raises(ValueError, match="pixel_weight"):
        m.step_log_prob(lr, x, 0, x, pixel_weight=-torch.ones(2, 1, 64, 64))
    with pytest.raises(ValueError, match="pixel_weight"):
        m.step_log_prob(lr, x, 0, x, pixel_weight=torch.ones(2, 3, 64, 64))
    with pytest.raises(ValueError, match="t must be"):
        m.denoising_error(lr, torch.rand(2, 3, 64, 64), torch.tensor(0.5), x)
    with pytest.raises(ValueError, match="NaN"):
        m.predict_sr(lr, torch.full((2, 3, 64, 64), float("nan")), 0)


# ---------------------------------------------------------------------------------------------
# Checkpoints and recipes


def test_checkpoint_round_trip(tmp_path):
    lr = lr_batch()
    tiny, flow = tiny_model(), flow_model()
    tiny2 = load_policy_checkpoint(save_policy(tiny, tmp_path / "tiny"))
    flow2 = load_policy(save_policy(flow, tmp_path / "flow"))
    assert isinstance(tiny2, TinySR) and tiny2.cfg == tiny.cfg
    assert torch.equal(tiny2(lr), tiny(lr))
    assert isinstance(flow2, FlowSR) and flow2.cfg == flow.cfg
    assert torch.equal(flow2(lr), flow(lr))
    assert torch.equal(flow2.sample(lr, gen(1)).log_probs, flow.sample(lr, gen(1)).log_probs)


def test_load_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_policies.py --which tiny"):
        load_tiny(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_policies.py --which flow"):
        load_flow(tmp_path / "nope")


def test_sample_batch_is_a_function_of_seed_and_step(photo_dir):
    from finpercep.policies.recipe_data import load_photos

    photos = load_photos(photo_dir, 64)
    lr, hr = sample_batch(photos, 0, 5, 2, 64, 4, FlowTrainConfig().degradation)
    assert lr.shape == (2, 3, 16, 16) and hr.shape == (2, 3, 64, 64)
    lr2, hr2 = sample_batch(photos, 0, 5, 2, 64, 4, FlowTrainConfig().degradation)
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    assert not torch.equal(hr, sample_batch(photos, 0, 6, 2, 64, 4, FlowTrainConfig().degradation)[1])


@pytest.mark.parametrize(
    "cfg, train_fn, load_fn, loss_key",
    [
        (TinyTrainConfig(model=TinyConfig(channels=8, num_layers=1), steps=2, batch=2, crop=32, threads=1, log_every=1),
         train_tiny, load_tiny, "loss/l1"),
        (FlowTrainConfig(model=FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=2), steps=2, batch=2, crop=32,
                         threads=1, log_every=1),
         train_flow, load_flow, "loss/fm"),
    ],
    ids=["tiny", "flow"],
)
def test_recipe_runs_writes_metrics_and_a_loadable_checkpoint(tmp_path, photo_dir, cfg, train_fn, load_fn, loss_key):
    threads = torch.get_num_threads()
    ckpt = train_fn(cfg, photo_dir, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == threads  # restored
    lines = read_metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [0, 1]
    assert all(np.isfinite(m[loss_key]) and m["lr"] > 0 for m in lines)
    model = load_fn(tmp_path / "run")  # a run folder works, as does the checkpoint itself
    assert model.cfg == cfg.model
    again = load_fn(ckpt)
    lr = lr_batch(1, 8, 8)
    assert torch.equal(model(lr), again(lr))
    # Same seed, same data and initialisation: a bit-identical rerun.
    rerun = load_fn(train_fn(cfg, photo_dir, tmp_path / "rerun", progress=False))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rerun.state_dict().values()))


# Recorded with the two recipes' own loops before they became one (train_recipe + a loss function):
# the losses of steps 0..2 and the sum of the trained weights, seed 3, one thread.
RECIPE_BEFORE = {
    "tiny": ([0.0796496793627739, 0.06502023339271545, 0.055850863456726074], -2.5560847383458167),
    "flow": ([2.351428985595703, 1.9101426601409912, 1.4798715114593506], -4.4416094338440075),
}


@pytest.mark.parametrize("which", ["tiny", "flow"])
def test_recipe_loop_reproduces_the_recipes_before_they_shared_it(tmp_path, photo_dir, which):
    if which == "tiny":
        cfg, train_fn, key = TinyTrainConfig(model=TinyConfig(channels=8, num_layers=1), steps=3, batch=2, crop=32,
                                             threads=1, log_every=1, seed=3), train_tiny, "loss/l1"
    else:
        cfg, train_fn, key = FlowTrainConfig(model=FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=2),
                                             steps=3, batch=2, crop=32, threads=1, log_every=1, seed=3), train_flow, "loss/fm"
    model = load_policy_checkpoint(train_fn(cfg, photo_dir, tmp_path / which, progress=False))
    losses, weight_sum = RECIPE_BEFORE[which]
    assert [m[key] for m in read_metrics(tmp_path / which)] == pytest.approx(losses, rel=1e-5)
    assert sum(float(t.double().sum()) for t in model.state_dict().values()) == pytest.approx(weight_sum, rel=1e-5)


@pytest.mark.parametrize("cls, name", [(TinyTrainConfig, "policy_tiny.yaml"), (FlowTrainConfig, "policy_flow.yaml")])
def test_recipe_yaml_parses(cls, name):
    cfg = load_config(cls, ROOT / "configs" / name)
    assert isinstance(cfg, cls) and cfg.steps >= 1
    with pytest.raises(ValueError, match="unknown keys"):
        from finpercep.config import from_dict

        from_dict(cls, {**to_dict(cfg), "stpes": 3})


# ---------------------------------------------------------------------------------------------
# Shipped weights


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float(((a - b) ** 2).mean()))


@pytest.mark.parametrize("name, cls, yaml_name", [("tiny-x4", TinySR, "policy_tiny.yaml"), ("flow-x4", FlowSR, "policy_flow.yaml")])
def test_shipped_weights_load_as_their_recipe(name, cls, yaml_name):
    cfg_cls = TinyTrainConfig if cls is TinySR else FlowTrainConfig
    model = load_policy(name)
    assert isinstance(model, cls) and model.name == name and model.scale == 4 and not model.training
    assert model.cfg == load_config(cfg_cls, ROOT / "configs" / yaml_name).model  # shipped = the recipe


@pytest.fixture(scope="module")
def real_crops(photo_dir):
    """Real photos (scikit-image's, never trained on): 192-px center crops and their LR degraded
    the way the recipes train."""
    _, lr, hr = eval_pairs(photo_dir, 192, 4, seed=0)
    return lr, hr


def test_shipped_tiny_beats_bicubic(real_crops):
    lr, hr = real_crops
    with torch.no_grad():
        assert _psnr(load_policy("tiny-x4")(lr), hr) > _psnr(bicubic_upscale(lr, 4).clamp(0, 1), hr)


def test_shipped_flow_mean_path_beats_its_samples(real_crops):
    """A trained sampler spreads its samples around the HR image: the mean path and the average
    of several samples are closer to HR (in PSNR) than one sample, and samples differ."""
    lr, hr = real_crops
    flow = load_policy("flow-x4")
    with torch.no_grad():
        samples = [flow.sample(lr, gen(s)).sr for s in range(4)]
        mean_path = flow(lr)
    one = _psnr(samples[0], hr)
    assert _psnr(mean_path, hr) > one
    assert _psnr(torch.stack(samples).mean(0), hr) > one
    assert float((samples[0] - samples[1]).abs().mean()) > 1e-3
