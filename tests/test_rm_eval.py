"""The reward-model benchmark (benchmarks/rm_eval.py, finpercep.eval.rm_benchmark) on tiny inputs:
a 4-crop data set, a randomly initialised 3-stage run, the classic baselines."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finpercep.data.builder import BuildConfig, build_dataset
from finpercep.data.dataset import swap
from finpercep.eval.rm_benchmark import (
    GT_REFERENCE,
    MapStats,
    exact_area_bounds,
    exact_area_mask,
    measure_speed,
    select_evenly,
)
from finpercep.metrics import average_precision, iou_at, map_mae, pixel_auroc
from finpercep.reward.model import FinPercepRM, RMConfig, save_pretrained

FAMILIES = ("bicubic", "halo", "blocking", "seams")  # cheap; one HR crop (unit) each
HELD_OUT = "seams"
STAGES = 2
CROP = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: with 2 OpenMP threads, a busy machine (e.g. a training job beside the
    tests) slows these tiny convolutions down ~100x; the results do not depend on it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def bench(photo_dir, tmp_path_factory) -> dict:
    """Tiny test data set + tiny random run, then the benchmark script on them (no speed part)."""
    root = tmp_path_factory.mktemp("rm_eval")
    build_dataset(photo_dir, root / "test", BuildConfig(num=8, crop=CROP, masks_per_sr=2, families=FAMILIES),
                  progress=False)
    torch.manual_seed(0)
    model = FinPercepRM(RMConfig(decoder_stage=0, decoder_channels=8, score_hidden=16), load_backbone_weights=False)
    for k in range(STAGES + 1):
        if k > 0:
            model = model.grow()
            with torch.no_grad():  # a random map head, so that maps are not a constant 0.5
                model.decoder.head.weight.normal_(0, 1.0)
        save_pretrained(model, root / "run" / f"stage_{k}")
    spec = importlib.util.spec_from_file_location("rm_eval", Path(__file__).parents[1] / "benchmarks" / "rm_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = root / "results" / "rm_eval.md"
    argv = ["--test-data", str(root / "test"), "--run", str(root / "run"), "--pixel-only-run", str(root / "run"),
            "--out", str(out), "--held-out", HELD_OUT, "--max-samples", "8", "--pixels-per-image", "1000",
            "--no-speed"]
    assert script.main(argv) == 0
    return {"md": out.read_text(), "report": json.loads(out.with_suffix(".json").read_text()), "root": root}


def test_report_has_every_scorer_group_and_target(bench) -> None:
    rep = bench["report"]
    rms = [f"RM_{k}" for k in range(STAGES + 1)]
    scorers = rms + [f"pixel-only RM_{STAGES}", "NIQE", "BRISQUE", "PIQE"]
    assert rep["setup"]["scorers"] == scorers and sorted(rep["ordering"]) == sorted(scorers)
    assert rep["setup"]["final"] == f"RM_{STAGES}"
    assert rep["setup"]["families_held_out"] == [HELD_OUT]
    assert rep["setup"]["n_triplets"] == 8 and rep["setup"]["n_crops"] == 4
    assert rep["setup"]["groups"] == ["all", "held-out", "seen", "interpolation", "procedural"]
    # map quality: only stages with a map; held-out = the 2 samples of the one seams crop
    assert sorted(rep["map_quality"]) == sorted(rms[1:] + [f"pixel-only RM_{STAGES}", GT_REFERENCE])
    assert rep["map_quality"][GT_REFERENCE]["all"]["mae"] == 0.0
    for mq in rep["map_quality"].values():
        assert mq["held-out"]["n_images"] == 2 and mq["seen"]["n_images"] == 6
        assert mq["held-out"]["n_pixels_ranked"] == 2 * 1000 and mq["all"]["n_pixels"] == 8 * CROP * CROP
        for g in ("held-out", "seen", "all"):
            for key in ("pixel_auroc", "average_precision", "mae", "iou"):
                assert 0.0 <= mq[g][key] <= 1.0
        assert sorted(mq["per_family"]) == sorted(FAMILIES)
    # ordering and sensitivity: fractions in [0, 1]; NIQE is undefined on 64-px crops (< 2 blocks of 96 px)
    for name in scorers:
        o = rep["ordering"][name]
        assert o["all"]["n"] + o["all"]["n_undefined"] == 8 and o["held-out"]["n"] + o["held-out"]["n_undefined"] == 2
        for area in ("1%", "3%", "10%"):
            s = rep["sensitivity"][name][area]
            assert s["all"]["n"] + s["all"]["n_undefined"] == 4
            assert s["all"]["drop_fraction"] is None or 0.0 <= s["all"]["drop_fraction"] <= 1.0
        if name != "NIQE":
            assert 0.0 <= o["all"]["accuracy"] <= 1.0 and o["all"]["n"] == 8
    assert rep["ordering"]["NIQE"]["all"]["accuracy"] is None and rep["ordering"]["NIQE"]["all"]["n_undefined"] == 8
    # issue #11's targets: held-out and worst-family AUROC, ordering, drops at 1 / 3 %, gain over RM_0, speed
    targets = {t["name"].split(" (")[0]: t for t in rep["targets"]}
    assert len(rep["targets"]) == 8
    assert all(t["status"] in ("goal reached", "reached", "not reached", "not measured") for t in rep["targets"])
    assert rep["targets"][-1]["status"] == "not measured" and rep["speed"] is None
    final = f"RM_{STAGES}"
    assert rep["targets"][0]["value"] == rep["map_quality"][final]["held-out"]["pixel_auroc"]
    per_family = rep["map_quality"][final]["per_family"]
    worst = targets["map AUROC, worst single family"]
    assert worst["value"] == min(s["pixel_auroc"] for s in per_family.values() if s["pixel_auroc"] is not None)
    gain = targets[f"{final} minus RM_0, local drop at 3%"]
    d = {n: rep["sensitivity"][n]["3%"]["all"]["drop_fraction"] for n in (final, "RM_0")}
    assert gain["value"] == pytest.approx(d[final] - d["RM_0"]) and gain["unit"] == "points"
    assert gain["must"] == ">= +5 points" and targets["score drops at 1% swapped area"]["must"] == ">= 85 %"


def test_raw_numbers_are_consistent_with_the_tables(bench) -> None:
    rep = bench["report"]
    trip, crops = rep["raw"]["triplets"], rep["raw"]["crops"]
    assert len({t["id"] for t in trip}) == 8
    for c in crops:  # exact artifact areas: round(a * 64 * 64) pixels
        assert c["areas"] == {"1%": 41 / 4096, "3%": 123 / 4096, "10%": 410 / 4096}
    name = f"RM_{STAGES}"
    acc = np.mean([t["scores"][name]["hr"] > t["scores"][name]["syn"] > t["scores"][name]["sr"] for t in trip])
    assert rep["ordering"][name]["all"]["accuracy"] == pytest.approx(acc)
    drop = np.mean([c["scores"][name]["local"]["3%"] < c["scores"][name]["clean"] for c in crops])
    assert rep["sensitivity"][name]["3%"]["all"]["drop_fraction"] == pytest.approx(drop)
    # clean score of a crop = the HR score of its triplets (shared forward pass)
    hr_scores = {t["unit"]: t["scores"][name]["hr"] for t in trip}
    assert all(c["scores"][name]["clean"] == hr_scores[c["unit"]] for c in crops)


def test_markdown_lists_the_command_targets_and_every_scorer(bench) -> None:
    md = bench["md"]
    assert md.splitlines()[2].startswith("`python benchmarks/rm_eval.py --test-data")
    for name in ("RM_0", f"RM_{STAGES}", f"pixel-only RM_{STAGES}", "NIQE", "BRISQUE", "PIQE"):
        assert f"| {name}" in md
    for heading in ("## Targets", "## 1. Map quality", "## 2. Ordering", "## 3. Local sensitivity", "## 4. Speed"):
        assert heading in md
    assert md.count("not measured") >= 1 and "nan" not in md.lower().replace("mann", "")


def test_map_stats_pool_like_the_metric_functions() -> None:
    g = torch.Generator().manual_seed(0)
    preds = [torch.rand(1, 20, 30, generator=g) for _ in range(3)]
    masks = [(torch.rand(1, 20, 30, generator=g) > 0.7).float() for _ in range(3)]
    gts = [torch.rand(1, 20, 30, generator=g) for _ in range(3)]
    parts = []
    for p, m, t in zip(preds, masks, gts):
        s = MapStats()
        s.add(p, m, t, None)
        parts.append(s)
    res = MapStats.merge(parts).summary()
    P, M, T = torch.cat(preds), torch.cat(masks), torch.cat(gts)
    assert res["pixel_auroc"] == pytest.approx(pixel_auroc(P.float(), M))
    assert res["average_precision"] == pytest.approx(average_precision(P.float(), M))
    assert res["iou"] == pytest.approx(iou_at(P, M, 0.5))
    assert res["mae"] == pytest.approx(map_mae(P, T))
    assert res["n_images"] == 3 and res["n_pixels"] == 3 * 600
    # a subsample changes only what AUROC / AP rank
    s = MapStats()
    s.add(preds[0], masks[0], gts[0], np.array([0, 5, 7]))
    assert s.summary()["n_pixels_ranked"] == 3 and s.summary()["mae"] == pytest.approx(map_mae(preds[0], gts[0]))
    assert MapStats().summary()["pixel_auroc"] is None


def test_exact_area_masks_and_the_swap() -> None:
    import skimage.data as sd

    from finpercep.io import to_tensor

    hr = to_tensor(np.ascontiguousarray(sd.astronaut()[:100, :130]))
    sr = to_tensor(np.ascontiguousarray(sd.astronaut()[100:200, 130:260]))
    for area in (0.01, 0.03, 0.10):
        lo, hi = exact_area_bounds(area, 13000)
        assert lo < round(area * 13000) / 13000 < hi and math.floor(hi * 13000) == math.ceil(lo * 13000)
        mask, params = exact_area_mask(hr, area, np.random.default_rng(1))
        assert int(mask.sum()) == round(area * 13000) and params["kind"] == "blob"
        mask2, _ = exact_area_mask(hr, area, np.random.default_rng(1))
        assert torch.equal(mask, mask2)
        syn = swap(hr[None], sr[None], mask[None, None])[0]
        inside = mask.bool()
        assert torch.equal(syn[:, ~inside], hr[:, ~inside]) and torch.equal(syn[:, inside], sr[:, inside])
        assert torch.equal(syn * 255, torch.round(syn * 255))
    with pytest.raises(ValueError, match="area"):
        exact_area_bounds(0.0, 100)


def test_select_evenly() -> None:
    assert select_evenly(10, 4) == [0, 2, 5, 7]
    assert select_evenly(3, 8) == [0, 1, 2]
    assert len(set(select_evenly(1000, 256))) == 256


def test_speed_runs_both_networks_in_subprocesses(bench) -> None:
    sp = measure_speed(bench["root"] / "run" / f"stage_{STAGES}", size=64, runs=2, warmup=1, threads=1)
    for kind in ("rm", "stlpips"):
        x = sp[kind]
        assert x["ms_median"] > 0 and len(x["ms_all"]) == 2 and x["size"] == 64
        assert x["torch_threads"] == 1 and x["cpu_count"] >= 1
        assert x["rss_after_imports_mib"] > 0 and x["rss_peak_over_imports_mib"] >= 0 and x["rss_forward_peak_mib"] >= 0
        assert x["memory_method"] in ("exact", "lower_bound")
    assert "map" in sp["rm"]["what"]
    assert sp["ratio"] == pytest.approx(sp["rm"]["ms_median"] / sp["stlpips"]["ms_median"])


def test_target_rows_tell_must_reach_from_goal() -> None:
    from finpercep.eval.rm_benchmark import _fmt_target, _target

    assert _target("auroc", 0.96, 0.90, 0.95)["status"] == "goal reached"
    row = _target("auroc", 0.92, 0.90, 0.95)
    assert row["status"] == "reached" and row["reached"] and row["must"] == ">= 0.9" and row["goal"] == ">= 0.95"
    assert _target("auroc", 0.5, 0.90, 0.95)["status"] == "not reached"
    assert _target("auroc", None, 0.90, 0.95)["status"] == "not measured"
    speed = _target("time", 0.4, 0.5, None, below=True)
    assert speed["status"] == "reached" and speed["must"] == "<= 0.5" and speed["goal"] == ""
    assert _target("time", 0.6, 0.5, None, below=True)["status"] == "not reached"
    gain = _target("gain", -0.125, 0.05, None, unit="points", detail="RM_0 80.0 %")
    assert gain["status"] == "not reached" and _fmt_target(gain) == "-12.5 points (RM_0 80.0 %)"
    assert _fmt_target(_target("order", 0.6875, 0.9, 0.95, unit="%")) == "68.8 %"


def test_ablation_page_puts_both_benchmarks_side_by_side(bench, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("rm_ablation", Path(__file__).parents[1] / "benchmarks" / "rm_ablation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    check = {"below": 1.0, "n": 3}
    hack = {"setup": {"command": "python benchmarks/rm_hackability.py --model m=run"},
            "edits": {"m": {"black": check, "gamma 2.2": {"below": 0.5, "n": 3}}},
            "whole_sr": {"m": {"bicubic": {"below": 0.96, "n": 3}}},
            "ascent": {"m": {"reward": {"change": 2.5}, "psnr_y": {"change": -0.1}, "stlpips": {"change": 0.01},
                             "above_hr_start": 0.25, "above_hr_end": 0.75}}}
    (tmp_path / "hack.json").write_text(json.dumps(hack))
    ev = bench["root"] / "results" / "rm_eval.json"
    out = tmp_path / "abl.md"
    assert script.main(["--row", f"m={ev}", "--hack", str(tmp_path / "hack.json"), "--out", str(out)]) == 0
    md, rep = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    auroc = bench["report"]["map_quality"][f"RM_{STAGES}"]["held-out"]["pixel_auroc"]
    assert f"| m | {auroc:.3f} |" in md and "1 / 2 (worst gamma 2.2 50.0 %)" in md and "+2.50 | 25 % -> 75 % |" in md
    rows = {t["name"].split(" (")[0]: t for t in rep["targets"]}
    assert rows["HR above each edit"]["status"] == "not reached" and rows["HR above each edit"]["detail"] == "gamma 2.2"
    assert rows["whole real-SR output below its HR"]["status"] == "reached"
    with pytest.raises(SystemExit, match="model 'x' is not in the hackability JSON"):
        script.main(["--row", f"x={ev}", "--hack", str(tmp_path / "hack.json"), "--out", str(out)])
    # A second benchmark file adds models; where both name one, the first file's numbers are used.
    other = json.loads(json.dumps(hack).replace('"m"', '"n"'))
    other["setup"]["command"] = "python benchmarks/rm_hackability.py --model n=run2"
    other["edits"]["n"]["gamma 2.2"]["below"] = 1.0
    other["edits"]["m"] = {"black": check, "gamma 2.2": check}
    (tmp_path / "hack2.json").write_text(json.dumps(other))
    assert script.main(["--row", f"m={ev}", "--row", f"n={ev}", "--hack", str(tmp_path / "hack.json"),
                        "--hack", str(tmp_path / "hack2.json"), "--out", str(out)]) == 0
    md = out.read_text()
    assert "1 / 2 (worst gamma 2.2 50.0 %)" in md and "| n | " in md and "2 / 2 (worst black 100.0 %)" in md
    assert "--model m=run`" in md and "--model n=run2`" in md
    # --alias: a row whose model the hackability files name differently
    assert script.main(["--row", f"renamed={ev}", "--alias", "renamed=n", "--hack", str(tmp_path / "hack2.json"),
                        "--out", str(out)]) == 0
    assert "| renamed | " in out.read_text() and "2 / 2 (worst black 100.0 %)" in out.read_text()
