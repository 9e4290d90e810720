"""mosec 0.9.8 serving the same ResNet-50 (``examples/resnet``): raw 150,528-byte body -> {"label": n}.

One worker, max batch 64, wait 2 ms, as our pod in ``bench/gpu/pipeline.yaml``.
Run from the repository root: python bench/gpu/mosec_resnet.py --port 8000 --address 127.0.0.1
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from mosec import Server, Worker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class ResNetWorker(Worker):
    def __init__(self) -> None:
        super().__init__()
        from examples.resnet import model as resnet

        self.resnet = resnet
        self.model = resnet.build_model(None, resnet.default_device())
        resnet.predict(self.model, np.zeros((1, *resnet.IMAGE_SHAPE), np.uint8), 1)

    def deserialize(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(self.resnet.IMAGE_SHAPE)

    def forward(self, data: list[np.ndarray]) -> list[Any]:
        labels, _ = self.resnet.predict(self.model, np.stack(data), 1)
        return [{"label": int(label[0])} for label in labels]


if __name__ == "__main__":
    server = Server()
    server.append_worker(ResNetWorker, num=1, max_batch_size=int(os.environ.get("BS", "64")), max_wait_time=2)
    server.run()
