"""The model files of the runtime benchmark, made here with random weights and a fixed seed (nothing downloaded).

- ``resnet18.onnx``: ``bench/gpu/runtimes.py``'s ResNet-18 (11.7 M parameters) behind a UINT8 [N, 224, 224, 3]
  image input, normalised and transposed in the graph, answering the top-1 class INT64 [N, 1];
- ``convnet.onnx``: a small conv net (four 3x3 convolutions, about a fiftieth of ResNet-18's work) with the
  same input and output, where the serving path's cost weighs more against the model's;
- ``sklearn/model.joblib``: a ``LogisticRegression`` on 16 synthetic features (joblib, which both our
  ``sklearn`` runtime, with ``trust_pickle``, and ``mlserver-sklearn`` read);
- ``xgboost/model.json``: an XGBoost ``binary:logistic`` booster of 1,000 trees (depth 6) on the same
  16 features (XGBoost's JSON format).

    PYTHONPATH=.:service .venv/bin/python -m bench.runtimes.models /tmp/models
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

FEATURES = 16
TREES = 1000


def tabular_data(rows: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic binary classification data: FP32 [rows, 16] and labels in {0, 1}."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    weights = rng.normal(size=FEATURES)
    y = (x @ weights + 0.5 * np.sin(3 * x[:, 0]) + rng.normal(scale=0.5, size=rows) > 0).astype(np.int64)
    return x, y


def build_tabular(folder: Path) -> None:
    """``sklearn/model.joblib`` and ``xgboost/model.json`` under ``folder``."""
    import joblib
    import xgboost
    from sklearn.linear_model import LogisticRegression

    x, y = tabular_data()
    (folder / "sklearn").mkdir(parents=True, exist_ok=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(x.astype(np.float64), y), folder / "sklearn/model.joblib")
    booster = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 6, "eta": 0.05, "nthread": 2, "seed": 0},
        xgboost.DMatrix(x, label=y),
        num_boost_round=TREES,
    )
    (folder / "xgboost").mkdir(parents=True, exist_ok=True)
    booster.save_model(folder / "xgboost/model.json")


def build_convnets(folder: Path) -> None:
    """``resnet18.onnx`` and ``convnet.onnx`` under ``folder`` (dynamic batch, opset 17)."""
    import torch
    from torch import nn

    from bench.gpu.runtimes import IMAGE_SHAPE, ResNet18

    class ConvNet(nn.Module):
        """Four 3x3 convolutions (16, 32, 64, 128 channels, stride 2) and a linear layer: 10 classes."""

        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            inputs = 3
            for width in (16, 32, 64, 128):
                layers += [nn.Conv2d(inputs, width, 3, 2, 1), nn.ReLU()]
                inputs = width
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(128, 10)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
            return self.fc(self.features(x).mean(dim=(2, 3))).argmax(dim=1, keepdim=True)

    torch.manual_seed(0)
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    for name, model in (("resnet18", ResNet18()), ("convnet", ConvNet())):
        for module in model.modules():  # random running statistics, so that the top-1 answers vary
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        with warnings.catch_warnings():  # dynamo=False: the new exporter needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model.eval(),
                (example,),
                str(folder / f"{name}.onnx"),
                input_names=["image"],
                output_names=["label"],
                dynamic_axes={"image": {0: "batch"}, "label": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )


def build(folder: Path) -> None:
    """Every model file of the benchmark under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tabular(folder)
    build_convnets(folder)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
