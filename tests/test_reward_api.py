"""finpercep.reward.api (load_reward, score_images) and finpercep.reward.score (run_score, the engine
of `finpercep score`), on tiny randomly initialised models saved into tmp folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep.io import output_names
from finpercep.reward import api, score
from finpercep.reward.api import ImageScore, embedded_checkpoint_dir, load_reward, resolve_checkpoint, score_images
from finpercep.reward.model import FinPercepRM, RMConfig, save_pretrained
from finpercep.reward.score import run_score

TINY = dict(decoder_channels=8, score_hidden=16)


def tiny_model(stage: int, seed: int = 0) -> FinPercepRM:
    """A random tiny FinPercep-RM; the (zero-initialised) map head is randomised so maps vary."""
    torch.manual_seed(seed)
    m = FinPercepRM(RMConfig(decoder_stage=stage, **TINY), load_backbone_weights=False)
    if m.decoder is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            m.decoder.head.weight.copy_(torch.randn(m.decoder.head.weight.shape, generator=g) * 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A single stage-2 checkpoint, a stage-0 one, and a run folder stage_0 / stage_1 (+ an incomplete stage_2)."""
    root = tmp_path_factory.mktemp("ckpts")
    m0 = tiny_model(0)
    m1 = m0.grow()
    m2 = tiny_model(2, seed=1)
    save_pretrained(m2, root / "single2")
    save_pretrained(m0, root / "single0")
    save_pretrained(m0, root / "run" / "stage_0")
    save_pretrained(m1, root / "run" / "stage_1")
    (root / "run" / "stage_2").mkdir()  # a stage still training: no checkpoint files yet
    (root / "run" / "stage_2" / "trainer_state.pt").write_bytes(b"x")
    return {"single2": root / "single2", "single0": root / "single0", "run": root / "run"}


@pytest.fixture(scope="module")
def model2(ckpts) -> FinPercepRM:
    return load_reward(ckpts["single2"])


@pytest.fixture(scope="module")
def model0(ckpts) -> FinPercepRM:
    return load_reward(ckpts["single0"])


def astro(h: int, w: int) -> np.ndarray:
    import skimage.data as sd

    return np.asarray(Image.fromarray(sd.astronaut()).resize((w, h), Image.BICUBIC))


# --- load_reward -------------------------------------------------------------------------------


def test_load_reward_is_frozen_and_differentiable_wrt_input(ckpts, model2):
    ref = tiny_model(2, seed=1)
    assert not model2.training
    assert all(not p.requires_grad for p in model2.parameters())
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = model2(x)
    assert out.score.shape == (2,) and out.map.shape == (2, 1, 37, 53)
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(out.score.detach(), expected.score)  # round trip through the folder
    torch.testing.assert_close(out.map.detach(), expected.map)
    out.score.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    x.grad = None
    model2(x).map.mean().backward()  # the map is differentiable too
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("stage, spec", [(None, "finpercep"), (0, "finpercep:0"), (1, "finpercep:1")])
def test_load_reward_is_a_reward_like_create_reward(ckpts, stage, spec):
    import math

    from finpercep.rewards import create_reward
    from finpercep.types import Reward

    rm, r = load_reward(ckpts["run"], stage), create_reward(spec, checkpoint=ckpts["run"])
    assert isinstance(rm, Reward) and isinstance(r, Reward)
    meta = ("name", "needs_reference", "differentiable", "range", "has_map")
    assert [getattr(rm, k) for k in meta] == [getattr(r, k) for k in meta]
    assert rm.name == spec and rm.range == (-math.inf, math.inf) and rm.has_map == (rm.stage > 0)
    assert rm.to("cpu") is rm
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    a, b = rm(x, lr=x[..., ::4, ::4], hr=x), r(x)  # the Reward call; lr and hr are ignored
    torch.testing.assert_close(a.score, b.score)
    assert (a.map is None) == (b.map is None) == (stage == 0)


def test_run_folder_picks_last_complete_stage_or_the_asked_one(ckpts):
    assert resolve_checkpoint(ckpts["run"]) == ckpts["run"] / "stage_1"  # stage_2 is incomplete
    assert load_reward(ckpts["run"]).stage == 1
    m0 = load_reward(ckpts["run"], stage=0)
    assert m0.stage == 0 and m0(torch.rand(1, 3, 8, 8)).map is None
    with pytest.raises(ValueError, match=r"stage 2 is not in .*available stages \[0, 1\]"):
        load_reward(ckpts["run"], stage=2)
    with pytest.raises(ValueError, match="stage 7 is not in"):
        load_reward(ckpts["run"], stage=7)
    with pytest.raises(ValueError, match="integer >= 0"):
        load_reward(ckpts["run"], stage=-1)


def test_load_reward_bad_paths_and_arguments(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward(tmp_path / "nope")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_reward(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no FinPercep-RM checkpoint in"):
        load_reward(tmp_path / "empty")
    with pytest.raises(ValueError, match="single stage-2 checkpoint, but stage 1"):
        load_reward(ckpts["single2"], stage=1)
    assert load_reward(ckpts["single2"], stage=2).stage == 2
    with pytest.raises(ValueError, match="not a torch device"):
        load_reward(ckpts["single2"], device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_reward(ckpts["single2"], device="cuda")


def test_embedded_checkpoint(ckpts, tmp_path, monkeypatch):
    d = embedded_checkpoint_dir()
    assert d.parts[-3:] == ("finpercep", "reward", "weights")
    monkeypatch.setattr(api, "embedded_checkpoint_dir", lambda: tmp_path / "weights")
    with pytest.raises(FileNotFoundError) as e:
        load_reward()
    msg = str(e.value)
    assert "embedded FinPercep-RM checkpoint is missing" in msg and "finpercep rm train" in msg
    (tmp_path / "weights").mkdir()  # an empty folder is still missing
    with pytest.raises(FileNotFoundError, match="embedded"):
        load_reward()
    monkeypatch.setattr(api, "embedded_checkpoint_dir", lambda: ckpts["run"])
    assert load_reward().stage == 1 and load_reward(stage=0).stage == 0


# --- score_images ------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(37, 53), (1, 1), (1, 40), (64, 64)])
def test_score_images_maps_at_input_resolution(model2, model0, hw):
    img = torch.rand(3, *hw, generator=torch.Generator().manual_seed(1))
    (r,) = score_images(model2, [img])
    assert isinstance(r, ImageScore) and isinstance(r.score, float) and np.isfinite(r.score)
    assert r.map.shape == hw and r.map.dtype == torch.float32
    assert 0.0 <= float(r.map.min()) and float(r.map.max()) <= 1.0
    (r0,) = score_images(model0, [img])
    assert r0.map is None and np.isfinite(r0.score)


def test_score_images_whole_or_tiled_rule(model2, monkeypatch):
    calls = []
    real = api.score_image_tiled
    monkeypatch.setattr(api, "score_image_tiled", lambda m, x, **kw: calls.append(x.shape) or real(m, x, **kw))
    g = torch.Generator().manual_seed(2)
    strip = torch.rand(3, 20, 200, generator=g)  # 4000 px <= 64 * 64: one whole-image pass
    big = torch.rand(3, 150, 130, generator=g)  # 19500 px > 64 * 64: tiled
    r_strip, r_big = score_images(model2, [strip, big], tile=64)
    assert calls == [(1, 3, 150, 130)]
    with torch.no_grad():
        whole_strip, whole_big = model2(strip[None]), model2(big[None])
    assert r_strip.score == float(whole_strip.score[0])
    assert r_big.map.shape == (150, 130)
    # Tiling is exact up to float rounding (score_image_tiled), so the rule only changes memory.
    torch.testing.assert_close(r_big.map, whole_big.map[0, 0], atol=1e-4, rtol=0)
    assert r_big.score == pytest.approx(float(whole_big.score[0]), abs=1e-4)


def test_score_images_rejects_bad_input(model2):
    with pytest.raises(ValueError, match="NaN"):
        score_images(model2, [torch.full((3, 8, 8), float("nan"))])
    with pytest.raises(ValueError, match="NaN"):
        model2(torch.full((1, 3, 8, 8), float("nan")))  # the API guard lives in the model itself
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        score_images(model2, [torch.rand(8, 8)])
    with pytest.raises(ValueError, match="multiples of the model stride"):
        score_images(model2, [torch.rand(3, 8, 8)], tile=100)  # checked even for small images
    with pytest.raises(ValueError, match="reach"):
        score_images(model2, [torch.rand(3, 8, 8)], context=32)


# --- run_score ---------------------------------------------------------------------------------


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(astro(37, 53)).save(d / "astro.png")
    Image.fromarray(astro(40, 30)).save(d / "sub" / "astro.jpg")  # same stem, other folder
    Image.fromarray(astro(1, 1)).save(d / "dot.png")
    Image.fromarray(astro(33, 35)[..., 0]).save(d / "grey.png")  # mode L
    rgba = np.dstack([astro(31, 29), np.full((31, 29), 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
    Image.fromarray(astro(27, 41)[..., 1].astype(np.uint16) * 257).save(d / "deep16.png")
    return d


def parse_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_run_score_json_maps_overlays(model2, image_dir, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    maps, overlays = tmp_path / "maps", tmp_path / "overlays"
    rc = run_score([image_dir], model2, json_out=True, maps_dir=maps, overlay_dir=overlays, out=out, err=err, progress=False)
    assert rc == 0, err.getvalue()
    recs = parse_lines(out.getvalue())
    assert [Path(r["path"]).name for r in recs] == ["astro.png", "deep16.png", "dot.png", "grey.png", "rgba.png", "astro.jpg"]
    for r in recs:
        assert {"path", "score", "map", "map_mean", "map_max", "height", "width", "notes"} <= set(r)
        assert isinstance(r["score"], float) and np.isfinite(r["score"])
        m = np.load(r["map"], allow_pickle=False)
        h, w = Image.open(r["path"]).size[::-1]
        assert m.shape == (h, w) == (r["height"], r["width"]) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0
        assert r["map_mean"] == pytest.approx(float(m.mean()), abs=1e-6) and r["map_max"] == pytest.approx(float(m.max()))
        ov = Image.open(overlays / f"{Path(r['map']).stem}.png")
        assert ov.size == (w, h) and ov.mode == "RGB"
    # Stem collision: the later file in input order gets "-1".
    assert [Path(r["map"]).name for r in recs if "astro" in r["path"]] == ["astro.npy", "astro-1.npy"]
    assert recs[2]["height"] == recs[2]["width"] == 1  # 1x1 image scored
    by_name = {Path(r["path"]).name: r for r in recs}
    assert any("16" in n for n in by_name["deep16.png"]["notes"])
    assert any("alpha" in n for n in by_name["rgba.png"]["notes"])
    assert by_name["grey.png"]["notes"] and by_name["astro.png"]["notes"] == []


def test_run_score_bad_files_are_reported_and_the_rest_scored(model2, image_dir, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((image_dir / "astro.png").read_bytes()[:60])  # truncated PNG
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    missing = tmp_path / "missing.png"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    out, err = io.StringIO(), io.StringIO()
    paths = [image_dir / "astro.png", corrupt, text, missing, empty, image_dir / "dot.png"]
    rc = run_score(paths, model2, json_out=True, maps_dir=None, overlay_dir=None, out=out, err=err, progress=False)
    assert rc == 1
    recs = parse_lines(out.getvalue())
    assert [Path(r["path"]).name for r in recs] == ["astro.png", "dot.png"]
    assert all(r["map"] is None and r["map_mean"] is not None for r in recs)  # no --maps: no file
    errors = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert len(errors) == 4
    for p in (corrupt, text, missing, empty):
        assert sum(str(p) in line for line in errors) == 1, (p, errors)
    assert "4 of 6 inputs failed" in err.getvalue()


def test_run_score_stage0_table(model0, image_dir, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    maps = tmp_path / "maps"
    files = [image_dir / "astro.png", image_dir / "dot.png"]
    rc = run_score(files, model0, json_out=False, maps_dir=maps, overlay_dir=None, out=out, err=err, progress=False)
    assert rc == 0
    assert err.getvalue().count("note:") == 1 and "no map" in err.getvalue()
    assert not maps.exists()
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["path", "score", "map_mean", "map_max"]
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1  # aligned columns
    for line, f in zip(lines[1:], files):
        cells = line.split()
        assert cells[0] == str(f) and np.isfinite(float(cells[1])) and cells[2:] == ["-", "-"]
    out = io.StringIO()
    run_score(files[:1], model0, json_out=True, maps_dir=maps, overlay_dir=None, out=out, err=io.StringIO(), progress=False)
    (rec,) = parse_lines(out.getvalue())
    assert rec["map"] is None and rec["map_mean"] is None


def test_run_score_large_image_goes_through_tiles(model2, tmp_path, monkeypatch):
    calls = []
    real = api.score_image_tiled
    monkeypatch.setattr(api, "score_image_tiled", lambda m, x, **kw: calls.append(kw) or real(m, x, **kw))
    monkeypatch.setattr(score, "TILE", 64)
    Image.fromarray(astro(150, 97)).save(tmp_path / "big.png")
    out = io.StringIO()
    rc = run_score([tmp_path / "big.png"], model2, json_out=True, maps_dir=tmp_path / "m", overlay_dir=None,
                   out=out, err=io.StringIO(), progress=True)
    assert rc == 0 and len(calls) == 1 and calls[0]["tile"] == 64
    (rec,) = parse_lines(out.getvalue())
    assert np.load(rec["map"]).shape == (150, 97)


def test_output_names_are_distinct_and_deterministic():
    files = [Path("a/x.png"), Path("b/x.jpg"), Path("x-1.png"), Path("c/X.png"), Path("y.png")]
    assert output_names(files) == ["x", "x-1", "x-1-1", "X-2", "y"]
    assert output_names(files) == output_names(list(files))


def test_run_score_rejects_no_paths(model2):
    with pytest.raises(ValueError, match="no paths"):
        run_score([], model2, json_out=True, maps_dir=None, overlay_dir=None, progress=False)


def test_run_score_broken_model_gives_error_lines_not_invalid_json(model0, image_dir):
    import copy

    broken = copy.deepcopy(model0)
    with torch.no_grad():
        broken.score_head[-1].bias.fill_(float("nan"))
    out, err = io.StringIO(), io.StringIO()
    rc = run_score([image_dir / "astro.png"], broken, json_out=True, maps_dir=None, overlay_dir=None, out=out, err=err, progress=False)
    assert rc == 1 and out.getvalue() == ""
    assert "non-finite score" in err.getvalue() and "astro.png" in err.getvalue()
