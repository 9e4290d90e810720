"""The in-process ceiling: ResNet-50 (``examples/resnet``) images/s by batch size, host-to-device copy included.

.venv/bin/python bench/gpu/ceiling.py [--device cuda] [--batches 1,8,16,32,64,128] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from examples.resnet import model as resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--batches", default="1,8,16,32,64,128")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write {batch: images/s} here")
    args = parser.parse_args()
    device = args.device or resnet.default_device()
    model = resnet.build_model(None, device)
    results = {}
    for batch in (int(b) for b in args.batches.split(",")):
        images = np.random.RandomState(0).randint(0, 255, (batch, *resnet.IMAGE_SHAPE)).astype(np.uint8)
        for _ in range(3):
            resnet.predict(model, images, 1)  # predict returns host arrays: the device is synchronised
        count, start = 0, time.perf_counter()
        latencies = []
        while time.perf_counter() - start < args.seconds:
            t0 = time.perf_counter()
            resnet.predict(model, images, 1)
            latencies.append(time.perf_counter() - t0)
            count += batch
        rate = count / (time.perf_counter() - start)
        results[batch] = round(rate, 1)
        print(f"{device} batch {batch}: {rate:,.0f} images/s, p50 {1000 * np.median(latencies):.2f} ms per batch")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
