"""The paper's reward-hacking experiment (arXiv 2512.22647, Fig. 1: global reward vs CCL).

Same policy, same data, same step budget and seed; one arm per reward (:data:`ARMS`):

- ``a-rm0``: the global-only RM_0;
- ``b-niqe``: a classic global NR metric (NIQE; not differentiable, so DPO / GRPO only);
- ``c-rmN``: the final fused reward ``R_N`` from the first step, no curriculum;
- ``d-fixed``: the curriculum, fixed schedule;
- ``e-auto``: the curriculum, automatic switching;
- ``f-coevolve``: the curriculum with online co-evolution of the reward model.

Every arm is evaluated on held-out photos by measures training never optimised
(:func:`finpercep.eval.sr_quality.evaluate_sr`): PSNR / SSIM / ST-LPIPS against HR, NIQE /
BRISQUE / PIQE, and a **held-out judge**, a FinPercep-RM trained with another seed on other photos
and other SR families, never used as a reward (its score, and the share of pixels its map puts
above :data:`finpercep.eval.sr_quality.MAP_THRESHOLD`). Training stability comes from each
arm's reward curve (:func:`stability`).

Outputs in ``out/``: one RL run folder per arm, ``results.json``, ``hacking.md`` (the table),
``reward_curves.png`` (the analogue of Fig. 1b) and ``crops.jpg`` (the same crops across arms with
the judge's maps, the analogue of Fig. 1c).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

ARMS: dict[str, dict[str, str | None]] = {
    "a-rm0": {"reward": "rm0", "curriculum": "none", "what": "global RM_0"},
    "b-niqe": {"reward": "niqe", "curriculum": "none", "what": "classic global NR metric (NIQE)"},
    "c-rmN": {"reward": "fused", "curriculum": "none", "what": "final fused R_N from the start"},
    "d-fixed": {"reward": None, "curriculum": "fixed", "what": "curriculum, fixed schedule"},
    "e-auto": {"reward": None, "curriculum": "auto", "what": "curriculum, automatic switching"},
    "f-coevolve": {"reward": None, "curriculum": "coevolve", "what": "curriculum + online co-evolution"},
}
"""Arm name -> reward spec (curriculum mode ``none``) or curriculum mode."""

WINDOW = 10
"""Sliding window (steps) of the stability measures."""


def stability(rewards: list[float], window: int = WINDOW) -> dict[str, float]:
    """Stability of a reward curve ``r_1 .. r_T`` (step means).

    - ``curve/last``: mean of the last ``window`` steps;
    - ``curve/gain``: that minus the mean of the first ``window`` steps, in units of the first
      window's std (comparable across rewards of different scales);
    - ``curve/window_std``: mean over windows of the within-window std, in the same units;
    - ``curve/drops``: how many times the moving average falls by more than one first-window std
      below its running maximum (counting entries into such a dip, not steps spent in it).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.size < 2 * window:
        window = max(1, r.size // 2)
    first = r[:window]
    unit = float(first.std()) or 1.0
    ma = np.convolve(r, np.ones(window) / window, mode="valid")
    stds = [float(r[i : i + window].std()) for i in range(0, r.size - window + 1)]
    drops, down = 0, False
    peak = -math.inf
    for v in ma:
        peak = max(peak, v)
        below = v < peak - unit
        drops += int(below and not down)
        down = below
    return {"curve/last": float(r[-window:].mean()), "curve/gain": float((r[-window:].mean() - first.mean()) / unit),
            "curve/window_std": float(np.mean(stds) / unit), "curve/drops": float(drops)}


def run_experiment(
    algo: str,
    policy: str,
    data: str | Path,
    test_data: str | Path,
    judge: str | Path,
    out: str | Path,
    cfg: Any,
    *,
    arms: list[str] | None = None,
    checkpoint: str | Path | None = None,
    eval_num: int = 16,
    results_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the arms (default: all that apply to ``algo``; ``b-niqe`` needs DPO / GRPO) with the
    RL config ``cfg`` (:class:`finpercep.rl.RLConfig`; its ``curriculum`` section sets the
    schedule, the mode is set per arm), evaluate each on the first ``eval_num`` pairs of
    ``test_data`` with the judge (a FinPercep-RM run or checkpoint folder), and write the outputs
    (module docstring; the table, figures and a copy of ``results.json`` to ``results_dir`` when
    given, e.g. ``docs/results/...``). Resumable: finished arms are neither trained nor evaluated
    again, so a rerun with another ``results_dir`` only redraws."""
    from finpercep.eval.sr_quality import evaluate_sr
    from finpercep.policies import load_policy
    from finpercep.reward.api import load_reward
    from finpercep.rl import fine_tune
    from finpercep.rl.common import PairData, is_stochastic
    from finpercep.runs import read_metrics

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = arms or [a for a in ARMS if not (a == "b-niqe" and algo == "refl")]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    if algo == "refl" and "b-niqe" in names:
        raise ValueError("arm b-niqe trains on NIQE, which is not differentiable: run it with --algo dpo or grpo")
    judge_model = load_reward(judge)
    test = PairData(test_data)
    idx = list(range(min(eval_num, len(test))))
    base = load_policy(policy)
    sample = (lambda: torch.Generator().manual_seed(0)) if is_stochastic(base) else (lambda: None)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["meta"] = {"algo": algo, "policy": policy, "data": str(data), "test_data": str(test_data),
                       "judge": str(judge), "eval_images": len(idx), "steps": cfg.run.steps, "batch": cfg.run.batch,
                       "seed": cfg.run.seed}
    if "pretrained" not in results:
        results["pretrained"] = {"eval": evaluate_sr(base, test, idx, judge=judge_model, device=device,
                                                     sample=sample(), progress=progress)}
        results_path.write_text(json.dumps(results, indent=1))
    for arm in names:
        if arm in results and "eval" in results[arm]:
            continue
        spec = ARMS[arm]
        arm_cfg = replace(cfg, curriculum=replace(cfg.curriculum, mode=spec["curriculum"]))
        log.info("arm %s: %s", arm, spec["what"])
        final = fine_tune(policy, algo, spec["reward"], data, out / arm, arm_cfg, checkpoint=checkpoint,
                          device=device, progress=progress)
        ev = evaluate_sr(load_policy(final), test, idx, judge=judge_model, device=device, sample=sample(),
                         progress=progress)
        curve = [m["reward/mean"] for m in read_metrics(out / arm)]
        (out / arm / "eval.json").write_text(json.dumps(ev, indent=1))
        results[arm] = {"eval": ev, **stability(curve), "what": spec["what"]}
        results_path.write_text(json.dumps(results, indent=1))
    dest = Path(results_dir) if results_dir is not None else out
    dest.mkdir(parents=True, exist_ok=True)
    if dest != out:
        (dest / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, dest / "hacking.md")
    plot_curves(out, [a for a in names if a in results], dest / "reward_curves.png")
    crops_figure(out, ["pretrained"] + names, policy, test, judge_model, dest / "crops.jpg", device=device)
    return results


COLUMNS = [("judge/score", "rm/score", "up"), ("judge/map area", "rm/map_area", "down"), ("psnr", "psnr", "up"),
           ("ssim", "ssim", "up"), ("stlpips", "stlpips", "down"), ("niqe", "niqe", "down"),
           ("brisque", "brisque", "down"), ("piqe", "piqe", "down")]


def write_table(results: dict[str, Any], path: Path) -> None:
    """The arms' table (markdown): held-out evaluation and reward-curve stability."""
    meta = results["meta"]
    rows = [k for k in results if k not in ("meta",)]
    head = ["arm", "reward"] + [f"{c} {'↑' if d == 'up' else '↓'}" for c, _, d in COLUMNS] + ["gain", "window std", "drops"]
    lines = [f"Algorithm `{meta['algo']}`, policy `{meta['policy']}`, {meta['steps']} steps x batch {meta['batch']}, "
             f"seed {meta['seed']}; {meta['eval_images']} held-out images; judge `{meta['judge']}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in rows:
        r = results[k]
        ev = r["eval"]
        cells = [k, r.get("what", "pretrained policy, no fine-tuning")]
        cells += [f"{ev[key]:.3f}" if key in ev and abs(ev[key]) < 100 else f"{ev.get(key, float('nan')):.1f}" for _, key, _ in COLUMNS]
        cells += [f"{r[c]:.2f}" if c in r else "-" for c in ("curve/gain", "curve/window_std")]
        cells += [f"{int(r['curve/drops'])}" if "curve/drops" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "gain, window std: the reward curve's rise (last 10 steps minus first 10) and its mean within-window",
              "std, both in units of the first 10 steps' std; drops: dips of the moving average by more than that unit",
              "below its running maximum (`finpercep.eval.hacking.stability`)."]
    path.write_text("\n".join(lines) + "\n")


def plot_curves(out: Path, arms: list[str], path: Path) -> None:
    """Each arm's reward curve (step mean with a moving average), one panel per arm (the rewards
    have different scales), curriculum stages shaded."""
    from finpercep.runs import read_metrics
    from finpercep.viz import pyplot

    plt = pyplot()

    arms = [a for a in arms if (out / a / "metrics.jsonl").exists()]
    if not arms:
        return
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 2.8), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        ms = read_metrics(out / arm)
        x = [m["step"] for m in ms]
        y = np.array([m["reward/mean"] for m in ms])
        ax.plot(x, y, lw=0.6, color="0.6")
        if len(y) >= WINDOW:
            ax.plot(x[WINDOW - 1 :], np.convolve(y, np.ones(WINDOW) / WINDOW, mode="valid"), lw=1.6, color="C0")
        st = [m.get("curriculum/stage") for m in ms]
        if any(s is not None and s >= 0 for s in st):
            for i in range(1, len(st)):
                if st[i] != st[i - 1]:
                    ax.axvline(x[i], color="C3", lw=0.8, ls="--")
                    ax.text(x[i], ax.get_ylim()[1], f"RM_{int(st[i])}", fontsize=7, color="C3", va="top")
        ax.set_title(f"{arm}: {ARMS[arm]['what']}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training reward (its own scale)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def crops_figure(out: Path, arms: list[str], policy: str, test: Any, judge: torch.nn.Module, path: Path,
                 n: int = 3, crop: int = 96, device: str = "cpu") -> None:
    """Rows: ``n`` held-out images (a fixed ``crop`` x ``crop`` HR-size window); columns: HR, then
    each arm's output with the judge's map overlaid (judge score in the label)."""
    from PIL import Image, ImageDraw

    from finpercep.io import to_uint8
    from finpercep.policies import load_policy
    from finpercep.rl.common import is_stochastic
    from finpercep.viz import heatmap_overlay

    cols: list[tuple[str, torch.Tensor]] = []
    pairs = [test.pair(i) for i in range(min(n, len(test)))]
    lr = torch.stack([p[0] for p in pairs]).to(device)
    hr = torch.stack([p[1] for p in pairs])
    cols.append(("HR", hr))
    for arm in arms:
        folder = out / arm / "final"
        if arm != "pretrained" and not folder.exists():
            continue
        pol = load_policy(policy if arm == "pretrained" else folder, device)
        sr = (pol.sample(lr, torch.Generator(device=device).manual_seed(0)).sr if is_stochastic(pol) else pol(lr)).clamp(0, 1)
        res = judge.to(device)(sr)
        cells = []
        for i in range(sr.shape[0]):
            m = res.map[i, 0] if res.map is not None else torch.zeros(sr.shape[2:])
            cells.append(heatmap_overlay(sr[i].cpu(), m.cpu().clamp(0, 1)))
        cols.append((f"{arm}", torch.stack(cells)))
    h, w = hr.shape[2:]
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    scale, label = 2, 14
    cw = crop * scale
    sheet = Image.new("RGB", (len(cols) * (cw + 4), label + len(pairs) * (cw + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, imgs) in enumerate(cols):
        draw.text((c * (cw + 4) + 2, 1), name, fill="black")
        for r in range(len(pairs)):
            tile = Image.fromarray(to_uint8(imgs[r][:, y0 : y0 + crop, x0 : x0 + crop])).resize((cw, cw), Image.NEAREST)
            sheet.paste(tile, (c * (cw + 4), label + r * (cw + 4)))
    sheet.save(path, quality=90)
