"""The run folder every trainer writes: the reward model's stages (:mod:`finpercep.reward.train`),
the RL loops (:mod:`finpercep.rl`, whose checkpoints also carry the co-evolving reward model) and
the policy recipes (:mod:`finpercep.policies.recipe`). One copy of the bookkeeping:

- **the resolved config** (:func:`check_config`): written when a run starts, compared when it
  resumes, so a rerun with other settings is refused in one line instead of mixing two runs.
  The file keeps the name runs written before this module have (:data:`TRAIN_CONFIG` for the
  reward model and the recipes, which do not resume and rewrite it; :data:`RUN_CONFIG` for RL);
- **metrics** (:func:`append_metrics`, :func:`truncate_metrics`, :func:`read_metrics`):
  ``RUN/metrics.jsonl``, one JSON object per logged step; on resume, the lines logged after the
  checkpoint are dropped (they are logged again), so a killed run logs each step once;
- **checkpoints** (:func:`save_trainer_state`, :func:`load_trainer_state`): ``RUN/ckpt/<name>/``
  holds the trainer's weights (in its own format) and ``trainer.pt`` (optimiser, step, extra state;
  written last, read with ``weights_only=True``), then ``RUN/ckpt/LATEST`` names it
  (:func:`finpercep.io.mark_latest_checkpoint`) and older ones are removed; a kill at any point
  leaves the previous checkpoint intact;
- **progress** (:func:`progress_bar`): a tqdm bar (imported when one is asked for) or nothing.

Nothing here knows a model, a reward or an algorithm: it imports only :mod:`finpercep.config`
and :mod:`finpercep.io`.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

from finpercep.config import rename_old_keys
from finpercep.io import (
    CKPT_DIR,
    append_jsonl,
    atomic_write_bytes,
    filter_jsonl,
    latest_checkpoint,
    mark_latest_checkpoint,
    read_jsonl,
    read_latest_checkpoint,
    save_json,
)

METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer.pt"
TRAIN_CONFIG = "train_config.json"
"""The resolved config of a reward-model run (``{"config", "data"}``) or a policy recipe
(``{"recipe", "photos", "config"}``)."""
RUN_CONFIG = "run_config.json"
"""The resolved config of an RL run (``{"algo", "policy", "reward", "data", "config", ...}``)."""


# ---------------------------------------------------------------------------------------------
# The resolved config


def check_config(run: str | Path, name: str, record: dict[str, Any], *, compare: str | None = None) -> None:
    """Write ``record`` (JSON types; tuples become lists) to ``RUN/name`` when the run starts, or
    check that a resumed run was started with the same.

    ``compare``: the key of ``record`` that must match (the reward model compares only its
    ``config``, so the data folder may move); ``None`` = all of it. Keys renamed since the saved
    file was written (:data:`finpercep.config.RENAMED_KEYS`: ``lr`` -> ``learning_rate``) are
    mapped first, so runs saved before a rename resume. The file is never rewritten.

    Raises ValueError in one line naming the keys that differ, or the saved file when it is not a
    JSON object.
    """
    path = Path(run) / name
    new = json.loads(json.dumps(record))
    if not path.exists():
        save_json(path, new)
        return
    try:
        old = rename_old_keys(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if not isinstance(old, dict):
        raise ValueError(f"{path}: not a saved run config (damaged?); delete it to resume with the current "
                         "settings, or choose a new --out")
    if compare is not None:
        old, new = old.get(compare, {}), new[compare]
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{run} was started with other settings ({', '.join(diff)} differ); "
                         "resume with the same arguments or choose a new --out")


# ---------------------------------------------------------------------------------------------
# Metrics


def append_metrics(run: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``RUN/metrics.jsonl`` (keys sorted). Raises
    :class:`finpercep.io.WriteError` naming the file when it cannot be written."""
    append_jsonl(Path(run) / METRICS, record)


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The lines of ``RUN/metrics.jsonl`` as dicts, in file order; ``[]`` when there is none."""
    return read_jsonl(Path(run) / METRICS)


def truncate_metrics(run: str | Path, upto: tuple[int, ...], keys: tuple[str, ...] = ("step",)) -> None:
    """On (re)start, keep only the lines logged up to position ``upto`` and drop the later ones
    (they are logged again), and any torn line (a kill or a full disk mid-write).

    A line's position is its values of ``keys`` (missing = 0), compared as a tuple: RL loops cut at
    ``(step,)``, the reward model at ``(stage, step)`` (earlier stages keep all their lines).
    ``upto = (0,)`` at the start of a run drops every step line.
    """
    filter_jsonl(Path(run) / METRICS, lambda r: tuple(r.get(k, 0) for k in keys) <= tuple(upto))


def restart_metrics(run: str | Path) -> None:
    """Remove ``RUN/metrics.jsonl``: a trainer that does not resume (the policy recipes) starts
    its log afresh on a rerun."""
    (Path(run) / METRICS).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_trainer_state(run: str | Path, folder: Path, state: dict[str, Any]) -> Path:
    """Complete the checkpoint ``folder`` (inside ``RUN/ckpt/``, its weights already written):
    write ``state`` (tensors and plain values; optimiser state, step, ...) to ``folder/trainer.pt``
    atomically, point ``RUN/ckpt/LATEST`` at it, then remove every other checkpoint folder.
    Returns ``folder``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(folder / TRAINER_STATE, buf.getvalue())
    mark_latest_checkpoint(Path(run), folder)
    for old in (Path(run) / CKPT_DIR).iterdir():
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_trainer_state(run: str | Path, keys: tuple[str, ...]) -> tuple[Path, dict[str, Any]] | None:
    """``(folder, state)`` of the newest complete checkpoint of ``run`` (``trainer.pt`` read with
    ``weights_only=True``), or None when there is none. Raises ValueError in one line for a
    ``trainer.pt`` that is damaged, holds pickled Python objects or lacks one of ``keys``."""
    return read_latest_checkpoint(run, keys=keys)


def last_checkpoint_note(run: str | Path) -> str:
    """``last good checkpoint: RUN/ckpt/<name>`` or ``no checkpoint was written yet``, for the
    message of a run that stops on a non-finite value."""
    last = latest_checkpoint(run)
    return f"last good checkpoint: {last[0]}" if last else "no checkpoint was written yet"


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A progress bar over a trainer's steps: :meth:`advance` after each step (with values shown
    next to the bar), :meth:`close` at the end. Made by :func:`progress_bar`; does nothing when
    the bar is off."""

    def __init__(self, bar: Any = None) -> None:
        self._bar = bar

    def advance(self, **shown: str) -> None:
        """One step done; ``shown`` (e.g. ``loss="0.123"``) is displayed next to the bar."""
        if self._bar is not None:
            self._bar.update(1)
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> Progress:
    """A tqdm bar of ``total`` steps starting at ``initial`` (a resumed run), labelled ``desc``;
    a :class:`Progress` that does nothing when not ``enabled`` (``--quiet``, ranks other than 0)."""
    if not enabled:
        return Progress()
    from tqdm import tqdm

    return Progress(tqdm(total=total, initial=initial, desc=desc, unit="step"))
