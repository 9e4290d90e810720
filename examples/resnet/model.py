"""torchvision ResNet-50 for batched image classification: build it, run it on a batch of uint8 images.

Plain functions, no serving code: ``handler.py`` serves them, tests run them in process to compare.
On CUDA the model runs in float16 with channels_last memory format; on CPU in float32.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torchvision

IMAGE_SHAPE = (224, 224, 3)  # height, width, RGB; uint8
# ImageNet's class names, in the order of the model's outputs (shipped with torchvision, no download).
CATEGORIES: list[str] = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
RANDOM_SEED = 0
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(weights: str | os.PathLike[str] | None, device: str) -> torch.nn.Module:
    """ResNet-50 in eval mode on ``device``: fp16 + channels_last on CUDA, float32 on CPU.

    ``weights`` is a state dict saved with ``torch.save(model.state_dict(), path)``; None gives random
    weights from a fixed seed, so every worker process (and a test) builds the same model.
    """
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = torchvision.models.resnet50(weights=None)
    else:
        model = torchvision.models.resnet50(weights=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = model.eval()
    if torch.device(device).type == "cuda":
        return model.half().to(device, memory_format=torch.channels_last)
    return model.to(device)


def predict(model: torch.nn.Module, images: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (n, 224, 224, 3) uint8 -> the ``topk`` class ids (n, k) int64 and their scores (n, k) float32.

    Scores are softmax probabilities, highest first.
    """
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(dtype).div_(255)
        mean = torch.tensor(_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        x = ((x - mean) / std).contiguous(memory_format=layout)
        probabilities = model(x).float().softmax(dim=1)
        scores, ids = probabilities.topk(topk, dim=1)
    return ids.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32)


def labels(ids: np.ndarray) -> np.ndarray:
    """Class ids -> their ImageNet names as a numpy bytes array of the same shape."""
    return np.array([CATEGORIES[i].encode() for i in ids.ravel()]).reshape(ids.shape)
