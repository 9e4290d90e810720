"""The ``torch`` runtime: ``torch.export`` programs (``.pt2``) and TorchScript modules (``.pt``).

The format is told by the archive's content, not by its name: both are zip files; an export holds
``models/model.json`` (its serialized graph), TorchScript ``code/`` and ``constants.pkl``. A
``torch.save`` pickle (a whole module or a state_dict) is neither: it is refused.

Metadata is read in the pod's main process, which must neither initialise CUDA (forked workers could
not use it then) nor run torch operators (their thread pool does not survive a fork). For an export,
only the serialized graph is read, never the weights, which may have been saved on a GPU: the user
inputs are the forward's arguments, the outputs ``output__0``, ``output__1``… (a returned dict's keys
when the forward returns a dict of tensors), symbolic dimensions ``-1``. TorchScript records no
shapes: the step's declared tensors (``ModelRuntime.declare``) are served, once their names are
checked against the forward's arguments (the module is loaded on the CPU for that).

torch is imported inside the methods, so that this module imports in an image without torch and
``metadata()`` names the image to use instead.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..settings import TensorSpec
from .base import ModelLoadError, ModelMetadata, ModelRuntime

if TYPE_CHECKING:
    import torch

EXPORT = "torch.export program"
TORCHSCRIPT = "TorchScript module"

#: ``dtype`` option -> the torch dtype floating-point parameters and inputs are cast to (None: as saved).
PRECISIONS: dict[str, str | None] = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}
_DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")
# OIP datatype -> torch dtype name. numpy has no bfloat16: a bfloat16 tensor of the model travels as FP32.
_TORCH_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_DATATYPES = {torch_name: datatype for datatype, torch_name in _TORCH_DTYPES.items()} | {"bfloat16": "FP32"}
_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class _Signature:
    """How the forward is called: ``positional`` then ``keywords`` argument names, and the torch dtype
    (by name) each input has in the model, in the order of the metadata's inputs."""

    kind: str
    positional: tuple[str, ...]
    keywords: tuple[str, ...]
    input_dtypes: tuple[str, ...]


class TorchRuntime(ModelRuntime):
    """Serve a ``torch.export`` program (``.pt2``, ``torch.export.save``) or TorchScript (``.pt``, ``torch.jit.save``).

    Every batch runs under ``torch.inference_mode()``; inputs are copied to ``device`` (cast to the
    model's dtype there), outputs come back as numpy arrays on the CPU in their declared datatype.
    A TorchScript module records no shapes: the config must declare its ``inputs:`` and ``outputs:``.

    Args:
        model: the model file.
        device: ``cpu`` (default), ``cuda`` or ``cuda:N``, numbered among the GPUs the worker sees.
        dtype: ``fp32`` (default: the model as saved), ``fp16`` (CUDA only) or ``bf16``: the model's
            floating-point parameters and buffers, and its floating-point inputs, are cast to it, and
            it runs under ``torch.autocast`` to that dtype.
    """

    name = "torch"
    packages = ("torch",)

    def __init__(self, model: str, device: str = "cpu", dtype: str = "fp32") -> None:
        super().__init__(model)
        self.device = device
        self.dtype = dtype
        self._signature: _Signature | None = None
        self._module: Any = None
        self._device: torch.device | None = None
        self._precision: torch.dtype | None = None
        self._inputs: list[tuple[str, torch.dtype]] = []
        self._outputs: list[tuple[str, torch.dtype]] = []

    # ------------------------------------------------------------------ main process, config time
    def read_metadata(self) -> ModelMetadata:
        """The model's tensors, from the export's graph or the TorchScript forward and the declared tensors."""
        self._check_options()
        with _open(self.model_path) as archive:
            kind, entry = _format_of(archive, self.model_path)
            corrupt = archive.testzip()  # torch itself loads a weight whose bytes changed without a word
            if corrupt is not None:
                raise ModelLoadError(
                    f"runtime 'torch': model file {self.model_path!r} is corrupt: its entry {corrupt!r} fails its CRC"
                )
            if kind == EXPORT:
                metadata, self._signature = _export_metadata(json.loads(archive.read(entry)), self.model_path)
                return metadata
        metadata, self._signature = self._torchscript_metadata()
        return metadata

    def _check_options(self) -> None:
        where = f"runtime 'torch', model {self.model_path!r}"
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ModelLoadError(f"{where}: option device is {self.device!r}: expected cpu, cuda or cuda:N")
        if self.dtype not in PRECISIONS:
            raise ModelLoadError(f"{where}: option dtype is {self.dtype!r}: expected one of {', '.join(PRECISIONS)}")
        if self.dtype == "fp16" and self.device == "cpu":
            raise ModelLoadError(f"{where}: dtype fp16 runs on CUDA only (device is cpu): use bf16 on a CPU")

    def _torchscript_metadata(self) -> tuple[ModelMetadata, _Signature]:
        import torch

        where = f"runtime 'torch': TorchScript model {self.model_path!r}"
        if not self.declared_inputs or not self.declared_outputs:
            raise ModelLoadError(f"{where} records no tensor shapes: declare its inputs: and outputs: in the config")
        for spec in (*self.declared_inputs, *self.declared_outputs):
            if spec.datatype not in _TORCH_DTYPES:
                raise ModelLoadError(f"{where}: tensor {spec.name!r} is declared {spec.datatype}, which torch lacks")
        module = torch.jit.load(self.model_path, map_location="cpu")  # type: ignore[no-untyped-call]
        arguments = module.forward.schema.arguments[1:]  # after self
        accepted = [argument.name for argument in arguments]
        required = {argument.name for argument in arguments if not argument.has_default_value()}
        declared = [spec.name for spec in self.declared_inputs]
        if not set(declared) <= set(accepted) or not required <= set(declared):
            raise ModelLoadError(
                f"{where}: the declared inputs ({', '.join(declared)}) do not match its forward's arguments "
                f"({', '.join(accepted)})"
            )
        tensors = (*self.declared_inputs, *self.declared_outputs)
        metadata = ModelMetadata(
            inputs=self.declared_inputs,
            outputs=self.declared_outputs,
            batched=all(spec.shape[:1] == (-1,) for spec in tensors),
        )
        input_dtypes = tuple(_TORCH_DTYPES[spec.datatype] for spec in self.declared_inputs)
        return metadata, _Signature(TORCHSCRIPT, (), tuple(declared), input_dtypes)

    # ------------------------------------------------------------------ worker
    def load(self) -> None:
        """Load the model on ``device`` and cast it to ``dtype``."""
        import torch

        if self._signature is None:  # metadata read elsewhere (another process): read the call signature here
            self.read_metadata()
        signature = self._signature
        assert signature is not None
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(
                f"runtime 'torch', model {self.model_path!r}: device {self.device!r}, but this worker sees no GPU "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
        if signature.kind == EXPORT:
            from torch.export.passes import move_to_device_pass

            program = torch.export.load(self.model_path)
            module = move_to_device_pass(program, device).module()
        else:
            module = torch.jit.load(self.model_path, map_location=device).eval()  # type: ignore[no-untyped-call]
        precision_name = PRECISIONS[self.dtype]
        if precision_name is not None:
            self._precision = getattr(torch, precision_name)
            module = module.to(self._precision)
        metadata = self.metadata()
        self._inputs = [
            (spec.name, getattr(torch, precision_name if precision_name and dtype in _FLOATS else dtype))
            for spec, dtype in zip(metadata.inputs, signature.input_dtypes, strict=True)
        ]
        self._outputs = [(spec.name, getattr(torch, _TORCH_DTYPES[spec.datatype])) for spec in metadata.outputs]
        self._device = device
        self._module = module

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Run the model once on the batch, under ``torch.inference_mode()``."""
        import torch

        signature = self._signature
        device = self._device
        assert signature is not None and device is not None, "load() runs before run()"
        # Autocast carries a float32 tensor the model makes itself (from a uint8 image, say) into the
        # reduced-precision convolutions and matrix products that follow.
        precision = self._precision
        autocast = contextlib.nullcontext() if precision is None else torch.autocast(device.type, precision)
        with torch.inference_mode(), autocast:
            tensors = {name: _to_torch(inputs[name], device, dtype) for name, dtype in self._inputs}
            result = self._module(
                *(tensors[name] for name in signature.positional),
                **{name: tensors[name] for name in signature.keywords},
            )
            produced = _output_tensors(result, [name for name, _ in self._outputs])
            return {
                name: tensor.to(dtype).cpu().numpy()
                for (name, dtype), tensor in zip(self._outputs, produced, strict=True)
            }


def _open(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ModelLoadError(
            f"runtime 'torch': model file {path!r} is neither a torch.export program (.pt2) nor TorchScript (.pt): "
            "it is not a zip archive, or it is truncated"
        ) from None


def _format_of(archive: zipfile.ZipFile, path: str) -> tuple[str, str]:
    """The model's format and, for an export, the archive entry holding its graph."""
    inner = {name.partition("/")[2]: name for name in archive.namelist()}
    if "models/model.json" in inner:
        return EXPORT, inner["models/model.json"]
    if "constants.pkl" in inner and any(name.startswith("code/") for name in inner):
        return TORCHSCRIPT, ""
    what = "a torch.save pickle (a module or a state_dict)" if "data.pkl" in inner else "another zip archive"
    raise ModelLoadError(
        f"runtime 'torch': model file {path!r} is {what}, not a torch.export program (.pt2) or TorchScript (.pt): "
        "save the model with torch.export.save (or torch.jit.save)"
    )


def _export_metadata(document: Any, path: str) -> tuple[ModelMetadata, _Signature]:
    """Inputs, outputs and call signature from an export's serialized graph, no weights loaded."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    where = f"runtime 'torch': torch.export program {path!r}"
    graph_module = _dict_to_dataclass(schema.ExportedProgram, document).graph_module  # type: ignore[no-untyped-call]
    placeholders = [
        _tensor_name(spec.user_input.arg, where, "input")
        for spec in graph_module.signature.input_specs
        if spec.type == "user_input"
    ]
    results = [
        _tensor_name(spec.user_output.arg, where, "output")
        for spec in graph_module.signature.output_specs
        if spec.type == "user_output"
    ]
    call = graph_module.module_call_graph[0].signature if graph_module.module_call_graph else None
    if call is None:
        raise ModelLoadError(f"{where} records no call signature of its forward")
    args_spec, kwargs_spec = _tree(call.in_spec)["children_spec"]
    if not all(_is_leaf(spec) for spec in (*args_spec["children_spec"], *kwargs_spec["children_spec"])):
        raise ModelLoadError(f"{where}: its forward takes nested inputs; export one that takes tensors")
    positional = tuple(call.forward_arg_names[: len(args_spec["children_spec"])])
    keywords = tuple(str(key) for key in json.loads(kwargs_spec["context"]))
    input_names = (*positional, *keywords)
    if len(input_names) != len(placeholders):
        raise ModelLoadError(f"{where}: {len(input_names)} forward arguments but {len(placeholders)} graph inputs")
    out_spec = _tree(call.out_spec)
    keys = json.loads(out_spec["context"]) if out_spec["type"] == "builtins.dict" else None
    if keys and all(isinstance(key, str) for key in keys) and all(map(_is_leaf, out_spec["children_spec"])):
        output_names = tuple(keys)
    else:
        output_names = tuple(f"output__{i}" for i in range(len(results)))
    values = graph_module.graph.tensor_values
    input_dtypes = tuple(_dtype_name(values[name].dtype) for name in placeholders)
    inputs = tuple(_spec(name, values[node], where) for name, node in zip(input_names, placeholders, strict=True))
    outputs = tuple(_spec(name, values[node], where) for name, node in zip(output_names, results, strict=True))
    # Batched: one symbol is the first dimension of every tensor (two inputs of independent lengths, or
    # an output of twice the rows, cannot be joined and split by rows).
    first_dims = {_first_dim(values[node]) for node in (*placeholders, *results)}
    batched = bool(placeholders) and len(first_dims) == 1 and None not in first_dims
    return ModelMetadata(inputs, outputs, batched), _Signature(EXPORT, positional, keywords, input_dtypes)


def _first_dim(meta: Any) -> str | None:
    """The symbol of a tensor's first dimension (its expression's text), None when fixed or a scalar."""
    if not meta.sizes or meta.sizes[0].type != "as_expr":
        return None
    return str(meta.sizes[0].as_expr.expr_str)


def _tree(serialized: str) -> dict[str, Any]:
    """A serialized pytree spec (``torch.utils._pytree.treespec_dumps``, protocol 1) as its JSON tree:
    each node ``{"type": "builtins.tuple", "context": "<JSON>", "children_spec": [...]}``, a leaf's type null."""
    protocol, tree = json.loads(serialized)
    if protocol != 1:
        raise ValueError(f"its call signature is in pytree protocol {protocol}; this runtime reads protocol 1")
    return dict(tree)


def _is_leaf(spec: dict[str, Any]) -> bool:
    return spec["type"] is None


def _tensor_name(argument: Any, where: str, what: str) -> str:
    if argument.type != "as_tensor":
        raise ModelLoadError(f"{where}: an {what} of its forward is not a tensor ({argument.type}); export one that is")
    return str(argument.as_tensor.name)


def _dtype_name(serialized: Any) -> str:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    return str(_SERIALIZE_TO_TORCH_DTYPE[serialized]).removeprefix("torch.")


def _spec(name: str, meta: Any, where: str) -> TensorSpec:
    dtype = _dtype_name(meta.dtype)
    datatype = _DATATYPES.get(dtype)
    if datatype is None:
        raise ModelLoadError(f"{where}: tensor {name!r} has dtype {dtype}, which the inference protocol lacks")
    shape = tuple(int(size.as_int) if size.type == "as_int" else -1 for size in meta.sizes)
    return TensorSpec(name, datatype, shape)


def _to_torch(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``array`` as a tensor of ``dtype`` on ``device``; a read-only request array is never written."""
    import torch

    if not array.flags.c_contiguous or (not array.flags.writeable and device.type == "cpu"):
        array = np.array(array, order="C")  # torch takes no negative strides; a model may write its inputs
    if array.flags.writeable:
        return torch.from_numpy(array).to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only: torch warns, but it is copied to the GPU here
        return torch.from_numpy(array).to(device=device, dtype=dtype)


def _output_tensors(result: Any, names: Sequence[str]) -> list[torch.Tensor]:
    """The forward's result as one tensor per output: a dict's by name, else a tensor or (nested) tuple's leaves."""
    from torch.utils._pytree import tree_leaves

    if isinstance(result, Mapping) and all(name in result for name in names):
        return [result[name] for name in names]
    leaves = tree_leaves(result)
    if len(leaves) != len(names):
        raise RuntimeError(f"the model returned {len(leaves)} tensor(s) for the outputs {', '.join(names)}")
    return leaves
