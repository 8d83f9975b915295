"""EfficientNet-Lite0: the shipped ImageNet weights load strictly and classify real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from finpercep.backbones.efficientnet_lite import (
    STAGES,
    EfficientNetLite0,
    default_weights_path,
    efficientnet_lite0,
    stage_receptive_field,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    return efficientnet_lite0()


def _imagenet_crop(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic) and take the centre crop: (1, 3, size, size) in [0, 1]."""
    im = Image.fromarray(arr)
    scale = size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)[None]


def test_weights_load_strictly_and_model_is_in_eval_mode(model: EfficientNetLite0) -> None:
    state = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    assert set(model.state_dict()) == set(state)
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training
    # An explicit local path gives the same network.
    again = efficientnet_lite0(weights=default_weights_path())
    assert torch.equal(again._fc.weight, model._fc.weight)


def test_missing_weights_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="weights not found"):
        efficientnet_lite0(weights=tmp_path / "nope.pth")


def test_chelsea_is_a_cat_top1(model: EfficientNetLite0) -> None:
    with torch.no_grad():
        probs = model(_imagenet_crop(data.chelsea())).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    # The cat classes together hold most of the mass (0.90 measured).
    assert float(probs[sorted(CAT_CLASSES)].sum()) > 0.7


def test_coffee_is_a_cup_in_top5(model: EfficientNetLite0) -> None:
    with torch.no_grad():
        top5 = model(_imagenet_crop(data.coffee())).topk(5).indices[0].tolist()
    assert CUP_CLASSES & set(top5)


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (2, 5)])
def test_feature_shapes_for_any_size(model: EfficientNetLite0, size: tuple[int, int]) -> None:
    H, W = size
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert len(feats) == len(STAGES)
    for f, (stride, channels) in zip(feats, STAGES):
        assert f.shape == (2, channels, -(-H // stride), -(-W // stride))
        assert torch.isfinite(f).all()
    assert logits.shape == (2, 1000)
    # Stopping early returns the same leading stages.
    with torch.no_grad():
        early = model.features(x, last_stage=2)
    assert len(early) == 3 and all(torch.equal(a, b) for a, b in zip(early, feats))


def test_gradients_flow_to_the_input(model: EfficientNetLite0) -> None:
    x = torch.rand(1, 3, 33, 47, requires_grad=True)
    feats = model.features(x)
    (feats[2].square().mean() + model(x)[0, 281]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_receptive_field_matches_a_one_pixel_probe(model: EfficientNetLite0, stage: int) -> None:
    """Changing one pixel changes exactly the outputs whose window (rf - 1) // 2 covers it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 161, 161, generator=g)
    y = x.clone()
    y[..., 80, 80] += 0.5
    with torch.no_grad():
        fx = model.features(x, last_stage=stage)[stage]
        fy = model.features(y, last_stage=stage)[stage]
    changed = ((fx - fy).abs().amax(dim=1)[0] > 0).nonzero() * STAGES[stage][0]  # cell centres, pixels
    half = (stage_receptive_field(stage) - 1) // 2
    assert (changed - 80).abs().max() <= half
    # ... and the bound is tight: some changed cell lies within one stride of the edge of the window.
    assert (changed - 80).abs().max() > half - STAGES[stage][0]


def test_bad_inputs_are_rejected(model: EfficientNetLite0) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.features(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="last_stage"):
        model.features(torch.rand(1, 3, 32, 32), last_stage=7)
