"""Built-in model runtimes: a step with ``runtime: NAME`` and ``model: FILE`` serves the file with no code.

Each runtime lives in a module of its own (one model format each) and is imported only when a step
uses it, so a package missing from the image is an error for that runtime alone. See
``docs/RUNTIMES.md`` and ``base.ModelRuntime`` for the contract.
"""

from __future__ import annotations

import importlib

from .base import ModelLoadError, ModelMetadata, ModelRuntime

#: ``runtime:`` value -> ``"module:Class"`` of its ``ModelRuntime``.
RUNTIMES: dict[str, str] = {
    "onnx": "aqueduct_service.runtimes.onnx:OnnxRuntime",
    "torch": "aqueduct_service.runtimes.torch:TorchRuntime",
    "sklearn": "aqueduct_service.runtimes.sklearn:SklearnRuntime",
    "xgboost": "aqueduct_service.runtimes.xgboost:XGBoostRuntime",
    "lightgbm": "aqueduct_service.runtimes.lightgbm:LightGBMRuntime",
}


def runtime_class(name: str) -> type[ModelRuntime]:
    """The runtime class registered as ``name``.

    Raises:
        ModelLoadError: no runtime has that name, or its module cannot be imported.
    """
    reference = RUNTIMES.get(name)
    if reference is None:
        raise ModelLoadError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelLoadError(f"runtime {name!r} is not available in this image: {type(e).__name__}: {e}") from e
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelRuntime)):
        raise ModelLoadError(f"runtime {name!r}: {reference} is not a ModelRuntime subclass")
    return cls


__all__ = ["RUNTIMES", "ModelLoadError", "ModelMetadata", "ModelRuntime", "runtime_class"]
