"""``runtime: onnx``: an ONNX model file served by onnxruntime, on the CPU or the CUDA execution provider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..settings import TensorSpec
from .base import ModelLoadError, ModelMetadata, ModelRuntime, worker_threads

#: onnxruntime's element types -> OIP datatypes.
_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


class OnnxRuntime(ModelRuntime):
    """Serves an ONNX model with an onnxruntime ``InferenceSession``.

    Inputs and outputs are the session's, by name; a dimension the graph leaves open (a symbolic name
    or none) is ``-1``, and the model is batched when the first dimension of every input and output
    is open. ``device``: ``cpu`` (default), ``cuda`` or ``cuda:N`` (the CUDA execution provider; an
    error at start when this onnxruntime has none). ``threads``: intra-op threads (default: the
    worker's share of the pod's CPUs). ``spinning``: let those threads spin between runs, as
    onnxruntime does by default (off here: on a pod of few CPUs the spinning takes the CPU the HTTP
    side needs; turn it on for the lowest latency on CPUs the model has to itself).
    """

    name = "onnx"
    packages = ("onnxruntime",)
    read_in_child = True

    def __init__(self, model: str, device: str = "cpu", threads: int | None = None, spinning: bool = False) -> None:
        super().__init__(model)
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.device = device
        self.cuda_device = int(index or 0) if kind == "cuda" else None
        if type(spinning) is not bool:
            raise ValueError(f"spinning must be true or false, got {spinning!r}")
        self.threads = threads
        self.spinning = spinning
        self._session: Any = None
        self._outputs: list[str] = []
        self._bytes_inputs: set[str] = set()
        self._bytes_outputs: set[str] = set()

    def read_metadata(self) -> ModelMetadata:
        import onnxruntime as ort

        if self.cuda_device is not None and _CUDA not in ort.get_available_providers():
            raise ModelLoadError(
                f"runtime 'onnx', model file {self.model_path!r}: device {self.device!r} needs onnxruntime with the "
                f"CUDA execution provider (onnxruntime-gpu); this one has {', '.join(ort.get_available_providers())}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(self.model_path, options, providers=[_CPU])
        inputs = tuple(self._spec(arg, "input") for arg in session.get_inputs())
        outputs = tuple(self._spec(arg, "output") for arg in session.get_outputs())
        batched = all(spec.shape[:1] == (-1,) for spec in inputs + outputs)
        return ModelMetadata(inputs, outputs, batched)

    def _spec(self, arg: Any, kind: str) -> TensorSpec:
        datatype = _DATATYPES.get(arg.type)
        if datatype is None:
            raise ModelLoadError(
                f"runtime 'onnx', model file {self.model_path!r}: {kind} {arg.name!r} has type {arg.type}, "
                f"which the inference protocol has no datatype for"
            )
        return TensorSpec(arg.name, datatype, tuple(_dim(d) for d in arg.shape))

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or worker_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        providers: Sequence[Any] = [_CPU]
        if self.cuda_device is not None:
            providers = [(_CUDA, {"device_id": self.cuda_device}), _CPU]
        self._session = ort.InferenceSession(self.model_path, options, providers=providers)
        if self.cuda_device is not None and _CUDA not in self._session.get_providers():
            raise RuntimeError(
                f"runtime 'onnx', model file {self.model_path!r}: the CUDA execution provider did not start "
                "(onnxruntime's log says why: no GPU visible, or CUDA/cuDNN libraries missing)"
            )
        self._outputs = [spec.name for spec in self.metadata().outputs]
        self._bytes_inputs = {spec.name for spec in self.metadata().inputs if spec.datatype == "BYTES"}
        self._bytes_outputs = {spec.name for spec in self.metadata().outputs if spec.datatype == "BYTES"}

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        feed = {name: _text(array) if name in self._bytes_inputs else array for name, array in inputs.items()}
        results = self._session.run(self._outputs, feed)
        return {
            name: result.astype(str) if name in self._bytes_outputs else result  # str objects -> numpy U
            for name, result in zip(self._outputs, results, strict=True)
        }


def _dim(dim: Any) -> int:
    """A graph dimension: its size, or -1 when the graph leaves it open (a symbolic name, or none)."""
    return dim if isinstance(dim, int) and dim >= 0 else -1


def _text(array: np.ndarray) -> np.ndarray:
    """A BYTES tensor (numpy ``S``) as the ``str`` objects onnxruntime's string tensors take."""
    return np.char.decode(array, "utf-8").astype(object)
