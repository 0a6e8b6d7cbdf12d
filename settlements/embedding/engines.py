"""Inference engines: the backbone cut at its layer, exported once to ONNX, run by ONNX Runtime or OpenVINO.

Every engine sees the same model inputs: :class:`~settlements.embedding.infer.ModelInput` makes them as
for torch, and only the network is swapped. The exported network is torch's own inference graph (batch
norms folded into the convolutions, as a torch fp32 run computes), written once per (backbone, weights
SHA-256, layer, input size) under the work folder's ``engines/`` and rebuilt when any of them changes;
its int8 version is quantised statically (ONNX Runtime's QDQ format: int8 weights per channel, uint8
activations, ranges calibrated on a sample of the run's own tiles), once per work folder, and run by
either engine. Whether an engine's embeddings may stand in for torch fp32's is the fidelity gate's
call (:mod:`settlements.embedding.fidelity`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import REFERENCE_ENGINE, REFERENCE_PRECISION
from ..errors import EngineError
from ..store import read_json_if, settings_key, sha256_file, write_atomic, write_json
from .backbones import Backbone
from .infer import cpu_supports, forward, prepare_model

log = logging.getLogger(__name__)

#: The Python module of each engine, and the pip extra that installs it.
ENGINE_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
INSTALL_HINT = "pip install 'settlements[engines]' (on a GPU machine: 'settlements[engines-gpu]')"

ONNX_INPUT, ONNX_OUTPUT = "input", "features"
ONNX_OPSET = 17
#: Tiles whose activations ONNX Runtime's calibration holds at once (MobileNetV2 at 224 px: a peak of
#: 4.4 GB for 32 tiles, 0.3 GB above the export's for 2).
CALIBRATION_STRIDE = 2


def installed(engine: str) -> bool:
    """True where ``engine`` can be imported (torch always can)."""
    if engine == REFERENCE_ENGINE:
        return True
    return importlib.util.find_spec(ENGINE_MODULES[engine]) is not None


def require(engine: str, precision: str = "fp32") -> None:
    """Raise one line naming the setting where ``engine`` (or int8's calibration) is not installed."""
    if not installed(engine):
        raise EngineError(f"embedding.engine: {engine} is not installed here; {INSTALL_HINT}")
    if precision == "int8" and not installed("onnxruntime"):
        raise EngineError(f"embedding.precision: int8 is calibrated with onnxruntime, not installed here; "
                          f"{INSTALL_HINT}")


def versions() -> dict[str, str]:
    """Versions of the installed engines (for the runs table and the measurement's key)."""
    out = {}
    for engine, module in ENGINE_MODULES.items():
        if installed(engine):
            out[engine] = str(getattr(importlib.import_module(module), "__version__", "?"))
    return out


# ------------------------------------------------------------------------------------------ export

@dataclass(frozen=True)
class Exported:
    """An exported network on disk: its file and the SHA-256 that names what it computes."""

    path: Path
    sha256: str


def export_key(backbone: Backbone, input_size: int) -> dict[str, Any]:
    """What the exported network depends on: rebuilt when any of these changes."""
    return {"backbone": backbone.name, "weights_sha256": backbone.weights.sha256, "layer": backbone.layer,
            "input_size": int(input_size)}


def export_folder(root: Path, backbone: Backbone, input_size: int) -> Path:
    return root / settings_key(export_key(backbone, input_size))


def _valid(manifest: dict[str, Any] | None, expect: dict[str, Any], path: Path) -> bool:
    """The manifest describes ``expect`` and the file beside it is the one it hashed."""
    if not manifest or not path.is_file() or any(manifest.get(k) != v for k, v in expect.items()):
        return False
    return bool(manifest.get("sha256") == sha256_file(path))


def export_onnx(backbone: Backbone, input_size: int, root: Path) -> Exported:
    """The backbone as torch runs it in fp32 (batch norms folded), as ONNX with a free batch size: made once
    per :func:`export_key` under ``root`` (the work folder's ``engines/``); other keys' exports are removed."""
    folder = export_folder(root, backbone, input_size)
    path, manifest_path = folder / "model.onnx", folder / "export.json"
    key = export_key(backbone, input_size)
    manifest = read_json_if(manifest_path)
    if _valid(manifest, key, path):
        return Exported(path, manifest["sha256"])  # type: ignore[index]
    folder.mkdir(parents=True, exist_ok=True)
    model = prepare_model(backbone.model, torch.device("cpu"), None)
    example = torch.zeros(2, 3, input_size, input_size)
    exporter = _export(model, example, path)
    for other in root.iterdir():  # exports of another backbone, weights file, layer or size are stale
        if other.is_dir() and other != folder:
            shutil.rmtree(other, ignore_errors=True)
    sha = sha256_file(path)
    write_json(manifest_path, {**key, "sha256": sha, "exporter": exporter, "torch": torch.__version__})
    log.info("exported %s cut at %s (%d px) to %s", backbone.name, backbone.layer, input_size, path)
    return Exported(path, sha)


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``model`` as ONNX to ``path`` (atomically); the exporter used.

    The TorchScript exporter takes about 1.5 s for MobileNetV2 here, the torch.export one about 15 s
    for the same graph; the latter is used where torch no longer has the former.
    """
    def write(tmp: Path, dynamo: bool) -> None:
        kwargs: dict[str, Any] = ({"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)} if dynamo else
                                  {"dynamic_axes": {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}})
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                              opset_version=ONNX_OPSET, dynamo=dynamo, external_data=False, **kwargs)

    try:
        write_atomic(path, lambda tmp: write(tmp, False))
        return "torchscript"
    except (TypeError, RuntimeError, ImportError, AttributeError) as exc:  # a torch without the old exporter
        log.debug("TorchScript ONNX export unavailable (%s); using torch.export", exc)
    try:
        write_atomic(path, lambda tmp: write(tmp, True))
    except Exception as exc:
        raise EngineError(f"{path}: the network cannot be exported to ONNX ({type(exc).__name__}: {exc})"
                          .splitlines()[0]) from None
    return "dynamo"


def quantize_int8(exported: Exported, calibration: Callable[[], Iterable[np.ndarray]], n_tiles: int,
                  fingerprint: str) -> Exported:
    """The int8 version of ``exported``: static quantisation, activation ranges calibrated on ``calibration``
    (batches of model inputs of the run's own tiles, ``n_tiles`` of them, named by ``fingerprint``).

    Made once per work folder and export: later runs reuse it (their new rasters are embedded by the same
    int8 network, so one cache key still means one network), and it is rebuilt with the export.
    """
    folder = exported.path.parent
    path, manifest_path = folder / "model.int8.onnx", folder / "int8.json"
    manifest = read_json_if(manifest_path)
    if _valid(manifest, {"fp32_sha256": exported.sha256}, path):
        return Exported(path, manifest["sha256"])  # type: ignore[index]
    require("onnxruntime", "int8")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The calibration batches, given one stride at a time (``set_range``): ONNX Runtime then folds each
        batch's activation ranges in before the next, where it would otherwise hold every activation of
        every batch (GBs at 224 px)."""

        def __init__(self) -> None:  # a few tiles a stride: every activation of a stride is held at once
            self.batches = [c for b in calibration() for c in np.array_split(b, -(-len(b) // CALIBRATION_STRIDE))]
            self.at, self.stop = 0, len(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.at, self.stop = start_index, min(end_index, len(self.batches))

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.at >= self.stop:
                return None
            self.at += 1
            return {ONNX_INPUT: self.batches[self.at - 1]}

    pre = folder / "model.pre.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_atomic(pre, lambda tmp: quant_pre_process(str(exported.path), str(tmp)))
        write_atomic(path, lambda tmp: quantize_static(
            str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            extra_options={"CalibStridedMinMax": 1}))
    pre.unlink(missing_ok=True)
    for leftover in folder.glob("*augmented*.onnx"):  # the calibrator's own scratch model
        leftover.unlink(missing_ok=True)
    sha = sha256_file(path)
    write_json(manifest_path, {"fp32_sha256": exported.sha256, "sha256": sha, "calibration_tiles": n_tiles,
                               "calibration": fingerprint})
    log.info("int8 network calibrated on %d of the run's tiles: %s", n_tiles, path)
    return Exported(path, sha)


# ----------------------------------------------------------------------------------------- runners

class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after the block.

    OpenVINO replaces the main thread's (Python's faulthandler's) with one of its own that it may free
    later: a signal delivered on it then (SIGCHLD from a DataLoader worker, Python's handlers use the
    alternate stack) killed the process with SIGSEGV. A no-op where libc has no ``sigaltstack``.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _SignalStack()
        ok = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    except (OSError, AttributeError):
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.sigaltstack(ctypes.byref(saved), None)


class Runner:
    """One engine at one precision on one device: model inputs (n, 3, s, s) -> float32 features (n, dim),
    on the CPU, or on the device where it is a GPU."""

    engine: str
    precision: str
    device: torch.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"


class TorchRunner(Runner):
    """The network in torch, as a torch run prepares it (channels_last, batch norms folded in fp32)."""

    engine = REFERENCE_ENGINE

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = REFERENCE_PRECISION) -> None:
        self.precision, self.device = precision, device
        self.amp = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = prepare_model(model, device, self.amp)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x, self.device, self.amp)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime: its CPU provider; on CUDA its CUDA provider, or TensorRT's where it is installed (fp16
    is TensorRT's only). On a GPU the inputs and features stay there (bound by pointer, no copy)."""

    engine = "onnxruntime"

    def __init__(self, path: Path, precision: str, device: torch.device, threads: int) -> None:
        import onnxruntime as ort

        self.precision, self.device = precision, device
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        available = ort.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise EngineError(f"embedding.engine: onnxruntime here has no CUDA provider (has {available}); "
                                  "install onnxruntime-gpu instead of onnxruntime")
            cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
            providers = [cuda, *providers]
            if precision in ("fp16", "int8") or "TensorrtExecutionProvider" in available:
                if "TensorrtExecutionProvider" not in available:
                    raise EngineError(f"embedding.precision: {precision} in onnxruntime on a GPU needs its TensorRT "
                                      "provider (pip install tensorrt)")
                trt = {"device_id": device.index or 0, "trt_fp16_enable": precision == "fp16",
                       "trt_engine_cache_enable": True, "trt_engine_cache_path": str(path.parent / "tensorrt")}
                providers = [("TensorrtExecutionProvider", trt), *providers]
        elif precision not in ("fp32", "int8"):
            raise EngineError(f"embedding.precision: onnxruntime runs {precision} only on a GPU (TensorRT)")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # a damaged file, a provider that cannot load
            raise EngineError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: {exc})"
                              .splitlines()[0]) from None
        self.dim: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            return torch.from_numpy(self.session.run([ONNX_OUTPUT], {ONNX_INPUT: feed})[0])
        xb = x.to(self.device).contiguous()
        if self.dim is None:
            self.dim = int(self.session.run([ONNX_OUTPUT], {ONNX_INPUT: xb[:1].cpu().numpy()})[0].shape[1])
        out = torch.empty((len(xb), self.dim), dtype=torch.float32, device=self.device)
        io = self.session.io_binding()
        index = self.device.index or 0
        io.bind_input(ONNX_INPUT, "cuda", index, np.float32, tuple(xb.shape), xb.data_ptr())
        io.bind_output(ONNX_OUTPUT, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input is made on torch's stream
        self.session.run_with_iobinding(io)
        return out


class OpenVinoRunner(Runner):
    """OpenVINO on the CPU: fp32, its bf16 inference precision (CPUs with native bf16), or the int8 network.
    Threads unpinned, as torch's: a DataLoader worker shares the cores."""

    engine = "openvino"

    def __init__(self, path: Path, precision: str, device: torch.device, threads: int) -> None:
        import openvino as ov

        if device.type != "cpu":
            raise EngineError("embedding.engine: openvino runs on the CPU here; on a GPU use torch or onnxruntime")
        self.precision, self.device = precision, device
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        with keep_signal_stack():
            core = ov.Core()
            try:
                self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except Exception as exc:
                raise EngineError(f"{path}: openvino cannot load it ({type(exc).__name__}: {exc})"
                                  .splitlines()[0]) from None
            self.request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with keep_signal_stack():
            out = self.request.infer({0: feed})[0]
            return torch.from_numpy(np.array(out, dtype=np.float32, copy=True))  # the request reuses its buffer


def make_runner(engine: str, precision: str, device: torch.device, model: torch.nn.Module | None = None,
                path: Path | None = None, threads: int | None = None) -> Runner:
    """The runner of ``engine`` at ``precision``: torch runs ``model``, the others the ONNX file ``path``."""
    threads = threads or torch.get_num_threads()
    if engine == REFERENCE_ENGINE:
        if model is None:
            raise ValueError("the torch engine needs the model")
        return TorchRunner(model, device, precision)
    require(engine, precision)
    if path is None:
        raise ValueError(f"the {engine} engine needs the exported network")
    if engine == "onnxruntime":
        return OnnxRuntimeRunner(path, precision, device, threads)
    return OpenVinoRunner(path, precision, device, threads)


def candidates(device: torch.device, engine: str, precision: str) -> list[tuple[str, str]]:
    """(engine, precision) pairs ``auto`` may choose among on ``device``: the installed engines' precisions
    that run natively there (torch bf16 never: its 7-bit mantissa is a known loss, opt-in only)."""
    cuda = device.type == "cuda"
    out: list[tuple[str, str]] = [("torch", "fp32")]
    if cuda or cpu_supports(torch.float16):
        out.append(("torch", "fp16"))
    if installed("onnxruntime"):
        import onnxruntime as ort

        providers = ort.get_available_providers()
        if not cuda:
            out += [("onnxruntime", "fp32"), ("onnxruntime", "int8")]
        elif "CUDAExecutionProvider" in providers:
            out.append(("onnxruntime", "fp32"))
            if "TensorrtExecutionProvider" in providers:
                out.append(("onnxruntime", "fp16"))
    if installed("openvino") and not cuda:
        out.append(("openvino", "fp32"))
        if cpu_supports(torch.bfloat16):
            out.append(("openvino", "bf16"))
        if installed("onnxruntime"):  # int8 is calibrated with onnxruntime's tools
            out.append(("openvino", "int8"))
    return [(e, p) for e, p in out if engine in ("auto", e) and precision in ("auto", p)]
