"""Images and arrays in and out, robustly and atomically.

Conventions: in memory an image is a float32 tensor ``(3, H, W)`` in [0, 1], RGB;
on disk it is an 8-bit RGB (or RGBA) PNG. Every write goes to a temporary name in the same folder
(``.NAME.<host>-<pid>.<random>.tmp``) and is renamed into place, so a killed job never leaves a
half-written file behind; the temporaries a killed job leaves are removed by the next write into
that folder (:func:`remove_stale_temps`).

Model checkpoints, reward models and policies alike, are folders with ``config.json`` and
``model.safetensors``: :func:`save_pretrained` writes one, :func:`load_pretrained` reads one into the
network a caller-supplied builder makes (this module imports no model code).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

_UMASK = os.umask(0)
os.umask(_UMASK)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

MAX_PIXELS = 256_000_000
"""Largest image :func:`read_image` decodes, in pixels (width x height), checked from the file's
header before decoding. Pillow refuses ~179 MP by default (decompression-bomb guard), but real photos
can be large (a 6028x3391 wallpaper is 20 MP), so up to 256 MP are allowed; a 256 MP image already
takes 0.8 GB as 8-bit RGB and 3 GB as a float32 tensor."""
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own guard stays as a backstop (it raises only above 2x)

_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageReadError(ValueError):
    """An image file could not be read; the message says why and what to do."""


class WriteError(OSError):
    """Writing a file failed (disk full, read-only file system, no permission, ...).

    ``errno`` and ``strerror`` are the system's; ``filename`` is the file the caller asked for,
    never the temporary name it was being written under."""


def list_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursively), sorted for determinism."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_inputs(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    """The files a command line names, in input order (folders expanded to their image files,
    recursively and sorted; any existing file is kept whatever its suffix, :func:`read_image`
    decides what it is), and one error message per input that gives nothing to read."""
    files: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = list_images(p)
            if not found:
                errors.append(f"{p}: folder holds no image files (looked for {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def output_names(files: list[Path]) -> list[str]:
    """A distinct output name per file: its stem; when two inputs share a stem (``a/x.png``,
    ``b/x.jpg``) the later ones in input order get ``x-1``, ``x-2``, ... Compared case-insensitively,
    so names stay distinct on case-insensitive file systems; assigned over all inputs up front, so
    they do not depend on which files later fail."""
    used: set[str] = set()
    names = []
    for f in files:
        name, k = f.stem, 0
        while name.casefold() in used:
            k += 1
            name = f"{f.stem}-{k}"
        used.add(name.casefold())
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Reading images


def _too_large(path: Path, size: str) -> ImageReadError:
    return ImageReadError(
        f"{path}: image is {size}, above the {MAX_PIXELS // 1_000_000} MP limit; downscale or crop it first"
    )


def _to_8bit_grey(im: Image.Image, path: Path) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit ``L`` (floats in [0, 1] or scaled by their
    maximum). Raises ImageReadError for a float image holding NaN or infinite values."""
    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ImageReadError(
                f"{path}: float image holds NaN or infinite values in {bad} of {arr.size} pixels; "
                "replace them (e.g. numpy.nan_to_num) and save it again"
            )
        hi = max(float(arr.max()), 1.0)
    else:
        hi = 65535.0 if arr.max() > 255 or im.mode.startswith("I;16") else 255.0
    arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def _decode(path: Path) -> tuple[Image.Image, list[str]]:
    """Decode ``path`` upright (EXIF orientation applied), high bit depths reduced to 8-bit grey.

    The size is checked from the header before decoding (:data:`MAX_PIXELS`). Returns the decoded
    image (any 8-bit Pillow mode) and notes on what was converted. Raises ImageReadError."""
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_PIXELS and twice that; the check below refuses with a clearer line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise _too_large(path, f"{w}x{h} ({w * h / 1e6:.0f} MP)")
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                ImageOps.exif_transpose(im, in_place=True)  # turned as the camera meant (no copy)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise _too_large(path, f"over {2 * MAX_PIXELS // 1_000_000} MP") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as e:
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if orientation not in (None, 1):
        notes.append(f"turned upright (EXIF orientation {orientation})")
    if im.mode in _HIGH_BIT_DEPTH_MODES:
        notes.append(f"converted {im.mode} (high bit depth) to 8-bit")
        im = _to_8bit_grey(im, path)
    if im.width < 1 or im.height < 1:
        raise ImageReadError(f"{path}: empty image ({im.width}x{im.height})")
    return im, notes


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def _to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    """``im`` as ``(H, W, 3)`` uint8 RGB, alpha composited on white; appends what it converted to ``notes``."""
    if _has_alpha(im):
        # Composite on white: transparent areas are background, not black content.
        notes.append(f"dropped alpha channel ({im.mode}) by compositing on white")
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif im.mode != "RGB":
        notes.append(f"converted {im.mode} to RGB")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def read_image(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read any common image file as 8-bit RGB, upright.

    Returns ``(array (H, W, 3) uint8, notes)`` where ``notes`` says what was converted (EXIF
    rotation, grey, palette, alpha composited on white, 16-bit / float). Raises
    :class:`ImageReadError` (one line: the path, why, what to do) for a missing, unreadable or
    corrupt file, an image above :data:`MAX_PIXELS` (checked before decoding) or a float image
    with NaN / infinite values.
    """
    im, notes = _decode(Path(path))
    return _to_rgb(im, notes), notes


def read_image_rgba(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Read an image file as 8-bit RGB plus its alpha channel, upright, for tools that keep
    transparency (``finpercep sr``).

    Returns ``(rgb (H, W, 3) uint8, alpha (H, W) uint8 or None, notes)``: ``alpha`` is None for an
    image without transparency; ``rgb`` is the straight (not premultiplied, not composited) colour.
    Raises :class:`ImageReadError` as :func:`read_image` does.
    """
    im, notes = _decode(Path(path))
    if not _has_alpha(im):
        return _to_rgb(im, notes), None, notes
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    return rgba[..., :3].copy(), rgba[..., 3].copy(), notes


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


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _host_tag() -> str:
    # The host goes into temporary names so that a folder shared by several machines (NFS) never
    # has a live writer's file taken for a dead one: PIDs are only compared on their own host.
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname() or "host")


_TEMP_RE = re.compile(r"\..+\.(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp")
_swept: set[str] = set()  # folders this process has already cleaned


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # no cheap, harmless liveness probe: keep every temporary
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders (``.NAME.<host>-<pid>.<random>.tmp``) that writers on
    this host left in ``folder`` when they were killed (their PID no longer runs). Temporaries of
    live processes, of other hosts, and anything not named that way are left alone. Returns the
    removed paths. Errors while removing are ignored (another process may be sweeping too)."""
    folder, host, removed = Path(folder), _host_tag(), []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.fullmatch(entry.name)
        if not m or m["host"] != host or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def make_temp_sibling(path: str | Path, *, directory: bool = False) -> Path:
    """Create an empty hidden temporary file (or folder) next to ``path``, named
    ``.NAME.<host>-<pid>.<random>.tmp``, with ordinary permissions (umask), and return it.

    The first call for a folder in a process also removes what killed writers left there
    (:func:`remove_stale_temps`); once per folder, so that writing many files stays linear."""
    path = Path(path)
    if str(path.parent) not in _swept:
        remove_stale_temps(path.parent)
        _swept.add(str(path.parent))
    prefix, parent = f".{path.name}.{_host_tag()}-{os.getpid()}.", str(path.parent)
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; the result is an ordinary folder
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
    return Path(tmp)


def make_parent(path: Path) -> None:
    """Create ``path``'s folder (and its parents). Raises :class:`WriteError` naming ``path``, e.g.
    when a parent is a file, the disk is read-only or permission is denied."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(errno.ENOTDIR, "a parent of it is a file, not a folder", str(path)) from None
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename
    (:func:`make_temp_sibling`). On any failure the temporary file is removed and ``path`` keeps
    its old content; an OSError (disk full, read-only, no permission) is raised as
    :class:`WriteError` naming ``path``."""
    path = Path(path)
    make_parent(path)
    tmp = None
    try:
        tmp = make_temp_sibling(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and tmp.exists():
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def save_png(path: str | Path, img: torch.Tensor | np.ndarray) -> None:
    """Write an image as PNG, atomically: a ``(3, H, W)`` float tensor in [0, 1], or uint8
    ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA or ``(H, W)`` grey (a mask).

    PNG metadata is left out and the compression level fixed, so equal pixels give equal bytes.
    Raises ValueError for another shape or dtype, :class:`WriteError` when the file cannot be written.
    """
    arr = to_uint8(img) if isinstance(img, torch.Tensor) else img
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png expects uint8 (H,W), (H,W,3) or (H,W,4), got {arr.shape} {arr.dtype}")
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


def read_json_object(path: str | Path, hint: str = "") -> dict[str, Any]:
    """The JSON object in the file ``path``. Raises ``ValueError`` in one line naming the file
    (followed by ``hint``, e.g. what to do) when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}){hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}{hint}")
    return data


def safe_relpath(root: Path, rel: str) -> Path:
    """Resolve a path read from a manifest, refusing absolute paths and ``..`` escapes."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"manifest path must be relative and inside its folder, got {rel!r}")
    return root / p


# ---------------------------------------------------------------------------------------------
# Model checkpoints: a folder with config.json + model.safetensors (reward models and policies)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
"""Version of the checkpoint folder format, stored in every ``config.json``."""
KIND_KEYS = ("model_type", "arch")
"""The ``config.json`` field saying what a checkpoint holds: ``model_type`` for FinPercep-RM
(``"finpercep-rm"``), ``arch`` for policies (``"tiny"``, ``"flow"``, ``"rrdbnet"``, ``"upconv7"``,
``"custom"``)."""
_STORED_CONFIG_KEYS = ("finpercep_config", "finpercep_policy")
"""Metadata keys of ``model.safetensors`` holding a copy of ``config.json``: the first is written;
policies saved by finpercep 0.1 used the second."""


def is_pretrained(folder: str | Path) -> bool:
    """True when ``folder`` holds both files of a checkpoint (``config.json`` + ``model.safetensors``)."""
    folder = Path(folder)
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def save_pretrained(
    model: torch.nn.Module | dict[str, torch.Tensor],
    folder: str | Path,
    config: dict[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a checkpoint folder: ``config.json`` (``config`` plus ``format_version``) and
    ``model.safetensors`` (the state dict of ``model``, or ``model`` itself when it is a state
    dict, with a copy of the config in its metadata). Returns ``folder``.

    ``config`` is a JSON object with exactly one field of :data:`KIND_KEYS` (what to build) and
    whatever the builder needs (``"config"``: the architecture dataclass as a dict). ``dtype``
    casts the floating tensors (float16 for a shipped checkpoint); loading casts them back.

    Complete or not at all: a new folder is written under a temporary name and renamed into place.
    An existing folder (it may hold other files, e.g. a stage's ``val.json``) gets the weights, then
    the config, each by a rename; a kill between the two leaves a pair whose stored copy of the
    config differs from ``config.json``, which :func:`load_pretrained` refuses.

    Raises ValueError for a ``config`` without one kind field, :class:`WriteError` naming ``folder``
    when it cannot be written (disk full, read-only, a file in the way).
    """
    from safetensors.torch import save

    if not isinstance(config, dict) or sum(k in config for k in KIND_KEYS) != 1:
        raise ValueError(f"save_pretrained: config must be a dict with exactly one of the fields {KIND_KEYS}, "
                         "naming what the checkpoint holds")
    meta = {**config, "format_version": FORMAT_VERSION}
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in state.items()
    }
    files = {  # written in this order: weights first (see the docstring)
        WEIGHTS_NAME: save(tensors, metadata={_STORED_CONFIG_KEYS[0]: json.dumps(meta, sort_keys=True)}),
        CONFIG_NAME: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    _write_folder(Path(folder), files)
    return Path(folder)


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into ``folder``, complete or not at all (:func:`save_pretrained`)."""
    make_parent(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(errno.ENOTDIR, "it is a file, not a folder", str(folder))
    tmp = None
    try:
        tmp = make_temp_sibling(folder, directory=True)
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if not folder.exists():
            try:
                os.rename(tmp, folder)  # the whole folder appears at once
                return
            except OSError:
                if not folder.is_dir():  # not a concurrent writer's new folder: a real failure
                    raise
        for name in files:
            os.replace(tmp / name, folder / name)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(e.errno, e.strerror or str(e), str(folder)) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_pretrained(
    folder: str | Path, build: Callable[[Any], torch.nn.Module], *, what: str = "finpercep"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_pretrained` into the network ``build`` makes.

    ``build(config)`` gets the parsed ``config.json`` and returns the network it describes (it
    checks the kind field and the architecture, e.g. through :func:`finpercep.config.from_dict`,
    and raises ValueError naming ``config.json``). It is called twice: first under
    ``torch.device("meta")``, so the shapes are checked before anything is allocated, then for real.
    ``what`` names the kind of checkpoint in messages (``"FinPercep-RM"``, ``"policy"``).

    Returns ``(network, config)``: the network as ``build`` made it (device, dtype, mode) with the
    weights loaded strictly (cast to its dtypes), and the config. Raises, each in one line:
    FileNotFoundError when a file is missing; ValueError when ``config.json`` is not JSON or has
    another ``format_version``, when ``build`` refuses it, when ``model.safetensors`` is truncated,
    damaged or not safetensors (a pickle is refused, never unpickled), when its stored copy of the
    config differs from ``config.json`` (an interrupted overwrite), or when its tensor names or
    shapes differ from those the config describes (a hand-edited ``channels: 200000`` fails
    before 1.4 TB are allocated).
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a {what} checkpoint: {p} is missing (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')} is not supported "
                         f"(expected {FORMAT_VERSION}); load it with the finpercep version that wrote it")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build(meta).state_dict().items()}
    stored, state = _read_safetensors(w_path)
    edited = any(key in stored and _json_or_none(stored[key]) != meta for key in _STORED_CONFIG_KEYS)
    have = {k: tuple(v.shape) for k, v in state.items()}
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        also = f"; {CONFIG_NAME} also does not match the config stored in {WEIGHTS_NAME} (edited?)" if edited else ""
        raise ValueError(f"{w_path}: weights do not match {CONFIG_NAME}: {len(diff)} tensors differ, e.g. {diff[0]!r} "
                         f"is {want.get(diff[0])} in the config and {have.get(diff[0])} in the file{also}")
    if edited:
        raise ValueError(f"{folder}: {CONFIG_NAME} does not match the config stored in {WEIGHTS_NAME} "
                         "(interrupted save?); save the checkpoint again")
    model = build(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not match {CONFIG_NAME}: {e}") from None
    return model, meta


def read_weights(folder: str | Path, *, what: str = "finpercep") -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors`` (on CPU, as stored), for loading into a network
    built by hand (a user's own policy). Raises FileNotFoundError when the file is missing and
    ValueError (one line) when it is not a complete safetensors file (never unpickled)."""
    w_path = Path(folder) / WEIGHTS_NAME
    if not w_path.is_file():
        raise FileNotFoundError(f"not a {what} checkpoint: {w_path} is missing")
    return _read_safetensors(w_path)[1]


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors (CPU) of the safetensors file ``path``. Raises ValueError in one line
    for a file that is truncated, damaged or of another format (a pickle is never unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e}); the checkpoint is damaged or was "
                         "not written by finpercep: save or copy it again") from None


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None



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


def read_latest_checkpoint(run: str | Path, keys: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
    """:func:`latest_checkpoint` for resuming a run: a ``trainer.pt`` that cannot be read (truncated,
    damaged, or a pickle of Python objects, which ``weights_only`` refuses unread) or that is not a
    mapping with every one of ``keys`` raises ValueError in one line naming the file and what to do."""
    import pickle

    try:
        found = latest_checkpoint(run)
        ok = found is None or isinstance(found[1], dict) and set(keys) <= set(found[1])
        problem = None if ok else "not a finpercep trainer state"
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError ... on bad files
        found = None
        problem = "it holds Python objects, refused unread" if isinstance(e, pickle.UnpicklingError) \
            else f"truncated or damaged: {type(e).__name__}"
    if problem is not None:
        folder = Path(run) / CKPT_DIR / (Path(run) / CKPT_DIR / "LATEST").read_text().strip()
        raise ValueError(f"{folder / 'trainer.pt'}: cannot resume from it ({problem}); delete {folder} "
                         "and rerun to train without it, or choose a new --out")
    return found


def append_jsonl(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one JSON object as a line (a training run's ``metrics.jsonl``). Raises
    :class:`WriteError` naming ``path`` when it cannot be written (disk full, read-only ...)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from None


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
