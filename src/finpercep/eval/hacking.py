"""The paper's reward-hacking experiment (arXiv 2512.22647, Fig. 1: global reward vs CCL), with an
independent judge, several seeds and confidence intervals.

Same policy, data and step budget in every arm; one arm per reward (:data:`ARMS`):

- ``a-rm0``: the global-only RM_0 (ReFL also with a weak fidelity term, ``-weakfid``, and none,
  ``-nofid``: hacking by a global reward shows only when the reward dominates);
- ``b-niqe``: a classic global NR metric (NIQE; not differentiable, so DPO / GRPO only);
- ``c-rmN``: the final fused reward ``R_N`` from the first step, no curriculum;
- ``d-fixed``: the curriculum, fixed schedule (ReFL also ``-weakfid`` and ``-nofid``);
- ``e-auto``: the curriculum, automatic switching;
- ``f-coevolve``: the curriculum with online co-evolution of the reward model;
- ``g-pixelmap``: ``R_N`` of a reward model trained on pixel-only ground-truth maps (the paper's
  ablation; needs ``pixel_only_checkpoint``; compare with ``c-rmN``).

Each arm trains once per seed. Every run is evaluated on the same held-out LR/HR pairs by
measures training never optimised (:func:`finpercep.eval.sr_quality.evaluate_sr_per_image`):
the **independent local-damage judge** (:mod:`finpercep.eval.damage`: the share of pixels whose
local SSIM to HR fell clearly below the pretrained policy's), PSNR-Y / SSIM-Y / ST-LPIPS, NIQE /
BRISQUE / PIQE, and a learned judge (a FinPercep-RM; it shares the reward's recipe, so it is one
more column, not the verdict). Means come with 95 % intervals over seeds and images
(:mod:`finpercep.eval.stats`: Student's t over seeds and a bootstrap over images, added), and
each arm's difference to the reference arm (default ``a-rm0``) is paired by seed and image.
Training stability comes from each run's reward curve (:func:`stability`), with Student's t
intervals over seeds. :func:`claims` turns the intervals into the verdict on the paper's three
claims and its map ablation.

Outputs in ``out/``: one RL run folder per arm and seed (``ARM/seed-S``, each with its
``eval.json``), ``results.json``, ``hacking.md`` (the tables), ``claims.md``,
``reward_curves.png`` (the analogue of Fig. 1b) and ``crops.jpg`` (the same crops across arms
with the damage maps, the analogue of Fig. 1c).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from finpercep.eval.damage import DAMAGE_THRESHOLD
from finpercep.io import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One arm: the reward (a spec of :func:`finpercep.rewards.create_reward`) with curriculum
    mode ``none``, or a curriculum mode; for ReFL optionally the fidelity weight scaled."""

    reward: str | None
    curriculum: str
    what: str
    fidelity_scale: float | None = None
    """ReFL only: ``refl.fidelity_weight`` times this (``None``: the config's)."""
    pixel_rm: bool = False
    """Rewards from the pixel-only-map reward model instead of the main one."""


ARMS: dict[str, Arm] = {
    "a-rm0": Arm("rm0", "none", "global RM_0"),
    "a-rm0-weakfid": Arm("rm0", "none", "global RM_0, fidelity x0.1", fidelity_scale=0.1),
    "a-rm0-nofid": Arm("rm0", "none", "global RM_0, no fidelity term", fidelity_scale=0.0),
    "b-niqe": Arm("niqe", "none", "classic global NR metric (NIQE)"),
    "c-rmN": Arm("fused", "none", "final fused R_N from the start"),
    "d-fixed": Arm(None, "fixed", "curriculum, fixed schedule"),
    "d-fixed-weakfid": Arm(None, "fixed", "curriculum, fixed, fidelity x0.1", fidelity_scale=0.1),
    "d-fixed-nofid": Arm(None, "fixed", "curriculum, fixed, no fidelity term", fidelity_scale=0.0),
    "e-auto": Arm(None, "auto", "curriculum, automatic switching"),
    "f-coevolve": Arm(None, "coevolve", "curriculum + online co-evolution"),
    "g-pixelmap": Arm("fused", "none", "R_N of the pixel-only-map RM from the start", pixel_rm=True),
}
"""Arm name -> :class:`Arm`."""

WINDOW = 10
"""Sliding window (steps) of the stability measures."""

MEASURES: list[tuple[str, str, str]] = [
    ("damage/area", "damaged area (independent)", "down"), ("psnr_y", "PSNR-Y", "up"), ("ssim_y", "SSIM-Y", "up"),
    ("stlpips", "ST-LPIPS", "down"), ("niqe", "NIQE", "down"), ("brisque", "BRISQUE", "down"),
    ("piqe", "PIQE", "down"), ("rm/score", "learned judge score (same recipe)", "up")]
"""(key in the per-image evaluation, column title, better direction) of the tables."""

CURVE_MEASURES = [("curve/gain", "reward gain"), ("curve/window_std", "window std"), ("curve/drops", "drops")]

DAMAGE_FLOOR = 0.01
"""Claim 1 counts the judge's damage as grown when its damaged area is above 1 % of the image
with the whole interval (and as not grown when the whole interval is below)."""


def default_arms(algo: str, pixel_rm: bool = False) -> list[str]:
    """The arms that apply to ``algo``: the fidelity sweep for ReFL only, NIQE (no gradient) for
    DPO / GRPO only, ``g-pixelmap`` when a pixel-only-map reward model is given."""
    return [name for name, a in ARMS.items()
            if (algo == "refl" or a.fidelity_scale is None) and not (algo == "refl" and name == "b-niqe")
            and (pixel_rm or not a.pixel_rm)]


def stability(rewards: list[float], window: int = WINDOW, stages: list[int | None] | None = None) -> dict[str, float]:
    """Stability of a reward curve ``r_1 .. r_T`` (step means).

    - ``curve/last``: mean of the last ``window`` steps;
    - ``curve/gain``: that minus the mean of the first ``window`` steps, in units of the first
      window's std (comparable across rewards of different scales);
    - ``curve/window_std``: mean over windows of the within-window std, in the same units;
    - ``curve/drops``: how many times the moving average falls by more than one first-window std
      below its running maximum (counting entries into such a dip, not steps spent in it).

    ``stages``: the curriculum stage of each step (``curriculum/stage``). A stage switch changes
    the reward itself, so windows that straddle one are left out of ``window_std`` and the
    running maximum of ``drops`` restarts at it. ``window`` shrinks to ``T // 2`` for short curves.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2 * window:
        window = max(1, r.size // 2)
    first = r[:window]
    unit = float(first.std()) or 1.0
    st = list(stages) if stages is not None else [None] * r.size
    if len(st) != r.size:
        raise ValueError(f"stability: {len(st)} stages for {r.size} rewards")
    # segments of constant stage: [start, end)
    cuts = [0] + [i for i in range(1, r.size) if st[i] != st[i - 1]] + [r.size]
    stds, drops = [], 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = r[a:b]
        stds += [float(seg[i : i + window].std()) for i in range(0, seg.size - window + 1)]
        if seg.size < window:
            continue
        peak, down = -math.inf, False
        for v in np.convolve(seg, np.ones(window) / window, mode="valid"):
            peak = max(peak, v)
            below = v < peak - unit
            drops += int(below and not down)
            down = below
    return {"curve/last": float(r[-window:].mean()), "curve/gain": float((r[-window:].mean() - first.mean()) / unit),
            "curve/window_std": float(np.mean(stds) / unit) if stds else float("nan"), "curve/drops": float(drops)}


def run_experiment(
    algo: str,
    policy: str,
    data: str | Path,
    test_data: str | Path,
    out: str | Path,
    cfg: Any,
    *,
    judge: str | Path | None = None,
    arms: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1, 2),
    checkpoint: str | Path | None = None,
    pixel_only_checkpoint: str | Path | None = None,
    reference_arm: str | None = None,
    eval_num: int = 64,
    results_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train every arm (default :func:`default_arms`) once per seed in ``seeds`` with the RL config
    ``cfg`` (:class:`finpercep.rl.RLConfig`; its ``curriculum`` section sets the schedule, the
    mode and the seed are set per run), evaluate each run on the first ``eval_num`` pairs of
    ``test_data`` (the learned-judge column by ``judge``, a FinPercep-RM run or checkpoint folder;
    default the shipped model), summarise with intervals and write the outputs (module
    docstring; the tables, ``claims.md`` and the figures go to ``results_dir`` instead when
    given, e.g. ``docs/results/hacking/...``, with a copy of ``results.json``). ``checkpoint``:
    the reward-model run of the rewards (default the shipped one); ``pixel_only_checkpoint``: the
    one of ``g-pixelmap``. Resumable: a run with an ``eval.json`` is neither trained nor
    evaluated again, an interrupted one resumes from its last checkpoint; a run whose evaluation settings (policy, test data, number of images,
    judge) changed is evaluated again, one whose training settings changed is an error of
    :func:`finpercep.rl.fine_tune`.

    Raises ``ValueError`` for an unknown arm, an arm that does not apply to ``algo``, no or
    repeated seeds, or ``g-pixelmap`` without ``pixel_only_checkpoint``."""
    from finpercep.eval.sr_quality import evaluate_sr_per_image
    from finpercep.policies import load_policy
    from finpercep.reward.api import load_reward
    from finpercep.rl import fine_tune
    from finpercep.rl.common import PairData, is_stochastic
    from finpercep.runs import read_metrics

    names = arms or default_arms(algo, pixel_only_checkpoint is not None)
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if algo != "refl" and any(ARMS[a].fidelity_scale is not None for a in names):
        raise ValueError("the fidelity-sweep arms (-weakfid, -nofid) scale ReFL's fidelity term: run them with --algo refl")
    if algo == "refl" and "b-niqe" in names:
        raise ValueError("arm b-niqe trains on NIQE, which is not differentiable: run it with --algo dpo or grpo")
    if "g-pixelmap" in names and pixel_only_checkpoint is None:
        raise ValueError("arm g-pixelmap needs the pixel-only-map reward model (--pixel-only-checkpoint RUN)")
    if not seeds:
        raise ValueError("no seeds: give at least one (e.g. 0,1,2)")
    reference_arm = reference_arm or ("a-rm0" if "a-rm0" in names else names[0])
    if reference_arm not in names:
        raise ValueError(f"reference arm {reference_arm!r} is not among the arms {names}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat a seed: each seed is one training run")
    judge_model = load_reward(judge)
    test = PairData(test_data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idx = list(range(min(eval_num, len(test))))
    if len(idx) < eval_num:
        log.warning("%s has %d LR/HR pairs, fewer than --eval-num %d: evaluating all of them", test_data, len(idx), eval_num)
    base = load_policy(policy)
    stochastic = is_stochastic(base)
    # what an evaluation depends on: a saved one is reused only when all of it matches
    evaluated_on = {"policy": str(policy), "test_data": str(test_data), "images": len(idx),
                    "judge": str(judge) if judge else None}

    # every run is judged against the same pretrained outputs: compute them once (a stochastic
    # policy's depend on the noise, which evaluate_sr_per_image replays per run)
    reference = base if stochastic else _Memo(base)

    def evaluate(pol: torch.nn.Module) -> dict[str, list[float]]:
        # a stochastic policy draws one sample per image; the same noise for every arm and the reference
        sample = torch.Generator(device=device).manual_seed(0) if stochastic else None
        return evaluate_sr_per_image(pol, test, idx, judge=judge_model, reference=reference, device=device,
                                     sample=sample, progress=progress)

    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["meta"] = {"algo": algo, "policy": str(policy), "data": str(data), "test_data": str(test_data),
                       "judge": str(judge) if judge else "shipped FinPercep-RM (the reward's own model)",
                       "checkpoint": str(checkpoint) if checkpoint else "shipped",
                       "pixel_only_checkpoint": str(pixel_only_checkpoint) if pixel_only_checkpoint else None,
                       "eval_images": len(idx), "eval_photos": _photos(test, idx), "steps": cfg.run.steps, "batch": cfg.run.batch, "seeds": list(seeds),
                       "fidelity_weight": cfg.refl.fidelity_weight if algo == "refl" else None,
                       "reference_arm": reference_arm, "arms": names}
    if results.get("pretrained", {}).get("evaluated_on") != evaluated_on:
        results["pretrained"] = {"evaluated_on": evaluated_on, "eval": evaluate(base)}
        _write_json(results_path, results)
    results["arms"] = {}
    for arm in names:
        spec = ARMS[arm]
        entry = results["arms"][arm] = {"what": spec.what, "seeds": {}}
        for seed in seeds:
            run_dir = out / arm / f"seed-{seed}"
            run_cfg = replace(cfg, run=replace(cfg.run, seed=seed),
                              curriculum=replace(cfg.curriculum, mode=spec.curriculum))
            if spec.fidelity_scale is not None:
                run_cfg = replace(run_cfg, refl=replace(cfg.refl, fidelity_weight=cfg.refl.fidelity_weight * spec.fidelity_scale))
            saved = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
            trained = (run_dir / "final").is_dir() and _trained_as(run_dir, algo, policy, spec.reward, data, run_cfg)
            if saved.get("evaluated_on") != evaluated_on or not trained:
                log.info("arm %s, seed %d: %s", arm, seed, spec.what)
                # trains or resumes; a run folder of other settings is an error there
                final = run_dir / "final" if trained else fine_tune(
                    policy, algo, spec.reward, data, run_dir, run_cfg,
                    checkpoint=pixel_only_checkpoint if spec.pixel_rm else checkpoint, device=device, progress=progress)
                saved = {"evaluated_on": evaluated_on, "eval": evaluate(load_policy(final))}
                _write_json(run_dir / "eval.json", saved)
            ms = read_metrics(run_dir)
            curve = stability([m["reward/mean"] for m in ms], stages=[m.get("curriculum/stage") for m in ms])
            times = [m["time/step"] for m in ms if "time/step" in m]
            entry["seeds"][str(seed)] = {"eval": saved["eval"], "curve": curve,
                                         "time/step": float(np.median(times)) if times else None}
        _write_json(results_path, results)
    results["summary"] = summarise(results, names, [str(s) for s in seeds], reference_arm)
    _write_json(results_path, results)
    dest = Path(results_dir) if results_dir is not None else out
    dest.mkdir(parents=True, exist_ok=True)
    if dest != out:
        _write_json(dest / "results.json", results)
    write_table(results, dest / "hacking.md")
    atomic_write_bytes(dest / "claims.md", claims(results).encode())
    plot_curves(out, names, [str(s) for s in seeds], dest / "reward_curves.png")
    crops_figure(out, names, str(seeds[0]), policy, test, dest / "crops.jpg", device=device)
    return results


class _Memo(torch.nn.Module):
    """A deterministic policy whose output is computed once per distinct LR batch (by content)."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.outputs: dict[tuple, torch.Tensor] = {}

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        key = (tuple(lr.shape), str(lr.device), hashlib.sha1(lr.detach().cpu().numpy().tobytes()).hexdigest())
        if key not in self.outputs:
            self.outputs[key] = self.policy(lr)
        return self.outputs[key]


def _photos(test: Any, idx: list[int]) -> int | None:
    """How many distinct photos the evaluated pairs come from (``None`` when the records do not say)."""
    photos = [test.dataset.records[i].get("photo") for i in idx]
    return len(set(photos)) if all(photos) else None


def _write_json(path: Path, obj: Any) -> None:
    """Compact JSON, written atomically (``eval.json`` is the resume marker of a run)."""
    atomic_write_bytes(path, json.dumps(obj).encode())


def _trained_as(run_dir: Path, algo: str, policy: str, reward: str | None, data: str | Path, cfg: Any) -> bool:
    """Whether the run folder's ``run_config.json`` records these training settings."""
    from finpercep.config import to_dict

    path = run_dir / "run_config.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return (saved.get("algo"), saved.get("policy"), saved.get("reward"), saved.get("data")) == (
        algo, str(policy), reward, str(data)) and saved.get("config") == json.loads(json.dumps(to_dict(cfg)))


def _table(results: dict[str, Any], arm: str, seeds: list[str], key: str) -> np.ndarray:
    """``(S, N)`` values of measure ``key`` of ``arm`` (``S`` seeds x ``N`` images); the
    pretrained policy repeated over seeds."""
    if arm == "pretrained":
        return np.tile(np.asarray(results["pretrained"]["eval"][key], dtype=np.float64), (len(seeds), 1))
    return np.asarray([results["arms"][arm]["seeds"][s]["eval"][key] for s in seeds], dtype=np.float64)


def _interval(values: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float] | None:
    """The interval of ``values`` (minus ``reference``, paired) by
    :func:`finpercep.eval.stats.mean_interval`: ``(S, N)`` seeds x images, or ``(S,)`` one value
    per seed. ``None`` when a value is not finite."""
    from finpercep.eval.stats import mean_interval

    v = values if reference is None else values - reference
    if not np.isfinite(v).all():
        return None
    return mean_interval(v).as_dict()


def summarise(results: dict[str, Any], arms: list[str], seeds: list[str], reference_arm: str) -> dict[str, Any]:
    """Per arm (and the pretrained policy): each measure's mean with its 95 % interval over
    seeds and images, its paired difference to ``reference_arm`` and to the pretrained
    policy, and the reward-curve statistics with t intervals over seeds (:func:`_interval`).
    ``None`` where a value is not finite."""
    keys = [k for k, _, _ in MEASURES if k in results["pretrained"]["eval"]]
    summary: dict[str, Any] = {"pretrained": {k: _interval(_table(results, "pretrained", seeds, k)) for k in keys}}
    for arm in arms:
        row: dict[str, Any] = {}
        for k in keys:
            v = _table(results, arm, seeds, k)
            row[k] = _interval(v)
            row[f"{k} - {reference_arm}"] = _interval(v, _table(results, reference_arm, seeds, k))
            row[f"{k} - pretrained"] = _interval(v, _table(results, "pretrained", seeds, k))
        curves = {k: np.asarray([results["arms"][arm]["seeds"][s]["curve"][k] for s in seeds]) for k, _ in CURVE_MEASURES}
        for k, v in curves.items():
            row[k] = _interval(v)
            ref = np.asarray([results["arms"][reference_arm]["seeds"][s]["curve"][k] for s in seeds])
            row[f"{k} - {reference_arm}"] = _interval(v, ref)
        times = [results["arms"][arm]["seeds"][s].get("time/step") for s in seeds]
        row["time/step"] = _interval(np.asarray(times, dtype=np.float64)) if None not in times else None
        summary[arm] = row
    return summary


def _fmt(iv: dict[str, float] | None, digits: int = 3) -> str:
    if iv is None:
        return "n/a"
    return f"{iv['mean']:.{digits}f} [{iv['lo']:.{digits}f}, {iv['hi']:.{digits}f}]"


def _digits(key: str) -> int:
    return 3 if key in ("damage/area", "ssim_y", "stlpips") else 2 if key in ("psnr_y", "niqe", "curve/gain", "curve/window_std") else 1


def write_table(results: dict[str, Any], path: Path) -> None:
    """The arms' tables (markdown): each measure with its 95 % interval, the paired differences to
    the reference arm, and the reward-curve statistics."""
    meta, summary = results["meta"], results["summary"]
    ref = meta["reference_arm"]
    keys = [(k, t, d) for k, t, d in MEASURES if k in summary["pretrained"]]
    head = ["arm", "reward"] + [f"{t} {'↑' if d == 'up' else '↓'}" for _, t, d in keys]
    fid = f", ReFL fidelity weight {meta['fidelity_weight']}" if meta.get("fidelity_weight") is not None else ""
    lines = [f"Algorithm `{meta['algo']}`, policy `{meta['policy']}`, {meta['steps']} steps x batch {meta['batch']}{fid}; "
             f"seeds {', '.join(str(s) for s in meta['seeds'])}; {meta['eval_images']} held-out LR/HR pairs"
             + (f" from {meta['eval_photos']} photos" if meta.get("eval_photos") else "") + " of "
             f"`{meta['test_data']}`; rewards from the reward model `{meta['checkpoint']}`; learned judge: {meta['judge']}.",
             "", "Mean over seeds and images with its 95 % interval (seeds: Student's t; images: bootstrap; added in "
             "quadrature, `finpercep.eval.stats`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("pretrained", "pretrained policy, no fine-tuning")] + [(a, results["arms"][a]["what"]) for a in meta["arms"]]
    for arm, what in rows:
        lines.append("| " + " | ".join([arm, what] + [_fmt(summary[arm][k], _digits(k)) for k, _, _ in keys]) + " |")
    lines += ["", f"Paired difference to `{ref}` (same seeds and images; an interval that excludes 0 is a difference).", "",
              "| " + " | ".join(["arm"] + [f"Δ {t}" for _, t, _ in keys]) + " |", "|" + "---|" * (len(keys) + 1)]
    for arm, _ in rows[1:]:
        if arm != ref:
            lines.append("| " + " | ".join([arm] + [_fmt(summary[arm][f"{k} - {ref}"], _digits(k)) for k, _, _ in keys]) + " |")
    lines += ["", "Reward curves: per run, then the mean over seeds with its Student's t 95 % interval over seeds.", "",
              "| arm | " + " | ".join(t for _, t in CURVE_MEASURES) + " | " + " | ".join(f"Δ {t} to {ref}" for _, t in CURVE_MEASURES)
              + " | s/step (median of each run) |", "|" + "---|" * (2 + 2 * len(CURVE_MEASURES))]
    for arm, _ in rows[1:]:
        cells = [_fmt(summary[arm][k], _digits(k)) for k, _ in CURVE_MEASURES]
        cells += ["-" if arm == ref else _fmt(summary[arm][f"{k} - {ref}"], _digits(k)) for k, _ in CURVE_MEASURES]
        cells += [_fmt(summary[arm].get("time/step"), 2)]
        lines.append("| " + " | ".join([arm] + cells) + " |")
    lines += ["", f"Damaged area: share of pixels whose local SSIM to HR fell by more than {DAMAGE_THRESHOLD} below the "
              "pretrained policy's output on the same LR (`finpercep.eval.damage`; 0 for the pretrained policy itself). "
              f"Reward gain, window std: the reward curve's rise (last {WINDOW} steps minus first {WINDOW}) and its mean "
              f"within-window std, both in units of the first {WINDOW} steps' std; drops: dips of the moving average by "
              "more than that unit below its running maximum; windows across a curriculum stage switch are left out "
              "and the maximum restarts there (`finpercep.eval.hacking.stability`)."]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def claims(results: dict[str, Any]) -> str:
    """The paper's claims decided from the intervals (markdown), for the arms that ran:

    1. a global reward raises its own score while the independent judge's damage grows: per
       ``a-rm0*`` arm, reproduced when its reward gain and its damaged area minus
       :data:`DAMAGE_FLOOR` both have intervals above 0, not reproduced when either lies below;
    2. the final fine-grained reward from the start is less stable and ends worse: ``c-rmN``
       against ``d-fixed``, reproduced when its window std and its damaged area are both higher
       (paired intervals above 0), not reproduced when either is lower; each part is also
       stated on its own;
    3. the curriculum is best on the judge: ``d-fixed`` against every non-curriculum arm at the
       same fidelity, reproduced when its damaged area is lower than each (paired intervals
       below 0), not reproduced when it is higher than one;
    4. the map ablation: ``g-pixelmap`` against ``c-rmN``, reproduced when the pixel-only
       maps give the larger damaged area.
    """
    from finpercep.eval.stats import Interval

    meta = results["meta"]
    seeds = [str(s) for s in meta["seeds"]]
    names = meta["arms"]
    lines = [f"# Claims ({meta['algo']}, `{meta['policy']}`, seeds {', '.join(seeds)}, {meta['eval_images']} images)", ""]

    def iv(values: np.ndarray, minus: np.ndarray | None = None) -> Interval | None:
        d = _interval(values, minus)
        return Interval(**d) if d is not None else None

    def area(arm: str) -> np.ndarray:
        return _table(results, arm, seeds, "damage/area")

    def curve(arm: str, k: str) -> np.ndarray:
        return np.asarray([results["arms"][arm]["seeds"][s]["curve"][k] for s in seeds])

    def verdict(ivs: list[Interval | None], yes: Callable[..., bool], no: Callable[..., bool]) -> str:
        if any(i is None for i in ivs):
            return "undecided (a value is not finite)"
        if len(seeds) < 2:
            return "undecided (one seed)"
        return "reproduced" if yes(*ivs) else "not reproduced" if no(*ivs) else "undecided"

    def f(i: Interval | None, d: int = 3) -> str:
        return _fmt(i.as_dict() if i is not None else None, d)

    lines.append("1. A global reward raises its own score while the independent judge's damage grows:")
    for arm in [a for a in names if a.startswith("a-rm0")]:
        gain, dmg = iv(curve(arm, "curve/gain")), iv(area(arm))
        v = verdict([gain, dmg], lambda g, d: g.lo > 0 and d.lo > DAMAGE_FLOOR, lambda g, d: g.hi < 0 or d.hi < DAMAGE_FLOOR)
        lines.append(f"   - `{arm}` ({ARMS[arm].what}): **{v}**; reward gain {f(gain, 2)}, "
                     f"damaged area {f(dmg)} (grown means above {DAMAGE_FLOOR}).")
    if not any(a.startswith("a-rm0") for a in names):
        lines.append("   - not run (no a-rm0 arm).")
    lines.append("2. The final fine-grained reward from the start is less stable and ends worse than the curriculum:")
    if {"c-rmN", "d-fixed"} <= set(names):
        std = iv(curve("c-rmN", "curve/window_std"), curve("d-fixed", "curve/window_std"))
        drops = iv(curve("c-rmN", "curve/drops"), curve("d-fixed", "curve/drops"))
        dmg = iv(area("c-rmN"), area("d-fixed"))
        both = verdict([std, dmg], lambda a, b: a.lo > 0 and b.lo > 0, lambda a, b: a.hi < 0 or b.hi < 0)
        unstable = verdict([std], lambda a: a.lo > 0, lambda a: a.hi < 0)
        worse = verdict([dmg], lambda a: a.lo > 0, lambda a: a.hi < 0)
        lines.append(f"   - c-rmN minus d-fixed: **{both}**; less stable: {unstable} (window std {f(std, 2)}, "
                     f"drops {f(drops, 1)}); ends worse: {worse} (damaged area {f(dmg)}).")
    else:
        lines.append("   - not run (needs c-rmN and d-fixed).")
    lines.append("3. The curriculum is best on the independent judge:")
    for suffix in ("", "-weakfid", "-nofid"):
        cur = f"d-fixed{suffix}"
        if cur not in names:
            continue
        others = [a for a in names if ARMS[a].curriculum == "none" and ARMS[a].fidelity_scale == ARMS[cur].fidelity_scale
                  and not ARMS[a].pixel_rm]
        if not others:
            lines.append(f"   - `{cur}`: not run (no arm without a curriculum at its fidelity weight).")
            continue
        diffs = {a: iv(area(cur), area(a)) for a in others}
        v = verdict(list(diffs.values()), lambda *ds: all(d.hi < 0 for d in ds), lambda *ds: any(d.lo > 0 for d in ds))
        lines.append(f"   - `{cur}` ({ARMS[cur].what}): **{v}**; damaged area minus " +
                     ", ".join(f"`{a}` {f(d)}" for a, d in diffs.items()) + ".")
    if not any(a.startswith("d-fixed") for a in names):
        lines.append("   - not run (no d-fixed arm).")
    lines.append("4. Pixel-only ground-truth maps make a worse reward than pixel + feature maps (the paper's ablation):")
    if {"g-pixelmap", "c-rmN"} <= set(names):
        dmg = iv(area("g-pixelmap"), area("c-rmN"))
        psnr = iv(_table(results, "g-pixelmap", seeds, "psnr_y"), _table(results, "c-rmN", seeds, "psnr_y"))
        v = verdict([dmg], lambda d: d.lo > 0, lambda d: d.hi < 0)
        lines.append(f"   - g-pixelmap minus c-rmN: **{v}**; damaged area {f(dmg)}, PSNR-Y {f(psnr, 2)} dB.")
    else:
        lines.append("   - not run (needs g-pixelmap and c-rmN).")
    lines += ["", "Intervals: 95 %; evaluation measures over seeds (Student's t) and images (bootstrap) added in "
              "quadrature, reward-curve statistics over seeds (Student's t) (`finpercep.eval.stats`). A verdict is "
              "'reproduced' or 'not reproduced' only when the intervals say so, else 'undecided'."]
    return "\n".join(lines) + "\n"


def plot_curves(out: Path, arms: list[str], seeds: list[str], path: Path) -> None:
    """Each arm's reward curves (moving average per seed, thin; their mean, bold), one panel per
    arm (the rewards have different scales), seed ``seeds[0]``'s curriculum stage switches dashed."""
    from finpercep.runs import read_metrics
    from finpercep.viz import pyplot

    plt = pyplot()
    arms = [a for a in arms if any((out / a / f"seed-{s}" / "metrics.jsonl").exists() for s in seeds)]
    if not arms:
        return
    cols = min(len(arms), 4)
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat[len(arms):]:
        ax.axis("off")
    for ax, arm in zip(axes.flat, arms):
        curves, w = [], WINDOW
        for s in seeds:
            if not (out / arm / f"seed-{s}" / "metrics.jsonl").exists():
                continue
            ms = read_metrics(out / arm / f"seed-{s}")
            y = np.array([m["reward/mean"] for m in ms])
            w = min(WINDOW, len(y))
            ma = np.convolve(y, np.ones(w) / w, mode="valid")  # the mean of steps i+1 .. i+w, drawn at step i+w
            ax.plot(np.arange(w, len(y) + 1), ma, lw=0.7, alpha=0.6)
            curves.append(ma)
            if s == seeds[0]:
                st = [m.get("curriculum/stage") for m in ms]
                for i in range(1, len(st)):
                    if st[i] is not None and st[i] != st[i - 1]:
                        ax.axvline(ms[i]["step"], color="C3", lw=0.8, ls="--")
        n = min(len(c) for c in curves)
        ax.plot(np.arange(w, w + n), np.mean([c[:n] for c in curves], 0), lw=1.8, color="k")
        ax.set_title(f"{arm}: {ARMS[arm].what}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"training reward, {WINDOW}-step mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def crops_figure(out: Path, arms: list[str], seed: str, policy: str, test: Any, path: Path,
                 n: int = 3, crop: int = 96, device: str = "cpu") -> None:
    """Columns: HR, the pretrained output, then each arm's output (run ``seed``; the damaged area
    of the whole image in the label). Per held-out image (``n`` of them, a fixed ``crop`` x
    ``crop`` HR-size window) two rows: the outputs, and below them the independent damage map
    (black: as faithful to HR as the pretrained output; hotter: local SSIM fell further, 0.5 and
    more drawn yellow)."""
    from PIL import Image, ImageDraw

    from finpercep.eval.damage import damaged_area, local_damage_map
    from finpercep.io import to_uint8
    from finpercep.policies import load_policy
    from finpercep.rl.common import is_stochastic
    from finpercep.viz import heatmap_overlay

    pairs = [test.pair(i) for i in range(min(n, len(test)))]
    lr = torch.stack([p[0] for p in pairs]).to(device)
    hr = torch.stack([p[1] for p in pairs]).to(device)

    def upscale(pol: torch.nn.Module) -> torch.Tensor:
        pol = pol.to(device).eval()
        g = torch.Generator(device=device).manual_seed(0)
        return (pol.sample(lr, g).sr if is_stochastic(pol) else pol(lr)).clamp(0, 1)

    def heat(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        dmg = local_damage_map(sr, ref, hr).cpu()
        return torch.stack([heatmap_overlay(torch.zeros_like(sr[i].cpu()), (dmg[i, 0] / 0.5).clamp(0, 1), alpha=1.0)
                            for i in range(sr.shape[0])])

    ref = upscale(load_policy(policy, device))
    # (label, outputs (n, 3, H, W), damage maps or None)
    cols: list[tuple[str, torch.Tensor, torch.Tensor | None]] = [("HR", hr.cpu(), None),
                                                                  ("pretrained", ref.cpu(), heat(ref, ref))]
    for arm in arms:
        folder = out / arm / f"seed-{seed}" / "final"
        if not folder.exists():
            continue
        sr = upscale(load_policy(folder, device))
        area = float(damaged_area(local_damage_map(sr, ref, hr)).mean())
        cols.append((f"{arm} ({area:.2f})", sr.cpu(), heat(sr, ref)))
    h, w = hr.shape[2:]
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    scale, label = 2, 14
    cw = crop * scale
    sheet = Image.new("RGB", (len(cols) * (cw + 4), label + 2 * len(pairs) * (cw + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, imgs, maps) in enumerate(cols):
        draw.text((c * (cw + 4) + 2, 1), name, fill="black")
        for r in range(len(pairs)):
            for k, src in enumerate((imgs, maps)):
                if src is None:
                    continue
                tile = Image.fromarray(to_uint8(src[r][:, y0 : y0 + crop, x0 : x0 + crop])).resize((cw, cw), Image.NEAREST)
                sheet.paste(tile, (c * (cw + 4), label + (2 * r + k) * (cw + 4)))
    sheet.save(path, quality=90)
