"""The independent local-damage judge: zero on identical outputs, finds a pasted artifact, and its
SSIM map agrees with the global SSIM it is the map of."""

from __future__ import annotations

import pytest
import skimage.data as sd
import torch

from finpercep.eval.damage import DAMAGE_THRESHOLD, damaged_area, local_damage_map
from finpercep.metrics import pixel_auroc, ssim, ssim_map


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """(1, 3, 96, 96) crop of a real photo in [0, 1]."""
    return torch.from_numpy(sd.astronaut()[100:196, 180:276]).permute(2, 0, 1)[None].float() / 255


def test_zero_on_identical_images(photo):
    blurred = torch.nn.functional.avg_pool2d(photo, 3, 1, 1)  # a reference worse than HR everywhere
    d = local_damage_map(blurred, blurred, photo)
    assert d.shape == (1, 1, 96, 96) and float(d.abs().max()) == 0.0
    assert float(damaged_area(d)) == 0.0
    assert float(local_damage_map(photo, photo, photo).max()) == 0.0


def test_finds_a_pasted_artifact(photo):
    ref = photo.clone()
    sr = photo.clone()
    g = torch.Generator().manual_seed(0)
    sr[:, :, 30:60, 40:70] = (sr[:, :, 30:60, 40:70] + 0.15 * torch.randn(1, 3, 30, 30, generator=g)).clamp(0, 1)
    mask = torch.zeros(1, 1, 96, 96)
    mask[:, :, 30:60, 40:70] = 1
    d = local_damage_map(sr, ref, photo)
    assert pixel_auroc(d, mask) > 0.97
    inside, outside = (d > DAMAGE_THRESHOLD)[mask.bool()].float().mean(), (d > DAMAGE_THRESHOLD)[~mask.bool()].float().mean()
    assert inside > 0.9 and outside < 0.1
    # a better output than the reference is not damage: swapping the roles leaves only noise-free pixels
    assert float(damaged_area(local_damage_map(ref, sr, photo))) == 0.0


def test_ssim_map_is_the_map_of_ssim(photo):
    other = (photo + 0.05 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    m = ssim_map(other, photo)
    assert m.shape == (1, 1, 96, 96) and float(m.max()) <= 1.0
    assert float(m[..., 5:-5, 5:-5].mean()) == pytest.approx(float(ssim(other, photo)), abs=1e-6)
    assert float(ssim_map(photo, photo).min()) == pytest.approx(1.0, abs=1e-6)


def test_a_saturation_change_is_damage():
    """Structure kept, colours changed: the RGB map sees it, a luma map would not."""
    from finpercep.metrics import rgb_to_y

    cups = torch.from_numpy(sd.coffee()[100:196, 180:276]).permute(2, 0, 1)[None].float() / 255
    grey = cups.mean(1, keepdim=True)
    sat = (grey + 1.5 * (cups - grey)).clamp(0, 1)
    assert float(damaged_area(local_damage_map(sat, cups, cups))) > 0.5
    assert float(damaged_area(1 - ssim_map(rgb_to_y(sat), rgb_to_y(cups)))) == 0.0


@pytest.mark.parametrize("shapes, words", [
    (((1, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 31)), "must have one shape"),
    (((1, 3, 8, 8),) * 3, "at least 11x11"),
])
def test_bad_input_is_one_clear_error(shapes, words):
    with pytest.raises(ValueError, match=words):
        local_damage_map(*(torch.rand(s) for s in shapes))
