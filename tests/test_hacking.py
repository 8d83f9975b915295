"""The reward-hacking experiment: stability measures on scripted curves, and a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep.curriculum import CurriculumConfig
from finpercep.eval.hacking import ARMS, claims, default_arms, run_experiment, stability
from finpercep.policies import save_policy
from finpercep.policies.tiny import TinyConfig, TinySR
from finpercep.rl import RLConfig
from finpercep.rl.common import RunConfig


def test_stability_of_scripted_curves():
    rng = np.random.default_rng(0)
    rising = list(np.linspace(0, 10, 60) + rng.normal(0, 0.5, 60))
    flat = list(rng.normal(0, 0.5, 60))
    dipping = list(np.r_[np.linspace(0, 10, 20), np.full(10, 0.0), np.linspace(0, 10, 20), np.full(10, 0.0)] + rng.normal(0, 0.1, 60))
    r, f, d = stability(rising), stability(flat), stability(dipping)
    assert r["curve/gain"] > 5 > abs(f["curve/gain"])
    assert r["curve/drops"] == 0 and d["curve/drops"] == 2
    assert f["curve/window_std"] == pytest.approx(1.0, abs=0.4)


@pytest.fixture(scope="module")
def pairs96(tmp_path_factory) -> Path:
    """Three x4 pairs with HR 96x192 (large enough for NIQE), in the FGR manifest format."""
    import skimage.data as sd

    root = tmp_path_factory.mktemp("pairs96")
    (root / "s").mkdir()
    lines = []
    for i, name in enumerate(("astronaut", "chelsea", "coffee")):
        hr = Image.fromarray(getattr(sd, name)()[:96, :192])
        hr.save(root / "s" / f"{i}_hr.png")
        hr.resize((48, 24), Image.BICUBIC).save(root / "s" / f"{i}_lr.png")
        lines.append(json.dumps({"id": str(i), "hr": f"s/{i}_hr.png", "lr": f"s/{i}_lr.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_experiment_end_to_end(pairs96, tmp_path, tiny_rm_run):
    torch.manual_seed(0)
    pol = save_policy(TinySR(TinyConfig(channels=8, num_layers=1)), tmp_path / "tiny")
    cfg = RLConfig(run=RunConfig(steps=3, batch=2, crop=32, learning_rate=1e-3, sample_every=0, ckpt_every=10),
                   curriculum=CurriculumConfig(schedule=(1, 1)))
    out = tmp_path / "exp"
    arms = ["a-rm0", "a-rm0-nofid", "d-fixed"]
    kw = dict(judge=tiny_rm_run, arms=arms, seeds=[0, 1], checkpoint=tiny_rm_run, eval_num=2, progress=False)
    res = run_experiment("refl", str(pol), pairs96, pairs96, out, cfg, **kw)
    assert set(res) == {"meta", "pretrained", "arms", "summary"} and set(res["arms"]) == set(arms)
    for arm in arms:
        for seed in ("0", "1"):
            run = res["arms"][arm]["seeds"][seed]
            assert len(run["eval"]["psnr_y"]) == 2 and np.isfinite(run["eval"]["psnr_y"]).all()
            assert (out / arm / f"seed-{seed}" / "final" / "model.safetensors").exists()
    # the pretrained policy is its own damage reference: zero damage
    assert res["pretrained"]["eval"]["damage/area"] == [0.0, 0.0]
    # the seeds are different runs; the no-fidelity arm trained with fidelity weight 0
    assert res["arms"]["a-rm0"]["seeds"]["0"]["eval"] != res["arms"]["a-rm0"]["seeds"]["1"]["eval"]
    assert json.loads((out / "a-rm0-nofid" / "seed-0" / "run_config.json").read_text())["config"]["refl"]["fidelity_weight"] == 0.0
    s = res["summary"]["d-fixed"]
    assert s["psnr_y"]["lo"] <= s["psnr_y"]["mean"] <= s["psnr_y"]["hi"] and "psnr_y - a-rm0" in s
    assert res["summary"]["a-rm0"]["damage/area - a-rm0"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "level": 0.95}
    table = (out / "hacking.md").read_text()
    assert "| a-rm0 | global RM_0 |" in table and "| d-fixed |" in table and "| pretrained |" in table
    assert "Paired difference to `a-rm0`" in table and "s/step (median of each run)" in table
    assert res["summary"]["d-fixed"]["time/step"]["mean"] > 0 and res["meta"]["eval_photos"] is None  # no photo names
    claims_text = (out / "claims.md").read_text()
    assert "`a-rm0-nofid` (global RM_0, no fidelity term): **" in claims_text and "not run (needs c-rmN" in claims_text
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "crops.jpg").stat().st_size > 1000
    # rerunning finds every run done and does not train again; it can redraw into another folder
    mtime = (out / "a-rm0" / "seed-0" / "metrics.jsonl").stat().st_mtime
    again = run_experiment("refl", str(pol), pairs96, pairs96, out, cfg, results_dir=tmp_path / "docs", **kw)
    assert (out / "a-rm0" / "seed-0" / "metrics.jsonl").stat().st_mtime == mtime
    assert again["arms"] == res["arms"]
    assert {p.name for p in (tmp_path / "docs").iterdir()} == {"results.json", "hacking.md", "claims.md",
                                                              "reward_curves.png", "crops.jpg"}
    # other evaluation settings: evaluated again, not trained again; other training settings: an error
    fewer = run_experiment("refl", str(pol), pairs96, pairs96, out, cfg, **{**kw, "eval_num": 1})
    assert (out / "a-rm0" / "seed-0" / "metrics.jsonl").stat().st_mtime == mtime
    assert len(fewer["arms"]["d-fixed"]["seeds"]["1"]["eval"]["psnr_y"]) == 1 and fewer["meta"]["eval_images"] == 1
    with pytest.raises(ValueError, match="other settings|differ"):
        run_experiment("refl", str(pol), pairs96, pairs96, out, replace(cfg, run=replace(cfg.run, learning_rate=5e-4)), **kw)


@pytest.mark.parametrize("algo, arms, kw, words", [
    ("refl", ["b-niqe"], {}, "not differentiable"),
    ("grpo", ["a-rm0-nofid"], {}, "run them with --algo refl"),
    ("refl", ["g-pixelmap"], {}, "needs the pixel-only-map reward model"),
    ("refl", ["z-arm"], {}, "unknown arms"),
    ("refl", ["a-rm0"], {"seeds": []}, "no seeds"),
    ("refl", ["a-rm0"], {"seeds": [0, 0]}, "repeat a seed"),
    ("refl", ["a-rm0"], {"reference_arm": "c-rmN"}, "is not among the arms"),
])
def test_bad_arms_are_one_clear_error_before_any_work(algo, arms, kw, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        run_experiment(algo, "tiny-x4", tmp_path / "none", tmp_path / "none", tmp_path / "out", RLConfig(), arms=arms,
                       progress=False, **kw)
    assert not (tmp_path / "out").exists()


def test_default_arms():
    assert default_arms("refl") == ["a-rm0", "a-rm0-weakfid", "a-rm0-nofid", "c-rmN", "d-fixed", "d-fixed-weakfid",
                                    "d-fixed-nofid", "e-auto", "f-coevolve"]
    assert default_arms("grpo") == ["a-rm0", "b-niqe", "c-rmN", "d-fixed", "e-auto", "f-coevolve"]
    assert default_arms("grpo", pixel_rm=True)[-1] == "g-pixelmap" and set(default_arms("dpo")) <= set(ARMS)


def _fake_results(area: dict[str, float], gain: dict[str, float], std: dict[str, float]) -> dict:
    """results.json of 3 seeds x 20 images with the given damaged area, reward gain and window std per arm."""
    rng = np.random.default_rng(0)
    arms = list(area)
    res = {"meta": {"algo": "refl", "policy": "p", "seeds": [0, 1, 2], "eval_images": 20, "arms": arms},
           "pretrained": {"eval": {"damage/area": [0.0] * 20}}, "arms": {}}
    for a in arms:
        res["arms"][a] = {"what": a, "seeds": {str(s): {
            "eval": {"damage/area": list(np.clip(area[a] + rng.normal(0, 0.002, 20), 0, 1)), "psnr_y": [20.0] * 20},
            "curve": {"curve/gain": gain[a] + 0.1 * s, "curve/window_std": std[a] + 0.01 * s, "curve/drops": 1.0}}
            for s in range(3)}}
    return res


def test_claims_follow_the_intervals():
    arms = ["a-rm0", "a-rm0-nofid", "c-rmN", "d-fixed"]
    hacked = _fake_results({"a-rm0": 0.005, "a-rm0-nofid": 0.3, "c-rmN": 0.2, "d-fixed": 0.001},
                           {"a-rm0": -2.0, "a-rm0-nofid": 5.0, "c-rmN": 3.0, "d-fixed": 3.0},
                           {"a-rm0": 1.0, "a-rm0-nofid": 1.0, "c-rmN": 2.0, "d-fixed": 1.0})
    text = claims(hacked)
    assert "`a-rm0-nofid` (global RM_0, no fidelity term): **reproduced**" in text
    assert "`a-rm0` (global RM_0): **not reproduced**" in text
    assert "c-rmN minus d-fixed: **reproduced**" in text
    assert "`d-fixed` (curriculum, fixed schedule): **reproduced**" in text
    assert "not run (needs g-pixelmap and c-rmN)" in text
    flat = _fake_results({a: 0.1 for a in arms}, {a: 1.0 for a in arms}, {a: 1.0 for a in arms})
    text = claims(flat)
    assert "c-rmN minus d-fixed: **undecided**" in text and "`d-fixed` (curriculum, fixed schedule): **undecided**" in text


def test_claims_need_two_seeds_and_finite_values():
    arms = ["a-rm0", "c-rmN", "d-fixed"]
    res = _fake_results({"a-rm0": 0.3, "c-rmN": 0.2, "d-fixed": 0.01}, {a: 5.0 for a in arms}, {a: 1.0 for a in arms})
    one = {**res, "meta": {**res["meta"], "seeds": [0]}}
    assert claims(one).count("**undecided (one seed)**") == 3
    res["arms"]["c-rmN"]["seeds"]["1"]["eval"]["damage/area"][3] = float("nan")
    text = claims(res)
    assert "c-rmN minus d-fixed: **undecided (a value is not finite)**" in text and "damaged area n/a" in text


def test_stability_restarts_at_a_stage_switch():
    # a steady curve on stage 0 (a wiggle of period 10 the moving average removes), then the reward
    # drops by 10 because stage 2 scores lower, steady again
    r = list(np.r_[np.full(30, 5.0), np.full(30, -5.0)] + np.sin(np.arange(60) * 2 * np.pi / 10))
    stages = [0] * 30 + [2] * 30
    plain, staged = stability(r), stability(r, stages=stages)
    assert plain["curve/drops"] == 1 and staged["curve/drops"] == 0
    assert staged["curve/window_std"] < plain["curve/window_std"]
    with pytest.raises(ValueError, match="stages for"):
        stability(r, stages=stages[:-1])
