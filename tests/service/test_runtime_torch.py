"""The torch runtime in process: metadata from a torch.export program or declared for TorchScript, batches
joined and split back, dtype and device options, and bad model files refused with the file and runtime named."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from aqueduct_service.runtimes.base import ModelLoadError, ModelMetadata
from aqueduct_service.runtimes.torch import TorchRuntime
from aqueduct_service.settings import TensorSpec
from aqueduct_service.task import InferenceTask

from tests.service.conftest import Server

# TorchScript is deprecated in torch 2.13, which says so on every torch.jit call; the runtime still serves it.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


class ConvNet(torch.nn.Module):
    """A small conv net: an image batch (and a per-row scale) in, class scores and pooled features out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.norm(self.conv(image))).mean(dim=(2, 3))
        return self.fc(features) * scale, features


class Mlp(torch.nn.Module):
    """A TorchScript MLP: probabilities and the argmax class."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(5, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.out(torch.relu(self.hidden(features)))
        return torch.softmax(scores, dim=-1), scores.argmax(dim=-1)


class Fixed(torch.nn.Module):
    """Static shapes, a keyword-only input and a dict of outputs: served one task at a time."""

    def forward(self, tokens: torch.Tensor, *, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": (tokens * weights).sum(dim=1), "first": tokens[:, 0]}


class Camera(torch.nn.Module):
    """uint8 HWC images in, normalised in the model (a float32 tensor it makes itself), scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255 - self.mean
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Apart(torch.nn.Module):
    """Two inputs whose first dimensions vary apart, and an output with twice the rows: no batch to join."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sum(dim=0) + y.sum(dim=0), torch.cat([x, x])


class Pair(torch.nn.Module):
    def forward(self, pair: list[torch.Tensor]) -> torch.Tensor:
        return pair[0] + pair[1]


class Single(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


MLP_INPUTS = (TensorSpec("features", "FP32", (-1, 5)),)
MLP_OUTPUTS = (TensorSpec("probabilities", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1,)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test's model files, and the modules they were made from under ``<name>.module``."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("torch-models")
    conv = ConvNet().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        conv,
        (torch.randn(2, 3, 8, 8), torch.ones(2, 1)),
        dynamic_shapes={"image": {0: batch}, "scale": {0: batch}},
    )
    torch.export.save(program, folder / "conv.pt2")
    fixed = torch.export.export(Fixed(), (torch.ones(2, 3, dtype=torch.int64),), {"weights": torch.ones(2, 3)})
    torch.export.save(fixed, folder / "fixed.pt2")
    torch.export.save(torch.export.export(Single(), (torch.ones(4),)), folder / "single.pt2")
    mlp = Mlp().eval()
    torch.jit.save(torch.jit.script(mlp), folder / "mlp.pt")
    torch.save(mlp.state_dict(), folder / "state_dict.pt")
    apart = torch.export.export(
        Apart(),
        (torch.ones(2, 3), torch.ones(4, 3)),
        dynamic_shapes={"x": {0: torch.export.Dim("n", min=1)}, "y": {0: torch.export.Dim("m", min=1)}},
    )
    torch.export.save(apart, folder / "apart.pt2")
    torch.export.save(torch.export.export(Pair(), ([torch.ones(2), torch.ones(2)],)), folder / "nested.pt2")
    images = torch.zeros(2, 6, 6, 3, dtype=torch.uint8)
    camera = torch.export.export(Camera().eval(), (images,), dynamic_shapes={"image": {0: batch}})
    torch.export.save(camera, folder / "camera.pt2")
    (folder / "notes.txt").write_text("not a model")
    data = (folder / "conv.pt2").read_bytes()
    (folder / "truncated.pt2").write_bytes(data[: len(data) // 2])
    (folder / "corrupt.pt2").write_bytes(_flip_byte_of(data, folder / "conv.pt2", "data/weights/weight_0"))
    torch.save({"conv": conv, "mlp": mlp}, folder / "modules.pt")
    return {path.stem: path for path in folder.iterdir()}


def _flip_byte_of(data: bytes, path: Path, entry: str) -> bytes:
    """The archive's bytes with one byte of ``entry``'s contents changed (the zip's CRC now disagrees)."""
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/" + entry)]
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    at = info.header_offset + 30 + name_length + extra_length + 1
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def started(runtime: TorchRuntime) -> TorchRuntime:
    runtime.on_start()
    return runtime


def test_export_metadata_from_the_graph(models: dict[str, Path]) -> None:
    assert TorchRuntime(str(models["conv"])).metadata() == ModelMetadata(
        inputs=(TensorSpec("image", "FP32", (-1, 3, 8, 8)), TensorSpec("scale", "FP32", (-1, 1))),
        outputs=(TensorSpec("output__0", "FP32", (-1, 3)), TensorSpec("output__1", "FP32", (-1, 4))),
        batched=True,
    )
    assert TorchRuntime(str(models["fixed"])).metadata() == ModelMetadata(
        inputs=(TensorSpec("tokens", "INT64", (2, 3)), TensorSpec("weights", "FP32", (2, 3))),
        outputs=(TensorSpec("total", "FP32", (2,)), TensorSpec("first", "INT64", (2,))),
        batched=False,
    )
    assert TorchRuntime(str(models["single"])).metadata().outputs == (TensorSpec("output__0", "FP32", (4,)),)
    apart = TorchRuntime(str(models["apart"])).metadata()
    assert [t.shape for t in (*apart.inputs, *apart.outputs)] == [(-1, 3), (-1, 3), (3,), (-1, 3)]
    assert not apart.batched


def test_export_metadata_loads_no_weights(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights saved on a GPU would initialise CUDA in the pod's main process: metadata never loads them."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("metadata loaded the model")

    monkeypatch.setattr(torch.export, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert TorchRuntime(str(models["conv"])).metadata().batched


def test_export_batches_tasks_of_different_row_counts(models: dict[str, Path]) -> None:
    runtime = started(TorchRuntime(str(models["conv"])))
    rng = np.random.default_rng(1)
    tasks = [
        InferenceTask(
            {
                "image": rng.standard_normal((rows, 3, 8, 8), dtype=np.float32),
                "scale": rng.standard_normal((rows, 1), dtype=np.float32),
            }
        )
        for rows in (1, 3, 2)
    ]
    runtime.handle(*tasks)
    direct = torch.export.load(str(models["conv"])).module()
    for task in tasks:
        with torch.inference_mode():
            scores, features = direct(torch.from_numpy(task.inputs["image"]), torch.from_numpy(task.inputs["scale"]))
        assert set(task.outputs) == {"output__0", "output__1"}
        assert task.outputs["output__0"].dtype == np.float32
        np.testing.assert_allclose(task.outputs["output__0"], scores.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(task.outputs["output__1"], features.numpy(), rtol=1e-5, atol=1e-6)


class ReadApart(TorchRuntime):
    read_in_child = True


def test_metadata_read_in_another_process(models: dict[str, Path]) -> None:
    """Only the metadata comes back from a reading process: the worker reads the call signature itself."""
    runtime = started(ReadApart(str(models["fixed"])))
    task = InferenceTask({"tokens": np.ones((2, 3), np.int64), "weights": np.ones((2, 3), np.float32)})
    runtime.handle(task)
    np.testing.assert_array_equal(task.outputs["total"], np.full(2, 3, np.float32))


def test_read_only_and_reversed_inputs_are_served_and_left_unwritten(models: dict[str, Path]) -> None:
    """Request tensors may be read-only views of the request body, a pre-processing step's a reversed view."""
    runtime = started(TorchRuntime(str(models["conv"])))
    image = np.random.default_rng(2).standard_normal((2, 3, 8, 8), dtype=np.float32)
    frozen = np.frombuffer(image.tobytes(), dtype=np.float32).reshape(image.shape)
    reversed_channels = image[:, ::-1]
    scale = np.ones((2, 1), np.float32)
    tasks = [
        InferenceTask({"image": frozen, "scale": scale}),
        InferenceTask({"image": reversed_channels, "scale": scale}),
    ]
    for task in tasks:
        runtime.handle(task)
    expected = runtime.run({"image": image, "scale": scale})
    np.testing.assert_array_equal(tasks[0].outputs["output__0"], expected["output__0"])
    np.testing.assert_array_equal(
        tasks[1].outputs["output__0"], runtime.run({"image": image[:, ::-1].copy(), "scale": scale})["output__0"]
    )
    np.testing.assert_array_equal(frozen, image)


def test_export_with_static_shapes_keywords_and_a_dict_of_outputs(models: dict[str, Path]) -> None:
    runtime = started(TorchRuntime(str(models["fixed"])))
    tokens = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    tasks = [InferenceTask({"tokens": tokens + i, "weights": np.full((2, 3), 0.5, np.float32)}) for i in range(2)]
    runtime.handle(*tasks)
    for i, task in enumerate(tasks):
        np.testing.assert_array_equal(task.outputs["total"], ((tokens + i) * 0.5).sum(axis=1).astype(np.float32))
        np.testing.assert_array_equal(task.outputs["first"], tokens[:, 0] + i)
        assert task.outputs["first"].dtype == np.int64


def test_single_tensor_output(models: dict[str, Path]) -> None:
    runtime = started(TorchRuntime(str(models["single"])))
    task = InferenceTask({"x": np.arange(4, dtype=np.float32)})
    runtime.handle(task)
    np.testing.assert_array_equal(task.outputs["output__0"], np.arange(4, dtype=np.float32) * 2)


def test_an_input_from_an_earlier_step_wins_over_the_request(models: dict[str, Path]) -> None:
    runtime = started(TorchRuntime(str(models["single"])))
    task = InferenceTask({"x": np.zeros(4, np.float32)})
    task.outputs["x"] = np.ones(4, np.float32)
    runtime.handle(task)
    np.testing.assert_array_equal(task.outputs["output__0"], np.full(4, 2, np.float32))


def test_torchscript_needs_declared_tensors(models: dict[str, Path]) -> None:
    runtime = TorchRuntime(str(models["mlp"]))
    with pytest.raises(ModelLoadError, match=r"runtime 'torch': TorchScript model '.*mlp.pt' records no tensor shapes"):
        runtime.metadata()
    runtime.declare(MLP_INPUTS, MLP_OUTPUTS)
    assert runtime.metadata() == ModelMetadata(MLP_INPUTS, MLP_OUTPUTS, batched=True)


def test_torchscript_declared_inputs_must_be_its_arguments(models: dict[str, Path]) -> None:
    runtime = TorchRuntime(str(models["mlp"]))
    runtime.declare((TensorSpec("x", "FP32", (-1, 5)),), MLP_OUTPUTS)
    with pytest.raises(
        ModelLoadError, match=r"declared inputs \(x\) do not match its forward's arguments \(features\)"
    ):
        runtime.metadata()
    runtime.declare((TensorSpec("features", "BYTES", (-1,)),), MLP_OUTPUTS)
    with pytest.raises(ModelLoadError, match="'features' is declared BYTES"):
        runtime.metadata()


def test_torchscript_batches_tasks(models: dict[str, Path]) -> None:
    runtime = TorchRuntime(str(models["mlp"]))
    runtime.declare(MLP_INPUTS, MLP_OUTPUTS)
    runtime.on_start()
    rng = np.random.default_rng(3)
    tasks = [InferenceTask({"features": rng.standard_normal((rows, 5), dtype=np.float32)}) for rows in (2, 1, 4)]
    runtime.handle(*tasks)
    direct = torch.jit.load(str(models["mlp"]))
    for task in tasks:
        with torch.inference_mode():
            probabilities, label = direct(torch.from_numpy(task.inputs["features"]))
        np.testing.assert_allclose(task.outputs["probabilities"], probabilities.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(task.outputs["label"], label.numpy())
        assert task.outputs["label"].dtype == np.int64


def test_torchscript_outputs_must_match_what_it_returns(models: dict[str, Path]) -> None:
    runtime = TorchRuntime(str(models["mlp"]))
    runtime.declare(MLP_INPUTS, MLP_OUTPUTS[:1])
    runtime.on_start()
    with pytest.raises(RuntimeError, match="returned 2 tensor"):
        runtime.handle(InferenceTask({"features": np.zeros((1, 5), np.float32)}))


def test_bf16_on_the_cpu_answers_in_the_declared_datatype(models: dict[str, Path]) -> None:
    full = started(TorchRuntime(str(models["conv"])))
    half = started(TorchRuntime(str(models["conv"]), dtype="bf16"))
    inputs = {
        "image": np.random.default_rng(4).standard_normal((4, 3, 8, 8), dtype=np.float32),
        "scale": np.ones((4, 1), np.float32),
    }
    exact, reduced = full.run(inputs), half.run(inputs)
    assert reduced["output__0"].dtype == np.float32
    np.testing.assert_allclose(reduced["output__0"], exact["output__0"], rtol=0.05, atol=0.05)
    assert not np.array_equal(reduced["output__0"], exact["output__0"])  # it did run in bfloat16


def test_bf16_for_a_model_that_makes_its_own_float32_tensors(models: dict[str, Path]) -> None:
    """A uint8 image normalised in the model meets bfloat16 weights: autocast carries it across."""
    runtime = started(TorchRuntime(str(models["camera"]), dtype="bf16"))
    assert runtime.metadata().inputs == (TensorSpec("image", "UINT8", (-1, 6, 6, 3)),)
    images = np.random.default_rng(5).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    task = InferenceTask({"image": images})
    runtime.handle(task)
    exact = started(TorchRuntime(str(models["camera"]))).run({"image": images})["output__0"]
    assert task.outputs["output__0"].dtype == np.float32
    np.testing.assert_allclose(task.outputs["output__0"], exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp16"}, "dtype fp16 runs on CUDA only"),
        ({"dtype": "int8"}, "option dtype is 'int8': expected one of fp32, fp16, bf16"),
        ({"device": "gpu"}, "option device is 'gpu': expected cpu, cuda or cuda:N"),
    ],
)
def test_bad_options(models: dict[str, Path], options: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        TorchRuntime(str(models["conv"]), **options).metadata()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_fails_at_start(models: dict[str, Path]) -> None:
    runtime = TorchRuntime(str(models["conv"]), device="cuda", dtype="fp16")
    runtime.metadata()  # config time touches no GPU
    with pytest.raises(ModelLoadError, match="device 'cuda', but this worker sees no GPU"):
        runtime.on_start()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("notes", "is neither a torch.export program .* nor TorchScript .*: it is not a zip archive"),
        ("truncated", "it is not a zip archive, or it is truncated"),
        ("state_dict", r"is a torch.save pickle \(a module or a state_dict\), not a torch.export program"),
        ("modules", "is a torch.save pickle"),
        ("nested", "its forward takes nested inputs; export one that takes tensors"),
        ("corrupt", "is corrupt: its entry '.*weight_0' fails its CRC"),
        ("missing", "does not exist"),
    ],
)
def test_bad_files_name_the_file_and_the_runtime(models: dict[str, Path], name: str, message: str) -> None:
    path = models.get(name, models["conv"].with_name("missing.pt2"))
    with pytest.raises(ModelLoadError, match=message) as raised:
        TorchRuntime(str(path)).metadata()
    assert "runtime 'torch'" in str(raised.value)
    assert repr(str(path)) in str(raised.value)


def test_served_by_the_pod_over_a_socket(models: dict[str, Path], start_server: Callable[..., Server]) -> None:
    """The .pt2 conv net as a runtime step: metadata from the model, requests of N rows (JSON and binary
    tensors, sent together so that the step joins them) answered as the model answers in process."""
    step = {"name": "model", "runtime": "torch", "model": str(models["conv"]), "batch_size": 8, "batch_timeout": 0.05}
    server = start_server({"version": 1, "name": "conv", "steps": [step]})
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    try:
        metadata = client.get_model_metadata("conv")
        assert metadata["inputs"] == [
            {"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
            {"name": "scale", "datatype": "FP32", "shape": [-1, 1]},
        ]
        assert metadata["outputs"] == [
            {"name": "output__0", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "output__1", "datatype": "FP32", "shape": [-1, 4]},
        ]
        rng = np.random.default_rng(6)
        sent = []
        for rows, binary in [(1, False), (3, True), (2, False), (4, True)]:
            image = rng.standard_normal((rows, 3, 8, 8), dtype=np.float32)
            scale = rng.standard_normal((rows, 1), dtype=np.float32)
            inputs = [
                triton.InferInput("image", list(image.shape), "FP32"),
                triton.InferInput("scale", [rows, 1], "FP32"),
            ]
            inputs[0].set_data_from_numpy(image, binary_data=binary)
            inputs[1].set_data_from_numpy(scale, binary_data=binary)
            outputs = [triton.InferRequestedOutput(f"output__{i}", binary_data=binary) for i in range(2)]
            sent.append((image, scale, client.async_infer("conv", inputs, outputs=outputs)))
        direct = torch.export.load(str(models["conv"])).module()
        for image, scale, request in sent:
            result = request.get_result(timeout=30)
            with torch.inference_mode():
                expected = direct(torch.from_numpy(image), torch.from_numpy(scale))
            for i, tensor in enumerate(expected):
                np.testing.assert_allclose(result.as_numpy(f"output__{i}"), tensor.numpy(), rtol=1e-5, atol=1e-6)
    finally:
        client.close()
