"""The FGR data set's one format, reader and swap (finpercep.data.dataset) and the Triplet type,
on a tiny synthetic data set written here (no builder, so the expected values do not depend on
OpenCV / SciPy versions)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep.data.dataset import (
    TRIPLET_KEYS,
    FGRDataset,
    check_dataset,
    quantise,
    read_manifest,
    swap,
)
from finpercep.io import to_tensor, to_uint8
from finpercep.types import Triplet

SIZE, SCALE = 32, 4


def write_synthetic(root: Path, units: int = 2, masks_per_unit: int = 3) -> Path:
    """A valid FGR data set of ``units * masks_per_unit`` samples of noise images (HR 32x32, x4):
    samples of one unit share HR, LR and SR files, as the builder's do."""
    rng = np.random.default_rng(1234)
    root.mkdir(parents=True)
    lines = []
    for u in range(units):
        hr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        sr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        lr = rng.integers(0, 256, (SIZE // SCALE, SIZE // SCALE, 3), dtype=np.uint8)
        for name, a in (("hr", hr), ("sr", sr), ("lr", lr)):
            Image.fromarray(a).save(root / f"u{u}_{name}.png")
        np.save(root / f"u{u}_map_sr.npy", rng.random((SIZE, SIZE), dtype=np.float32))
        for k in range(masks_per_unit):
            i = u * masks_per_unit + k
            m = rng.random((SIZE, SIZE)) < 0.2
            Image.fromarray(np.where(m[..., None], sr, hr)).save(root / f"s{i}_syn.png")
            Image.fromarray(m.astype(np.uint8) * 255).save(root / f"s{i}_mask.png")
            np.save(root / f"s{i}_map_syn.npy", rng.random((SIZE, SIZE), dtype=np.float32))
            lines.append(json.dumps({"id": f"s{i:07d}", "unit": u, "hr": f"u{u}_hr.png", "lr": f"u{u}_lr.png",
                                     "sr": f"u{u}_sr.png", "syn": f"s{i}_syn.png", "mask": f"s{i}_mask.png",
                                     "map_syn": f"s{i}_map_syn.npy", "map_sr": f"u{u}_map_sr.npy",
                                     "sr_family": "bicubic", "mask_kind": "blob", "mask_area": float(m.mean()),
                                     "seed": 0}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps({"config": {"scale": SCALE}}))
    return root


@pytest.fixture()
def synthetic(tmp_path: Path) -> Path:
    return write_synthetic(tmp_path / "d")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The format module is light


def test_reading_a_data_set_imports_neither_the_builder_nor_opencv_nor_scipy() -> None:
    code = ("import sys, finpercep.data, finpercep.data.dataset; "
            "print(sorted(m for m in ('cv2', 'scipy', 'finpercep.data.builder') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_synthetic_data_set_meets_the_contract(synthetic: Path) -> None:
    assert check_dataset(synthetic) == []
    # a syn that is not the swap of its HR and SR is caught (check_dataset uses the one swap)
    path = synthetic / "s1_syn.png"
    arr = np.array(Image.open(path))
    arr[0, 0] ^= 1
    Image.fromarray(arr).save(path)
    assert check_dataset(synthetic) == ["s0000001: syn != mask * sr + (1 - mask) * hr"]


def test_read_manifest_skips_a_torn_last_line_and_a_non_json_line(synthetic: Path) -> None:
    manifest = synthetic / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text(lines[0] + "\nnot json\n" + "\n".join(lines[1:]) + "\n" + lines[0][:20])
    assert [r["id"] for r in read_manifest(synthetic)] == [f"s{i:07d}" for i in range(6)]
    assert read_manifest(synthetic / "nothing-here") == []


# ---------------------------------------------------------------------------------------------
# One reader: batches exactly as the pre-#10 readers gave them (recorded with their code)

# Triplets.load(idx, crop=16, rng) of `rm train` at seed 0, stage 0, step 3: rng =
# default_rng(SeedSequence([0, 0, 3])), idx = rng.integers(6, size=4) = [4, 4, 5, 2].
RM_STEP3 = {"hr": "803441c18f26420c", "syn": "7e1baee6bfa46326", "sr": "55d0cde30dca9417",
            "map_syn": "8ced326e29461f16", "mask": "7c5baffce7702915"}
RM_WHOLE_0_5 = {"hr": "9b0757936b7f0e4b", "syn": "e52ecfb207e5a701", "sr": "7a83a44a6d3b9615",
                "map_syn": "8b957e05bf2c0fe2", "mask": "d6fdf8eaa6d6ee71"}


def test_reward_model_batches_are_those_of_the_old_reader(synthetic: Path) -> None:
    from finpercep.reward.train import Triplets

    ds = FGRDataset(synthetic, keys=TRIPLET_KEYS)
    rng = np.random.default_rng(np.random.SeedSequence([0, 0, 3]))
    idx = rng.integers(len(ds), size=4).tolist()
    assert idx == [4, 4, 5, 2]
    b = ds.load_triplets(idx, 16, rng)
    assert b.hr.shape == (4, 3, 16, 16) and b.map_syn.shape == b.mask.shape == (4, 1, 16, 16) and b.map_sr is None
    assert {k: digest(getattr(b, k)) for k in RM_STEP3} == RM_STEP3
    whole = Triplets(synthetic, read_manifest(synthetic), pixel_only=False).load([0, 5], None, np.random.default_rng(0))
    assert {k: digest(getattr(whole, k)) for k in RM_WHOLE_0_5} == RM_WHOLE_0_5


def test_pixel_only_maps_are_computed_on_the_whole_sample_before_the_crop(synthetic: Path) -> None:
    from finpercep.data.gt_maps import GTMapConfig, GTMapper
    from finpercep.reward.train import Triplets

    rng = np.random.default_rng(np.random.SeedSequence([0, 0, 3]))
    idx = rng.integers(6, size=4).tolist()
    b = Triplets(synthetic, read_manifest(synthetic), pixel_only=True).load(idx, 16, rng)
    assert {k: digest(getattr(b, k)) for k in ("hr", "syn", "sr", "mask")} == {k: RM_STEP3[k] for k in ("hr", "syn", "sr", "mask")}
    assert float(b.map_syn.double().sum()) == pytest.approx(213.5177382826805, rel=1e-6)  # the old reader's
    # the same as mapping each whole sample, then cutting the window the images were cut at
    ds = FGRDataset(synthetic, keys=TRIPLET_KEYS)
    mapper = GTMapper(GTMapConfig(pixel_only=True))
    for j, i in enumerate(idx):
        full = ds[i]
        m = mapper(full["hr"][None], full["syn"][None])[0]
        hit = [(y, x) for y in range(17) for x in range(17) if torch.equal(full["hr"][:, y : y + 16, x : x + 16], b.hr[j])]
        assert any(torch.equal(m[:, y : y + 16, x : x + 16], b.map_syn[j]) for y, x in hit)


def test_pair_batches_are_those_of_the_old_reader(synthetic: Path) -> None:
    from finpercep.rl.common import PairData

    pairs = PairData(synthetic)
    assert len(pairs) == 2 and pairs.scale == SCALE  # one pair per unit, however many masks
    lr, hr = pairs.batch(0, 3, 4, 16)
    assert lr.shape == (4, 3, 4, 4) and hr.shape == (4, 3, 16, 16)
    assert (digest(lr), digest(hr)) == ("cba9209ede4db763", "b750a5a8cfe26554")
    lr, hr = pairs.batch(0, 3, 2, 0)
    assert (digest(lr), digest(hr)) == ("da9efdaea6d7caef", "423cea909f3e6c17")


def test_load_triplets_refuses_what_it_cannot_batch(synthetic: Path) -> None:
    with pytest.raises(ValueError, match="needs the keys"):
        FGRDataset(synthetic, keys=("hr", "syn", "sr")).load_triplets([0])
    with pytest.raises(ValueError, match="needs rng"):
        FGRDataset(synthetic, keys=TRIPLET_KEYS).load_triplets([0], crop=16)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(synthetic / "u1_hr.png")
    with pytest.raises(ValueError, match="differ in size"):
        FGRDataset(synthetic, keys=("hr", "syn", "sr", "map_syn")).load_triplets([0, 3])


# ---------------------------------------------------------------------------------------------
# One swap


def test_swap_is_the_quantised_blend_of_the_paper() -> None:
    g = torch.Generator().manual_seed(0)
    hr, sr = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    syn = swap(hr, sr, mask)
    assert syn.dtype == torch.float32 and torch.equal(syn * 255, torch.round(syn * 255))
    inside = mask.bool().expand_as(hr)
    assert torch.equal(syn[inside], quantise(sr)[inside]) and torch.equal(syn[~inside], quantise(hr)[~inside])
    assert (syn - (mask * sr + (1 - mask) * hr)).abs().max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ValueError, match=r"mask \(B, 1, H, W\)"):
        swap(hr, sr, mask[:, 0])


def test_quantise_is_what_a_png_holds() -> None:
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1
    assert torch.equal(quantise(x), to_tensor(to_uint8(x)))
    assert torch.equal(quantise(quantise(x)), quantise(x))


# ---------------------------------------------------------------------------------------------
# The Triplet type


def _triplet(b: int = 3, size: int = 8, mask: bool = True) -> Triplet:
    g = torch.Generator().manual_seed(b)
    img = lambda c: torch.rand(b, c, size, size, generator=g)  # noqa: E731
    return Triplet(hr=img(3), syn=img(3), sr=img(3), map_syn=img(1), mask=img(1) if mask else None)


def test_triplet_checks_shapes_naming_the_field() -> None:
    t = _triplet()
    with pytest.raises(ValueError, match=r"Triplet.hr must be a \(B, 3, H, W\) tensor"):
        Triplet(hr=t.hr[:, :1], syn=t.syn, sr=t.sr, map_syn=t.map_syn)
    with pytest.raises(ValueError, match=r"Triplet.sr must be \(3, 3, 8, 8\)"):
        Triplet(hr=t.hr, syn=t.syn, sr=t.sr[:2], map_syn=t.map_syn)
    with pytest.raises(ValueError, match=r"Triplet.map_syn must be \(3, 1, 8, 8\)"):
        Triplet(hr=t.hr, syn=t.syn, sr=t.sr, map_syn=t.syn)
    with pytest.raises(ValueError, match="Triplet.mask"):
        Triplet(hr=t.hr, syn=t.syn, sr=t.sr, map_syn=t.map_syn, mask=t.map_syn[..., :4])


def test_triplet_index_cat_and_to() -> None:
    t = _triplet()
    assert len(t) == 3 and len(t[1]) == 1 and len(t[-1]) == 1 and len(t[:2]) == 2 and len(t[[0, 2]]) == 2
    assert torch.equal(t[-1].hr, t.hr[2:]) and torch.equal(t[[2, 0]].mask, t.mask[[2, 0]])
    back = Triplet.cat([t[i] for i in range(3)])
    assert all(torch.equal(getattr(back, k), getattr(t, k)) for k in ("hr", "syn", "sr", "map_syn", "mask"))
    assert Triplet.cat([t, _triplet(2, mask=False)]).mask is None  # kept only when every part has it
    with pytest.raises(ValueError, match="differ in size"):
        Triplet.cat([t, _triplet(size=16)])
    with pytest.raises(ValueError, match="at least one"):
        Triplet.cat([])
    assert t.to("cpu").hr.device.type == "cpu"
