"""The reward model's targets and its ablation table, from the JSON files the two benchmarks write.

    python benchmarks/rm_ablation.py --row LABEL=EVAL_JSON [--row ...] --hack HACK_JSON [--hack ...]
        [--title TITLE] [--intro TEXT] [--out docs/results/rm_v2_ablation.md]

Each ``--row`` is one model: ``EVAL_JSON`` is what ``benchmarks/rm_eval.py`` wrote for its run (map
AUROC, ordering, local drops on the test data set), and ``LABEL`` names the same model in one of the
``HACK_JSON`` files, what ``benchmarks/rm_hackability.py`` wrote with ``--model LABEL=...`` (edit checks,
whole-SR check, pixel-space ascent on the test photos; several files are merged by label, the first
file naming a label wins). Nothing is recomputed: the page is the
numbers of those two commands side by side, one row per model in the order given, and the issue-#11
target table for the last row (must reach, goal, status). Writes ``--out`` and the same name ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from finpercep.eval.edit_checks import EDIT_TARGET, WHOLE_SR_TARGET
from finpercep.eval.rm_benchmark import _fmt_target, _target, check_targets
from finpercep.io import atomic_write_bytes, save_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=EVAL_JSON",
                    help="a model: its label in --hack and the JSON of benchmarks/rm_eval.py for its run")
    ap.add_argument("--hack", action="append", required=True, type=Path,
                    help="JSON of benchmarks/rm_hackability.py naming some of the labels (repeatable)")
    ap.add_argument("--alias", action="append", default=[], metavar="LABEL=HACK_LABEL",
                    help="the model of row LABEL is named HACK_LABEL in the --hack files (e.g. a model since renamed)")
    ap.add_argument("--title", default="Reward model v2: ablation and targets")
    ap.add_argument("--intro", default="", help="a paragraph under the title (what the rows are)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/rm_v2_ablation.md"))
    return ap.parse_args(argv)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: cannot read {path}: {e}")


def merge_hack(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rm_hackability reports as one: per part (edits, whole_sr, ascent) the models of every
    file, the first file naming a model wins; ``setup.commands`` lists every file's command."""
    out: dict[str, Any] = {"edits": {}, "whole_sr": {}, "ascent": {},
                           "setup": {"commands": [p.get("setup", {}).get("command", "") for p in parts]}}
    for p in parts:
        for part in ("edits", "whole_sr", "ascent"):
            for label, v in p.get(part, {}).items():
                out[part].setdefault(label, v)
    return out


def model_row(label: str, ev: dict[str, Any], hack: dict[str, Any], hack_label: str | None = None) -> dict[str, Any]:
    """Every number of one model: rm_eval's targets (by name) and the edit / whole-SR / ascent results
    of ``hack_label`` (default: ``label``) in the merged hackability report."""
    key = hack_label or label
    for part in ("edits", "whole_sr", "ascent"):
        if key not in hack.get(part, {}):
            sys.exit(f"error: model {key!r} is not in the hackability JSON's {part} "
                     f"(it has {sorted(hack.get(part, {}))})")
    edits, whole, asc = hack["edits"][key], hack["whole_sr"][key], hack["ascent"][key]
    return {
        "label": label,
        "eval_targets": check_targets(ev),  # recomputed: files written before issue #11's targets have others
        "eval_command": ev["setup"].get("command", ""),
        "edits": {k: v["below"] for k, v in edits.items()},
        "whole_sr": {k: v["below"] for k, v in whole.items()},
        "ascent": {"gain": asc["reward"]["change"], "above_hr_start": asc["above_hr_start"],
                   "above_hr_end": asc["above_hr_end"], "psnr_y": asc["psnr_y"]["change"],
                   "stlpips": asc["stlpips"]["change"]},
    }


def targets_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue-#11 table for one model: rm_eval's rows, then the edit and whole-SR checks (the worst
    edit / family decides), then the ascent (reported, no target)."""
    out = list(row["eval_targets"])
    worst_edit = min(row["edits"], key=row["edits"].get)
    out.append(_target("HR above each edit (worst edit)", row["edits"][worst_edit], EDIT_TARGET, 1.0, unit="%",
                       detail=worst_edit))
    worst_sr = min(row["whole_sr"], key=row["whole_sr"].get)
    out.append(_target("whole real-SR output below its HR (worst family)", row["whole_sr"][worst_sr], WHOLE_SR_TARGET,
                       1.0, unit="%", detail=worst_sr))
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def render(rows: list[dict[str, Any]], args: argparse.Namespace, command: str, hack: dict[str, Any]) -> str:
    md = [f"# {args.title}", "", f"`{command}`", ""]
    if args.intro:
        md += [args.intro, ""]
    md += ["Evaluations behind each row (map, ordering and drops on the test data set):", ""]
    md += [f"- {r['label']}: `{r['eval_command']}`" for r in rows]
    md += [f"- edit checks, whole-SR check and pixel-space ascent (test photos): `{c}`"
           for c in hack["setup"]["commands"]] + [""]

    md += ["## Ablation", "",
           "Map AUROC against the swap mask, ordering S_HR > S_syn > S_SR and local drops from `rm_eval.py`; "
           f"edit and whole-SR checks (how many of the edits / real SR families reach {100 * EDIT_TARGET:.0f} % / "
           f"{100 * WHOLE_SR_TARGET:.0f} %, and the worst) and the ascent (reward gain and images above their HR "
           "after 10 sign steps of 1/255) from `rm_hackability.py`. Rewards are in each model's own units.", "",
           "| model | held-out AUROC | worst-family AUROC | ordering | drop 1 % / 3 % | minus RM_0 at 1 % / 3 % | "
           "edit checks | whole-SR below HR | ascent gain | above HR after ascent |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        by_start = {x["name"].split(" (")[0]: x for x in r["eval_targets"]}
        gains = [x for x in r["eval_targets"] if "minus RM_0" in x["name"]]
        drops = [x for x in r["eval_targets"] if x["name"].startswith("score drops")]
        e_ok = sum(v >= EDIT_TARGET for v in r["edits"].values())
        s_ok = sum(v >= WHOLE_SR_TARGET for v in r["whole_sr"].values())
        worst_e = min(r["edits"], key=r["edits"].get)
        worst_s = min(r["whole_sr"], key=r["whole_sr"].get)
        a = r["ascent"]
        md.append(" | ".join([
            f"| {r['label']}",
            _fmt_target(by_start["map AUROC vs swap mask, held-out families"]),
            _fmt_target(by_start["map AUROC, worst single family"]),
            _fmt_target(by_start["ordering S_HR > S_syn > S_SR, all families"]),
            " / ".join(_pct(x["value"]) for x in drops),
            " / ".join("n/a" if x["value"] is None else f"{100 * x['value']:+.1f}" for x in gains),
            f"{e_ok} / {len(r['edits'])} (worst {worst_e} {_pct(r['edits'][worst_e])})",
            f"{s_ok} / {len(r['whole_sr'])} (worst {worst_s} {_pct(r['whole_sr'][worst_s])})",
            f"{a['gain']:+.2f}",
            f"{100 * a['above_hr_start']:.0f} % -> {100 * a['above_hr_end']:.0f} % |",
        ]))
    last = rows[-1]
    md += ["", f"## Targets of issue #11: {last['label']}", "",
           "| target | measured | must reach | goal | status |", "|---|---:|---|---|---|"]
    for x in targets_of(last):
        md.append(f"| {x['name']} | {_fmt_target(x)} | {x['must']} | {x['goal']} | **{x['status']}** |")
    md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/rm_ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    hack = merge_hack([_read(p) for p in args.hack])
    aliases = dict(a.partition("=")[::2] for a in args.alias)
    rows = []
    for spec in args.row:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            sys.exit(f"error: --row wants LABEL=EVAL_JSON, got {spec!r}")
        rows.append(model_row(label, _read(Path(path)), hack, aliases.get(label)))
    md = render(rows, args, command, hack)
    atomic_write_bytes(args.out, md.encode())
    save_json(args.out.with_suffix(".json"), {"command": command, "rows": rows,
                                              "targets": targets_of(rows[-1])})
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
