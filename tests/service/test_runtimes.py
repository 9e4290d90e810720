"""Runtime steps in the config: the schema's rules, options, the pod's tensors and batch_dim derived from the
model and checked against the config, the rows of a batched request, runtimes run in process, and bad model
files refused by the pod with exit status 2, naming the file and the runtime, before the port is bound."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aqueduct_service.errors import InferenceError
from aqueduct_service.inference import check_inputs, datatype_of
from aqueduct_service.pipeline import build_flow, resolve_settings
from aqueduct_service.runtimes import RUNTIMES, ModelLoadError, ModelRuntime, runtime_class
from aqueduct_service.runtimes.lightgbm import LightGBMRuntime
from aqueduct_service.runtimes.onnx import OnnxRuntime
from aqueduct_service.runtimes.sklearn import SklearnRuntime
from aqueduct_service.runtimes.xgboost import XGBoostRuntime
from aqueduct_service.settings import (
    ConfigError,
    Settings,
    TensorSpec,
    config_schema,
    parse_settings,
    signature_json,
    with_signature,
)
from aqueduct_service.task import InferenceTask

from tests.service.conftest import REPO, server_env
from tests.service.runtime_models import (
    FEATURES,
    make_lightgbm,
    make_onnx_fixed,
    make_onnx_linear,
    make_onnx_text,
    make_sklearn,
    make_xgboost,
)

LINEAR_INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
LINEAR_OUTPUTS = (TensorSpec("y", "FP32", (-1, 3)), TensorSpec("norm", "FP32", (-1,)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("models")
    corrupt = directory / "corrupt.onnx"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    not_a_model = directory / "notes.txt"
    not_a_model.write_text("a,b,c\n1,2,3\n")
    return {
        "linear": make_onnx_linear(directory)[0],
        "fixed": make_onnx_fixed(directory),
        "corrupt": corrupt,
        "text": not_a_model,
        "joblib": make_sklearn(directory, "joblib")[0],
        "labels": make_sklearn(directory, "labels")[0],
    }


def document(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "name": "m", "steps": list(steps), **top}


def onnx_step(model: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "model", "runtime": "onnx", "model": str(model), "batch_size": 8, **extra}


def resolved(doc: dict[str, Any]) -> Settings:
    settings = parse_settings(doc, {})
    return resolve_settings(settings, build_flow(settings))


# ---------------------------------------------------------------- config file and registry


def test_the_schema_names_every_registered_runtime() -> None:
    assert config_schema()["$defs"]["step"]["properties"]["runtime"]["enum"] == list(RUNTIMES)


def test_unknown_or_unimportable_runtimes_are_load_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="unknown runtime 'caffe'"):
        runtime_class("caffe")
    monkeypatch.setitem(RUNTIMES, "gone", "aqueduct_service.runtimes.gone:GoneRuntime")
    with pytest.raises(ModelLoadError, match="runtime 'gone' is not available in this image: ModuleNotFoundError"):
        runtime_class("gone")


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            {"handler": "a.b:C", "runtime": "onnx", "model": "m.onnx"},
            r"steps\[0\]: a step has either a handler or a runtime, not both",
        ),
        ({"model": "m.onnx"}, r"steps\[0\]: model names the file of a runtime step: add runtime"),
        ({}, r"steps\[0\]: needs a handler .* or a runtime"),
        ({"runtime": "caffe", "model": "m"}, r"steps\[0\]\.runtime: 'caffe' is not one of"),
    ],
    ids=["both", "model-alone", "neither", "unknown-runtime"],
)
def test_a_step_is_a_handler_or_a_runtime(step: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(document({"name": "s", **step}), {})


def test_a_runtime_step_without_a_model_serves_model_path() -> None:
    doc = document({"name": "s", "runtime": "onnx"})
    assert parse_settings(doc, {"MODEL_PATH": "/mnt/models/m.onnx"}).steps[0].model == "/mnt/models/m.onnx"
    with pytest.raises(ConfigError, match=r"steps\[0\]\.model: runtime step 's' needs a model file \(or MODEL_PATH"):
        parse_settings(doc, {})


def test_runtime_options_are_checked(models: dict[str, Path]) -> None:
    with pytest.raises(
        ConfigError, match=r"steps\[0\]\.options\.colour: runtime 'onnx' has no option 'colour'.*device"
    ):
        build_flow(parse_settings(document(onnx_step(models["linear"], options={"colour": "red"})), {}))
    with pytest.raises(ConfigError, match=r"steps\[0\]\.options: runtime 'onnx': device must be cpu, cuda or cuda:N"):
        build_flow(parse_settings(document(onnx_step(models["linear"], options={"Device": "tpu"})), {}))


# ---------------------------------------------------------------- the pod's tensors


def test_tensors_and_batch_dim_come_from_the_model(models: dict[str, Path]) -> None:
    settings = resolved(document(onnx_step(models["linear"])))
    assert (settings.inputs, settings.outputs, settings.batch_dim) == (LINEAR_INPUTS, LINEAR_OUTPUTS, True)
    # what the main process hands its front ends
    assert (
        with_signature(parse_settings(document(onnx_step(models["linear"])), {}), signature_json(settings)) == settings
    )


def test_a_fixed_batch_dimension_is_served_one_request_at_a_time(models: dict[str, Path]) -> None:
    settings = resolved(document(onnx_step(models["fixed"])))
    assert settings.inputs == (TensorSpec("x", "FP32", (2, 4)),)
    assert settings.batch_dim is False
    with pytest.raises(ConfigError, match=r"batch_dim: true, but model file '.*fixed\.onnx' \(runtime 'onnx'\)"):
        resolved(document(onnx_step(models["fixed"]), batch_dim=True))


def test_declared_tensors_may_fix_what_the_model_leaves_open(models: dict[str, Path]) -> None:
    outputs = [{"name": "norm", "datatype": "FP32", "shape": [-1]}, {"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    settings = resolved(document(onnx_step(models["linear"]), outputs=outputs, batch_dim=False))
    assert settings.outputs == LINEAR_OUTPUTS  # in the model's order
    settings = resolved(
        document(onnx_step(models["linear"]), inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 4]}])
    )
    assert (settings.inputs, settings.batch_dim) == ((TensorSpec("x", "FP32", (1, 4)),), False)


@pytest.mark.parametrize(
    ("declared", "described"),
    [
        ({"name": "features", "datatype": "FP32", "shape": [-1, 4]}, r"features FP32 \[-1, 4\]"),
        ({"name": "x", "datatype": "FP64", "shape": [-1, 4]}, r"x FP64 \[-1, 4\]"),
        ({"name": "x", "datatype": "FP32", "shape": [-1, 5]}, r"x FP32 \[-1, 5\]"),
        ({"name": "x", "datatype": "FP32", "shape": [-1]}, r"x FP32 \[-1\]"),
    ],
    ids=["name", "datatype", "size", "rank"],
)
def test_declared_inputs_that_disagree_name_both(
    models: dict[str, Path], declared: dict[str, Any], described: str
) -> None:
    model = r"model file '.*linear\.onnx' \(runtime 'onnx'\) has x FP32 \[-1, 4\]"
    message = rf"inputs: the config declares {described}, but {model}"
    with pytest.raises(ConfigError, match=message):
        resolved(document(onnx_step(models["linear"]), inputs=[declared]))


def test_a_handler_first_takes_declared_inputs_and_the_model_gives_the_outputs(models: dict[str, Path]) -> None:
    pre = {"name": "pre", "handler": "tests.service.runtime_models:Standardise"}
    inputs = [{"name": "raw", "datatype": "FP64", "shape": [4]}]
    settings = resolved(document(pre, onnx_step(models["linear"]), inputs=inputs))
    assert (settings.inputs, settings.outputs) == ((TensorSpec("raw", "FP64", (4,)),), LINEAR_OUTPUTS)
    assert settings.batch_dim is False  # the handler's inputs say nothing of rows
    with pytest.raises(ConfigError, match=r"inputs\[0\] \('raw'\): shape \[4\]: with batch_dim, the first dimension"):
        resolved(document(pre, onnx_step(models["linear"]), inputs=inputs, batch_dim=True))


# ---------------------------------------------------------------- rows of a batched request


def rows(*counts: int) -> dict[str, np.ndarray]:
    return {f"in{i}": np.zeros((n, 2), np.float32) for i, n in enumerate(counts)}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            rows(2, 3),
            "inputs 'in0' and 'in1' have 2 and 3 rows: every input of a request must have the same first",
        ),
        (rows(0), "a request must carry at least one row"),
        (rows(9, 9), "a request of 9 rows is over this model's limit of 8 (the first step's batch_size)"),
        ({"s": np.float32(1.0).reshape(())}, "input 's': a scalar has no batch dimension"),
    ],
    ids=["unequal", "empty", "over-limit", "scalar"],
)
def test_batched_requests_are_checked(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InferenceError) as caught:
        check_inputs(inputs, (), max_rows=8)
    assert caught.value.status == 400
    assert caught.value.message.startswith(message)
    check_inputs(rows(8, 8), (), max_rows=8)


# ---------------------------------------------------------------- runtimes in process


def test_onnx_joins_tasks_rows_and_splits_the_outputs(models: dict[str, Path]) -> None:
    runtime = OnnxRuntime(str(models["linear"]), threads=1)
    runtime.on_start()
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(n, 4)).astype(np.float32) for n in (1, 3, 2)]
    tasks = [InferenceTask({"x": x}, {}) for x in xs[:2]]
    tasks.append(InferenceTask({}, {}))
    tasks[2].outputs["x"] = xs[2]  # set by an earlier step: read from the outputs
    runtime.handle(*tasks)
    for x, task in zip(xs, tasks, strict=True):
        alone = runtime.run({"x": x})
        assert task.outputs["y"].shape == (len(x), 3)
        np.testing.assert_allclose(task.outputs["y"], alone["y"], rtol=1e-6)
        np.testing.assert_allclose(task.outputs["norm"], alone["norm"], rtol=1e-6)


@pytest.mark.parametrize("spinning", [False, True])
def test_onnx_threads_sleep_between_runs_unless_told_to_spin(models: dict[str, Path], spinning: bool) -> None:
    runtime = OnnxRuntime(str(models["linear"]), threads=1, spinning=spinning)
    runtime.on_start()
    options = runtime._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")


def test_tree_runtimes_let_openmp_threads_sleep_unless_the_user_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    XGBoostRuntime(str(make_xgboost(tmp_path)[0]), threads=1).on_start()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    LightGBMRuntime(str(make_lightgbm(tmp_path)[0]), threads=1).on_start()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_onnx_string_tensors_are_bytes(tmp_path: Path) -> None:
    runtime = OnnxRuntime(str(make_onnx_text(tmp_path)), threads=1)
    assert runtime.metadata().inputs == (TensorSpec("words", "BYTES", (-1,)),)
    runtime.on_start()
    task = InferenceTask({"words": np.array([b"caf\xc3\xa9", b"tea"])}, {})
    runtime.handle(task)
    assert datatype_of(task.outputs["same"]) == "BYTES"
    assert task.outputs["same"].tolist() == ["caf\u00e9", "tea"]


def test_onnx_on_cuda_needs_the_cuda_provider(models: dict[str, Path]) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    with pytest.raises(ModelLoadError, match=r"device 'cuda' needs onnxruntime with the CUDA execution provider"):
        OnnxRuntime(str(models["linear"]), device="cuda").metadata()


def test_sklearn_string_labels_are_bytes(models: dict[str, Path]) -> None:
    runtime = SklearnRuntime(str(models["labels"]))
    assert runtime.metadata().outputs == (TensorSpec("predict", "BYTES", (-1,)),)
    runtime.load()
    labels = runtime.run({"input": np.array([[3.0, 0, 0, 0, 0, 0], [-3.0, 0, 0, 0, 0, 0]])})["predict"]
    assert labels.tolist() == ["dog", "cat"]


@pytest.mark.parametrize(
    ("make", "runtime", "inputs", "outputs"),
    [
        (lambda d: make_xgboost(d, ".ubj")[0], XGBoostRuntime, ("FP32", (-1, FEATURES)), ("FP32", (-1, 3))),
        (lambda d: make_lightgbm(d, "binary")[0], LightGBMRuntime, ("FP64", (-1, FEATURES)), ("FP64", (-1,))),
    ],
    ids=["xgboost-ubj", "lightgbm-binary"],
)
def test_booster_metadata(
    tmp_path: Path,
    make: Callable[[Path], Path],
    runtime: type[ModelRuntime],
    inputs: tuple[str, tuple[int, ...]],
    outputs: tuple[str, tuple[int, ...]],
) -> None:
    metadata = runtime(str(make(tmp_path))).metadata()
    assert metadata.inputs == (TensorSpec("input", *inputs),)
    assert metadata.outputs == (TensorSpec("predict", *outputs),)
    assert metadata.batched


# ---------------------------------------------------------------- bad model files: exit status 2


def serve_expecting_exit(tmp_path: Path, doc: dict[str, Any]) -> str:
    """Run the pod on ``doc`` with its port held by this process; return its output after it exits 2.

    Had the pod tried to bind the port it would have failed there, with another status and message.
    """
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(doc))
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "aqueduct_service",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("runtime", "model", "extra", "message"),
    [
        ("onnx", "missing.onnx", {}, r"runtime 'onnx': model file '.*missing\.onnx' does not exist"),
        ("onnx", "corrupt", {}, r"runtime 'onnx' cannot load model file '.*corrupt\.onnx'"),
        ("lightgbm", "text", {}, r"runtime 'lightgbm' cannot load model file '.*notes\.txt'"),
        ("xgboost", "linear", {}, r"runtime 'xgboost' cannot load model file '.*linear\.onnx'"),
        ("sklearn", "joblib", {}, r"runtime 'sklearn', model file '.*logreg\.joblib': a \.joblib file is a pickle"),
        (
            "onnx",
            "linear",
            {"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 4]}]},
            r"the config declares x FP64 \[-1, 4\], but model file '.*linear\.onnx' \(runtime 'onnx'\) has",
        ),
    ],
    ids=["missing", "corrupt", "wrong-format", "wrong-runtime", "pickle-untrusted", "inputs-mismatch"],
)
def test_bad_model_files_exit_2_before_the_port_is_bound(
    models: dict[str, Path], tmp_path: Path, runtime: str, model: str, extra: dict[str, Any], message: str
) -> None:
    path = models.get(model, tmp_path / model)
    step = {"name": "model", "runtime": runtime, "model": str(path)}
    stderr = serve_expecting_exit(tmp_path, document(step, **extra))
    assert stderr.startswith("aqueduct-serve: steps[0] ('model'): ") or "inputs:" in stderr, stderr
    assert "Traceback" not in stderr
    assert re.search(message, stderr), stderr
