"""Images and arrays in and out, robustly and atomically.

Conventions (STYLE.md): in memory an image is a float32 tensor ``(3, H, W)`` in [0, 1], RGB;
on disk it is an 8-bit RGB PNG. Every write goes to a temporary name in the same folder and is
renamed into place, so a killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Pillow refuses images above ~179 MP by default (decompression-bomb guard). Real photos can be
# large (a 6028x3391 wallpaper is 20 MP), so allow up to 256 MP and refuse beyond with a message.
Image.MAX_IMAGE_PIXELS = 256_000_000


class ImageReadError(ValueError):
    """An image file could not be read; the message says why and what to do."""


def list_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted for determinism."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read any common image file as 8-bit RGB.

    Returns ``(array (H, W, 3) uint8, notes)`` where ``notes`` says what was converted
    (grey, palette, alpha, 16-bit). Raises :class:`ImageReadError` for unreadable files.
    """
    path = Path(path)
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F") or (mode == "I;16N"):
                arr = np.asarray(im).astype(np.float64)
                hi = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
                if mode == "F":
                    hi = max(float(arr.max()), 1.0) if arr.max() > 1.0 else 1.0
                arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
                notes.append(f"converted {mode} (high bit depth) to 8-bit")
                im = Image.fromarray(arr, mode="L")
                mode = "L"
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                # Composite on white: transparent areas are background, not black content.
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba).convert("RGB")
                notes.append(f"dropped alpha channel ({mode}) by compositing on white")
            elif mode != "RGB":
                notes.append(f"converted {mode} to RGB")
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    except Image.DecompressionBombError as e:  # pragma: no cover - needs a >256 MP file
        raise ImageReadError(f"{path}: image too large ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"{path}: unexpected image shape {arr.shape}")
    return arr, notes


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded (not truncated)."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(img.shape)}")
    x = img.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().cpu().numpy()


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file as a (3, H, W) float32 tensor in [0, 1]."""
    arr, _ = read_image(path)
    return to_tensor(arr)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(path: str | Path, img: torch.Tensor | np.ndarray) -> None:
    """Write an RGB image ((3,H,W) float tensor or (H,W,3) uint8) or a (H,W) uint8 mask as PNG, atomically.

    PNG metadata is left out and the compression level fixed, so equal pixels give equal bytes.
    """
    arr = to_uint8(img) if isinstance(img, torch.Tensor) else img
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"save_png expects uint8 (H,W) or (H,W,3), got {arr.shape} {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_npy(path: str | Path, arr: np.ndarray) -> None:
    """Write a numpy array as ``.npy`` atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_npy(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` array without ever unpickling objects."""
    return np.load(path, allow_pickle=False)


def save_json(path: str | Path, obj: Any) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def safe_relpath(root: Path, rel: str) -> Path:
    """Resolve a path read from a manifest, refusing absolute paths and ``..`` escapes."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"manifest path must be relative and inside its folder, got {rel!r}")
    return root / p



CKPT_DIR = "ckpt"
"""Training runs keep their resumable checkpoints in ``RUN/ckpt/<name>/`` (each with a
``trainer.pt``) and name the newest in ``RUN/ckpt/LATEST``."""


def mark_latest_checkpoint(run: Path, folder: Path) -> None:
    """Point ``RUN/ckpt/LATEST`` at ``folder`` (call it after the folder is complete)."""
    atomic_write_bytes(Path(run) / CKPT_DIR / "LATEST", folder.name.encode())


def latest_checkpoint(run: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint folder of a training run and its trainer state
    (``trainer.pt``, read with ``weights_only=True``), or None."""
    import torch

    pointer = Path(run) / CKPT_DIR / "LATEST"
    if not pointer.exists():
        return None
    folder = Path(run) / CKPT_DIR / pointer.read_text().strip()
    if not (folder / "trainer.pt").exists():
        return None
    return folder, torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)


def append_jsonl(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one JSON object as a line (a training run's ``metrics.jsonl``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped); ``[]`` when it does not exist."""
    path = Path(path)
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def filter_jsonl(path: str | Path, keep: Any) -> None:
    """Rewrite a JSON-lines file atomically with only the records for which ``keep(record)`` is
    true (torn or invalid lines are dropped): on resume, the metrics logged after the checkpoint."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
