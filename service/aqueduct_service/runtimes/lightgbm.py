"""``runtime: lightgbm``: a LightGBM booster saved as a text model file (``Booster.save_model``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..settings import TensorSpec
from .base import ModelMetadata, ModelRuntime, quiet_openmp, worker_threads

INPUT = "input"
OUTPUT = "predict"


class LightGBMRuntime(ModelRuntime):
    """Serves a LightGBM ``Booster`` text model file with ``Booster.predict``.

    The input ``input`` is ``[-1, num_feature]`` of ``dtype`` (``FP64``, default, or ``FP32``); the
    output ``predict`` is FP64, ``[-1]`` or ``[-1, num_class]`` (class probabilities for multiclass).
    ``threads``: prediction threads (default: the worker's share of the pod's CPUs).
    """

    name = "lightgbm"
    packages = ("lightgbm",)
    read_in_child = True

    def __init__(self, model: str, dtype: str = "FP64", threads: int | None = None) -> None:
        super().__init__(model)
        if dtype not in ("FP32", "FP64"):
            raise ValueError(f"dtype must be FP32 or FP64, got {dtype!r}")
        if threads is not None and (type(threads) is not int or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.dtype = dtype
        self.threads = threads
        self._booster: Any = None
        self._threads = 1

    def read_metadata(self) -> ModelMetadata:
        import lightgbm

        booster = lightgbm.Booster(model_file=self.model_path)
        features = booster.num_feature()
        probe = np.asarray(booster.predict(np.zeros((1, features), np.float64), num_threads=1))
        return ModelMetadata(
            inputs=(TensorSpec(INPUT, self.dtype, (-1, features)),),
            outputs=(TensorSpec(OUTPUT, "FP64", (-1, *probe.shape[1:])),),
            batched=True,
        )

    def load(self) -> None:
        quiet_openmp()
        import lightgbm

        self._booster = lightgbm.Booster(model_file=self.model_path)
        self._threads = self.threads or worker_threads()

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        result = self._booster.predict(inputs[INPUT], num_threads=self._threads)
        return {OUTPUT: np.asarray(result, np.float64)}
