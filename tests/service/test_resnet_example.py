"""examples/resnet: ResNet-50 served by the pod answers what the same model answers in process.

The weights are a state dict this module writes (seeded, with a classifier head centred on the test
images so that each image gets its own classes); the server loads them through the step's options.
CPU in every run; CUDA too where a GPU is visible (fp16 there, so scores are compared more loosely).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml

from examples.resnet import model as resnet
from examples.resnet.handler import ResNetHandler

from .conftest import REPO, Server

IMAGES = 6
TOPK = 5
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def images() -> np.ndarray:
    """Six distinct 224x224 RGB patterns (stripes and colours), uint8."""
    yy, xx = np.mgrid[0:224, 0:224]
    out = []
    for seed in range(IMAGES):
        rng = np.random.default_rng(seed)
        a, b, base = rng.uniform(0.2, 3), rng.uniform(0.2, 3), rng.integers(0, 256, 3)
        channels = [(base[k] + 127 * np.sin(xx * a / 20 + k) + 127 * np.cos(yy * b / 20 - k)) % 256 for k in range(3)]
        out.append(np.stack(channels, -1).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-50 state dict whose classes differ from image to image (random features, centred head)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = resnet.ResNet50().eval()
    head, net.fc = net.fc, torch.nn.Identity()
    mean = torch.tensor(resnet.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(resnet.STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        features = net((torch.from_numpy(images()).permute(0, 3, 1, 2).float() / 255 - mean) / std)
    net.fc = head
    with torch.no_grad():
        head.weight.mul_(3 / (head.weight @ (features - features.mean(0)).T).std())
        head.bias.copy_(-(head.weight @ features.mean(0)))
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pt"
    torch.save(net.state_dict(), path)
    return path


def config(weights: Path, device: str) -> dict[str, Any]:
    """The shipped examples/resnet/pipeline.yaml, with the test's weights, small batches and quiet logs."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples/resnet/pipeline.yaml").read_text())
    doc["steps"][0].update(batch_size=4, batch_timeout=0.05)
    doc["steps"][0]["options"] = {"weights": str(weights), "topk": TOPK, "device": device}
    doc["server"] = {"log_level": "warning"}
    return doc


async def infer_all(server: Server, batch: np.ndarray) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

        async def one(image: np.ndarray) -> dict[str, Any]:
            body = {
                "inputs": [
                    {"name": "image", "datatype": "UINT8", "shape": list(image.shape), "data": image.ravel().tolist()}
                ]
            }
            reply = await client.post("/v2/models/resnet/infer", json=body)
            assert reply.status_code == 200, reply.text
            return {out["name"]: out for out in reply.json()["outputs"]}

        return await asyncio.gather(*(one(image) for image in batch))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
async def test_served_answers_equal_the_model_in_process(
    start_server: Callable[..., Server], weights: Path, device: str
) -> None:
    batch = images()
    server = await asyncio.to_thread(start_server, config(weights, device))
    answers = await infer_all(server, batch)

    expected_labels, expected_scores = resnet.predict(resnet.build_model(weights, device), batch, TOPK)
    assert len({tuple(labels) for labels in expected_labels}) > 1, "the test's weights must tell images apart"
    for answer, labels, scores in zip(answers, expected_labels, expected_scores, strict=True):
        assert (answer["labels"]["datatype"], answer["labels"]["shape"]) == ("INT64", [TOPK])
        assert (answer["scores"]["datatype"], answer["scores"]["shape"]) == ("FP32", [TOPK])
        got_labels, got_scores = np.array(answer["labels"]["data"]), np.array(answer["scores"]["data"])
        if device == "cpu":  # float32: the same classes, in the same order
            assert got_labels.tolist() == labels.tolist()
            np.testing.assert_allclose(got_scores, scores, rtol=1e-4, atol=1e-6)
        else:  # float16 on the GPU: batches of other sizes may reorder near ties below the top class
            assert got_labels[0] == labels[0]
            np.testing.assert_allclose(got_scores, scores, atol=2e-2)


def test_without_weights_every_worker_builds_the_same_random_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_PATH", raising=False)
    first, second = ResNetHandler(topk=3, device="cpu"), ResNetHandler(topk=3, device="cpu")
    assert first.weights is None
    first.on_start()
    second.on_start()
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_weights_default_to_model_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the operator's spec.model gives the serving container."""
    monkeypatch.setenv("MODEL_PATH", "/mnt/models/resnet50.pt")
    assert ResNetHandler().weights == "/mnt/models/resnet50.pt"
    assert ResNetHandler(weights="/elsewhere.pt").weights == "/elsewhere.pt"
    with pytest.raises(ValueError, match="topk"):
        ResNetHandler(topk=0)
