"""The built-in model runtimes against their libraries run in process: a ResNet-18 at batch 64 of 150 KB images.

The model (``ResNet18`` below, written out: torchvision is not needed) takes UINT8 images [N, 224, 224, 3],
normalises them in the graph and answers the top-1 class, INT64 [N, 1]; random weights, fixed seed.
It is exported to ONNX (dynamic batch) and to a ``torch.export`` program (``.pt2``) in a temporary folder,
then each row runs batches of ``--batch`` images and reports images/s (host-to-device copy and the
answer's way back included) and the median time per batch:

- ``onnxruntime``: ``InferenceSession.run`` in process (the CUDA execution provider on ``cuda``);
- ``onnx runtime``: ``OnnxRuntime.handle`` on ``--batch`` tasks of one image each, as the pod calls it
  on a batch of single-image requests (joins them, runs once, splits the answer);
- ``torch``: the exported module called in process, fp32, and fp16 on CUDA (bf16 on a CPU);
- ``torch runtime``: ``TorchRuntime.handle`` the same way, ``dtype`` fp32, and fp16 on CUDA (bf16 on a CPU);
- ``torch fp16 channels_last``: the module in process with NHWC weights, what the runtime leaves out.

A row whose library or runtime is missing is skipped with the reason. The last line is one JSON object.

    PYTHONPATH=.:service python bench/gpu/runtimes.py                       # cuda when a GPU is visible
    PYTHONPATH=.:service python bench/gpu/runtimes.py --device cpu --iters 3 --batch 8

Needs torch, onnx (the legacy ONNX exporter, ``dynamo=False``, writes through it; the new one would need
onnxscript), onnxruntime for the ONNX rows (onnxruntime-gpu for CUDA) and what ``aqueduct_service``
imports (starlette, orjson, jsonschema and its dependencies, pyyaml, threadpoolctl, prometheus-client).
On a GPU machine that reaches no registry they travel as wheels (``bench/gpu/README.md``); the
onnxruntime-gpu wheel (1.31.1, 256 MB) is larger than some machines let travel, and its rows are then
skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

IMAGE_SHAPE = (224, 224, 3)  # 150,528 bytes as UINT8


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions and a shortcut (projected when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (11.7 M parameters) behind a uint8 HWC image input, answering the top-1 class."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        widths, layers, inputs = (64, 128, 256, 512), [], 64
        for i, width in enumerate(widths):
            layers += [Block(inputs, width, 1 if i == 0 else 2), Block(width, width, 1)]
            inputs = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        x = self.layers(self.stem(x)).mean(dim=(2, 3))
        return self.fc(x).argmax(dim=1, keepdim=True)


def build(folder: Path) -> tuple[Path, Path]:
    """The model exported to ``resnet18.onnx`` and ``resnet18.pt2`` (on the CPU; dynamic batch)."""
    torch.manual_seed(0)
    model = ResNet18().eval()
    for module in model.modules():  # random running statistics, so that the top-1 answers vary
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    onnx_path, pt2_path = folder / "resnet18.onnx", folder / "resnet18.pt2"
    with warnings.catch_warnings():  # dynamo=False: the new exporter needs onnxscript, which the images lack
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            input_names=["image"],
            output_names=["label"],
            dynamic_axes={"image": {0: "batch"}, "label": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, pt2_path)
    return onnx_path, pt2_path


def measure(run: Callable[[], Any], batch: int, iters: int, warmup: int) -> dict[str, float]:
    """images/s and the median ms per batch of ``run`` (which returns host arrays: the device is synchronised)."""
    for _ in range(warmup):
        run()
    times = []
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {"images_per_s": round(batch * iters / elapsed, 1), "p50_ms": round(1000 * statistics.median(times), 3)}


def onnxruntime_row(path: Path, device: str, images: np.ndarray) -> Callable[[], Any]:
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(f"onnxruntime {ort.__version__} has no CUDA execution provider (onnxruntime-gpu)")
        index = int(device.partition(":")[2] or 0)
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the session fell back to {session.get_providers()}")
    return lambda: session.run(["label"], {"image": images})


def runtime_row(runtime: Any, images: np.ndarray) -> Callable[[], Any]:
    """``runtime.handle`` on one task per image, as the pod calls it on a batch of single-image requests."""
    from aqueduct_service.task import InferenceTask

    runtime.on_start()
    rows = [images[i : i + 1] for i in range(len(images))]

    def run() -> list[np.ndarray]:
        tasks = [InferenceTask({"image": row}) for row in rows]
        runtime.handle(*tasks)
        return [task.outputs["label"] if "label" in task.outputs else task.outputs["output__0"] for task in tasks]

    return run


def onnx_runtime_row(path: Path, device: str, images: np.ndarray) -> Callable[[], Any]:
    from aqueduct_service.runtimes.onnx import OnnxRuntime

    return runtime_row(OnnxRuntime(str(path), device=device), images)


def torch_row(
    path: Path, device: str, dtype: str, images: np.ndarray, channels_last: bool = False
) -> Callable[[], Any]:
    """The exported module called directly: the in-process figure the torch runtime is held to
    (``channels_last``: convolution weights NHWC too, what cuDNN's fp16 kernels like; the runtime does not)."""
    from torch.export.passes import move_to_device_pass

    module = move_to_device_pass(torch.export.load(str(path)), device).module()
    precision = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if precision is not None:
        module = module.to(precision)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    target = torch.device(device)

    def run() -> np.ndarray:
        autocast = torch.autocast(target.type, precision, enabled=precision is not None)
        with torch.inference_mode(), autocast:
            result: np.ndarray = module(torch.from_numpy(images).to(target)).cpu().numpy()
            return result

    return run


def torch_runtime_row(path: Path, device: str, dtype: str, images: np.ndarray) -> Callable[[], Any]:
    from aqueduct_service.runtimes.torch import TorchRuntime

    return runtime_row(TorchRuntime(str(path), device=device, dtype=dtype), images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    reduced = "fp16" if device.startswith("cuda") else "bf16"
    repo = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(repo), str(repo / "service")]
    images = np.random.default_rng(0).integers(0, 256, (args.batch, *IMAGE_SHAPE), dtype=np.uint8)
    figures: dict[str, Any] = {
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        "cpu": platform.processor() or platform.machine(),
        "batch": args.batch,
        "iters": args.iters,
        "torch": torch.__version__,
        "rows": {},
        "skipped": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        onnx_path, pt2_path = build(Path(folder))
        rows: dict[str, Callable[[], Callable[[], Any]]] = {
            "onnxruntime": lambda: onnxruntime_row(onnx_path, device, images),
            "onnx runtime": lambda: onnx_runtime_row(onnx_path, device, images),
            "torch fp32": lambda: torch_row(pt2_path, device, "fp32", images),
            "torch runtime fp32": lambda: torch_runtime_row(pt2_path, device, "fp32", images),
            f"torch {reduced}": lambda: torch_row(pt2_path, device, reduced, images),
            f"torch runtime {reduced}": lambda: torch_runtime_row(pt2_path, device, reduced, images),
            f"torch {reduced} channels_last": lambda: torch_row(pt2_path, device, reduced, images, True),
        }
        answers: dict[str, np.ndarray] = {}
        for name, make in rows.items():
            try:
                run = make()
            except Exception as e:
                figures["skipped"][name] = f"{type(e).__name__}: {e}"
                print(f"{name:>27}: skipped ({type(e).__name__}: {e})", flush=True)
                continue
            answers[name] = np.concatenate(run()).reshape(-1)
            figures["rows"][name] = result = measure(run, args.batch, args.iters, args.warmup)
            print(f"{name:>27}: {result['images_per_s']:>9,.1f} images/s, p50 {result['p50_ms']:.2f} ms", flush=True)
    reference = answers.get("torch fp32")
    if reference is not None:  # top-1 agreement with the fp32 module: the rows ran the same model
        figures["top1_agreement"] = {name: float(np.mean(a == reference)) for name, a in answers.items()}
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
