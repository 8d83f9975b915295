"""Real photographs for HR crops: Debian wallpaper packages, or the photos bundled in Python wheels.

No standard SR benchmark (DIV2K, Set5, ...) can be installed offline, so the
default HR images are real photographs shipped in Debian packages. ``DEBIAN_PHOTOS`` below is the
source of truth: every entry was checked by eye to be a photograph (not a drawing or a render) and
its licence read from the package's ``usr/share/doc/PKG/copyright`` (and, where that file only has
a blanket entry, from the per-image metadata shipped next to it). The result is therefore the same
on every machine: the packages are only a transport.

The JPEGs are compressed at about 1-2 bits per pixel, so each Debian photo is halved with an
anti-aliased LANCZOS filter (the filter Real-ESRGAN's ``scripts/generate_multiscale_DF2K.py``
uses to make its multi-scale HR set, Wang et al. 2021), which hides most of the JPEG artifacts.
Wheel photos are small PNG/JPEG files and are halved only when the result keeps a short side of at
least ``WHEEL_MIN_SHORT_SIDE`` pixels (in practice none of them is).

Output layout (``fetch_photos(out)``)::

    out/photos.jsonl               one JSON object per photo (see PhotoRecord)
    out/train/<name>.png           8-bit RGB PNG
    out/val/<name>.png
    out/test/<name>.png
    out/.cache/                    only while downloading; removed afterwards

The split (``SPLITS``) is fixed by name: ``val`` and ``test`` photos are never used for training.

``add_photo_folders(out, root, include=...)`` (``finpercep photos add``) makes a second kind of
folder, split by *source*: each known sub-folder of ``root`` (``FOLDER_SOURCES``: Sun_Hays80,
BSD68, Set14, Set5) is one photo source, either a training source (a few of its photos validate)
or a test source kept out of training whole; a ``fetch_photos`` folder can join as a training
source. Same layout and manifest; ``fetch_photos`` refuses to write into such a folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from finpercep.io import ImageReadError, atomic_write_bytes, read_image, safe_relpath, save_png

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
Source = Literal["auto", "debian", "wheels"]

MANIFEST_NAME = "photos.jsonl"
CACHE_DIR_NAME = ".cache"
# Wheel photos are already small (300-600 px); halving them below this short side would leave
# too little room for 256 px HR crops, so they are halved only when they stay at least this big.
WHEEL_MIN_SHORT_SIDE = 384
# apt-get download of the biggest package (94 MB) takes seconds on a mirror; allow slow links.
APT_TIMEOUT_S = 900


class PhotosUnavailable(RuntimeError):
    """A photo source cannot be used on this machine (no apt-get/dpkg-deb, no network, ...)."""


@dataclass(frozen=True)
class PhotoSource:
    """One photograph inside a package.

    ``package`` is a Debian package (``kind="debian"``, ``member`` a path inside the ``.deb``) or a
    Python distribution (``kind="wheel"``, ``module`` its import name and ``member`` a path inside
    the module's folder). ``sha256`` is the first 16 hex digits of the file's SHA-256 in the package
    version we checked (given in ``DEBIAN_VERSIONS_CHECKED``); a mismatch is logged, not fatal.
    """

    name: str
    kind: Literal["debian", "wheel"]
    package: str
    member: str
    licence: str
    author: str
    sha256: str = ""
    module: str = ""


@dataclass(frozen=True)
class PhotoRecord:
    """One fetched photo, as written to ``photos.jsonl``.

    Sizes are ``[width, height]`` in pixels; ``file`` is the PNG path relative to the output folder;
    ``scale`` is the downscaling factor applied (2 = halved, 1 = kept); ``sha256`` is the full
    SHA-256 of the source file that was read. For ``source="folder"`` (``finpercep photos add``),
    ``package`` is the photo source (the folder name, e.g. ``Sun_Hays80``), ``package_version`` is
    empty, ``member`` the file's path relative to the ``--from`` folder, and ``licence`` / ``author``
    the source's terms and origin from :data:`FOLDER_SOURCES`.
    """

    name: str
    split: Split
    file: str
    source: Literal["debian", "wheel", "folder"]
    package: str
    package_version: str
    member: str
    original_size: list[int]
    saved_size: list[int]
    scale: int
    licence: str
    author: str
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PhotoRecord:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------
# The table (source of truth). Checked on Debian 12 (bookworm) with the versions below.
# Left out on purpose (not photographs): lomiri 16.04 umang_by_Abhishek_Mudgal (gradient render)
# and analogpattern_by_Peter_Nerlich (texture under a synthetic colour overlay); lomiri 20.04
# Fossa, Infinite-Sea, Painting-Colors (renders); mate abstract/ and desktop/ (drawings; the
# Elephants are a drawing); palapeli backgrounds/ (tiled textures); plasma Autumn, SafeLanding
# (paintings), Flow, Honeywave, PastelHills, Shell, Volna, Altai, ... (renders). Plasma "Kite" is
# a real sky photo with a small drawn kite; kept.
# --------------------------------------------------------------------------------------------
DEBIAN_VERSIONS_CHECKED: dict[str, str] = {
    "plasma-workspace-wallpapers": "4:5.27.5-2",
    "mate-backgrounds": "1.26.0-1",
    "lomiri-wallpapers-16.04": "20.04.0-2",
    "lomiri-wallpapers-20.04": "20.04.0-2",
    "palapeli-data": "4:22.12.3-1",
}

_LOMIRI = "usr/share/backgrounds/"
_MATE = "usr/share/backgrounds/mate/nature/"
_PALA = "usr/share/palapeli/collection/"
_PLASMA_LIC = "GPL-2+ (debian/copyright) / LGPL-3.0 (upstream metadata.json)"


def _plasma(name: str, folder: str, author: str, sha: str) -> PhotoSource:
    member = f"usr/share/wallpapers/{folder}/contents/images/2560x1600.jpg"
    return PhotoSource(name, "debian", "plasma-workspace-wallpapers", member, _PLASMA_LIC, author, sha)


DEBIAN_PHOTOS: tuple[PhotoSource, ...] = (
    # lomiri-wallpapers-16.04: licences per file in usr/share/doc/lomiri-wallpapers-16.04/copyright
    PhotoSource("bridge", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0", "Sander Klootwijk", "bd86b081f9975e2b"),
    PhotoSource("dragonfly", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0", "Bolly", "af5af17841009732"),
    PhotoSource("picture-0b", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "Picture_0B_by_freespace.jpg", "CC-BY-4.0", "Trevor 'Freespace'", "c8c0ab18e48d9e04"),
    PhotoSource("picture-1a", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "Picture_1A_by_freespace.jpg", "CC-BY-4.0", "Trevor 'Freespace'", "89e86af38d04daae"),
    PhotoSource("wine", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0", "Jakub Mede", "d2e96e6d4da40dd8"),
    PhotoSource("aitzgorri", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi", "66268e7b48f8854d"),
    PhotoSource("free", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich", "85a5453c2fed514c"),
    PhotoSource("friends", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi", "cc40e313c74e421e"),
    PhotoSource("greentock", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "greentock_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich", "e7b20e2db9dcd6e2"),
    PhotoSource("life", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi", "4c119350ead80201"),
    PhotoSource("picosdeeuropa", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi", "414d0072b2f6f2c5"),
    PhotoSource("seeding", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "seeding_by_Clements_Engelhardt.jpg", "CC0-1.0", "Clemens Engelhardt", "a5634d1ab5e41a35"),
    PhotoSource("sunset", "debian", "lomiri-wallpapers-16.04", _LOMIRI + "sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi", "474dab6a4b9f94dc"),
    # lomiri-wallpapers-20.04 (same copyright file)
    PhotoSource("kleiber", "debian", "lomiri-wallpapers-20.04", _LOMIRI + "Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0", "Lukas Baubkus", "6572410c09f4492c"),
    # mate-backgrounds nature/: GPL-2+ per usr/share/doc/mate-backgrounds/copyright
    PhotoSource("aqua", "debian", "mate-backgrounds", _MATE + "Aqua.jpg", "GPL-2+", "Charles Barbin", "5c30118205982da4"),
    PhotoSource("blinds", "debian", "mate-backgrounds", _MATE + "Blinds.jpg", "GPL-2+", "Lennart Poettering, Andrea Cimitan", "f7aac0dcc2e06d04"),
    PhotoSource("dune", "debian", "mate-backgrounds", _MATE + "Dune.jpg", "GPL-2+", "Marco Cogoni, Hylke Bons", "8a67c2cb0be8c46b"),
    PhotoSource("freshflower", "debian", "mate-backgrounds", _MATE + "FreshFlower.jpg", "GPL-2+", "Jens Ansorg", "972b0a0c4e5e3fa9"),
    PhotoSource("garden", "debian", "mate-backgrounds", _MATE + "Garden.jpg", "GPL-2+", "Charles Barbin", "d3095ee09d425ef2"),
    PhotoSource("greenmeadow", "debian", "mate-backgrounds", _MATE + "GreenMeadow.jpg", "GPL-2+", "Timothy Schellhase, Lapo Calamandrei", "8fa0de0aa4089f73"),
    PhotoSource("ladybird", "debian", "mate-backgrounds", _MATE + "LadyBird.jpg", "GPL-2+", "Charles Barbin", "e35a9a4126ef969c"),
    PhotoSource("raindrops", "debian", "mate-backgrounds", _MATE + "RainDrops.jpg", "GPL-2+", "blackcombwhistler07", "3e4ea9671c28c90a"),
    PhotoSource("storm", "debian", "mate-backgrounds", _MATE + "Storm.jpg", "GPL-2+", "Sergey Nazarov", "77ca53077831d323"),
    PhotoSource("twowings", "debian", "mate-backgrounds", _MATE + "TwoWings.jpg", "GPL-2+", "Charles Barbin, Hylke Bons", "665e5abf8a539907"),
    PhotoSource("wood", "debian", "mate-backgrounds", _MATE + "Wood.jpg", "GPL-2+", "Jean-François Fortin Tam", "19c78500ac00a622"),
    PhotoSource("yellowflower", "debian", "mate-backgrounds", _MATE + "YellowFlower.jpg", "GPL-2+", "Charles Barbin", "254da96256acb7ad"),
    # palapeli-data collection/: debian/copyright has only "Files: * GPL-2+"; the licence below is
    # the per-image one in the .desktop file next to each photo (Wikimedia Commons originals).
    PhotoSource("castle-maintenon", "debian", "palapeli-data", _PALA + "castle-maintenon.jpg", "GFDL (upstream .desktop) / GPL-2+ (debian/copyright)", "Eric Pouhier", "f4a6bf48b97d9771"),
    PhotoSource("cincinnati-bridge", "debian", "palapeli-data", _PALA + "cincinnati-bridge.jpg", "public domain (upstream .desktop)", "Derek Jensen", "09772d09318b34a5"),
    PhotoSource("citrus-fruits", "debian", "palapeli-data", _PALA + "citrus-fruits.jpg", "public domain (upstream .desktop)", "US Department of Agriculture", "0cbd7154a1478980"),
    PhotoSource("european-honey-bee", "debian", "palapeli-data", _PALA + "european-honey-bee.jpg", "public domain (upstream .desktop)", "John Severns", "9d54ae706bddd899"),
    PhotoSource("panther-chameleon-female", "debian", "palapeli-data", _PALA + "panther-chameleon-female.jpg", "GFDL (upstream .desktop) / GPL-2+ (debian/copyright)", "B. Navez and others", "adb9e2834a8a3db4"),
    # plasma-workspace-wallpapers: debian/copyright says GPL-2+ for all files; each wallpaper's
    # metadata.json says LGPLv3. The other image sizes in the package are symlinks to this file.
    _plasma("bythewater", "BytheWater", "Maciej Wiklo", "c272434ef39f2abf"),
    _plasma("coldripple", "ColdRipple", "Risto Saukonpää", "05bef6722fc0ed81"),
    _plasma("colorfulcups", "ColorfulCups", "Dmitri Popov", "6e0f3a72feb5a4a9"),
    _plasma("darkesthour", "DarkestHour", "Risto Saukonpää", "8e3703fae3a3c217"),
    _plasma("eveningglow", "EveningGlow", "Ian Hex", "586682dcb362b9f6"),
    _plasma("fallenleaf", "FallenLeaf", "Martin Klapetek", "95603a6560c7e8d5"),
    _plasma("grey", "Grey", "Sigi Sagi", "88c31d8944b7e693"),
    _plasma("kite", "Kite", "Risto Saukonpää", "bdca288ce296a981"),
    _plasma("onestandsout", "OneStandsOut", "Risto Saukonpää", "cb507baf1dafdcae"),
    _plasma("path", "Path", "Risto Saukonpää", "7477457d7f17b736"),
    _plasma("summer-1am", "summer_1am", "Risto Saukonpää", "c868b50789591dd4"),
)

# Photos bundled in Python wheels: the offline fallback. Only colour photographs that ship inside
# the wheel (scikit-image's other images either need a download or are grey/microscopy/space).
# motorcycle_right is left out: it is the stereo twin of motorcycle_left, a near duplicate.
WHEEL_PHOTOS: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", "wheel", "scikit-image", "data/astronaut.png", "public domain (NASA)", "NASA", module="skimage"),
    PhotoSource("chelsea", "wheel", "scikit-image", "data/chelsea.png", "CC0-1.0", "Stefan van der Walt", module="skimage"),
    PhotoSource("coffee", "wheel", "scikit-image", "data/coffee.png", "CC0-1.0", "Rachel Michetti", module="skimage"),
    PhotoSource("rocket", "wheel", "scikit-image", "data/rocket.jpg", "public domain (SpaceX)", "SpaceX", module="skimage"),
    PhotoSource("motorcycle-left", "wheel", "scikit-image", "data/motorcycle_left.png", "Middlebury 2014 stereo data set (research use)", "Scharstein et al., Middlebury College", module="skimage"),
    PhotoSource("grace-hopper", "wheel", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)", "US Navy", module="matplotlib"),
    # Only when scikit-learn happens to be installed (it is not a dependency).
    PhotoSource("china", "wheel", "scikit-learn", "datasets/images/china.jpg", "CC-BY-2.0 (sklearn/datasets/images/README.txt)", "danielbuechele (Flickr)", module="sklearn"),
    PhotoSource("flower", "wheel", "scikit-learn", "datasets/images/flower.jpg", "CC-BY-2.0 (sklearn/datasets/images/README.txt)", "vultilion (Flickr)", module="sklearn"),
)

# The fixed split, by name. val/test are never used for training; each split mixes sources and
# content (landscape, macro, animal, architecture, objects, night). Debian: 30 / 6 / 6.
SPLITS: dict[Split, tuple[str, ...]] = {
    "train": (
        # Debian
        "bridge", "dragonfly", "picture-0b", "wine", "aitzgorri", "free", "greentock", "life",
        "seeding", "sunset", "aqua", "blinds", "dune", "freshflower", "garden", "greenmeadow",
        "storm", "twowings", "wood", "yellowflower", "citrus-fruits", "panther-chameleon-female",
        "bythewater", "coldripple", "darkesthour", "eveningglow", "fallenleaf", "kite",
        "onestandsout", "summer-1am",
        # wheels
        "astronaut", "coffee", "rocket", "motorcycle-left", "china",
    ),
    "val": (
        "european-honey-bee", "cincinnati-bridge", "grey", "picosdeeuropa", "picture-1a", "raindrops",
        "chelsea", "flower",
    ),
    "test": (
        "kleiber", "castle-maintenon", "colorfulcups", "path", "ladybird", "friends",
        "grace-hopper",
    ),
}


def split_of(name: str) -> Split:
    """The fixed split (``train``/``val``/``test``) of a photo name; ``KeyError`` if unlisted."""
    for split, names in SPLITS.items():
        if name in names:
            return split
    raise KeyError(f"photo {name!r} is not in finpercep.data.photos.SPLITS")


def halving_factor(width: int, height: int, min_short_side: int = 0) -> int:
    """2 if halving keeps the short side >= ``min_short_side`` pixels, else 1 (keep as is)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return 2 if min(width, height) // 2 >= min_short_side and min(width, height) >= 2 else 1


def downscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """Anti-aliased downscale of an (H, W, 3) uint8 image by an integer ``factor`` (LANCZOS).

    Odd edges are cropped first (last row/column) so the scale is exactly ``factor``. LANCZOS is
    what Real-ESRGAN uses to make multi-scale HR images (``scripts/generate_multiscale_DF2K.py``).
    """
    if factor == 1:
        return arr
    h, w = arr.shape[:2]
    h2, w2 = h // factor, w // factor
    im = Image.fromarray(np.ascontiguousarray(arr[: h2 * factor, : w2 * factor]))
    return np.asarray(im.resize((w2, h2), Image.Resampling.LANCZOS), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def fetch_photos(out: str | Path, *, source: Source = "auto", progress: bool = True) -> list[PhotoRecord]:
    """Fetch the listed real photos into ``out/<split>/<name>.png`` and write ``out/photos.jsonl``.

    ``source``: ``"debian"`` downloads the packages of ``DEBIAN_PHOTOS`` with ``apt-get download``
    (runs ``apt-get update`` once if the package lists are missing) and extracts them with
    ``dpkg-deb -x`` in ``out/.cache`` (deleted afterwards); ``"wheels"`` reads ``WHEEL_PHOTOS``
    from the installed Python packages (offline); ``"auto"`` keeps a complete earlier result of
    either source, else tries Debian and falls back to the wheels with a logged warning.

    Idempotent: photos already listed in the manifest whose PNG exists are not fetched again, and
    a package is downloaded only if one of its photos is missing. Returns the records in table
    order. Raises :class:`PhotosUnavailable` if ``source="debian"`` and Debian cannot be used.
    """
    if source not in ("auto", "debian", "wheels"):
        raise ValueError(f"source must be 'auto', 'debian' or 'wheels', got {source!r}")
    out = Path(out).resolve()  # apt-get and dpkg-deb run in other working folders
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out must be a folder, but {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    existing = _read_manifest(out)
    if any(r.source == "folder" for r in existing.values()):
        raise ValueError(f"{out} holds a `finpercep photos add` folder (source-disjoint split); "
                         "fetch into another folder and pass it to `photos add --include`")

    if source == "auto":
        for kind in ("debian", "wheel"):
            if _is_complete(out, existing, kind):
                log.info("photos already fetched from %s sources in %s; nothing to do", kind, out)
                return [existing[s.name] for s in _expected(kind) if s.name in existing]
    if source in ("auto", "debian"):
        try:
            return _fetch(out, "debian", existing, progress)
        except PhotosUnavailable as e:
            if source == "debian":
                raise
            log.warning(
                "Debian photos unavailable (%s); falling back to the photos bundled in Python wheels "
                "(scikit-image, matplotlib, scikit-learn if installed): fewer and smaller photos.", e
            )
    return _fetch(out, "wheel", existing, progress)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------
def _expected(kind: str) -> tuple[PhotoSource, ...]:
    """The photos a source can give on this machine (wheel photos of missing modules left out)."""
    if kind == "debian":
        return DEBIAN_PHOTOS
    return tuple(s for s in WHEEL_PHOTOS if _wheel_file(s) is not None)


def _is_complete(out: Path, records: dict[str, PhotoRecord], kind: str) -> bool:
    expected = _expected(kind)
    return bool(expected) and all(_is_done(out, records.get(s.name), s) for s in expected)


def _is_done(out: Path, rec: PhotoRecord | None, src: PhotoSource) -> bool:
    return (
        rec is not None
        and rec.source == src.kind
        and rec.member == src.member
        and rec.split == split_of(src.name)
        and rec.file == f"{split_of(src.name)}/{src.name}.png"
        and (out / rec.file).is_file()
    )


def _read_manifest(out: Path) -> dict[str, PhotoRecord]:
    """Records of an earlier run by name; a damaged manifest is ignored (everything refetched)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return {}
    records: dict[str, PhotoRecord] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                rec = PhotoRecord.from_json(json.loads(line))
                records[rec.name] = rec
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable %s (%s); photos will be fetched again", path, e)
        return {}
    return records


def _write_manifest(out: Path, records: Iterable[PhotoRecord]) -> None:
    text = "".join(json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(out / MANIFEST_NAME, text.encode("utf-8"))


def _fetch(out: Path, kind: Literal["debian", "wheel"], existing: dict[str, PhotoRecord], progress: bool) -> list[PhotoRecord]:
    """Fetch every missing photo of one source; rewrite the manifest after each package."""
    from tqdm.auto import tqdm

    expected = _expected(kind)
    if not expected:
        raise PhotosUnavailable(f"no {kind} photos can be found on this machine")
    if kind == "debian":
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise PhotosUnavailable(f"{tool} is not installed (not a Debian/Ubuntu machine?)")
    done = {s.name: existing[s.name] for s in expected if _is_done(out, existing.get(s.name), s)}
    _remove_stale(out, existing, keep=set(done))
    todo = [s for s in expected if s.name not in done]
    by_package: dict[str, list[PhotoSource]] = {}
    for s in todo:
        by_package.setdefault(s.package, []).append(s)

    apt_state: dict[str, bool] = {"updated": False}
    bar = tqdm(total=len(expected), initial=len(done), desc=f"photos ({kind})", unit="photo", disable=not progress)
    try:
        for package, sources in by_package.items():
            bar.set_postfix_str(package)
            if kind == "debian":
                try:
                    fetched = _fetch_debian_package(out, package, sources, bar, apt_state)
                except PhotosUnavailable as e:  # one package failing does not lose the others
                    log.warning("skipping Debian package %s: %s", package, e)
                    continue
            else:
                fetched = []
                for s in sources:
                    path = _wheel_file(s)
                    assert path is not None  # _expected() keeps only photos whose file exists
                    fetched.append(_save_photo(out, s, path, _dist_version(s.package), WHEEL_MIN_SHORT_SIDE))
                    bar.update(1)
            done.update((r.name, r) for r in fetched)
            _write_manifest(out, (done[s.name] for s in expected if s.name in done))
    finally:
        bar.close()
        shutil.rmtree(out / CACHE_DIR_NAME, ignore_errors=True)

    if not done:
        raise PhotosUnavailable(f"none of the {kind} photos could be fetched")
    missing = [s.name for s in expected if s.name not in done]
    if missing:
        log.warning("%d of %d %s photos could not be fetched: %s", len(missing), len(expected), kind, ", ".join(missing))
    records = [done[s.name] for s in expected if s.name in done]
    mp = sum(r.saved_size[0] * r.saved_size[1] for r in records) / 1e6
    log.info("%d %s photos (%.1f megapixels) in %s", len(records), kind, mp, out)
    return records


def _remove_stale(out: Path, existing: dict[str, PhotoRecord], keep: set[str]) -> None:
    """Delete PNGs an earlier run wrote that this run will not keep (e.g. another source)."""
    for name, rec in existing.items():
        if name not in keep:
            try:
                path = safe_relpath(out, rec.file)
            except ValueError:
                continue
            if path.is_file():
                path.unlink()


def _save_photo(out: Path, src: PhotoSource, path: Path, package_version: str, min_short_side: int) -> PhotoRecord:
    """Read one source file, downscale it, and write ``out/<split>/<name>.png`` atomically."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if src.sha256 and not sha.startswith(src.sha256):
        log.warning("%s: %s differs from the version we checked (sha256 %s..., expected %s...)", src.name, src.member, sha[:16], src.sha256)
    arr, notes = read_image(path)
    for note in notes:
        log.info("%s: %s", src.name, note)
    h, w = arr.shape[:2]
    factor = halving_factor(w, h, min_short_side)
    small = downscale(arr, factor)
    split = split_of(src.name)
    rel = f"{split}/{src.name}.png"
    save_png(out / rel, small)
    return PhotoRecord(
        name=src.name, split=split, file=rel, source=src.kind, package=src.package,
        package_version=package_version, member=src.member, original_size=[int(w), int(h)],
        saved_size=[int(small.shape[1]), int(small.shape[0])], scale=factor,
        licence=src.licence, author=src.author, sha256=sha,
    )


# ---- Debian ------------------------------------------------------------------------------------
def _run(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command (no shell); a missing program becomes :class:`PhotosUnavailable`."""
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except FileNotFoundError:
        raise PhotosUnavailable(f"{cmd[0]} is not installed (not a Debian/Ubuntu machine?)") from None
    except subprocess.TimeoutExpired:
        raise PhotosUnavailable(f"{' '.join(cmd)} took more than {APT_TIMEOUT_S} s") from None


def _apt_download(package: str, cwd: Path, apt_state: dict[str, bool]) -> Path:
    """``apt-get download PACKAGE`` into ``cwd``; on failure runs ``apt-get update`` (once per
    fetch, remembered in ``apt_state``) and retries."""
    res = _run(["apt-get", "download", package], cwd)
    if res.returncode != 0 and not apt_state.get("updated"):
        apt_state["updated"] = True
        log.info("apt-get download %s failed (%s); running apt-get update and retrying", package, _last_line(res.stderr))
        upd = _run(["apt-get", "update"], cwd)
        if upd.returncode != 0:
            raise PhotosUnavailable(f"apt-get update failed ({_last_line(upd.stderr)}); it needs root and network access to a Debian mirror")
        res = _run(["apt-get", "download", package], cwd)
    if res.returncode != 0:
        raise PhotosUnavailable(f"apt-get download {package} failed: {_last_line(res.stderr)}")
    debs = sorted(cwd.glob(f"{package}_*.deb"))
    if not debs:
        raise PhotosUnavailable(f"apt-get download {package} succeeded but left no .deb in {cwd}")
    return debs[-1]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("E:")] or text.strip().splitlines()
    return lines[-1] if lines else "no error message"


def _fetch_debian_package(out: Path, package: str, sources: list[PhotoSource], bar: Any, apt_state: dict[str, bool]) -> list[PhotoRecord]:
    """Download and extract one package in ``out/.cache``, save its listed photos, delete the rest."""
    cache = out / CACHE_DIR_NAME
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{package}.", dir=cache) as tmp:
        tmpdir = Path(tmp)
        deb = _apt_download(package, tmpdir, apt_state)
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], tmpdir).stdout.strip()
        if version != DEBIAN_VERSIONS_CHECKED.get(package):
            log.info("%s: version %s (table checked with %s)", package, version, DEBIAN_VERSIONS_CHECKED.get(package))
        tree = tmpdir / "tree"
        res = _run(["dpkg-deb", "-x", str(deb), str(tree)], tmpdir)
        if res.returncode != 0:
            raise PhotosUnavailable(f"dpkg-deb -x {deb.name} failed: {_last_line(res.stderr)}")
        deb.unlink()  # the extracted tree is all we need from here on
        records = []
        for s in sources:
            path = tree / s.member
            if not path.is_file():
                log.warning("%s %s has no %s; skipping photo %s", package, version, s.member, s.name)
            else:
                try:
                    records.append(_save_photo(out, s, path, version, 0))
                except ImageReadError as e:
                    log.warning("skipping photo %s: %s", s.name, e)
            bar.update(1)
    return records


# ---- wheels ------------------------------------------------------------------------------------
def _module_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _wheel_file(src: PhotoSource) -> Path | None:
    """The photo's file inside its installed package, or None (not installed / not shipped)."""
    base = _module_dir(src.module)
    path = base / src.member if base is not None else None
    if path is None or not path.is_file():
        log.debug("%s: %s not found in an installed %s", src.name, src.member, src.package)
        return None
    return path


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Photo folders as whole sources: the photo-source-disjoint split (`finpercep photos add`)
# --------------------------------------------------------------------------------------------
SourceRole = Literal["train", "test"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderSource:
    """A folder of photos taken as one photo source of the source-disjoint split.

    Fields:
        folder: the sub-folder of the ``--from`` folder that holds the photos.
        prefix: photo names are ``<prefix>-<file stem>`` (lower case), unique across sources.
        role: ``"train"``: a training source, of which every ``val_every``-th photo in file-name
            order goes to ``val``; ``"test"``: a held-out source, all of it in ``test``.
        val_every: see ``role``; 0 = no validation photos.
        halve: halve each photo with the anti-aliased LANCZOS filter (:func:`downscale`), as the
            Debian photos are, to hide JPEG artifacts.
        terms: licence or terms of use, recorded as ``licence``.
        origin: who made the photos and where they were published, recorded as ``author``.
        count: photos the folder is expected to hold (another count is logged, not fatal).
    """

    folder: str
    prefix: str
    role: SourceRole
    val_every: int
    halve: bool
    terms: str
    origin: str
    count: int


_NO_LICENCE = "research benchmark; no explicit licence (research use only)"

# The sources of ../shared/photos (a copy of majedelhelou/denoising_datasets, colour folders).
# Sun_Hays80 trains (every 10th photo by name validates: 8 of 80); BSD68, Set14 and Set5 are whole
# sources kept out of training for testing.
FOLDER_SOURCES: dict[str, FolderSource] = {
    "Sun_Hays80": FolderSource(
        "Sun_Hays80", "sunhays80", "train", 10, True, _NO_LICENCE,
        "Sun & Hays, scene-matching SR benchmark (ICCP 2012)", 80,
    ),
    "BSD68": FolderSource(
        "BSD68", "bsd68", "test", 0, False, "Berkeley Segmentation Dataset: non-commercial research and education",
        "Martin et al., ICCV 2001; the BSD68 split of Roth & Black", 68,
    ),
    "Set14": FolderSource("Set14", "set14", "test", 0, False, _NO_LICENCE, "Zeyde et al., 2010", 11),
    "Set5": FolderSource("Set5", "set5", "test", 0, False, _NO_LICENCE, "Bevilacqua et al., BMVC 2012", 5),
}


def fetched_split_in_source_scheme(name: str) -> Split:
    """Split of a Debian / wheel photo (``finpercep photos fetch``) in the source-disjoint scheme.

    Its source trains, so its ``val`` photos stay ``val`` and its ``test`` photos join ``train``
    (the held-out test photos are whole other sources). ``KeyError`` if ``name`` is not a listed photo.
    """
    return "val" if split_of(name) == "val" else "train"


def folder_photo_name(src: FolderSource, file: Path) -> str:
    """``<prefix>-<stem>`` in lower case, characters other than ``a-z 0-9 _ -`` replaced by ``-``."""
    stem = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "-" for c in file.stem.lower())
    return f"{src.prefix}-{stem}"


def folder_split(src: FolderSource, index: int) -> Split:
    """Split of the ``index``-th photo (0-based, file-name order) of folder source ``src``."""
    if src.role == "test":
        return "test"
    return "val" if src.val_every and (index + 1) % src.val_every == 0 else "train"


@dataclass(frozen=True)
class _Planned:
    """One photo ``add_photo_folders`` will hold: where it comes from and the record it gets."""

    record: PhotoRecord
    path: Path  # the file to read: a photo of a source folder, or a PNG of the --include folder
    copy: bool  # True: copy the PNG bytes as they are (an --include photo, already downscaled)
    halve: bool


def add_photo_folders(
    out: str | Path, root: str | Path, *, include: str | Path | None = None, progress: bool = True
) -> list[PhotoRecord]:
    """Take the photo folders of ``root`` as whole sources and split them by source.

    Each sub-folder of ``root`` named in :data:`FOLDER_SOURCES` is one source: a training source
    goes to ``out/train`` (every ``val_every``-th photo to ``out/val``), a test source wholly to
    ``out/test``, so no test photo comes from a source the model trained on. ``include`` is an
    optional folder made by ``finpercep photos fetch``: its photos (Debian wallpapers, or the
    wheel fallback) join as a training source (:func:`fetched_split_in_source_scheme`), copied
    as they are. Writes ``out/<split>/<name>.png`` and ``out/photos.jsonl`` (:class:`PhotoRecord`,
    ``source="folder"`` for folder photos, with the source's terms and the halving in ``scale``).

    Idempotent: a photo whose record and PNG exist is not read again; photos of an earlier run
    that this run does not hold are deleted. Other sub-folders of ``root`` are skipped with a
    warning. Raises NotADirectoryError for a missing ``root``, ValueError when ``root`` holds
    none of the sources, ``include`` has no ``photos.jsonl`` or is ``out`` itself.
    """
    from tqdm.auto import tqdm

    root, out = Path(root).resolve(), Path(out).resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"--from {root}: no such folder of photo folders")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out must be a folder, but {out} is a file")
    plan = _plan_include(Path(include).resolve(), out) if include is not None else []
    plan += _plan_folders(root)
    names = [p.record.name for p in plan]
    if len(names) != len(set(names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"photo names occur twice: {', '.join(dup[:5])}; rename the files")
    out.mkdir(parents=True, exist_ok=True)
    existing = _read_manifest(out)

    done: dict[str, PhotoRecord] = {}
    todo = []
    for p in plan:
        rec = existing.get(p.record.name)
        same = rec is not None and (rec.source, rec.member, rec.split, rec.file, rec.package) == (
            p.record.source, p.record.member, p.record.split, p.record.file, p.record.package)
        if same and (out / p.record.file).is_file():
            done[p.record.name] = rec
        else:
            todo.append(p)
    _remove_stale(out, existing, keep=set(done))
    for p in tqdm(todo, desc="photos (folders)", unit="photo", disable=not progress):
        done[p.record.name] = _produce(out, p)
        if len(done) % 20 == 0:  # resumable: the manifest follows the work
            _write_manifest(out, (done[n] for n in names if n in done))
    records = [done[n] for n in names]
    _write_manifest(out, records)
    counts = {k: sum(r.split == k for r in records) for k in ("train", "val", "test")}
    log.info("%d photos in %s: %s", len(records), out, counts)
    return records


def _plan_include(include: Path, out: Path) -> list[_Planned]:
    """The photos of a ``photos fetch`` folder, re-split as a training source."""
    if include == out:
        raise ValueError(f"--include {include} is --out itself; fetch into another folder")
    existing = _read_manifest(include)
    if not existing:
        raise ValueError(f"--include {include}: no {MANIFEST_NAME}; make it with `finpercep photos fetch --out {include}`")
    plan = []
    for rec in existing.values():
        if rec.source == "folder":
            raise ValueError(f"--include {include} is a `photos add` folder; pass a `photos fetch` folder")
        split = fetched_split_in_source_scheme(rec.name)
        new = PhotoRecord.from_json({**rec.to_json(), "split": split, "file": f"{split}/{rec.name}.png"})
        plan.append(_Planned(new, safe_relpath(include, rec.file), copy=True, halve=False))
    return plan


def _plan_folders(root: Path) -> list[_Planned]:
    """The photos of every known source folder under ``root``, in table then file-name order."""
    present = {d.name for d in root.iterdir() if d.is_dir()}
    unknown = sorted(present - set(FOLDER_SOURCES))
    if unknown:
        log.warning("skipping folders of %s that are no known photo source: %s (known: %s)",
                    root, ", ".join(unknown), ", ".join(FOLDER_SOURCES))
    found = [src for key, src in FOLDER_SOURCES.items() if key in present]
    if not found:
        raise ValueError(f"--from {root} holds none of the photo folders {', '.join(FOLDER_SOURCES)}")
    plan = []
    for src in found:
        files = sorted(f for f in (root / src.folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) != src.count:
            log.warning("%s: %d photos, the table expects %d", src.folder, len(files), src.count)
        for i, f in enumerate(files):
            name, split = folder_photo_name(src, f), folder_split(src, i)
            rec = PhotoRecord(
                name=name, split=split, file=f"{split}/{name}.png", source="folder", package=src.folder,
                package_version="", member=f"{src.folder}/{f.name}", original_size=[0, 0], saved_size=[0, 0],
                scale=2 if src.halve else 1, licence=src.terms, author=src.origin, sha256="",
            )
            plan.append(_Planned(rec, f, copy=False, halve=src.halve))
    return plan


def _produce(out: Path, p: _Planned) -> PhotoRecord:
    """Write one planned photo to ``out/<split>/<name>.png`` and return its full record."""
    data = p.path.read_bytes()
    if p.copy:  # an --include PNG, already downscaled by `photos fetch`: copy the bytes
        atomic_write_bytes(out / p.record.file, data)
        return p.record
    arr, notes = read_image(p.path)
    for note in notes:
        log.info("%s: %s", p.record.name, note)
    h, w = arr.shape[:2]
    small = downscale(arr, 2 if p.halve else 1)
    save_png(out / p.record.file, small)
    return PhotoRecord.from_json({
        **p.record.to_json(), "original_size": [int(w), int(h)],
        "saved_size": [int(small.shape[1]), int(small.shape[0])], "sha256": hashlib.sha256(data).hexdigest(),
    })


__all__ = [
    "DEBIAN_PHOTOS",
    "DEBIAN_VERSIONS_CHECKED",
    "FOLDER_SOURCES",
    "SPLITS",
    "WHEEL_MIN_SHORT_SIDE",
    "WHEEL_PHOTOS",
    "FolderSource",
    "PhotoRecord",
    "PhotoSource",
    "PhotosUnavailable",
    "add_photo_folders",
    "downscale",
    "fetch_photos",
    "fetched_split_in_source_scheme",
    "folder_photo_name",
    "folder_split",
    "halving_factor",
    "split_of",
]
