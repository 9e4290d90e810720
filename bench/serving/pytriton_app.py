"""Triton Inference Server (2.51 through PyTriton 0.7.0: Triton's C++ HTTP and gRPC front ends, the models
Python callables) serving the benchmark models over the Open Inference Protocol v2.

Adapted from ``../shared/bench/http/pytriton_app.py``: both models in one server, the image model's
computation imported from ``image_model.py`` (the one our pod's handler runs), noop's ``x`` INT64 as
``examples/noop`` takes it. Triton's requests carry a batch dimension first:

  noop:  x INT64 [1,3] -> y (the same values)               /v2/models/noop/infer
  image: image UINT8 [1,224,224,3] -> label INT64 [1,1]     /v2/models/image/infer

Each model: one instance, dynamic batching up to 64 without a queue delay (as our pod's
``batch_size: 64, batch_timeout: 0``). HTTP on ``--port``, gRPC on port + 1, metrics on port + 2.

Set-up (PyTriton's Python backend stub needs Debian's own interpreter, not another 3.11 build):

    /usr/bin/python3.11 -m venv /tmp/venv-pytriton && /tmp/venv-pytriton/bin/pip install nvidia-pytriton==0.7.0
    /tmp/venv-pytriton/bin/python bench/serving/pytriton_app.py --port 8000

It runs without a GPU (it logs that no CUDA driver was found). SIGINT or SIGTERM stop it and its
tritonserver; they share its process group, which is the way to make sure that both are gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_model import SHAPE, labels  # noqa: E402


@batch
def noop(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"y": x}


@batch
def image(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"label": labels(image).reshape(-1, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="HTTP; gRPC on port + 1, metrics on port + 2")
    args = parser.parse_args()
    # KeyboardInterrupt ends serve() and stops tritonserver, even when the shell that started us
    # ignored SIGINT (as it does for background jobs) or the caller sends SIGTERM.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=args.port + 1,
        metrics_port=args.port + 2,
        log_verbose=0,
    )
    batching = ModelConfig(max_batch_size=64, batcher=DynamicBatcher(max_queue_delay_microseconds=0))
    with Triton(config=config) as triton:
        triton.bind(
            model_name="noop",
            infer_func=noop,
            inputs=[Tensor(name="x", dtype=np.int64, shape=(-1,))],
            outputs=[Tensor(name="y", dtype=np.int64, shape=(-1,))],
            config=batching,
        )
        triton.bind(
            model_name="image",
            infer_func=image,
            inputs=[Tensor(name="image", dtype=np.uint8, shape=SHAPE)],
            outputs=[Tensor(name="label", dtype=np.int64, shape=(1,))],
            config=batching,
        )
        triton.serve()


if __name__ == "__main__":
    main()
