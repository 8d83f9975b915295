"""The FinPercep-RM shipped inside the package: loads offline, and behaves like a reward model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data as sd
import torch
from PIL import Image

import finpercep
from finpercep.reward.api import embedded_checkpoint_dir, list_stages


def _t(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _degraded(im: Image.Image) -> tuple[Image.Image, Image.Image]:
    blur = im.resize((64, 64), Image.BICUBIC).resize((256, 256), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=10)
    return blur, Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def rm():
    return finpercep.load_reward()


def test_every_stage_ships_and_loads():
    stages = list_stages(embedded_checkpoint_dir())
    assert sorted(stages) == list(range(len(stages))) and len(stages) >= 2
    for k in stages:
        assert finpercep.load_reward(stage=k).stage == k


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
def test_clean_image_scores_above_its_degraded_versions(rm, name):
    im = Image.fromarray(getattr(sd, name)()).convert("RGB").crop((0, 0, 256, 256))
    blur, jpeg = _degraded(im)
    with torch.no_grad():
        out = rm(torch.cat([_t(im), _t(blur), _t(jpeg)]))
    s = out.score
    assert s[0] > s[1] and s[0] > s[2]
    m = out.map.mean(dim=(1, 2, 3))
    assert m[0] < m[1] and m[0] < m[2]  # the map lights up on degraded images


def test_map_points_at_a_local_defect(rm):
    im = Image.fromarray(sd.astronaut()).convert("RGB").crop((0, 0, 256, 256))
    _, jpeg = _degraded(im)
    clean, bad = _t(im), _t(jpeg)
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 128:224, 32:128] = 1  # a 96x96 patch, 14 % of the image
    syn = mask * bad + (1 - mask) * clean
    with torch.no_grad():
        out = rm(torch.cat([clean, syn]))
    inside = float((out.map[1:] * mask).sum() / mask.sum())
    outside = float((out.map[1:] * (1 - mask)).sum() / (1 - mask).sum())
    assert inside > 2 * outside
    assert out.score[1] < out.score[0]


def test_score_command_uses_the_shipped_model(tmp_path):
    Image.fromarray(sd.coffee()).save(tmp_path / "coffee.png")
    src = str(Path(__file__).parents[1] / "src")
    r = subprocess.run([sys.executable, "-m", "finpercep.cli", "-q", "score", str(tmp_path / "coffee.png"), "--json",
                        "--maps", str(tmp_path / "maps")], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[0])
    assert np.isfinite(rec["score"]) and rec["map"]
    assert np.load(rec["map"]).shape == (400, 600)
