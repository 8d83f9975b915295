"""Edit checks, the whole-SR check and pixel-space reward ascent (finpercep.eval.edit_checks,
finpercep.eval.hackability, benchmarks/rm_hackability.py) on toy rewards and tiny inputs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finpercep.eval.edit_checks import (
    EDITS,
    bootstrap_ci,
    check_variants,
    compare_scores,
    edit_images,
    lr_of,
    real_sr_outputs,
    sr_scale,
)
from finpercep.eval.hackability import AscentConfig, merge_curves, reward_ascent, summarise_ascent
from finpercep.metrics import psnr_y


def _photos(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 0.8 + 0.1


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# Edits


def test_edits_give_the_right_images() -> None:
    x = _photos()
    ed = edit_images(x)
    assert list(ed) == list(EDITS) and all(v.shape == x.shape for v in ed.values())
    assert torch.equal(ed["darken x0.5"], x * 0.5)
    assert torch.equal(ed["black"], torch.zeros_like(x))
    mean = ed["mean colour"]
    assert torch.allclose(mean, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    assert torch.equal(mean, mean[:, :, :1, :1].expand_as(mean))  # constant per image and channel
    assert torch.allclose(ed["gamma 2.2"], x**2.2)
    assert all(0 <= float(v.min()) and float(v.max()) <= 1 for v in ed.values())


def test_saturation_keeps_grey_and_blur_keeps_flat_and_mean() -> None:
    grey = torch.full((1, 3, 8, 8), 0.4)
    ed = edit_images(grey)
    assert torch.allclose(ed["saturate x1.6"], grey) and torch.allclose(ed["blur 5x5 box"], grey)
    x = torch.zeros(1, 3, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel: a 5x5 box spreads it to 1/25 over 25 pixels
    b = edit_images(x)["blur 5x5 box"]
    assert torch.allclose(b[0, :, 2:7, 2:7], torch.full((3, 5, 5), 1 / 25)) and float(b[0, :, 0, 0].sum()) == 0
    red = torch.tensor([0.6, 0.3, 0.3]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    s = edit_images(red)["saturate x1.6"]
    y = 0.299 * 0.6 + 0.587 * 0.3 + 0.114 * 0.3
    assert torch.allclose(s[0, :, 0, 0], torch.tensor([y + 1.6 * (0.6 - y), y + 1.6 * (0.3 - y), y + 1.6 * (0.3 - y)]))


def test_edit_images_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="edit_images"):
        edit_images(torch.rand(3, 8, 8))


# ---------------------------------------------------------------------------------------------
# Checks


def test_check_flags_what_a_toy_reward_prefers() -> None:
    x = _photos(8)
    g = torch.Generator().manual_seed(0)
    # A reward that prefers darkness (the shipped model's failure): darkening and black fail.
    dark = check_variants(lambda t: -brightness(t), x, edit_images(x), generator=g)
    assert dark["darken x0.5"].below == 0.0 and dark["black"].below == 0.0 and dark["darken x0.5"].gap < 0
    # One that prefers brightness ranks every darker version below the photo.
    bright = check_variants(brightness, x, edit_images(x), generator=g)
    assert bright["darken x0.5"].below == 1.0 and bright["black"].below == 1.0
    assert bright["darken x0.5"].gap == pytest.approx(float(brightness(x).double().mean()) * 0.5, rel=1e-5)


def test_compare_scores_counts_strictly_below_with_intervals() -> None:
    s_ref = torch.tensor([1.0, 1.0, 1.0, 1.0])
    c = compare_scores(s_ref, torch.tensor([0.0, 2.0, 1.0, 0.5]), torch.Generator().manual_seed(0))
    assert c.n == 4 and c.below == 0.5 and c.gap == pytest.approx(0.125)
    assert c.below_ci[0] <= c.below <= c.below_ci[1] and c.gap_ci[0] <= c.gap <= c.gap_ci[1]
    assert c.to_json()["below_ci"] == list(c.below_ci)
    with pytest.raises(ValueError, match="paired"):
        compare_scores(s_ref, torch.zeros(3))


def test_bootstrap_ci_is_seeded_and_brackets_the_mean() -> None:
    v = torch.arange(20.0)
    a = bootstrap_ci(v, torch.Generator().manual_seed(1))
    assert a == bootstrap_ci(v, torch.Generator().manual_seed(1))
    assert a[0] < 9.5 < a[1] and bootstrap_ci(torch.tensor([3.0])) == (3.0, 3.0)


def test_whole_sr_check_with_a_cheap_family() -> None:
    from finpercep.data.sr_zoo import resolve_families

    hr = _photos(2, 32)
    lr = lr_of(hr, 4)
    assert lr.shape == (2, 3, 8, 8) and torch.equal(lr, (lr * 255).round() / 255)
    fams = resolve_families("bicubic", 4)
    assert [sr_scale(f) for f in fams] == [4]
    seen = []
    srs = real_sr_outputs(hr, fams, np.random.default_rng(0), on_image=lambda name, i: seen.append((name, i)))
    assert list(srs) == ["bicubic"] and srs["bicubic"].shape == hr.shape and seen == [("bicubic", 0), ("bicubic", 1)]
    # A reward equal to -|x - hr| per image puts HR (distance 0) above its SR output.
    res = check_variants(lambda t: -(t - hr[: t.shape[0]]).abs().mean(dim=(1, 2, 3)), hr, srs, batch_size=2)
    assert res["bicubic"].below == 1.0
    with pytest.raises(ValueError, match="divisible"):
        lr_of(_photos(1, 30), 4)


# ---------------------------------------------------------------------------------------------
# Reward ascent


def test_ascent_raises_a_toy_reward_with_curves_of_the_right_length() -> None:
    hr = _photos(3, 32)
    start = (hr * 0.9).clamp(0, 1)
    cfg = AscentConfig(steps=4, step_size=0.01, record_every=2)
    curves = reward_ascent(brightness, start, hr, {"psnr_y": psnr_y}, cfg)
    assert curves.steps.tolist() == [0, 2, 4] and curves.reward.shape == (3, 3)
    assert curves.metrics["psnr_y"].shape == (3, 3)
    # Signed gradient of the mean brightness: every pixel +0.01 per step (none reaches 1).
    assert torch.allclose(curves.final, start + 0.04, atol=1e-6)
    assert torch.allclose(curves.reward[-1] - curves.reward[0], torch.full((3,), 0.04, dtype=torch.float64), atol=1e-6)
    assert torch.equal(start, (hr * 0.9).clamp(0, 1))  # the input is not modified
    adam = reward_ascent(brightness, start, hr, {}, AscentConfig(steps=3, step_size=0.01, method="adam", record_every=1))
    assert adam.steps.tolist() == [0, 1, 2, 3] and bool((adam.reward[-1] > adam.reward[0]).all())


def test_constant_reward_changes_nothing() -> None:
    hr = _photos(2, 32)
    start = (hr + 0.05).clamp(0, 1)
    for method in ("sign", "adam"):
        for fn in (lambda t: torch.zeros(t.shape[0]), lambda t: t.sum(dim=(1, 2, 3)) * 0 + 1.0):
            c = reward_ascent(fn, start, hr, {"psnr_y": psnr_y}, AscentConfig(steps=2, record_every=1, method=method))
            assert torch.equal(c.final, start)
            s = summarise_ascent(c, reward_hr=torch.zeros(2))
            assert s["reward"]["change"] == 0.0 and s["psnr_y"]["change"] == 0.0 and s["steps"] == 2


def test_ascent_moves_away_from_hr_and_summary_counts_above_hr() -> None:
    hr = _photos(4, 32, seed=1)
    start = hr * 0.95
    c = reward_ascent(brightness, start, hr, {"psnr_y": psnr_y}, AscentConfig(steps=10, step_size=0.02, record_every=5))
    s = summarise_ascent(c, reward_hr=brightness(hr), generator=torch.Generator().manual_seed(0))
    assert s["reward"]["change"] > 0 and s["psnr_y"]["change"] < 0  # hackable: up while moving away from HR
    assert s["above_hr_start"] == 0.0 and s["above_hr_end"] == 1.0
    lo, hi = s["reward"]["change_ci"]
    assert lo <= s["reward"]["change"] <= hi
    halves = merge_curves([reward_ascent(brightness, start[i : i + 2], hr[i : i + 2], {"psnr_y": psnr_y},
                                         AscentConfig(steps=10, step_size=0.02, record_every=5)) for i in (0, 2)])
    assert torch.allclose(halves.reward, c.reward) and torch.allclose(halves.final, c.final)


def test_ascent_refuses_bad_config_and_reward() -> None:
    with pytest.raises(ValueError, match="record_every"):
        AscentConfig(steps=5, record_every=2)
    with pytest.raises(ValueError, match="method"):
        AscentConfig(method="sgd")
    x = _photos(2, 16)
    with pytest.raises(ValueError, match="reward_fn must return"):
        reward_ascent(lambda t: t.mean(), x, x, {}, AscentConfig(steps=1, record_every=1))


# ---------------------------------------------------------------------------------------------
# The benchmark script, end to end on a tiny random model


def _script():
    path = Path(__file__).parents[1] / "benchmarks" / "rm_hackability.py"
    spec = importlib.util.spec_from_file_location("rm_hackability", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_spec_parsing() -> None:
    parse = _script().parse_model_spec
    assert parse("RM_N=embedded") == ("RM_N", None, None)
    assert parse("RM_0=embedded:0") == ("RM_0", None, 0)
    assert parse("v2=runs/rm-v2:3") == ("v2", "runs/rm-v2", 3)
    assert parse("v2=runs/rm-v2") == ("v2", "runs/rm-v2", None)
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse("runs/rm-v2")


def test_script_writes_tables_json_and_figure(tiny_rm_run, photo_dir, tmp_path) -> None:
    photos = tmp_path / "photos" / "A"
    photos.mkdir(parents=True)
    for p in sorted(photo_dir.iterdir()):
        shutil.copy(p, photos / p.name)
    out = tmp_path / "res" / "hack.md"
    fig = tmp_path / "res" / "hack.png"
    argv = ["--photos", str(tmp_path / "photos"), "--sets", "A", "--crop", "64", "--families", "bicubic",
            "--model", f"tiny2={tiny_rm_run}", "--model", f"tiny0={tiny_rm_run}:0",
            "--whole-sr-photos", "2", "--hack-photos", "2", "--steps", "2", "--record-every", "1",
            "--out", str(out), "--figure", str(fig), "--n-boot", "50"]
    assert _script().main(argv) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert sorted(rep["models"]) == ["tiny0", "tiny2"]
    assert sorted(rep["edits"]["tiny2"]) == sorted(EDITS) and rep["edits"]["tiny2"]["black"]["n"] == 3
    assert rep["whole_sr"]["tiny0"]["bicubic"]["n"] == 2
    assert rep["ascent"]["tiny2"]["steps"] == 2 and rep["ascent"]["tiny2"]["n"] == 2
    md = out.read_text()
    assert "`python benchmarks/rm_hackability.py --photos" in md and "| darken x0.5 |" in md
    assert md.index("| tiny2 | ") < md.index("| tiny0 | ")  # --model order, not sorted
    assert _script().render_markdown(rep, rep["setup"]["command"]) + "\n" == md  # the JSON renders the same
    assert fig.stat().st_size > 0
