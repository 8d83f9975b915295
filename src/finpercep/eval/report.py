"""A self-contained HTML report of RL runs: what ``finpercep report`` writes.

One HTML file, readable offline and mailable as is: CSS inline, every image (curves, sample grids)
inlined as a base64 ``data:`` URI, no script and no external URL. Per run (a folder written by
:mod:`finpercep.rl.common`):

- the resolved configuration (``run_config.json``) in a collapsible ``<details>``;
- the curves from ``metrics.jsonl`` (matplotlib, Agg): reward mean with a +-std band, and
  ``fidelity/l1``, ``kl``, ``loss``, ``grad_norm`` where logged; when ``curriculum/stage`` is logged,
  each stage is a shaded span on every panel;
- the latest few sample grids ``samples/step_XXXXXXX.png`` (LR | SR | reward map over SR | HR),
  downscaled so the page stays small, each captioned with its step;
- a table: ``eval.json`` when the run has one (``{metric: value}``, or groups such as
  ``{"before": {...}, "after": {...}}`` side by side), else the last logged metrics.

For several runs, a comparison table (one row per run: algo, policy, reward, steps, final reward
mean, evaluation metrics; the best value of each metric whose direction is known in bold) and one
figure with every run's reward curve come first.

Every text read from a run folder is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finpercep.checks import require
from finpercep.io import atomic_write_bytes, read_json_object

log = logging.getLogger(__name__)

CURVES: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward (mean ± std)"),
    ("fidelity/l1", "fidelity L1"),
    ("kl", "KL to reference"),
    ("loss", "loss"),
    ("grad_norm", "gradient norm"),
)
"""Metric key -> panel title, in panel order; a panel is drawn only when its key was logged."""

STAGE_KEY = "curriculum/stage"
"""Metric key of the curriculum stage (shaded spans on the curves)."""

FINAL_WINDOW = 10
"""The comparison table's final reward is the mean ``reward/mean`` over this many last logs."""

SAMPLE_MIN_DISPLAY = 480
"""Sample grids narrower than this (pixels) are displayed enlarged by a whole factor (at most 4)."""

_SAMPLE_RE = re.compile(r"^step_(\d+)\.png$")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.path, .note { color: #666; font-size: .9em; }
.warn { color: #a33; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: .5em 0; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; font-family: ui-monospace, monospace; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
td.text { text-align: left; font-family: ui-monospace, monospace; }
figure { margin: 1em 0; } figcaption { color: #444; font-size: .9em; margin-top: .3em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
img.sample { image-rendering: pixelated; }
nav ul { columns: 2; }
"""


@dataclass(frozen=True)
class RunView:
    """What the report reads from one run folder."""

    path: Path
    """The run folder."""
    meta: dict[str, Any]
    """``run_config.json`` (algo, policy, reward, data, config); empty when the file is missing."""
    metrics: list[dict[str, Any]]
    """``metrics.jsonl``, one dict per logged step, in file order."""
    bad_lines: int
    """Lines of ``metrics.jsonl`` that are not a JSON object (e.g. a line cut off mid-write)."""
    samples: list[tuple[int, Path]]
    """``(step, path)`` of every ``samples/step_XXXXXXX.png``, by step."""
    eval: dict[str, Any] | None
    """``eval.json``, or None when the run has none."""


def load_run(path: str | Path) -> RunView:
    """Read a run folder. Raises FileNotFoundError when it does not exist, ValueError when it is
    not a run (neither ``metrics.jsonl`` nor ``run_config.json``) or a JSON file in it is broken."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"run folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; give a run folder (one written by `finpercep rl train`)")
    if not (root / "metrics.jsonl").is_file() and not (root / "run_config.json").is_file():
        raise ValueError(f"{root} is not a run folder: it has neither metrics.jsonl nor run_config.json "
                         "(give the folder passed as --out to `finpercep rl train`)")
    meta = read_json_object(root / "run_config.json", "; fix or remove it") if (root / "run_config.json").is_file() else {}
    metrics, bad = [], 0
    if (root / "metrics.jsonl").is_file():
        for line in (root / "metrics.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                metrics.append(rec)
            else:
                bad += 1
    samples = []
    if (root / "samples").is_dir():
        for p in (root / "samples").iterdir():
            m = _SAMPLE_RE.match(p.name)
            if m and p.is_file():
                samples.append((int(m.group(1)), p))
    samples.sort()
    ev = read_json_object(root / "eval.json", "; fix or remove it") if (root / "eval.json").is_file() else None
    return RunView(root, meta, metrics, bad, samples, ev)


def render_report(runs: list[Path], out: Path, title: str | None = None, *, num_samples: int = 3,
                  max_image_width: int = 1024) -> Path:
    """Write one self-contained HTML report of ``runs`` (run folders) to ``out``; returns ``out``.

    ``num_samples``: the latest sample grids shown per run. ``max_image_width``: sample grids wider
    than this (pixels) are downscaled, then inlined as JPEG, so a report of a few runs stays a few
    MB. Raises ValueError for an empty list, a folder that is not a run, or ``out`` being a folder.
    """
    runs = [Path(r) for r in runs]
    out = Path(out)
    if not runs:
        raise ValueError("no run folders given; pass at least one")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if max_image_width < 16:
        raise ValueError(f"max_image_width must be >= 16 pixels, got {max_image_width}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    views = [load_run(r) for r in runs]
    names = _names(views)
    title = title or ("RL run: " + names[0] if len(views) == 1 else f"RL runs: {len(views)} compared")

    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    if len(views) > 1:
        parts.append(_comparison(views, names))
    for i, (v, name) in enumerate(zip(views, names)):
        parts.append(_run_section(v, name, i, num_samples, max_image_width))
    parts.append("</body></html>\n")
    atomic_write_bytes(out, "\n".join(parts).encode("utf-8"))
    log.info("wrote report of %d run(s) to %s", len(views), out)
    return out


# ---------------------------------------------------------------------------------------------
# Sections


def _comparison(views: list[RunView], names: list[str]) -> str:
    from finpercep.eval.sr_quality import DIRECTION

    evals = [_comparison_eval(v.eval) for v in views]
    keys = list(dict.fromkeys(k for e in evals for k in e))
    best = {}
    for k in keys:
        vals = [e.get(k) for e in evals]
        nums = [x for x in vals if _is_number(x) and math.isfinite(x)]
        base = k.split("/", 1)[-1] if k not in DIRECTION else k
        if len(nums) >= 2 and base in DIRECTION:
            best[k] = max(nums) if DIRECTION[base] == "up" else min(nums)
    head = ["run", "algo", "policy", "reward", "steps (logged / planned)",
            f"final reward/mean (last {FINAL_WINDOW} logs)"] + [k + _arrow(k, DIRECTION) for k in keys]
    rows = []
    for v, name, e, i in zip(views, names, evals, range(len(views))):
        planned = _run_settings(v.meta).get("steps")
        steps = f"{_last_step(v)} / {planned if planned is not None else '?'}"
        rewards = [m["reward/mean"] for m in v.metrics if _is_number(m.get("reward/mean"))][-FINAL_WINDOW:]
        final = sum(rewards) / len(rewards) if rewards else None
        cells = [f'<a href="#run-{i + 1}">{_e(name)}</a>', _e(v.meta.get("algo", "?")), _e(v.meta.get("policy", "?")),
                 _e(v.meta.get("reward", "?")), _e(steps), _e(_fmt(final))]
        for k in keys:
            x = e.get(k)
            s = _e(_fmt(x))
            cells.append(f"<b>{s}</b>" if k in best and x == best[k] else s)
        rows.append(cells)
    html_parts = ['<section id="compare"><h2>Comparison</h2>',
                  '<p class="note">Evaluation columns come from each run\'s eval.json (its "after" group '
                  "when it has before/after groups); the best value of a metric whose direction is known is in bold.</p>",
                  '<div class="scroll">' + _table(head, rows, raw=True) + "</div>"]
    fig = _overlay_figure(views, names)
    if fig is None:
        html_parts.append('<p class="note">No run has logged reward/mean yet.</p>')
    else:
        html_parts.append(_figure(fig, "image/png", "reward/mean of every run against the step",
                                  "Reward curves of all runs (reward/mean per logged step)."))
    html_parts.append("<nav><h3>Runs</h3><ul>" + "".join(
        f'<li><a href="#run-{i + 1}">{_e(n)}</a></li>' for i, n in enumerate(names)) + "</ul></nav></section>")
    return "\n".join(html_parts)


def _run_section(v: RunView, name: str, i: int, num_samples: int, max_width: int) -> str:
    p = [f'<section class="run" id="run-{i + 1}"><h2>{_e(name)}</h2>', f'<p class="path">{_e(str(v.path))}</p>']
    summary = [("algo", v.meta.get("algo")), ("policy", v.meta.get("policy")), ("reward", v.meta.get("reward")),
               ("data", v.meta.get("data"))]
    run_cfg = _run_settings(v.meta)
    if run_cfg:
        summary += [(k, run_cfg.get(k)) for k in ("steps", "batch", "crop", "lr", "lora_rank", "seed") if k in run_cfg]
    summary = [(k, x) for k, x in summary if x is not None]
    if summary:
        p.append('<dl class="summary">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fmt(x))}</dd>" for k, x in summary) + "</dl>")
    if v.meta:
        p.append("<details><summary>Resolved configuration (run_config.json)</summary><pre>"
                 + _e(json.dumps(v.meta, indent=2)) + "</pre></details>")
    else:
        p.append('<p class="note">No run_config.json in this run.</p>')

    p.append("<h3>Curves</h3>")
    if not v.metrics:
        p.append('<p class="warn empty-metrics">No metrics logged yet: metrics.jsonl is missing or empty.</p>')
    else:
        fig = _curves_figure(v)
        if fig is None:
            p.append('<p class="note">None of the plotted metrics (' + _e(", ".join(k for k, _ in CURVES))
                     + ") was logged.</p>")
        else:
            stages = " Shaded spans: curriculum stages." if any(STAGE_KEY in m for m in v.metrics) else ""
            p.append(_figure(fig, "image/png", f"training curves of {name}",
                             f"{len(v.metrics)} logged steps, last step {_last_step(v)}.{stages}"))
    if v.bad_lines:
        p.append(f'<p class="warn">{v.bad_lines} line(s) of metrics.jsonl were not JSON objects and were skipped '
                 "(a line cut off while the run was writing it).</p>")

    if v.eval is not None:
        p.append("<h3>Evaluation (eval.json)</h3>" + _eval_table(v.eval))
    elif v.metrics:
        last = v.metrics[-1]
        p.append(f"<h3>Last logged metrics (step {_e(_fmt(last.get('step', '?')))})</h3>")
        p.append(_table(["metric", "value"], [[k, _fmt(x)] for k, x in last.items()]))

    p.append("<h3>Samples</h3>")
    shown = v.samples[-num_samples:] if num_samples else []
    if not shown:
        p.append('<p class="note">No sample grids in samples/.</p>')
    else:
        if len(v.samples) > len(shown):
            p.append(f'<p class="note">The latest {len(shown)} of {len(v.samples)} sample grids.</p>')
        for step, path in shown:
            try:
                data, width = _grid_jpeg(path, max_width)
            except Exception as exc:  # an unreadable image must not take the whole report down
                p.append(f'<p class="warn">Could not read {_e(path.name)}: {_e(str(exc))}</p>')
                continue
            # tiny grids (test runs, small crops) are shown enlarged by a whole factor, pixels kept sharp
            zoom = max(1, min(4, SAMPLE_MIN_DISPLAY // max(1, width)))
            p.append(_figure(data, "image/jpeg", f"sample grid at step {step}",
                             f"Step {step}: each row LR (nearest-upsampled) | SR | reward map over SR "
                             "(when the reward has a map) | HR.", width=width * zoom, css="sample"))
    p.append("</section>")
    return "\n".join(p)


def _eval_table(ev: dict[str, Any]) -> str:
    from finpercep.eval.sr_quality import DIRECTION

    groups = [k for k, x in ev.items() if isinstance(x, dict)]
    scalars = [k for k, x in ev.items() if not isinstance(x, dict)]
    if not groups:
        return _table(["metric", "value"], [[k + _arrow(k, DIRECTION), _fmt(ev[k])] for k in scalars])
    metrics = list(dict.fromkeys(m for g in groups for m in ev[g]))
    rows = [[m + _arrow(m, DIRECTION)] + [_fmt(ev[g].get(m)) for g in groups] for m in metrics]
    out = _table(["metric"] + groups, rows)
    if scalars:
        out += _table(["field", "value"], [[k, _fmt(ev[k])] for k in scalars])
    return out


def _comparison_eval(ev: dict[str, Any] | None) -> dict[str, Any]:
    """The evaluation columns of one run: a flat eval.json as is, else its ``after`` group, else
    every group flattened to ``group/metric``."""
    if not ev:
        return {}
    if isinstance(ev.get("after"), dict):
        return {k: x for k, x in ev["after"].items() if not isinstance(x, (dict, list))}
    flat = {}
    for k, x in ev.items():
        if isinstance(x, dict):
            flat.update({f"{k}/{m}": y for m, y in x.items() if not isinstance(y, (dict, list))})
        elif not isinstance(x, list):
            flat[k] = x
    return flat


# ---------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float, height: float) -> Any:
    require("matplotlib", extra="report")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the logs where ``key`` is a number (NaN kept: a gap in the line)."""
    xs, ys = [], []
    for j, m in enumerate(metrics):
        if _is_number(m.get(key)):
            xs.append(float(m["step"]) if _is_number(m.get("step")) else float(j + 1))
            ys.append(float(m[key]))
    return xs, ys


def stage_spans(metrics: list[dict[str, Any]]) -> list[tuple[float, float, Any]]:
    """The curriculum stages of a run as shaded spans: for each contiguous run of one
    ``curriculum/stage`` value, ``(first step, first step of the next span or the last step, stage)``."""
    xs, _ = _series(metrics, STAGE_KEY)
    stages = [m[STAGE_KEY] for m in metrics if _is_number(m.get(STAGE_KEY))]
    spans: list[list[Any]] = []
    for x, s in zip(xs, stages):
        if spans and spans[-1][2] == s:
            spans[-1][1] = x
        else:
            if spans:
                spans[-1][1] = x
            spans.append([x, x, s])
    return [(a, b, s) for a, b, s in spans]


def _curves_figure(v: RunView) -> bytes | None:
    panels = [(k, t) for k, t in CURVES if any(math.isfinite(y) for y in _series(v.metrics, k)[1])]
    if not panels:
        return None
    fig = _new_figure(8.0, 1.9 * len(panels) + 0.4)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    spans = stage_spans(v.metrics)
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    for ax, (key, panel_title) in zip(axes, panels):
        xs, ys = _series(v.metrics, key)
        ax.plot(xs, ys, color="#1f4e9a", lw=1.3, marker="o" if len(xs) < 30 else None, ms=3)
        if key == "reward/mean":
            sx, sd = _series(v.metrics, "reward/std")
            std = dict(zip(sx, sd))
            band = [(x, y, std[x]) for x, y in zip(xs, ys) if x in std and math.isfinite(std[x])]
            if band:
                bx = [b[0] for b in band]
                ax.fill_between(bx, [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color="#1f4e9a", alpha=0.18, lw=0, label="± std")
        for j, (a, b, s) in enumerate(spans):
            ax.axvspan(a, b if b > a else a + 0.5, color=palette[int(s) % len(palette)] if float(s).is_integer()
                       else palette[j % len(palette)], alpha=0.13, lw=0)
            if ax is axes[0]:
                ax.annotate(f"stage {_fmt(s)}", (a, 1.0), xycoords=("data", "axes fraction"), va="top",
                            fontsize=7, color="#333", xytext=(2, -2), textcoords="offset points")
        ax.set_title(panel_title, fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("step", fontsize=9)
    return _png(fig)


def _overlay_figure(views: list[RunView], names: list[str]) -> bytes | None:
    series = [(n, *_series(v.metrics, "reward/mean")) for v, n in zip(views, names)]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig = _new_figure(8.0, 3.6)
    ax = fig.subplots()
    for n, xs, ys in series:
        ax.plot(xs, ys, lw=1.3, label=n, marker="o" if len(xs) < 30 else None, ms=3)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("reward/mean", fontsize=9)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8)
    return _png(fig)


def _grid_jpeg(path: Path, max_width: int) -> tuple[bytes, int]:
    """A sample grid, downscaled to ``max_width`` (anti-aliased) and encoded as JPEG; and its width."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), im.width


# ---------------------------------------------------------------------------------------------
# Small helpers


def _figure(data: bytes, mime: str, alt: str, caption: str, width: int | None = None, css: str = "plot") -> str:
    uri = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    size = f' width="{width}"' if width else ""
    return (f'<figure><img class="{css}" src="{uri}" alt="{_e(alt)}"{size}>'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """An HTML table; headers are escaped, cells too unless ``raw`` (the caller escaped them)."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    if isinstance(x, (dict, list)):
        s = json.dumps(x)
        return s if len(s) <= 200 else s[:197] + "..."
    return str(x)


def _arrow(key: str, direction: dict[str, str]) -> str:
    base = key if key in direction else key.split("/", 1)[-1]
    return {"up": " ↑", "down": " ↓"}.get(direction.get(base, ""), "")


def _run_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The shared run settings: ``config.run`` (an RLConfig), or ``config`` itself (a RunConfig)."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        return {}
    run = cfg.get("run", cfg)
    return run if isinstance(run, dict) else {}


def _last_step(v: RunView) -> Any:
    steps = [m["step"] for m in v.metrics if _is_number(m.get("step"))]
    return max(steps) if steps else 0


def _names(views: list[RunView]) -> list[str]:
    """Folder names; where two runs share one, their last two path parts."""
    names = [v.path.resolve().name or str(v.path) for v in views]
    dup = {n for n in names if names.count(n) > 1}
    return ["/".join(v.path.resolve().parts[-2:]) if n in dup else n for v, n in zip(views, names)]
