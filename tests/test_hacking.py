"""The reward-hacking experiment: stability measures on scripted curves, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep.curriculum import CurriculumConfig
from finpercep.eval.hacking import ARMS, run_experiment, stability
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
    res = run_experiment("refl", str(pol), pairs96, pairs96, tiny_rm_run, out, cfg, arms=["a-rm0", "d-fixed"],
                         checkpoint=tiny_rm_run, eval_num=2, progress=False)
    assert set(res) == {"meta", "pretrained", "a-rm0", "d-fixed"}
    for arm in ("a-rm0", "d-fixed"):
        assert res[arm]["eval"]["images"] == 2 and np.isfinite(res[arm]["eval"]["psnr"])
        assert (out / arm / "final" / "model.safetensors").exists()
    table = (out / "hacking.md").read_text()
    assert "| a-rm0 | global RM_0 |" in table and "| d-fixed |" in table and "pretrained" in table
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "crops.jpg").stat().st_size > 1000
    # rerunning finds every arm done and does not train again; it can redraw into another folder
    mtime = (out / "a-rm0" / "metrics.jsonl").stat().st_mtime
    again = run_experiment("refl", str(pol), pairs96, pairs96, tiny_rm_run, out, cfg, arms=["a-rm0", "d-fixed"],
                           checkpoint=tiny_rm_run, eval_num=2, results_dir=tmp_path / "docs", progress=False)
    assert (out / "a-rm0" / "metrics.jsonl").stat().st_mtime == mtime
    assert again["a-rm0"]["eval"] == res["a-rm0"]["eval"]
    assert {p.name for p in (tmp_path / "docs").iterdir()} == {"results.json", "hacking.md", "reward_curves.png", "crops.jpg"}
    with pytest.raises(ValueError, match="not differentiable"):
        run_experiment("refl", str(pol), pairs96, pairs96, tiny_rm_run, out, cfg, arms=["b-niqe"], progress=False)
    assert list(ARMS) == ["a-rm0", "b-niqe", "c-rmN", "d-fixed", "e-auto", "f-coevolve"]
