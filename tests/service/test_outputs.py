"""Outputs as declared, over a socket: each handler mistake is a 500 naming the output, its neighbours in
the batch are answered; lossless casts are made; requested outputs limit the answer; Triton's model config."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from tritonclient.utils import InferenceServerException

from tests.service.conftest import FRONT_ENDS, Server, echo_config

BATCH_SIZE = 16
CONFIG: dict[str, Any] = {
    "version": 1,
    "name": "strict",
    "batch_dim": True,
    "steps": [
        {
            "name": "double",
            "handler": "tests.service.output_handlers:MisbehavingHandler",
            "batch_size": BATCH_SIZE,
            "batch_timeout": 0.2,
        }
    ],
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "n", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "batch", "datatype": "INT32", "shape": [-1, 1]},
    ],
    "queue_size": 64,
    "timeout": 30,
    "server": {"log_level": "warning"},
}


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("strict")
    path = workdir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    server = Server(path, workdir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def ask(server: Server, rows: int, mode: str = "ok", outputs: list[str] | None = None) -> httpx.Response:
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 2], "data": x.ravel().tolist()}],
        "parameters": {"mode": mode},
    }
    if outputs is not None:
        doc["outputs"] = [{"name": name} for name in outputs]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return client.post("/v2/models/strict/infer", json=doc)


def tensors(response: httpx.Response) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in response.json()["outputs"]}


def test_each_bad_output_is_a_500_naming_it_and_neighbours_are_answered(strict_server: Server) -> None:
    modes = ["ok", "missing", "fp64", "shape", "rows", "ok", "extra"]
    with ThreadPoolExecutor(len(modes)) as pool:  # one batch: the window (0.2 s) holds them all
        answers = list(pool.map(lambda mode: ask(strict_server, 3, mode), modes))
    by_mode = dict(zip(modes, answers, strict=False))
    for mode in ("ok", "extra"):
        answer = by_mode[mode]
        assert answer.status_code == 200, answer.text
        out = tensors(answer)
        assert set(out) == {"y", "n", "batch"}  # "scratch", set by the handler but not declared, stays behind
        assert out["y"]["data"] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0] and out["y"]["shape"] == [3, 2]
        assert out["n"]["datatype"] == "INT64" and out["n"]["data"] == [3, 3, 3]  # int32 set, cast losslessly
    assert max(tensors(a)["batch"]["data"][0] for a in (by_mode["ok"], by_mode["extra"])) > 3  # batched together
    expected = {
        "missing": ("y", "was not set by the handler"),
        "fp64": ("y", "has the wrong datatype: expected FP32, the handler set FP64"),
        "shape": ("y", "has the wrong shape: expected [3, 2], the handler set [3, 3]"),
        "rows": ("y", "has the wrong shape: expected [3, 2], the handler set [2, 2]"),
    }
    for mode, (name, what) in expected.items():
        answer = by_mode[mode]
        assert answer.status_code == 500, (mode, answer.text)
        assert answer.json()["error"].startswith(f"output {name!r} {what}"), answer.json()
        assert answer.json()["output"] == name
        assert f"output {name!r} {what}" in strict_server.output()  # the server says so too


def test_requested_outputs_limit_the_answer(strict_server: Server) -> None:
    answer = ask(strict_server, 2, outputs=["n"])
    assert answer.status_code == 200 and list(tensors(answer)) == ["n"]
    unknown = ask(strict_server, 2, outputs=["n", "scores"])
    assert unknown.status_code == 400
    assert unknown.json()["error"] == "output 'scores' is not an output of this model (expected: y, n, batch)"


def test_triton_model_config(strict_server: Server) -> None:
    client = triton.InferenceServerClient(strict_server.url.removeprefix("http://"))
    try:
        config = client.get_model_config("strict")
        assert client.get_model_config("strict", model_version="1") == config
        with pytest.raises(InferenceServerException, match="not found"):
            client.get_model_config("other")
    finally:
        client.close()
    assert config["max_batch_size"] == BATCH_SIZE
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [2]}]  # the batch dimension aside
    assert [o["name"] for o in config["output"]] == ["y", "n", "batch"]
    assert config["output"][1] == {"name": "n", "data_type": "TYPE_INT64", "dims": [1]}
    batching = config["dynamic_batching"]
    assert batching["preferred_batch_size"] == [BATCH_SIZE] and batching["max_queue_delay_microseconds"] == 200_000
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 30_000_000
    assert batching["default_queue_policy"]["max_queue_size"] == 64
    assert config["instance_group"] == [{"name": "double", "kind": "KIND_AUTO", "count": 1}]


def test_triton_model_config_without_batch_dim(start_server: Callable[..., Server], tmp_path: Path) -> None:
    config = echo_config(
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1]}],
        outputs=[
            {"name": "y", "datatype": "FP32", "shape": [-1]},
            {"name": "batch", "datatype": "INT32", "shape": [1]},
        ],
    )
    server = start_server(config)
    answer = server.client.get("/v2/models/echo/config").json()
    assert answer["max_batch_size"] == 0  # requests carry no batch dimension: dims are the whole shapes
    assert answer["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert answer["dynamic_batching"]["preferred_batch_size"] == [16]
    assert server.client.get("/v2/models/echo/versions/2/config").status_code == 404


@pytest.mark.parametrize("front_ends", FRONT_ENDS)
def test_batch_size_counts_rows(start_server: Callable[..., Server], front_ends: int) -> None:
    server = start_server(CONFIG, env={"AQUEDUCT_SERVER__WORKERS": str(front_ends)})
    with ThreadPoolExecutor(8) as pool:  # 8 requests of 3 rows: 24 rows, over one batch of 16
        answers = list(pool.map(lambda _: ask(server, 3), range(8)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    rows = [tensors(a)["batch"]["data"][0] for a in answers]
    assert max(rows) <= BATCH_SIZE and max(rows) > 3, rows  # batched together, never over batch_size rows
    metrics = server.client.get("/metrics").text
    (batched_rows,) = re.findall(r'^aqueduct_batch_rows_total\{step="double"\} (\S+)$', metrics, re.M)
    (batched_tasks,) = re.findall(r'^aqueduct_batch_size_sum\{step="double"\} (\S+)$', metrics, re.M)
    assert (float(batched_rows), float(batched_tasks)) == (24, 8)
