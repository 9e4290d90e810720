"""ResNet-50 for batched image classification: build it, run it on a batch of uint8 images.

The network is torchvision's ``resnet50`` layer for layer, with the same parameter names, so its
state dicts (``torchvision.models.resnet50(...).state_dict()``, ImageNet checkpoints) load as they
are. It is defined here rather than imported because the torchvision wheels on PyPI are built
against CUDA torch: with the CPU build of torch (what CI installs), ``import torchvision`` fails.

Plain functions, no serving code: ``handler.py`` serves them, tests run them in process to compare.
On CUDA the model runs in float16 with channels_last memory format; on CPU in float32.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

IMAGE_SHAPE = (224, 224, 3)  # height, width, RGB; uint8
CLASSES = 1000
RANDOM_SEED = 0
# ImageNet normalisation, as torchvision's ResNet-50 weights expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ``resnet50(weights=None)``: same layers, same names, same initialisation scheme."""

    def __init__(self, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, stride=2)
        self.layer4 = self._layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


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
            model = ResNet50()
    else:
        model = ResNet50()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = model.eval()
    if torch.device(device).type == "cuda":
        return model.half().to(device, memory_format=torch.channels_last)
    return model.to(device)


def predict(model: torch.nn.Module, images: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (n, 224, 224, 3) uint8 -> the ``topk`` labels (class ids, (n, k) int64) and their scores (n, k).

    Scores are softmax probabilities, highest first.
    """
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(dtype).div_(255)
        mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        x = ((x - mean) / std).contiguous(memory_format=layout)
        probabilities = model(x).float().softmax(dim=1)
        scores, ids = probabilities.topk(topk, dim=1)
    return ids.cpu().numpy().astype(np.int64), scores.cpu().numpy().astype(np.float32)
