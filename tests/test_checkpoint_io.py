"""finpercep.io.save_pretrained / load_pretrained: the one checkpoint format (config.json +
model.safetensors) behind reward models and policies, on a tiny builder-made network."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from finpercep import io
from finpercep.io import WriteError, is_pretrained, load_pretrained, read_weights, save_pretrained


def build(meta: dict) -> nn.Module:
    """A Linear(n, 2) from ``{"arch": "toy", "config": {"n": n}}``."""
    if meta.get("arch") != "toy":
        raise ValueError("config.json: not a toy config")
    return nn.Linear(meta["config"]["n"], 2)


def toy(n: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, 2)


META = {"arch": "toy", "config": {"n": 3}}


def test_round_trip_from_a_module_or_a_state_dict(tmp_path):
    net = toy()
    for src, folder in ((net, tmp_path / "a"), (net.state_dict(), tmp_path / "b")):
        assert save_pretrained(src, folder, META) == folder
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"] and is_pretrained(folder)
        assert json.loads((folder / "config.json").read_text()) == {**META, "format_version": 1}
        loaded, meta = load_pretrained(folder, build)
        assert meta == {**META, "format_version": 1}
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_dtype_casts_floats_and_loading_casts_back(tmp_path):
    net = toy()
    save_pretrained(net, tmp_path / "half", META, dtype=torch.float16)
    assert read_weights(tmp_path / "half")["weight"].dtype == torch.float16
    loaded, _ = load_pretrained(tmp_path / "half", build)
    assert loaded.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.weight, net.weight.half().float())


def test_config_must_name_one_kind(tmp_path):
    for bad in ({"config": {}}, {"arch": "toy", "model_type": "x"}, ["arch"]):
        with pytest.raises(ValueError, match="exactly one of the fields"):
            save_pretrained(toy(), tmp_path / "x", bad)
    assert not (tmp_path / "x").exists()


def test_a_killed_save_leaves_no_folder_and_no_temporaries(tmp_path, monkeypatch):
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(toy(), tmp_path / "ckpt", META)
    assert list(tmp_path.iterdir()) == []


def test_overwriting_keeps_other_files_and_a_torn_overwrite_is_refused(tmp_path, monkeypatch):
    folder = save_pretrained(toy(seed=0), tmp_path / "stage_1", META)
    (folder / "val.json").write_text("{}")
    save_pretrained(toy(seed=1), folder, META)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "val.json"]
    assert torch.equal(load_pretrained(folder, build)[0].weight, toy(seed=1).weight)
    # Killed between the two renames of an overwrite: new weights, old config.
    real_replace = os.replace

    def replace_weights_only(src, dst):
        if Path(dst).name == "config.json":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_weights_only)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(toy(seed=2), folder, {**META, "name": "retrained"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage_1"]  # no temporaries left
    with pytest.raises(ValueError, match="config.json does not match the config stored in model.safetensors"):
        load_pretrained(folder, build)


def test_policies_of_0_1_store_their_config_under_another_key(tmp_path):
    """finpercep 0.1 policies keep their copy of config.json under ``finpercep_policy``: still checked."""
    from safetensors.torch import save

    folder = tmp_path / "old"
    folder.mkdir()
    meta = {**META, "format_version": 1}
    (folder / "model.safetensors").write_bytes(save(toy().state_dict(), metadata={"finpercep_policy": json.dumps(meta)}))
    (folder / "config.json").write_text(json.dumps(meta))
    assert torch.equal(load_pretrained(folder, build)[0].weight, toy().weight)
    (folder / "config.json").write_text(json.dumps({**meta, "config": {"n": 4}}))
    with pytest.raises(ValueError, match="does not match the config stored"):
        load_pretrained(folder, build)


def test_shapes_are_checked_on_the_meta_device_before_allocating(tmp_path):
    folder = save_pretrained(toy(), tmp_path / "ckpt", META)
    (folder / "config.json").write_text(json.dumps({**META, "config": {"n": 10**9}, "format_version": 1}))
    devices = []

    def spy(meta: dict) -> nn.Module:
        devices.append(torch.empty(0).device.type)  # the default device build runs under
        return build(meta)

    with pytest.raises(ValueError, match=r"weights do not match config.json: 1 tensors differ, e.g. 'weight' is "
                                         r"\(2, 1000000000\) in the config and \(2, 3\) in the file"):
        load_pretrained(folder, spy)
    assert devices == ["meta"]  # never built for real


@pytest.mark.parametrize("how", ["missing", "bad json", "version", "pickle", "truncated", "refused by build"])
def test_bad_folders_are_one_line(tmp_path, how):
    folder = save_pretrained(toy(), tmp_path / "ckpt", META)
    sentinel = tmp_path / "executed"
    expect: tuple[type, str] = (ValueError, "")
    if how == "missing":
        (folder / "model.safetensors").unlink()
        expect = (FileNotFoundError, r"not a toy checkpoint: .*model.safetensors is missing \(expected config.json")
    elif how == "bad json":
        (folder / "config.json").write_text("{")
        expect = (ValueError, "config.json: not valid JSON")
    elif how == "version":
        (folder / "config.json").write_text(json.dumps({**META, "format_version": 7}))
        expect = (ValueError, "format_version 7 is not supported")
    elif how == "pickle":
        (folder / "model.safetensors").write_bytes(pickle.dumps(Sentinel(sentinel)))
        expect = (ValueError, "not a complete safetensors file")
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        expect = (ValueError, "not a complete safetensors file")
    else:
        (folder / "config.json").write_text(json.dumps({"arch": "other", "format_version": 1}))
        expect = (ValueError, "not a toy config")
    with pytest.raises(expect[0], match=expect[1]) as e:
        load_pretrained(folder, build, what="toy")
    assert "\n" not in str(e.value) and not sentinel.exists()


def test_a_file_in_place_of_the_folder_is_a_write_error(tmp_path):
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(WriteError, match="not a folder"):
        save_pretrained(toy(), tmp_path / "ckpt", META)


class Sentinel:
    """Unpickling it creates a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))
