"""FinPercep-RM network: shapes for any size and stage, map range, gradients to the input, growth,
checkpoints, tiled == whole-image, bad inputs. Tiny decoders (8-16 channels), pretrained encoder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from finpercep.config import from_dict, to_dict
from finpercep.reward.model import (
    BACKBONES,
    FinPercepRM,
    RMConfig,
    decoder_reach,
    default_tile_context,
    load_pretrained,
    save_pretrained,
    score_image_tiled,
)

TINY = RMConfig(decoder_stage=0, decoder_channels=8, score_hidden=16)
N_STAGES = len(TINY.levels)
# v2 (configs/rm_v2.yaml, tiny): the stride-2 level and the full-resolution branch at the last stage.
TINY_V2 = RMConfig(decoder_stage=0, levels=(0, 1, 2, 4, 5), decoder_channels=8, score_hidden=16, fullres_channels=4)
N_V2 = len(TINY_V2.levels)

# Tiled vs whole-image pass: the tiled pass is exact by construction (score_image_tiled
# docstring); measured max |difference| on 600x700 photos (tile 128..512, stages 0..4) was
# <= 2e-7 for the map and the score and <= 8e-7 for the logits: float32 rounding only.
TILED_TOL = 1e-5


def _randomize_decoder(model: FinPercepRM, seed: int) -> FinPercepRM:
    """Give the decoder random weights (growth starts it at a uniform map) so maps vary in space."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.decoder.parameters():
            fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.ndim > 1 else 0.1) / fan_in**0.5)
    return model


def _grown(cfg: RMConfig) -> list[FinPercepRM]:
    """Tiny models at stages 0..N (one pretrained encoder load, then growth), decoders randomised."""
    torch.manual_seed(0)
    out = [FinPercepRM(cfg)]
    for k in range(1, len(cfg.levels) + 1):
        out.append(_randomize_decoder(out[-1].grow(), seed=k))
    return out


@pytest.fixture(scope="module")
def models() -> list[FinPercepRM]:
    return _grown(TINY)


@pytest.fixture(scope="module")
def models_v2() -> list[FinPercepRM]:
    return _grown(TINY_V2)


def _photo(h: int, w: int, name: str = "astronaut") -> torch.Tensor:
    im = Image.fromarray(getattr(data, name)()).resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255)[None]


@pytest.mark.parametrize("stage", range(N_STAGES + 1))
@pytest.mark.parametrize("size", [(1, 1), (17, 23), (37, 53), (256, 256)])
def test_shapes_and_ranges_for_any_size_and_stage(models, stage: int, size: tuple[int, int]) -> None:
    model = models[stage]
    b = 1 if size[0] * size[1] > 10_000 else 2
    x = torch.rand(b, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.score.shape == (b,) and torch.isfinite(out.score).all()
    if stage == 0:
        assert out.map is None and out.map_logits is None
    else:
        assert out.map.shape == (b, 1, *size) and out.map_logits.shape == (b, 1, *size)
        assert float(out.map.min()) >= 0 and float(out.map.max()) <= 1
        assert torch.allclose(out.map, torch.sigmoid(out.map_logits))


def test_maps_vary_in_space_and_differ_between_images(models) -> None:
    # Guards against a degenerate test set-up: the randomised decoders give non-trivial maps.
    with torch.no_grad():
        a, b = models[-1](_photo(64, 96, "astronaut")), models[-1](_photo(64, 96, "coffee"))
    assert float(a.map.std()) > 1e-3
    assert float((a.map - b.map).abs().mean()) > 1e-3 and float((a.score - b.score).abs()) > 1e-4


def test_batch_independent_in_train_mode_too(models) -> None:
    # Frozen backbone BatchNorm: one image scored alone or in a batch gives the same result.
    model = models[2]
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    model.train()
    try:
        with torch.no_grad():
            whole = model(x)
            single = model(x[1:2])
    finally:
        model.eval()
    assert torch.allclose(whole.score[1], single.score[0], atol=1e-5)
    assert torch.allclose(whole.map[1], single.map[0], atol=1e-5)
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("stage", [0, N_STAGES])
def test_gradients_flow_to_the_input(models, stage: int) -> None:
    model = models[stage]
    x = torch.rand(1, 3, 45, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = model(x)
    (gs,) = torch.autograd.grad(out.score.sum(), x, retain_graph=out.map is not None)
    assert torch.isfinite(gs).all() and float(gs.abs().sum()) > 0
    if out.map is not None:
        (gm,) = torch.autograd.grad(out.map.mean(), x)
        assert torch.isfinite(gm).all() and float(gm.abs().sum()) > 0


def test_grow_from_stage_0_keeps_the_score_and_starts_a_uniform_map(models) -> None:
    m0 = models[0]
    m1 = m0.grow()
    x = _photo(96, 128)
    with torch.no_grad():
        a, b = m0(x), m1(x)
    assert b.map is not None and torch.all(b.map == 0.5)
    # Masked pool of f_N under a uniform map = RM_0's plain mean, up to pool_eps (1e-4 relative).
    assert torch.allclose(a.score, b.score, atol=1e-3)


@pytest.mark.parametrize("stage", range(1, N_STAGES))
def test_grow_keeps_old_parameters_and_nearly_the_map(models, stage: int) -> None:
    old = models[stage]
    before = {k: v.clone() for k, v in old.state_dict().items()}
    new = old.grow()
    assert new.stage == stage + 1
    new_state = new.state_dict()
    for k, v in before.items():
        assert torch.equal(new_state[k], v), k
        assert torch.equal(old.state_dict()[k], v), f"grow changed the old model: {k}"
    added = set(new_state) - set(before)
    lv = new.cfg.active_levels[-1]
    assert added and all(f".s{lv}." in k for k in added)
    x = _photo(96, 128, "coffee")
    with torch.no_grad():
        a, b = old(x), new(x)
    # Zero lateral + identity fusion: the new map is the old coarse map refined by a 2x bilinear
    # upsampling, equal up to interpolation differences at the kinks of the coarse map.
    d = (a.map_logits - b.map_logits).abs()
    spread = float(a.map_logits.max() - a.map_logits.min())
    assert spread > 0.05
    assert float(d.mean()) < 0.05 * spread and float(d.max()) < 0.5 * spread
    assert float((a.score - b.score).abs().max()) < 0.05 * max(1.0, float(a.score.abs().max()))
    # The new level's weights then receive gradients (it is not dead).
    out = new(x)
    out.map.mean().backward()
    assert float(new.decoder.lateral[f"s{lv}"].weight.grad.abs().sum()) > 0


def test_with_stage_and_last_stage_errors(models) -> None:
    grown = models[0].with_stage(N_STAGES)
    assert grown.stage == N_STAGES and grown.cfg.active_levels == tuple(reversed(TINY.levels))
    with pytest.raises(ValueError, match="already at the last stage"):
        models[N_STAGES].grow()
    with pytest.raises(ValueError, match="with_stage"):
        models[2].with_stage(1)


@pytest.mark.parametrize("stage", [0, 2])
def test_save_load_round_trip_is_identical(models, tmp_path, stage: int) -> None:
    model = models[stage]
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg and not loaded.training
    x = _photo(50, 70)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.score, b.score)
    if stage:
        assert torch.equal(a.map, b.map)
    # The classifier head of the backbone is not part of the checkpoint.
    assert not any("_fc" in k or "_conv_head" in k for k in loaded.state_dict())


def test_v2_fields_are_saved_only_when_used(models, models_v2, tmp_path) -> None:
    """A v1 model's config.json has no v2 keys (old checkpoints keep their bytes); a v2 one round-trips."""
    v1 = json.loads((save_pretrained(models[2], tmp_path / "v1") / "config.json").read_text())["config"]
    assert "fullres_channels" not in v1 and "fullres_layers" not in v1
    folder = save_pretrained(models_v2[N_V2], tmp_path / "v2")
    assert json.loads((folder / "config.json").read_text())["config"]["fullres_channels"] == 4
    loaded = load_pretrained(folder)
    assert loaded.cfg == models_v2[N_V2].cfg and loaded.decoder.fullres is not None
    x = _photo(40, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x).map, models_v2[N_V2](x).map)


def test_load_rejects_unknown_keys_mismatches_and_missing_files(models, tmp_path) -> None:
    folder = save_pretrained(models[1], tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["not_a_field"] = 1
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown keys.*not_a_field"):
        load_pretrained(folder)
    # A config.json that no longer matches the weights (e.g. an interrupted overwrite).
    save_pretrained(models[2], tmp_path / "other")
    (folder / "config.json").write_text((tmp_path / "other" / "config.json").read_text())
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "version, stage, size, tile",
    [("v1", N_STAGES, (600, 700), 256), ("v1", 0, (300, 260), 128), ("v1", 2, (300, 260), 128),
     ("v2", N_V2, (600, 700), 256), ("v2", N_V2, (300, 260), 64), ("v2", N_V2 - 1, (300, 260), 128)],
)
def test_tiled_equals_whole_image(request, version: str, stage: int, size: tuple[int, int], tile: int) -> None:
    model = request.getfixturevalue("models" if version == "v1" else "models_v2")[stage]
    x = _photo(*size, "chelsea")
    with torch.no_grad():
        whole = model(x)
    tiled = score_image_tiled(model, x, tile=tile)
    assert tiled.score.shape == (1,)
    assert float((tiled.score - whole.score).abs().max()) < TILED_TOL
    if stage:
        assert tiled.map.shape == (1, 1, *size)
        assert float((tiled.map - whole.map).abs().max()) < TILED_TOL
        assert float((tiled.map_logits - whole.map_logits).abs().max()) < 10 * TILED_TOL


@pytest.mark.parametrize("size", [(1, 1), (17, 23), (64, 96)])
def test_v2_stride2_level_and_fullres_branch_at_the_last_stage_only(models_v2, size: tuple[int, int]) -> None:
    assert [m.decoder is not None and m.decoder.fullres is not None for m in models_v2] == [False] * N_V2 + [True]
    assert models_v2[N_V2].cfg.active_levels[-1] == 0 and BACKBONES["efficientnet_lite0"].stages[0][0] == 2
    # Reach: 2 * (2 + 4 + 8 + 16 + 32) px through the levels, + 3 px for the branch's three 3x3 convs.
    assert decoder_reach(models_v2[N_V2]) == 127 and decoder_reach(models_v2[N_V2 - 1]) == 2 * (4 + 8 + 16 + 32)
    assert default_tile_context(models_v2[N_V2]) == 128
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = models_v2[N_V2](x)
    assert out.map.shape == (2, 1, *size) and float(out.map.min()) >= 0 and float(out.map.max()) <= 1
    assert torch.isfinite(out.score).all()


def test_v2_grow_into_the_fullres_stage_starts_from_the_old_map(models_v2) -> None:
    old = models_v2[N_V2 - 1]
    new = old.grow()
    added = set(new.state_dict()) - set(old.state_dict())
    assert any(k.startswith("decoder.fullres.") for k in added)
    assert all(".s0." in k or k.startswith("decoder.fullres.") for k in added)
    x = _photo(96, 128, "coffee")
    with torch.no_grad():
        a, b = old(x), new(x)
        residual = new.decoder.fullres(x, new.decoder.features(new.encode(x)))  # 96x128: no padding
    assert residual.shape == (1, 1, 96, 128) and float(residual.abs().max()) == 0  # starts at exactly 0
    # The new stride-2 level refines the old stride-4 map (as in test_grow_keeps_old_parameters...).
    d, spread = (a.map_logits - b.map_logits).abs(), float(a.map_logits.max() - a.map_logits.min())
    assert spread > 0.05 and float(d.mean()) < 0.05 * spread and float(d.max()) < 0.5 * spread
    new = old.grow()
    new(x).map.mean().backward()  # the zero output conv of the branch receives gradient (not dead)
    assert float(new.decoder.fullres.out.weight.grad.abs().sum()) > 0


def test_tiled_validates_tile_and_context(models) -> None:
    x = torch.rand(1, 3, 100, 100)
    with pytest.raises(ValueError, match="multiples of the model stride"):
        score_image_tiled(models[1], x, tile=100)
    with pytest.raises(ValueError, match="reach"):
        score_image_tiled(models[N_STAGES], x, tile=64, context=decoder_reach(models[N_STAGES]) - 24)
    # An image that fits in one tile is simply scored whole.
    with torch.no_grad():
        assert torch.equal(score_image_tiled(models[1], x, tile=128).score, models[1](x).score)


def test_backbone_continuation_matches_features() -> None:
    spec = BACKBONES["efficientnet_lite0"]
    net = spec.build(None, True)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = net.features(x)
        rest = spec.continue_features(net, full[2], 3, 6)
    for a, b in zip(full[3:], rest):
        assert torch.allclose(a, b, atol=1e-5)
    assert [f.shape[1] for f in full] == [c for _, c in spec.stages]


@pytest.mark.parametrize(
    "modulation, pool",
    [("map", "masked_mean_area"), ("one_minus_map", "masked_mean_area"), ("none", "masked_mean_area"),
     ("map", "mean"), ("map", "masked_mean"), ("none", "mean")],
)
def test_every_modulation_and_pool_runs(models, modulation: str, pool: str) -> None:
    base = models[1]
    cfg = dataclasses.replace(base.cfg, modulation=modulation, pool=pool)
    model = FinPercepRM(cfg, load_backbone_weights=False)
    # Reuse the encoder and decoder; the score head's input width depends on the pool.
    model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("score_head")}, strict=False)
    x = _photo(64, 64)
    out = model(x)
    assert out.score.shape == (1,) and torch.isfinite(out.score).all()
    # Only modulation "none" makes the score blind to the map.
    with torch.no_grad():
        model.decoder.head.bias += 3.0
        changed = model(x).score
    assert (float((changed - out.score.detach()).abs()) < 1e-6) == (modulation == "none")


def test_autocast_bfloat16_runs_and_stays_close(models) -> None:
    model, x = models[N_STAGES], _photo(64, 80)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out.score).all() and out.map.shape == ref.map.shape
    # bfloat16 keeps ~3 significant digits: logits of a few units are off by ~0.02-0.1, which moves
    # the map by up to ~0.1 where the sigmoid is steepest (0.11 measured), ~0.002 on average.
    d = (out.map.float() - ref.map).abs()
    assert float(d.mean()) < 0.01 and float(d.max()) < 0.25
    assert float((out.score.float() - ref.score).abs().max()) < 0.1 * max(1.0, float(ref.score.abs().max()))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(3, 32, 32), r"\(B, 3, H, W\)"),
        (torch.rand(1, 4, 32, 32), r"\(B, 3, H, W\)"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "float"),
        (torch.rand(1, 3, 8, 8) * 255, r"values in \[0, 1\]"),
        (torch.rand(1, 3, 0, 8), "empty"),
        (np.zeros((1, 3, 8, 8), np.float32), "torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(models, bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        models[1](bad)
    with pytest.raises(ValueError, match=match):
        score_image_tiled(models[1], bad)


def test_config_validation_and_round_trip() -> None:
    cfg = RMConfig(levels=(2, 3, 6), decoder_stage=3, modulation="one_minus_map")
    assert from_dict(RMConfig, to_dict(cfg)) == cfg
    assert cfg.active_levels == (6, 3, 2) and cfg.stride == 32
    for kwargs, match in [
        ({"backbone": "resnet"}, "unknown backbone"),
        ({"levels": (4, 2)}, "strictly increasing"),
        ({"levels": (1, 9)}, "stages 0..6"),
        ({"decoder_stage": 5}, "decoder_stage"),
        ({"modulation": "inverse"}, "modulation"),
        ({"pool": "max"}, "pool"),
    ]:
        with pytest.raises(ValueError, match=match):
            RMConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(RMConfig, {"decoder_stages": 2})


def test_score_does_not_train_the_map_unless_asked() -> None:
    """While training, the score's losses leave the decoder alone (the map learns from L_map only);
    with score_map_grad they reach it; at inference the input gradient flows through the map."""
    torch.manual_seed(0)
    cfg = RMConfig(decoder_stage=2, decoder_channels=8, score_hidden=16)
    for flag, reaches in ((False, False), (True, True)):
        m = FinPercepRM(dataclasses.replace(cfg, score_map_grad=flag), load_backbone_weights=False).train()
        m(torch.rand(1, 3, 64, 64)).score.sum().backward()
        grads = [p.grad for p in m.decoder.parameters() if p.grad is not None]
        assert any(float(g.abs().sum()) > 0 for g in grads) == reaches
    m.eval()
    torch.nn.init.normal_(m.decoder.head.weight)  # a map that is not constant
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    m(x).map.mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
