"""``runtime: sklearn``: a scikit-learn estimator saved with skops (safe), or as a pickle only when trusted."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..settings import TensorSpec
from .base import ModelLoadError, ModelMetadata, ModelRuntime, quiet_openmp

METHODS = ("predict", "predict_proba")
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
INPUT = "input"
#: numpy dtype kind of what the method returns -> the output's datatype and the dtype sent.
_OUTPUT_KINDS = {"f": ("FP64", "<f8"), "i": ("INT64", "<i8"), "u": ("INT64", "<i8"), "b": ("BOOL", "?")}
_TEXT_KINDS = "USO"


class SklearnRuntime(ModelRuntime):
    """Serves a fitted scikit-learn estimator (or pipeline).

    ``.skops`` files are loaded with ``skops.io``, which refuses types it does not trust: list those
    you have reviewed in ``trusted_types``. ``.joblib``, ``.pkl`` and ``.pickle`` files are pickles,
    and loading a pickle runs whatever code it holds: they are refused unless ``trust_pickle`` is true.
    ``method``: ``predict`` (default) or ``predict_proba``, served as the output of that name. The
    input ``input`` is ``[-1, n_features_in_]`` of ``dtype`` (``FP64``, default, or ``FP32``); the
    output's datatype is what the method returns: FP64 for numbers, INT64 for integer labels, BYTES
    for string labels.
    """

    name = "sklearn"
    packages = ("sklearn", "skops")
    read_in_child = True

    def __init__(
        self,
        model: str,
        method: str = "predict",
        dtype: str = "FP64",
        trust_pickle: bool = False,
        trusted_types: Sequence[str] = (),
    ) -> None:
        super().__init__(model)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if dtype not in ("FP32", "FP64"):
            raise ValueError(f"dtype must be FP32 or FP64, got {dtype!r}")
        if not isinstance(trust_pickle, bool):
            raise ValueError(f"trust_pickle must be true or false, got {trust_pickle!r}")
        if isinstance(trusted_types, str) or not all(isinstance(t, str) for t in trusted_types):
            raise ValueError(f"trusted_types must be a list of type names, got {trusted_types!r}")
        self.method = method
        self.dtype = dtype
        self.trust_pickle = trust_pickle
        self.trusted_types = list(trusted_types)
        self._predict: Callable[[np.ndarray], Any] | None = None
        self._output_dtype = "<f8"

    def read_metadata(self) -> ModelMetadata:
        predict, features = self._open()
        dtype = "<f4" if self.dtype == "FP32" else "<f8"
        probe = np.asarray(predict(np.zeros((1, features), dtype)))
        datatype = "BYTES" if probe.dtype.kind in _TEXT_KINDS else _OUTPUT_KINDS.get(probe.dtype.kind, ("", ""))[0]
        if not datatype or probe.ndim < 1:
            raise ModelLoadError(
                f"runtime 'sklearn', model file {self.model_path!r}: {self.method}() returns {probe.dtype} of shape "
                f"{list(probe.shape)}, which cannot be served"
            )
        return ModelMetadata(
            inputs=(TensorSpec(INPUT, self.dtype, (-1, features)),),
            outputs=(TensorSpec(self.method, datatype, (-1, *probe.shape[1:])),),
            batched=True,
        )

    def _open(self) -> tuple[Callable[[np.ndarray], Any], int]:
        """The estimator's method and its number of input features."""
        estimator = self._load_estimator()
        where = f"runtime 'sklearn', model file {self.model_path!r}"
        predict = getattr(estimator, self.method, None)
        if not callable(predict):
            raise ModelLoadError(f"{where}: the {type(estimator).__name__} it holds has no {self.method}()")
        features = getattr(estimator, "n_features_in_", None)
        if not isinstance(features, int):
            raise ModelLoadError(
                f"{where}: the {type(estimator).__name__} it holds records no n_features_in_ (is it fitted?)"
            )
        return predict, features

    def _load_estimator(self) -> Any:
        path = self.model_path
        suffix = Path(path).suffix.lower()
        where = f"runtime 'sklearn', model file {path!r}"
        if suffix == ".skops":
            import skops.io

            untrusted = [t for t in skops.io.get_untrusted_types(file=path) if t not in self.trusted_types]
            if untrusted:
                raise ModelLoadError(
                    f"{where}: the file holds types skops does not trust by default: {', '.join(untrusted)}. If you "
                    "made the file or trust its source, list those you have reviewed in options.trusted_types"
                )
            return skops.io.load(path, trusted=self.trusted_types or None)
        if suffix in PICKLE_SUFFIXES:
            if not self.trust_pickle:
                raise ModelLoadError(
                    f"{where}: a {suffix} file is a pickle, and loading a pickle runs any code it holds. Save the "
                    "model with skops (.skops), or set options.trust_pickle: true for a file you trust"
                )
            import joblib

            return joblib.load(path)
        raise ModelLoadError(
            f"{where}: unknown file type {suffix or '(none)'!r}: expected .skops, or {', '.join(PICKLE_SUFFIXES)} "
            "with options.trust_pickle"
        )

    def load(self) -> None:
        quiet_openmp()
        self._predict, _ = self._open()
        datatype = self.metadata().outputs[0].datatype
        self._output_dtype = next((d for name, d in _OUTPUT_KINDS.values() if name == datatype), "U")

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        assert self._predict is not None, "load() runs before run()"
        result = np.asarray(self._predict(inputs[INPUT]))
        return {self.method: result.astype(self._output_dtype, copy=False)}
