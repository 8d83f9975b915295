from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One thread per test process (and, through the environment, per subprocess a test starts). With
# two OpenMP threads on two cores that other jobs keep busy, threads spin waiting for each other:
# `pytest tests/test_reward_model.py tests/test_policies_small.py` with two `yes > /dev/null`
# processes running took 54 s with two threads and 18 s with one (11 s unloaded) on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A small folder of real photos (bundled with scikit-image), as a user's --images folder."""
    import skimage.data as sd

    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(sd, name)()).save(d / f"{name}.png")
    return d


def tree_bytes(root: Path, skip: tuple[str, ...] = ("build_stats.json",)) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-identity checks."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_rm_run(tmp_path_factory) -> Path:
    """A reward-model run folder with stage_0 .. stage_2 of a tiny FinPercep-RM (random heads)."""
    import torch

    from finpercep.reward.model import FinPercepRM, RMConfig, save_pretrained

    run = tmp_path_factory.mktemp("rmrun")
    torch.manual_seed(0)
    m = FinPercepRM(RMConfig(decoder_stage=0, levels=(1, 2), decoder_channels=8, score_hidden=16))
    for k in range(3):
        if k:
            m = m.grow()
            with torch.no_grad():  # a non-trivial map head, so stages' rewards differ
                m.decoder.head.weight.normal_(0, 0.5)
        save_pretrained(m, run / f"stage_{k}")
    return run
