"""Fine-tune an SR policy with RL and measure it before and after on held-out photos.

One invocation = one row: it evaluates the pretrained policy on the first ``--eval-num`` LR/HR
pairs of ``--test-data`` (photos never used for training), runs ``finpercep.rl.fine_tune`` (resumable:
rerun the same command after an interruption), evaluates the result the same way, reads the
step-time breakdown from the run's ``metrics.jsonl`` and writes ``docs/results/rl/<name>.json``.
Then it regenerates ``docs/results/rl_finetune.md`` from all rows there.

The rows in the docs come from (2 CPU cores; see the table's header for what each ran):

    python benchmarks/rl_finetune.py --name refl-realsr --algo refl --policy realsr-x4 \\
        --config configs/rl_refl_realsr.yaml --train-data runs/fgr-train --test-data runs/fgr-test --threads 1
    python benchmarks/rl_finetune.py --name grpo-flow --algo grpo --policy flow-x4 \\
        --config configs/rl_flow.yaml --train-data runs/fgr-train --test-data runs/fgr-test --threads 1
    python benchmarks/rl_finetune.py --name dpo-flow --algo dpo --policy flow-x4 \\
        --config configs/rl_flow.yaml --train-data runs/fgr-train --test-data runs/fgr-test --threads 1

    python benchmarks/rl_finetune.py --name grpo-flow-v2data --algo grpo --policy flow-x4 \\
        --config configs/rl_flow.yaml --train-data runs/fgr-v2-probe --test-data runs/fgr-v2-test --threads 2
    python benchmarks/rl_finetune.py --name grpo-flow-rmv2cpu --algo grpo --policy flow-x4 \\
        --config configs/rl_flow.yaml --train-data runs/fgr-v2-probe --test-data runs/fgr-v2-test --threads 2 \\
        --checkpoint runs/rm-v2-cpu
    python benchmarks/rl_finetune.py --name grpo-flow-rmv2cpu-fp16 --algo grpo --policy flow-x4 \\
        --config configs/rl_flow.yaml --train-data runs/fgr-v2-probe --test-data runs/fgr-v2-test --threads 2 \\
        --checkpoint runs/rm-v2-cpu-fp16
    # seeds 1 and 2 of the first and last v2 rows: the same two commands with --seed S and --name ...-sS

(the first three with one thread each, as they ran side by side with other jobs on the 2 cores; the ReFL run was
paused for a while, its step times were then recomputed with ``--refresh-times refl-realsr``.
``runs/fgr-train`` / ``runs/fgr-test``: ``finpercep data build`` on the train / test photo splits,
2400 and 512 samples, seeds 0 and 2; see docs/reward_model.md; the v2 rows: the v2 data of
configs/rm_v2_probe.yaml and configs/rm_v2.yaml; ``runs/rm-v2-cpu``: configs/rm_v2_cpu.yaml; ``runs/rm-v2-cpu-fp16``: ``finpercep rm export runs/rm-v2-cpu
--to runs/rm-v2-cpu-fp16``, the float16 copy that would ship.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from finpercep.config import load_config  # noqa: E402
from finpercep.eval.sr_quality import DIRECTION, evaluate_sr  # noqa: E402
from finpercep.policies import load_policy  # noqa: E402
from finpercep.rl import RLConfig, fine_tune  # noqa: E402
from finpercep.rl.common import PairData  # noqa: E402
from finpercep.runs import read_metrics  # noqa: E402

RESULTS = ROOT / "docs" / "results"
COLUMNS = ["rm/score", "rm/map_mean", "rm/map_area", "niqe", "brisque", "piqe", "psnr", "ssim", "stlpips"]
TIMES = ["policy_forward", "policy_sample", "reward_forward", "reward_backward", "policy_backward", "optimizer"]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--refresh-times":
        return refresh_times(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="row name; the run goes to runs/bench-rl/<name>")
    ap.add_argument("--algo", required=True, choices=("refl", "dpo", "grpo"))
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", default="finpercep")
    ap.add_argument("--checkpoint", default=None,
                    help="FinPercep-RM run or checkpoint the reward is computed with (default: the shipped model); "
                         "the rm/* columns are always the shipped model's")
    ap.add_argument("--train-data", required=True)
    ap.add_argument("--test-data", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--seed", type=int, default=None, help="run seed (default: the config's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--crop", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--eval-num", type=int, default=32, help="held-out pairs evaluated (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    run = ROOT / "runs" / "bench-rl" / args.name
    run_over = dict(seed=args.seed, steps=args.steps, batch=args.batch, crop=args.crop, learning_rate=args.lr, lora_rank=args.lora_rank,
                    sample_every=25, ckpt_every=10)
    group = dict(group_size=args.group_size or None)
    cfg = load_config(RLConfig, args.config, run=run_over, dpo=group, grpo=group)
    test = PairData(args.test_data)
    idx = list(range(min(args.eval_num, len(test))))
    before_path = run.parent / f"{args.name}.before.json"
    if before_path.exists():
        before = json.loads(before_path.read_text())
    else:
        before = evaluate_sr(load_policy(args.policy), test, idx, device=args.device, progress=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        before_path.write_text(json.dumps(before))
    t0 = time.perf_counter()
    final = fine_tune(args.policy, args.algo, args.reward, args.train_data, run, cfg, checkpoint=args.checkpoint,
                      device=args.device)
    train_s = time.perf_counter() - t0
    after = evaluate_sr(load_policy(final), test, idx, device=args.device, progress=True)
    times, step_time = step_times(run)
    curve = read_metrics(run)
    row = {"name": args.name, "algo": args.algo, "policy": args.policy, "reward": args.reward,
           "config": json.loads((run / "run_config.json").read_text())["config"]["run"],
           "group_size": cfg.grpo.group_size if args.algo == "grpo" else cfg.dpo.group_size if args.algo == "dpo" else None,
           "eval_images": len(idx), "threads": args.threads, "before": before, "after": after, "time_per_step": times, "step_time": step_time,
           "reward_share": (times["reward_forward"] + times["reward_backward"]) / step_time if step_time else None,
           "train_seconds_this_call": train_s,
           "reward_first": sum(m["reward/mean"] for m in curve[:10]) / len(curve[:10]),
           "reward_last": sum(m["reward/mean"] for m in curve[-10:]) / len(curve[-10:]),
           "train_data": Path(args.train_data).name, "test_data": Path(args.test_data).name, "judge": judge_id(),
           "reward_checkpoint": Path(args.checkpoint).name if args.checkpoint else None}
    (run / "eval.json").write_text(json.dumps({"before": before, "after": after}, indent=1))  # for `finpercep report`
    out = RESULTS / "rl" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1, sort_keys=True))
    write_table()
    print(f"wrote {out} and {RESULTS / 'rl_finetune.md'}")


def judge_id() -> str:
    """The shipped FinPercep-RM that judged a row (``rm/*``): the first 12 hex digits of the SHA-256 of
    its final stage's weights, so rows judged by different shipped models are told apart."""
    import hashlib

    from finpercep.reward.api import embedded_checkpoint_dir, list_stages

    d = embedded_checkpoint_dir()
    last = max(list_stages(d))
    return hashlib.sha256((d / f"stage_{last}" / "model.safetensors").read_bytes()).hexdigest()[:12]


def step_times(run: Path) -> tuple[dict[str, float], float]:
    """Median seconds per step of each section and of the whole step, over steps 2..N (step 1
    includes warm-up; the median is robust to steps slowed by other work on a shared machine)."""
    import statistics

    steps = [m for m in read_metrics(run) if m["step"] > 1]

    def med(key: str) -> float:
        return statistics.median(m.get(key, 0.0) for m in steps) if steps else 0.0

    return {k: med(f"time/{k}") for k in TIMES}, med("time/step")


def refresh_times(name: str) -> None:
    """Recompute a finished row's step times from its run's metrics (``--refresh-times NAME``)."""
    path = RESULTS / "rl" / f"{name}.json"
    row = json.loads(path.read_text())
    times, step_time = step_times(ROOT / "runs" / "bench-rl" / name)
    row.update(time_per_step=times, step_time=step_time,
               reward_share=(times["reward_forward"] + times["reward_backward"]) / step_time if step_time else None)
    path.write_text(json.dumps(row, indent=1, sort_keys=True))
    write_table()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def write_table() -> None:
    rows = [json.loads(p.read_text()) for p in sorted((RESULTS / "rl").glob("*.json"))]
    arrows = {k: "↑" if DIRECTION[k] == "up" else "↓" for k in COLUMNS}
    lines = ["# RL fine-tuning: before / after on held-out photos", "",
             "Generated by `benchmarks/rl_finetune.py` (commands in its docstring); 2 CPU cores. Each row fine-tunes one",
             "policy against the reward named, then evaluates the pretrained and the fine-tuned policy on the same",
             "held-out LR/HR pairs (`test data`: photos never used in training; whole 256x256 HR, x4; `runs/fgr-test`",
             "from the Debian test photos, `runs/fgr-v2-test` from BSD68, Set14 and Set5).",
             "`rm/*` is the FinPercep-RM shipped when the row ran (final stage; `judge`: the first 12 hex digits of",
             "its weights' SHA-256, `v1` for rows run before the column existed), i.e. the training reward itself for",
             "rows trained on the shipped `finpercep`: read it as 'did the policy climb the reward', not as an",
             "independent judge. A reward in parentheses is another FinPercep-RM run (`--checkpoint`).", "",
             "| run | algo | policy | reward | train -> test data | judge | steps x batch (G) | LoRA | | "
             + " | ".join(f"{k} {arrows[k]}" for k in COLUMNS) + " |",
             "|" + "---|" * (9 + len(COLUMNS))]
    for r in rows:
        c = r["config"]
        g = f" ({r['group_size']})" if r.get("group_size") else ""
        for tag in ("before", "after"):
            data = f"{r.get('train_data', 'fgr-train')} -> {r.get('test_data', 'fgr-test')}"
            reward = r["reward"] + (f" ({r['reward_checkpoint']})" if r.get("reward_checkpoint") else "")
            lines.append(f"| {r['name']} | {r['algo']} | {r['policy']} | {reward} | {data} | {r.get('judge', 'v1')} | "
                         f"{c['steps']} x {c['batch']}{g} | "
                         f"{c['lora_rank'] or 'full'} | {tag} | " + " | ".join(_fmt(r[tag].get(k)) for k in COLUMNS) + " |")
    lines += ["", "## Step time (seconds per step, median over steps 2..N)", "",
              "| run | threads | step | " + " | ".join(TIMES) + " | reward share |", "|" + "---|" * (4 + len(TIMES))]
    for r in rows:
        t = r["time_per_step"]
        lines.append(f"| {r['name']} | {r['threads']} | {r['step_time']:.2f} | " + " | ".join(f"{t[k]:.2f}" for k in TIMES)
                     + f" | {100 * r['reward_share']:.0f} % |")
    lines += ["", "Reward share = (reward forward + reward backward) / step time. Target for ReFL: at most 30 %.", "",
              "## Training reward (mean of the first / last 10 logged steps)", "",
              "| run | first | last |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['reward_first']:.3f} | {r['reward_last']:.3f} |")
    (RESULTS / "rl_finetune.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
