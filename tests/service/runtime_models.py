"""Model files the runtime tests serve, made here (never downloaded), and a pre-processing handler.

Each ``make_*`` writes a model into a directory and returns its path and a function that runs the same
model in this process (the reference answers the pod must give).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from aqueduct_service import InferenceTask

from aqueduct import BaseTaskHandler

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]
RNG_SEED = 7
FEATURES = 6


def training_data(rows: int = 300, features: int = FEATURES, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic features and class labels that depend on them."""
    rng = np.random.default_rng(RNG_SEED)
    x = rng.normal(size=(rows, features))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64) * (classes - 2)
    return x, y


def make_onnx_linear(directory: Path) -> tuple[Path, Predict]:
    """``y = x @ W + b`` (FP32, x ``[batch, 4]`` with a symbolic batch dim) and ``norm``: the row sums of y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axes"], ["norm"], keepdims=0),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("norm", TensorProto.FLOAT, [None]),
        ],
        [
            numpy_helper.from_array(weight, "W"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    path = directory / "linear.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        y = x @ weight + bias
        return {"y": y, "norm": y.sum(axis=1)}

    return path, predict


def make_onnx_conv(directory: Path) -> tuple[Path, Predict]:
    """A small conv net: image ``[batch, 3, 8, 8]`` FP32 -> Conv 3x3 -> Relu -> global average pool -> ``scores``
    ``[batch, 4]``. The reference is onnxruntime itself on one image at a time."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(RNG_SEED)
    kernel = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(size=(4,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "K", "B"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["scores"]),
        ],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(kernel, "K"), numpy_helper.from_array(bias, "B")],
    )
    path = directory / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def predict(image: np.ndarray) -> dict[str, np.ndarray]:
        rows = [session.run(["scores"], {"image": image[i : i + 1]})[0] for i in range(len(image))]
        return {"scores": np.concatenate(rows)}

    return path, predict


def make_onnx_fixed(directory: Path) -> Path:
    """A graph whose batch dimension is fixed (2): not batched."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    path = directory / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def make_sklearn(directory: Path, kind: str) -> tuple[Path, Any]:
    """A fitted estimator saved in ``directory``; ``kind``: ``logreg`` (skops), ``boosting``
    (GradientBoostingClassifier, skops, holding a type skops does not trust by default), ``joblib``
    (LogisticRegression as a pickle) or ``labels`` (LogisticRegression with string labels, skops)."""
    import joblib
    import skops.io
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = training_data()
    if kind == "boosting":
        estimator: Any = GradientBoostingClassifier(n_estimators=10, max_depth=2, random_state=0).fit(x, y)
    elif kind == "labels":
        estimator = LogisticRegression(max_iter=500).fit(x, np.array(["cat", "dog", "emu"])[y])
    else:
        estimator = LogisticRegression(max_iter=500).fit(x, y)
    if kind == "joblib":
        path = directory / "logreg.joblib"
        joblib.dump(estimator, path)
    else:
        path = directory / f"{kind}.skops"
        skops.io.dump(estimator, path)
    return path, estimator


def make_xgboost(directory: Path, suffix: str = ".json") -> tuple[Path, Any]:
    """A 3-class ``multi:softprob`` booster on ``FEATURES`` features, saved as JSON or UBJSON; the booster
    (one thread, so that this process never starts OpenMP's pool: see ``ModelRuntime.read_in_child``)."""
    import xgboost

    x, y = training_data()
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1, "seed": 0}
    booster = xgboost.train(params, xgboost.DMatrix(x, y, nthread=1), num_boost_round=15)
    path = directory / f"booster{suffix}"
    booster.save_model(path)
    return path, booster


def make_lightgbm(directory: Path, objective: str = "multiclass") -> tuple[Path, Any]:
    """A LightGBM booster (``multiclass`` over 3 classes, or ``binary``) saved as a text model file."""
    import lightgbm

    x, y = training_data()
    params: dict[str, Any] = {"objective": objective, "num_threads": 1, "verbose": -1, "seed": 0}
    if objective == "multiclass":
        params["num_class"] = 3
    else:
        y = (y > 0).astype(np.int64)
    booster = lightgbm.train(params, lightgbm.Dataset(x, y), num_boost_round=15)
    path = directory / f"lightgbm-{objective}.txt"
    booster.save_model(path)
    return path, booster


def make_onnx_text(directory: Path) -> Path:
    """A graph of string tensors: ``words`` ``[n]`` in, ``same`` (Identity) out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["words"], ["same"])],
        "text",
        [helper.make_tensor_value_info("words", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])],
    )
    path = directory / "text.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


class Standardise(BaseTaskHandler):
    """Pre-processing before a model step: ``raw`` (FP64 ``[rows, 4]``) -> ``x`` (FP32), ``(raw - shift) / 2``."""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = shift

    def handle(self, *tasks: InferenceTask) -> None:
        for task in tasks:
            task.outputs["x"] = ((task.inputs["raw"] - self.shift) / 2).astype(np.float32)
