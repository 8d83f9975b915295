"""Contact sheet of a data set (finpercep.data.sheet), on a tiny fake data set built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep.data.sheet import COLUMNS, HEADER_H, LABEL_H, PAD, pick_samples, render_contact_sheet
from finpercep.io import save_npy, save_png
from finpercep.viz import heatmap_overlay

FAMILIES = ("bicubic", "halo", "realesrgan")
H = W = 64


def _write_sample(root: Path, i: int, family: str, rng: np.random.Generator) -> dict:
    """One fake sample: HR noise-free gradient, SR = HR + artifact inside a square mask."""
    yy, xx = np.mgrid[0:H, 0:W]
    hr = np.stack([xx * 4, yy * 4, np.full_like(xx, 128)], -1).astype(np.uint8)
    mask = np.zeros((H, W), np.uint8)
    y0, x0 = 10 + 5 * i, 12 + 4 * i
    mask[y0 : y0 + 20, x0 : x0 + 20] = 255
    sr = np.clip(hr.astype(int) + rng.integers(-60, 61, hr.shape), 0, 255).astype(np.uint8)
    syn = np.where(mask[..., None] > 0, sr, hr)
    heat = (mask > 0).astype(np.float32) * (0.5 + 0.2 * i)
    rec = {"id": f"s{i:07d}", "sr_family": family, "mask_kind": "ellipse", "mask_area": float((mask > 0).mean()), "seed": i}
    for key, arr in (("hr", hr), ("lr", hr[::4, ::4]), ("sr", sr), ("syn", syn), ("mask", mask)):
        rec[key] = f"shard0/s{i:07d}_{key}.png"
        save_png(root / rec[key], np.ascontiguousarray(arr))
    for key in ("map_syn", "map_sr"):
        rec[key] = f"shard0/s{i:07d}_{key}.npy"
        save_npy(root / rec[key], heat)
    return rec


def _write_dataset(root: Path, records: list[dict]) -> None:
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture()
def fake_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fgr"
    _write_dataset(root, [_write_sample(root, i, FAMILIES[i], rng) for i in range(3)])
    return root


def test_sheet_has_rows_by_columns_layout(fake_dataset: Path, tmp_path: Path) -> None:
    tile = 96
    sizes = {}
    for num in (2, 3):
        out = render_contact_sheet(fake_dataset, tmp_path / f"sheet{num}.png", num=num, tile=tile)
        with Image.open(out) as im:
            assert im.mode == "RGB"
            sizes[num] = im.size
    cols = len(COLUMNS)
    assert cols == 4
    row_h = LABEL_H + tile + PAD
    assert sizes[3] == (cols * tile + (cols + 1) * PAD, HEADER_H + 3 * row_h + PAD)
    assert sizes[3][1] - sizes[2][1] == row_h
    # num larger than the data set: every sample once, no error
    out = render_contact_sheet(fake_dataset, tmp_path / "all.png", num=10, tile=tile)
    with Image.open(out) as im:
        assert im.size == sizes[3]


def test_sheet_is_deterministic_and_shows_the_map(fake_dataset: Path, tmp_path: Path) -> None:
    a = render_contact_sheet(fake_dataset, tmp_path / "a.png", num=3, seed=1, tile=64).read_bytes()
    b = render_contact_sheet(fake_dataset, tmp_path / "b.png", num=3, seed=1, tile=64).read_bytes()
    assert a == b
    sheet = np.asarray(Image.open(tmp_path / "a.png")).astype(int)
    # the map column of the first row is hot (bright) inside the mask square and dark outside
    x0, y0 = PAD + 3 * (64 + PAD), HEADER_H + LABEL_H
    map_tile = sheet[y0 : y0 + 64, x0 : x0 + 64]
    assert map_tile.sum(-1).max() > map_tile[-8:, -8:].sum(-1).mean() + 150
    # the syn column carries the cyan mask outline
    syn_tile = sheet[y0 : y0 + 64, x0 - 64 - PAD : x0 - PAD]
    assert ((syn_tile == [0, 255, 255]).all(-1)).sum() > 20


def test_pick_samples_round_robin_over_families() -> None:
    records = [{"id": f"{f}{i}", "sr_family": f} for f in ("a", "b", "c") for i in range(5)]
    picked = pick_samples(records, num=3, seed=0)
    assert sorted(r["sr_family"] for r in picked) == ["a", "b", "c"]
    picked6 = pick_samples(records, num=6, seed=0)
    assert [r["sr_family"] for r in picked6] == ["a", "b", "c"] * 2
    assert pick_samples(records, 6, seed=0) == picked6  # deterministic in the seed
    assert [r["id"] for r in pick_samples(records, 15, seed=1)] != [r["id"] for r in pick_samples(records, 15, seed=2)]
    assert len(pick_samples(records, 100, seed=0)) == 15
    with pytest.raises(ValueError, match="num"):
        pick_samples(records, 0, seed=0)


def test_heatmap_overlay_is_hotter_where_the_map_is_high() -> None:
    img = torch.full((3, 8, 16), 0.5)
    heat = torch.zeros(8, 16)
    heat[:, 8:] = 1.0
    out = heatmap_overlay(img, heat, alpha=0.6)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    cold, hot = out[:, :, :8], out[:, :, 8:]
    assert hot.mean() > cold.mean() + 0.3  # inferno(1) is bright yellow, inferno(0) near black
    assert hot[0].mean() > cold[0].mean()  # redder too
    # the map values are monotone in brightness along a ramp
    ramp = torch.linspace(0, 1, 16).expand(8, 16)
    lum = heatmap_overlay(img, ramp, 0.6).sum(0).mean(0)
    assert bool((lum[1:] >= lum[:-1] - 1e-6).all())
    assert torch.equal(heatmap_overlay(img, heat, alpha=0.0), img)  # alpha 0: the image itself


def test_heatmap_overlay_rejects_bad_input() -> None:
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="map must be"):
        heatmap_overlay(img, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="img must be"):
        heatmap_overlay(torch.rand(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(img, torch.zeros(8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="NaN"):
        heatmap_overlay(img, torch.full((8, 8), float("nan")))


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.jsonl"):
        render_contact_sheet(tmp_path, tmp_path / "sheet.png")
    assert not (tmp_path / "sheet.png").exists()


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd"])
def test_manifest_path_escaping_the_folder_is_refused(fake_dataset: Path, tmp_path: Path, bad: str) -> None:
    lines = (fake_dataset / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    for r in recs:
        r["hr"] = bad
    _write_dataset(fake_dataset, recs)
    with pytest.raises(ValueError, match="inside its folder"):
        render_contact_sheet(fake_dataset, tmp_path / "sheet.png", num=1)


def test_manifest_missing_keys_and_torn_lines(fake_dataset: Path, tmp_path: Path) -> None:
    path = fake_dataset / "manifest.jsonl"
    good = path.read_text()
    path.write_text(good + '{"id": "torn", "hr"')  # a build killed mid-line: skipped
    out = render_contact_sheet(fake_dataset, tmp_path / "s.png", num=5, tile=48)
    assert out.is_file()
    path.write_text(json.dumps({"id": "x", "hr": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="missing keys"):
        render_contact_sheet(fake_dataset, tmp_path / "s2.png")
