"""Loading a trained FinPercep-RM and scoring images with it: the reward's public entry points.

``load_reward`` accepts any of

- a **checkpoint folder** (``config.json`` + ``model.safetensors``, written by
  :func:`finpercep.reward.model.save_pretrained`);
- a **training run folder** holding one checkpoint per curriculum stage, ``stage_0/ .. stage_N/``
  (RM_0 .. RM_N, the curriculum of arXiv 2512.22647); ``stage`` picks one, by default the last complete one;
- ``None``: the **embedded default**, a run-like folder with ``stage_0 .. stage_N`` shipped inside
  the package (:func:`embedded_checkpoint_dir`).

The returned model is frozen (eval mode, ``requires_grad=False`` on every parameter) but stays
differentiable with respect to its input, as a reward inside an RL loop needs:
``load_reward()(x.requires_grad_()).score.sum().backward()`` fills ``x.grad``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from finpercep.io import CONFIG_NAME, WEIGHTS_NAME
from finpercep.io import is_pretrained as _is_checkpoint
from finpercep.reward.model import (
    FinPercepRM,
    decoder_reach,
    default_tile_context,
    load_pretrained,
    score_image_tiled,
)

log = logging.getLogger(__name__)

EMBEDDED_DIRNAME = "weights"
STAGE_DIR_RE = re.compile(r"stage_(\d+)")

TRAIN_HINT = (
    "train one with `finpercep rm train --data DIR --out RUN` (a data set from `finpercep data build`) "
    "and pass `--checkpoint RUN` (Python: `load_reward('RUN')`)"
)


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint


def embedded_checkpoint_dir() -> Path:
    """Folder of the default checkpoint shipped inside the package,
    ``finpercep/reward/weights/`` (a run-like folder with ``stage_0 .. stage_N``). It may not exist
    (a source checkout before the default model is trained)."""
    from importlib.resources import files

    return Path(str(files("finpercep.reward").joinpath(EMBEDDED_DIRNAME)))


def list_stages(run_dir: str | Path) -> dict[int, Path]:
    """The complete stage checkpoints of a run folder, ``{k: run_dir / "stage_k"}`` sorted by ``k``.
    A ``stage_k`` folder without both checkpoint files (a stage still training, or killed
    mid-save) is left out."""
    run_dir = Path(run_dir)
    stages = {}
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        m = STAGE_DIR_RE.fullmatch(p.name)
        if m and p.is_dir() and _is_checkpoint(p):
            stages[int(m.group(1))] = p
    return dict(sorted(stages.items()))


def resolve_checkpoint(checkpoint: str | Path | None = None, stage: int | None = None) -> Path:
    """The checkpoint folder ``load_reward(checkpoint, stage)`` would load (see module docstring).

    Raises FileNotFoundError (no such path, no checkpoint in it, embedded default missing) or
    ValueError (``stage`` not an int >= 0 or not in the run) with a message saying what to do.
    """
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int) or stage < 0):
        raise ValueError(f"stage must be an integer >= 0 (k of RM_k) or None for the last one, got {stage!r}")
    if checkpoint is None:
        folder = embedded_checkpoint_dir()
        if not folder.is_dir() or not list_stages(folder):
            raise FileNotFoundError(
                f"the embedded FinPercep-RM checkpoint is missing: no stage_K/ checkpoint under {folder} "
                f"(this install ships without a trained default model); {TRAIN_HINT}"
            )
    else:
        folder = Path(checkpoint).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"checkpoint not found: {folder} does not exist")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"checkpoint {folder} is a file; pass a folder with {CONFIG_NAME} + {WEIGHTS_NAME}, "
                "or a training run folder with stage_K/ subfolders"
            )
    if _is_checkpoint(folder):
        # A single checkpoint: ``stage`` is checked against its config after loading.
        return folder
    stages = list_stages(folder)
    if not stages:
        raise FileNotFoundError(
            f"no FinPercep-RM checkpoint in {folder}: expected {CONFIG_NAME} + {WEIGHTS_NAME}, "
            f"or stage_K/ subfolders holding them; {TRAIN_HINT}"
        )
    if stage is None:
        return stages[max(stages)]
    if stage not in stages:
        raise ValueError(
            f"stage {stage} is not in {folder}: available stages {sorted(stages)} "
            f"(a stage_K folder counts once it holds {CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    return stages[stage]


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"not a torch device: {device!r} ({e}); use e.g. 'cpu', 'cuda', 'cuda:1'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available here; use device='cpu'")
    return dev


def load_reward(
    checkpoint: str | Path | None = None, stage: int | None = None, device: str | torch.device = "cpu"
) -> FinPercepRM:
    """A trained FinPercep-RM, frozen, on ``device``.

    ``checkpoint``: a checkpoint folder, a training run folder (``stage`` picks ``stage_<stage>``,
    default the last complete stage), or ``None`` for the embedded default (module docstring).
    For a single checkpoint folder ``stage``, when given, must equal the checkpoint's own stage.

    Returns the model in eval mode with ``requires_grad=False`` on its parameters; calling it on
    ``x`` ``(B, 3, H, W)`` in [0, 1] gives ``RewardOutput(score (B,), map (B, 1, H, W) or None at
    stage 0)``, differentiable with respect to ``x``. ``x`` may be float16, bfloat16, float32 or
    float64 (cast to the model's dtype; ``torch.from_numpy`` gives float64); integer images are
    refused with a ValueError saying to divide by 255.

    The model is a :class:`finpercep.types.Reward` with the metadata ``create_reward("finpercep")``
    has: ``name`` ``"finpercep"`` (``"finpercep:K"`` for ``stage=K``), no reference, differentiable,
    range ``(-inf, inf)``, ``has_map`` from stage 1 on; ``model(sr, lr=None, hr=None)`` works.
    """
    dev = _device(device)
    folder = resolve_checkpoint(checkpoint, stage)
    model = load_pretrained(folder, map_location=dev)
    if stage is not None and model.stage != stage:
        raise ValueError(
            f"{folder} is a single stage-{model.stage} checkpoint, but stage {stage} was asked for "
            "(pass the training run folder to pick among stages)"
        )
    model.name = "finpercep" if stage is None else f"finpercep:{stage}"  # the spec create_reward takes
    model.eval().requires_grad_(False)
    log.info("loaded FinPercep-RM stage %d from %s on %s", model.stage, folder, dev)
    return model


# ---------------------------------------------------------------------------------------------
# Scoring single images of any size


@dataclass
class ImageScore:
    """The reward for one image of size ``H x W``.

    ``score``: python float, higher = better (the model's scale, see ``finpercep.reward.model``).
    ``map``: ``(H, W)`` float32 CPU tensor in [0, 1], higher = more degraded; ``None`` at stage 0.
    """

    score: float
    map: torch.Tensor | None


def export_run(run_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> list[Path]:
    """Copy every finished stage of a training run to ``out/stage_k/`` (weights cast to ``dtype``,
    float16 by default: half the size, scores slightly off the float32 ones), with each stage's ``val.json``.
    This is how the embedded checkpoint in ``finpercep/reward/weights`` is made."""
    import shutil

    from finpercep.reward.model import load_pretrained, save_pretrained

    stages = list_stages(run_dir)
    if not stages:
        raise FileNotFoundError(f"{run_dir} has no finished stage_k/ folder to export")
    out = Path(out)
    written = []
    for k, folder in sorted(stages.items()):
        dst = out / f"stage_{k}"
        save_pretrained(load_pretrained(folder), dst, dtype=dtype)
        if (folder / "val.json").exists():
            shutil.copyfile(folder / "val.json", dst / "val.json")
        written.append(dst)
    return written


def score_images(
    model: FinPercepRM, images: list[torch.Tensor], tile: int = 512, context: int | None = None
) -> list[ImageScore]:
    """Score each image ``(3, H, W)`` float in [0, 1] (any ``H, W >= 1``) one at a time, without
    gradients, maps at the input resolution.

    Rule: an image with ``H * W <= tile * tile`` pixels goes through one whole-image forward pass
    (its memory is at most that of a ``tile x tile`` image, thin strips included); a larger one
    through :func:`finpercep.reward.model.score_image_tiled` with ``tile x tile`` cores and
    ``context`` px of surrounding image per tile (``None``: the model's
    :func:`~finpercep.reward.model.default_tile_context`), so memory is bounded by one tile's
    activations plus a few floats per pixel for the full-size map. Tiling is exact up to
    floating-point rounding (``score_image_tiled``'s docstring), so the rule only decides memory
    use, not the result. ``tile`` and ``context`` are checked for every call, whatever the image
    sizes, so a bad setting fails at once rather than on the first large image.
    """
    if not isinstance(model, FinPercepRM):
        raise ValueError(f"score_images expects a FinPercepRM (see load_reward), got {type(model).__name__}")
    s, reach = model.cfg.stride, decoder_reach(model)
    ctx = default_tile_context(model) if context is None else context
    if tile < s or tile % s or ctx % s or ctx < reach:
        raise ValueError(
            f"tile and context must be multiples of the model stride {s}, tile >= {s}, and context >= "
            f"the decoder's reach {reach} px; got tile={tile}, context={context}"
        )
    if isinstance(images, torch.Tensor):
        raise ValueError("score_images expects a list of (3, H, W) tensors; call the model directly on a (B, 3, H, W) batch")
    param = next(model.parameters())
    results = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(
                f"score_images: image {i} must be a (3, H, W) tensor in [0, 1], "
                f"got {type(img).__name__} {tuple(getattr(img, 'shape', ()))}"
            )
        x = img[None].to(param.device)  # the model checks the dtype and casts to its own
        with torch.no_grad():
            h, w = img.shape[-2:]
            out = model(x) if h * w <= tile * tile else score_image_tiled(model, x, tile=tile, context=ctx)
        m = None if out.map is None else out.map[0, 0].float().cpu()
        results.append(ImageScore(score=float(out.score[0]), map=m))
    return results
