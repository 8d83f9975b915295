"""Tiled upscaling and the SR quality evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from finpercep.eval.sr_quality import DIRECTION, evaluate_sr, evaluate_sr_per_image, psnr
from finpercep.policies.flow import FlowConfig, FlowSR
from finpercep.policies.tiny import TinyConfig, TinySR
from finpercep.policies.upscale import upscale_tiled
from finpercep.rl.common import PairData


@pytest.mark.parametrize("make", [lambda: TinySR(TinyConfig(channels=8, num_layers=2)),
                                  lambda: FlowSR(FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=2))])
def test_tiles_equal_a_whole_image_pass(make):
    torch.manual_seed(0)
    pol = make().eval()
    lr = torch.rand(1, 3, 23, 37)
    whole = pol(lr).clamp(0, 1)
    tiled = upscale_tiled(pol, lr, tile=8, context=8)
    assert tiled.shape == whole.shape == (1, 3, 23 * pol.scale, 37 * pol.scale)
    assert torch.allclose(tiled, whole, atol=1e-5)
    with pytest.raises(ValueError):
        upscale_tiled(pol, torch.rand(3, 8, 8))


def test_psnr_known_values():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[1] += 0.1
    p = psnr(x, y)
    assert p[1] == pytest.approx(20.0, abs=1e-4) and p[0] > 100


def test_evaluate_sr_prefers_the_real_image(tmp_path):
    """An 'oracle' policy that returns HR beats bicubic on every full-reference metric."""
    import skimage.data as sd

    (tmp_path / "s").mkdir()
    lines = []
    for i, name in enumerate(("astronaut", "coffee")):
        hr = Image.fromarray(getattr(sd, name)()[:96, :192])
        hr.save(tmp_path / "s" / f"{i}_hr.png")
        hr.resize((48, 24), Image.BICUBIC).save(tmp_path / "s" / f"{i}_lr.png")
        lines.append(json.dumps({"id": str(i), "hr": f"s/{i}_hr.png", "lr": f"s/{i}_lr.png"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    pairs = PairData(tmp_path)
    hrs = {pairs.pair(i)[0].sum().item(): pairs.pair(i)[1] for i in range(2)}

    class Oracle(torch.nn.Module):
        scale, name = 4, "oracle"

        def forward(self, lr):
            return torch.stack([hrs[x.sum().item()] for x in lr])

    class Bicubic(torch.nn.Module):
        scale, name = 4, "bicubic"

        def forward(self, lr):
            return torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)

    good = evaluate_sr(Oracle(), pairs, [0, 1])
    bad = evaluate_sr(Bicubic(), pairs, [0, 1])
    assert good["images"] == bad["images"] == 2
    assert set(DIRECTION) - {"damage/area", "damage/mean"} <= set(good)
    assert good["psnr"] > 60 and good["ssim"] == pytest.approx(1.0) and good["stlpips"] == pytest.approx(0.0, abs=1e-6)
    assert bad["psnr"] < good["psnr"] and bad["stlpips"] > 0.05
    # the damage judge: bicubic against the oracle's output is damaged, the oracle against bicubic is not
    worse = evaluate_sr_per_image(Bicubic(), pairs, [0, 1], reference=Oracle())
    better = evaluate_sr_per_image(Oracle(), pairs, [0, 1], reference=Bicubic())
    assert len(worse["damage/area"]) == 2 and min(worse["damage/area"]) > 0.2 and better["damage/area"] == [0.0, 0.0]
    assert worse["psnr"] == pytest.approx([float(v) for v in psnr(Bicubic()(torch.stack([pairs.pair(i)[0] for i in (0, 1)])),
                                                                 torch.stack([pairs.pair(i)[1] for i in (0, 1)]))])


def test_a_stochastic_policy_is_its_own_zero_damage_reference(tmp_path):
    """The reference draws the same noise as the policy did: a sampled policy judged against
    itself has no damage, and the draw is reproducible from the generator."""
    import skimage.data as sd

    from rl_helpers import flow_policy

    (tmp_path / "s").mkdir()
    hr = Image.fromarray(sd.astronaut()[:96, :192])  # NIQE needs two 96-px blocks
    hr.save(tmp_path / "s" / "0_hr.png")
    hr.resize((48, 24), Image.BICUBIC).save(tmp_path / "s" / "0_lr.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "0", "hr": "s/0_hr.png", "lr": "s/0_lr.png"}) + "\n")
    pairs = PairData(tmp_path)
    torch.manual_seed(0)
    flow = flow_policy()
    a = evaluate_sr_per_image(flow, pairs, [0], reference=flow, sample=torch.Generator().manual_seed(0))
    b = evaluate_sr_per_image(flow, pairs, [0], reference=flow, sample=torch.Generator().manual_seed(0))
    assert a["damage/area"] == [0.0] and a["damage/mean"] == [0.0] and a == b
    c = evaluate_sr_per_image(flow, pairs, [0], sample=torch.Generator().manual_seed(1))
    assert c["psnr"] != a["psnr"]  # another draw
