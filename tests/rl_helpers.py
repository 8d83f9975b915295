"""Tiny RL test material shared by tests/test_rl.py, tests/test_faults_training.py and the diffusers
policy tests: x4 LR/HR pairs in the FGR manifest format, tiny seeded policies, a toy differentiable
reward with a map, a constant reward, and the LoRA / base weights of a peft-adapted policy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from finpercep.policies.flow import FlowConfig, FlowSR
from finpercep.policies.gaussian import GaussianPolicy
from finpercep.policies.tiny import TinyConfig, TinySR
from finpercep.types import RewardOutput


def write_pairs(root: Path) -> Path:
    """Four x4 LR/HR pairs (HR 32x32 crops of scikit-image photos) in ``root``, in the FGR manifest format."""
    import skimage.data as sd

    (root / "samples").mkdir(parents=True)
    lines = []
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        hr = Image.fromarray(getattr(sd, name)()[40:72, 60:92])
        hr.save(root / "samples" / f"{i}_hr.png")
        hr.resize((8, 8), Image.BICUBIC).save(root / "samples" / f"{i}_lr.png")
        lines.append(json.dumps({"id": f"s{i}", "hr": f"samples/{i}_hr.png", "lr": f"samples/{i}_lr.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps({"config": {"scale": 4}}))
    return root


def tiny_policy() -> TinySR:
    torch.manual_seed(0)
    return TinySR(TinyConfig(channels=8, num_layers=1))


def flow_policy() -> FlowSR:
    torch.manual_seed(0)
    return FlowSR(FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=3))


class ToyReward:
    """Differentiable, with a map: prefers images close to mid-grey; map = |sr - 0.5|."""

    name, needs_reference, differentiable, range, has_map = "toy", False, True, (-1.0, 0.0), True

    def __call__(self, sr, lr=None, hr=None):
        d = (sr - 0.5).abs().mean(1, keepdim=True)
        return RewardOutput(score=-d.flatten(1).mean(1), map=d.clamp(0, 1))

    def to(self, device):
        return self


class ConstantReward(ToyReward):
    """The same score (0.3) for every image: an RL step must not move the policy."""

    name, differentiable, has_map = "const", False, False

    def __call__(self, sr, lr=None, hr=None):
        return RewardOutput(score=torch.full((sr.shape[0],), 0.3))


def lora_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the LoRA parameters of a peft-adapted policy (names containing ``.lora_``)."""
    return {k: v.detach().clone() for k, v in policy.named_parameters() if ".lora_" in k}


def base_state(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the non-LoRA weights under their plain names (peft renames a wrapped ``W``
    ``base_layer.W``); a Gaussian wrapper's inner network is read."""
    net = policy.base if isinstance(policy, GaussianPolicy) else policy
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in net.state_dict().items() if ".lora_" not in k}


def train_rl(algo: str, policy, reward, pairs: Path, out: Path, cfg, algo_cfg=None, *, policy_name: str = "test",
             **kw) -> Path:
    """One run of ReFL / DPO / GRPO (``finpercep.rl.ALGORITHMS``) on ``pairs`` into ``out``, quiet, with
    ``algo_cfg`` or the algorithm's default config; ``policy_name`` is what the run's meta records."""
    from finpercep.rl import ALGORITHMS, RLConfig
    from finpercep.rl.common import PairData, run_meta

    algo_cfg = algo_cfg or RLConfig().algo_config(algo)
    meta = run_meta(algo, policy_name, getattr(reward, "name", "curriculum"), pairs, cfg)
    return ALGORITHMS[algo](policy, reward, PairData(pairs), out, cfg, algo_cfg, meta=meta, progress=False, **kw)
