"""Each built-in runtime served by a real pod over a socket: answers equal to the model run here (tritonclient,
JSON and binary tensors), client-side batches of several rows, concurrent requests joined into one handler
batch and split back, the metadata derived from the model file, and a runtime step after a Python handler."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from aqueduct_service.inference import datatype_of

from tests.service.conftest import Server
from tests.service.runtime_models import (
    FEATURES,
    make_lightgbm,
    make_onnx_conv,
    make_onnx_linear,
    make_sklearn,
    make_xgboost,
)
from tests.service.test_server import metric

BATCH_SIZE = 16
TREE = "sklearn.tree._tree.Tree"


@dataclass
class Case:
    """One served model: its pod's steps, its tensors as the pod must report them, and the reference."""

    steps: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    reference: Callable[[np.ndarray], dict[str, np.ndarray]]
    # the single request input: (name, numpy dtype, the shape of one row)
    request: tuple[str, str, tuple[int, ...]]
    env: dict[str, str] = field(default_factory=dict)
    rtol: float = 1e-6


def tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


def runtime_step(runtime: str, model: Path, **options: Any) -> dict[str, Any]:
    step = {"name": "model", "runtime": runtime, "model": str(model), "batch_size": BATCH_SIZE, "batch_timeout": 0.05}
    if options:
        step["options"] = options
    return step


def make_case(kind: str, directory: Path) -> Case:
    """The model of ``kind`` written into ``directory``, and how it is served."""
    features = ("input", "<f8", (FEATURES,))
    if kind.startswith("onnx-linear"):
        path, predict = make_onnx_linear(directory)
        return Case(
            [runtime_step("onnx", path, threads=1)],
            [tensor("x", "FP32", [-1, 4])],
            [tensor("y", "FP32", [-1, 3]), tensor("norm", "FP32", [-1])],
            predict,
            ("x", "<f4", (4,)),
            # two HTTP front ends: they must serve the tensors the main process read from the model
            env={"AQUEDUCT_SERVER__WORKERS": "2"} if kind == "onnx-linear-2-frontends" else {},
            rtol=1e-5,
        )
    if kind == "onnx-conv":
        path, predict = make_onnx_conv(directory)
        return Case(
            [runtime_step("onnx", path)],
            [tensor("image", "FP32", [-1, 3, 8, 8])],
            [tensor("scores", "FP32", [-1, 4])],
            predict,
            ("image", "<f4", (3, 8, 8)),
            rtol=1e-5,
        )
    if kind == "preprocess-onnx":
        path, predict = make_onnx_linear(directory)
        pre = {"name": "pre", "handler": "tests.service.runtime_models:Standardise", "batch_size": BATCH_SIZE}
        pre["options"] = {"shift": 0.5}
        return Case(
            [pre, runtime_step("onnx", path)],
            [tensor("raw", "FP64", [-1, 4])],
            [tensor("y", "FP32", [-1, 3]), tensor("norm", "FP32", [-1])],
            lambda raw: predict(((raw - 0.5) / 2).astype(np.float32)),
            ("raw", "<f8", (4,)),
            rtol=1e-5,
        )
    if kind == "sklearn-logreg":
        path, estimator = make_sklearn(directory, "logreg")
        return Case(
            [runtime_step("sklearn", path, method="predict_proba")],
            [tensor("input", "FP64", [-1, FEATURES])],
            [tensor("predict_proba", "FP64", [-1, 3])],
            lambda x: {"predict_proba": estimator.predict_proba(x)},
            features,
            rtol=1e-9,
        )
    if kind == "sklearn-boosting":
        path, estimator = make_sklearn(directory, "boosting")
        return Case(
            [runtime_step("sklearn", path, trusted_types=[TREE])],
            [tensor("input", "FP64", [-1, FEATURES])],
            [tensor("predict", "INT64", [-1])],
            lambda x: {"predict": estimator.predict(x)},
            features,
        )
    if kind == "sklearn-joblib":
        path, estimator = make_sklearn(directory, "joblib")
        return Case(
            [runtime_step("sklearn", path, trustPickle=True, dtype="FP32")],
            [tensor("input", "FP32", [-1, FEATURES])],
            [tensor("predict", "INT64", [-1])],
            lambda x: {"predict": estimator.predict(x)},
            ("input", "<f4", (FEATURES,)),
        )
    if kind == "xgboost":
        path, booster = make_xgboost(directory)
        return Case(
            [runtime_step("xgboost", path)],
            [tensor("input", "FP32", [-1, FEATURES])],
            [tensor("predict", "FP32", [-1, 3])],
            lambda x: {"predict": booster.inplace_predict(x)},
            ("input", "<f4", (FEATURES,)),
        )
    assert kind == "lightgbm"
    path, booster = make_lightgbm(directory)
    return Case(
        [runtime_step("lightgbm", path)],
        [tensor("input", "FP64", [-1, FEATURES])],
        [tensor("predict", "FP64", [-1, 3])],
        lambda x: {"predict": booster.predict(x, num_threads=1)},
        features,
        rtol=1e-12,
    )


KINDS = [
    "onnx-linear-2-frontends",
    "onnx-conv",
    "preprocess-onnx",
    "sklearn-logreg",
    "sklearn-boosting",
    "sklearn-joblib",
    "xgboost",
    "lightgbm",
]


@dataclass
class Served:
    server: Server
    case: Case
    name: str = "model"

    def rows(self, count: int, seed: int = 0) -> np.ndarray:
        _, dtype, row = self.case.request
        return np.random.default_rng(seed).normal(size=(count, *row)).astype(dtype)

    def check(self, x: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        expected = self.case.reference(x)
        assert sorted(outputs) == sorted(expected)
        for name, want in expected.items():
            assert outputs[name].shape == want.shape, name
            np.testing.assert_allclose(outputs[name], want, rtol=self.case.rtol, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module", params=KINDS)
def served(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A pod serving one model of ``KINDS`` (one at a time: a module's tests run against it, then it stops)."""
    workdir = tmp_path_factory.mktemp(request.param)
    case = make_case(request.param, workdir)
    config = {"version": 1, "name": "model", "steps": case.steps, "timeout": 30, "server": {"log_level": "warning"}}
    if request.param == "preprocess-onnx":
        # a handler comes first: the pod's inputs are declared, and that it takes rows is said
        config.update(inputs=case.inputs, batch_dim=True)
    path = workdir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    server = Server(path, workdir, case.env)
    try:
        server.wait_ready()
        yield Served(server, case)
    finally:
        server.stop()


def test_metadata_is_derived_from_the_model(served: Served) -> None:
    metadata = served.server.client.get("/v2/models/model").json()
    assert (metadata["inputs"], metadata["outputs"]) == (served.case.inputs, served.case.outputs)
    assert metadata["parameters"]["batch_dim"] is True
    step = metadata["parameters"]["steps"][-1]
    assert (step["runtime"], step["model"]) == (served.case.steps[-1]["runtime"], served.case.steps[-1]["model"])
    assert "handler" not in step


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_answers_equal_the_model_run_here(served: Served, binary: bool) -> None:
    client = triton.InferenceServerClient(served.server.url.removeprefix("http://"))
    try:
        for rows in (1, 5):
            x = served.rows(rows, seed=rows)
            name = served.case.request[0]
            tensor = triton.InferInput(name, list(x.shape), datatype_of(x))
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = [triton.InferRequestedOutput(t["name"], binary_data=binary) for t in served.case.outputs]
            result = client.infer("model", [tensor], outputs=wanted)
            served.check(x, {t["name"]: result.as_numpy(t["name"]) for t in served.case.outputs})
    finally:
        client.close()


def test_concurrent_requests_share_batches_and_get_their_own_rows(served: Served) -> None:
    count = 24
    before_batches = metric(served.server, "aqueduct_batch_size_count", step="model")
    before_tasks = metric(served.server, "aqueduct_batch_size_sum", step="model")
    requests = [served.rows(1 + i % 4, seed=100 + i) for i in range(count)]
    name = served.case.request[0]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.server.url, timeout=60) as client:
            bodies = [
                {
                    "inputs": [
                        {"name": name, "datatype": datatype_of(x), "shape": list(x.shape), "data": x.ravel().tolist()}
                    ]
                }
                for x in requests
            ]
            return list(await asyncio.gather(*(client.post("/v2/models/model/infer", json=b) for b in bodies)))

    replies = asyncio.run(send_all())
    for x, reply in zip(requests, replies, strict=True):
        assert reply.status_code == 200, reply.text
        outputs = {
            t["name"]: np.array(t["data"]).reshape(t["shape"]) for t in reply.json()["outputs"] if t["name"] != "x"
        }
        served.check(x, outputs)
    batches = metric(served.server, "aqueduct_batch_size_count", step="model") - before_batches
    tasks = metric(served.server, "aqueduct_batch_size_sum", step="model") - before_tasks
    assert tasks == count
    assert batches < count, "no handler batch held more than one request"


def test_a_request_over_the_batch_size_is_refused_naming_the_limit(served: Served) -> None:
    x = served.rows(BATCH_SIZE + 1)
    body = {"inputs": [{"name": served.case.request[0], "datatype": datatype_of(x), "shape": list(x.shape)}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    reply = served.server.client.post("/v2/models/model/infer", json=body)
    assert reply.status_code == 400
    assert f"{BATCH_SIZE + 1} rows is over this model's limit of {BATCH_SIZE}" in reply.json()["error"]
