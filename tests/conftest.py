from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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
