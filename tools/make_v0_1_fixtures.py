"""Regenerate ``tests/fixtures/v0_1``: checkpoints, runs and a data set written by finpercep 0.1
(commit 99c4b40, before the checkpoint code moved into ``finpercep.io``), with the outputs
that code computed on them, so ``tests/test_old_checkpoints.py`` can check that today's code loads
them and computes the same.

Run it with the OLD code on the path, from the repository root::

    git worktree add /tmp/old99 99c4b40
    PYTHONPATH=/tmp/old99/src OMP_NUM_THREADS=1 .venv/bin/python tools/make_v0_1_fixtures.py
    git worktree remove /tmp/old99

It refuses to run with this checkout's own ``src/`` (fixtures written by today's code would prove
nothing). What it writes (about 0.6 MB, CPU, under a minute):

- ``fgr/``: a 3-sample FGR data set, 48 px HR crops, the ``bicubic`` family (``finpercep data build``);
- ``rm_run/``: a reward-model run with ``stage_0`` and ``stage_1`` of a tiny FinPercep-RM (levels
  0 and 1, 8 decoder channels) and its last resumable checkpoint ``ckpt/*/trainer.pt``
  (``finpercep rm train``; the loss plot is left out);
- ``rm_fp16/``: that run exported in float16 (``finpercep rm export --dtype fp16``);
- ``tiny_x4/``, ``flow_x4/``: small random tiny and flow policies (``save_policy``);
- ``rrdb_converted/``: a tiny RRDBNet written the way the ncnn converter writes its cache
  (``convert._write_cache``); the real converted networks are 1-67 MB, too large to keep;
- ``rl_run/``: a 2-step ReFL run with LoRA rank 2 on ``tiny_x4`` and the ``l1`` reward
  (``finpercep rl train``): ``final/``, ``ckpt/*/trainer.pt``, metrics and samples;
- ``expected.json``: what the old code computed on them (:func:`record`).

A rerun rewrites everything and records ``expected.json`` afresh. It is not bit-identical: at 99c4b40
the LoRA adapters were initialised from the global RNG (not the run's seed), so ``rl_run`` differs
from run to run, as do the timings in the metrics.

The helpers :func:`digest`, :func:`tensor_sha256` and :func:`fixture_batch` use no finpercep code,
so the test imports them from this file and compares like with like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "v0_1"
OLD_COMMIT = "99c4b40"

RM_YAML = """\
model: {levels: [0, 1], decoder_channels: 8, score_hidden: 16, decoder_stage: 0}
stages: 1
steps_per_stage: [2]
batch_size: 2
warmup_steps: 0
log_every: 1
ckpt_every: 1
val_fraction: 0.34
"""
"""The tiny reward-model recipe: 2 steps per stage, stages 0 and 1, one validation sample."""

TILE = 32
"""Tile size of the tiled-scoring record (a multiple of the tiny RM's stride 4)."""


# ---------------------------------------------------------------------------------------------
# Helpers shared with tests/test_old_checkpoints.py (no finpercep imports)


def digest(t: torch.Tensor) -> dict:
    """A small JSON summary of a tensor: shape, sum, sum of absolute values and 64 evenly spaced
    values (float64 sums; compare with a tolerance)."""
    flat = t.detach().double().cpu().flatten()
    step = max(1, flat.numel() // 64)
    return {"shape": list(t.shape), "sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()),
            "sample": [float(v) for v in flat[::step][:64]]}


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (exact equality of what a reader returns)."""
    a = t.detach().cpu().contiguous().numpy()
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()


def fixture_batch(fgr: Path) -> dict[str, torch.Tensor]:
    """The images of every sample of the fixture data set, read straight from its PNG files:
    ``{"hr" | "syn" | "sr": (N, 3, 48, 48), "lr": (N, 3, 12, 12)}`` float32 in [0, 1]."""
    from PIL import Image

    recs = [json.loads(line) for line in (fgr / "manifest.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for key in ("hr", "syn", "sr", "lr"):
        arrs = [np.asarray(Image.open(fgr / r[key]).convert("RGB"), dtype=np.float32) / 255.0 for r in recs]
        out[key] = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Writing the fixtures (old code)


def cli(cwd: Path, *args: str) -> str:
    """Run ``finpercep ARGS`` (the old code, through PYTHONPATH) in ``cwd``; returns its stdout."""
    res = subprocess.run([sys.executable, "-m", "finpercep.cli", "-q", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"finpercep {' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res.stdout


def write_photos(folder: Path) -> None:
    """Three 96x96 photos (scikit-image's astronaut, chelsea, coffee) to build the data set from."""
    import skimage.data as sd
    from PIL import Image

    folder.mkdir(parents=True)
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(sd, name)()).resize((96, 96), Image.BICUBIC).save(folder / f"{name}.png")


def write_policies(out: Path) -> None:
    """``tiny_x4``, ``flow_x4`` (random, perturbed so no output is plain bicubic) and ``rrdb_converted``."""
    from finpercep.policies import save_policy
    from finpercep.policies.convert import _write_cache
    from finpercep.policies.flow import FlowConfig, FlowSR
    from finpercep.policies.rrdbnet import RRDBConfig, RRDBNet
    from finpercep.policies.tiny import TinyConfig, TinySR

    torch.manual_seed(0)
    nets = {
        "tiny_x4": TinySR(TinyConfig(channels=8, num_layers=1)),
        "flow_x4": FlowSR(FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=2)),
        "rrdb_converted": RRDBNet(RRDBConfig(num_feat=4, num_block=1, num_grow_ch=4, source="fixture: tiny, random")),
    }
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    save_policy(nets["tiny_x4"], out / "tiny_x4")
    save_policy(nets["flow_x4"], out / "flow_x4")
    _write_cache(nets["rrdb_converted"], out / "rrdb_converted")


def record(out: Path) -> dict:
    """What the old code computes on the fixtures: data-set tensors (hashes), reward scores and
    maps, policy outputs, the trainer states' keys."""
    from finpercep.data.dataset import FGRDataset, check_dataset
    from finpercep.policies import load_policy
    from finpercep.reward.api import load_reward
    from finpercep.reward.model import score_image_tiled

    keys = ("hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr")
    ds = FGRDataset(out / "fgr", keys=keys)
    exp: dict = {"commit": OLD_COMMIT, "dataset": {"problems": check_dataset(out / "fgr"), "samples": [
        {"id": it["meta"]["id"], **{k: {"shape": list(it[k].shape), "sha256": tensor_sha256(it[k])} for k in keys}}
        for it in (ds[i] for i in range(len(ds)))]}}

    b = fixture_batch(out / "fgr")
    images = torch.cat([b["hr"], b["syn"], b["sr"]])  # (9, 3, 48, 48)
    wide = torch.cat(list(b["hr"]), dim=-1)[None]  # (1, 3, 48, 144): tiled with 32 px tiles
    exp["rm"] = {}
    for name, folder, stage in (("rm_run", "rm_run", None), ("rm_run:0", "rm_run", 0), ("rm_fp16", "rm_fp16", None)):
        model = load_reward(out / folder, stage)
        with torch.no_grad():
            res = model(images)
            tiled = score_image_tiled(model, wide, tile=TILE)
        exp["rm"][name] = {"stage": model.stage, "score": res.score.tolist(),
                           "map": None if res.map is None else digest(res.map),
                           "tiled_score": tiled.score.tolist(), "tiled_map": None if tiled.map is None else digest(tiled.map)}
    hr_files = sorted(str(p.relative_to(out)) for p in (out / "fgr").rglob("*_hr.png"))
    exp["score_cli"] = {"args": ["score", "--json", "--checkpoint", "rm_run", *hr_files],
                        "records": [json.loads(line) for line in cli(out, "score", "--json", "--checkpoint", "rm_run", *hr_files).splitlines()]}

    exp["policies"] = {}
    for name in ("tiny_x4", "flow_x4", "rrdb_converted", "rl_run/final"):
        pol = load_policy(str(out / name))
        with torch.no_grad():
            rec = {"class": type(pol).__name__, "name": pol.name, "scale": pol.scale, "sr": digest(pol(b["lr"]))}
            if hasattr(pol, "sample"):
                traj = pol.sample(b["lr"], torch.Generator().manual_seed(0))
                rec["sample"] = {"log_probs": traj.log_probs.tolist(), "sr": digest(traj.sr)}
        exp["policies"][name] = rec

    exp["trainer_states"] = {}
    for run in ("rm_run", "rl_run"):
        ckpt = out / run / "ckpt" / (out / run / "ckpt" / "LATEST").read_text().strip()
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        exp["trainer_states"][run] = {"folder": str(ckpt.relative_to(out)), "keys": sorted(state),
                                      "step": state["step"], "stage": state.get("stage")}
    return exp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture folder, replaced (default: %(default)s)")
    args = ap.parse_args(argv)
    import finpercep

    if Path(finpercep.__file__).resolve().is_relative_to(REPO / "src"):
        raise SystemExit(f"finpercep is imported from this checkout ({finpercep.__file__}); run with the old code: "
                         f"git worktree add /tmp/old99 {OLD_COMMIT} && PYTHONPATH=/tmp/old99/src python {sys.argv[0]}")
    out: Path = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_photos(out / "photos")  # relative paths, so the data set records no temporary folder
    cli(out, "data", "build", "--images", "photos", "--out", "fgr", "--num", "3", "--families", "bicubic",
        "--crop", "48", "--masks-per-sr", "1", "--workers", "1")
    shutil.rmtree(out / "photos")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rm.yaml").write_text(RM_YAML)
        cli(out, "rm", "train", "--data", "fgr", "--out", "rm_run", "--config", str(Path(tmp) / "rm.yaml"))
    (out / "rm_run" / "loss.png").unlink(missing_ok=True)
    cli(out, "rm", "export", "rm_run", "--to", "rm_fp16", "--dtype", "fp16")
    write_policies(out)
    cli(out, "rl", "train", "--policy", "tiny_x4", "--algo", "refl", "--reward", "l1", "--data", "fgr", "--out",
        "rl_run", "--steps", "2", "--batch", "2", "--crop", "16", "--lora-rank", "2")
    exp = record(out)
    (out / "expected.json").write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")
    (out / "README.md").write_text(f"Written by finpercep at commit {OLD_COMMIT} with `tools/make_v0_1_fixtures.py` "
                                   "(its docstring says how to regenerate them); checked by "
                                   "`tests/test_old_checkpoints.py`. Do not edit by hand.\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) with finpercep from {Path(finpercep.__file__).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
