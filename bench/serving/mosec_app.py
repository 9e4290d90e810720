"""mosec 0.9.8 serving bench/serving.py's models: one worker, max batch 64, wait 5 ms (as the peers' baseline).

noop: JSON {"x": [1, 2, 3]} -> {"y": [1, 2, 3]}; image: raw 150,528-byte body -> {"label": n}.
Run with a venv holding mosec: python bench/serving/mosec_app.py --model image --port 8000
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np
from mosec import Server, Worker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_model import SHAPE, labels  # noqa: E402


class NoopWorker(Worker):
    def forward(self, data: list[Any]) -> list[Any]:
        return [{"y": d["x"]} for d in data]


class ImageWorker(Worker):
    def deserialize(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).reshape(SHAPE)

    def forward(self, data: list[np.ndarray]) -> list[Any]:
        return [{"label": int(y)} for y in labels(np.stack(data))]


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default="noop")
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    server = Server()
    worker = {"noop": NoopWorker, "image": ImageWorker}[args.model]
    server.append_worker(worker, num=1, max_batch_size=64, max_wait_time=5)
    server.run()


if __name__ == "__main__":
    main()
