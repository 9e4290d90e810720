"""The runtime images (the Dockerfile's RUNTIME=onnx, sklearn, torch), built by a real Docker engine and run.

Each image is built once per session (its layers cached between runs on one machine) on the base the
`aqueduct` image has. Every serving test makes a model file here, mounts it read-only into the image's serving
pod (`docker run`, read-only root), asks the pod once over the socket and compares the answer with the same model
run in this process: the test venv holds the versions the images pin (pyproject.toml's extras).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
import yaml

from .conftest import ROOT, Docker, build_image
from .containers import http, serving

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # a first build downloads the runtime's packages

# What each image's runtime steps import; a shared library the image lacks (libgomp) fails its import.
IMPORTS = {"onnx": ("onnxruntime",), "sklearn": ("sklearn", "skops.io", "xgboost", "lightgbm"), "torch": ("torch",)}
# The config's `runtime:` names each image serves.
SERVES = {"onnx": ("onnx",), "sklearn": ("sklearn", "xgboost", "lightgbm"), "torch": ("torch",)}
# Tried first for the local torch index, so that the torch build's cache key (the index URL) is the same each run.
TORCH_INDEX_PORT = 47613
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def pins(extra: str) -> dict[str, str]:
    """pyproject.toml's pins in one extra: distribution name -> version pattern (e.g. ``2.13.*``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", spec) for spec in project["optional-dependencies"][extra]]
    assert all(specs), f"every requirement of the {extra} extra is pinned with ==: {specs}"
    return {m.group(1): m.group(2) for m in specs if m}


def layers(docker: Docker, image: str) -> list[str]:
    return list(json.loads(docker("image", "inspect", image).stdout)[0]["RootFS"]["Layers"])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def local_torch_wheel(docker: Docker, base: str) -> Path | None:
    """A torch CPU wheel (the torch extra's version, for the base's Python) in one of pip's find-links folders.

    Machines whose only index is PyPI keep one there: PyPI's torch is the CUDA build (several GB).
    """
    config = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    ).stdout
    folders = [Path(p) for value in re.findall(r"find-links='([^']*)'", config) for p in value.split()]
    folders += [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split()]
    python = "import sys; print('cp%d%d' % sys.version_info[:2])"
    tag = docker("run", "--rm", "--network", "host", base, "python3", "-c", python).stdout.strip()
    for folder in folders:
        found = sorted(folder.glob(f"torch-{pins('torch')['torch']}+cpu-{tag}-{tag}-*x86_64.whl"))
        if found:
            return found[-1]
    return None


@contextlib.contextmanager
def torch_index(docker: Docker, base: str, folder: Path) -> Iterator[dict[str, str]]:
    """Build args taking torch from a local CPU wheel, served here as a package index; none without one
    (the Dockerfile's default index, download.pytorch.org, is used then)."""
    wheel = local_torch_wheel(docker, base)
    if wheel is None:
        yield {}
        return
    (folder / "simple" / "torch").mkdir(parents=True)
    (folder / "simple" / "torch" / wheel.name).symlink_to(wheel)
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"TORCH_INDEX_URL": f"http://127.0.0.1:{server.server_port}/simple"}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="session")
def runtime_image(docker: Docker, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    """``runtime_image("onnx")`` -> ``aqueduct-onnx:test``, built from the working tree on first use."""
    built: dict[str, str] = {}

    def image(runtime: str) -> str:
        if runtime not in built:
            tag = f"aqueduct-{runtime}:test"
            index = (
                torch_index(docker, base_image, tmp_path_factory.mktemp("torch-index"))
                if runtime == "torch"
                else contextlib.nullcontext({})
            )
            with index as extra:
                seconds, _ = build_image(docker, tag, {"BASE": base_image, "RUNTIME": runtime, **extra})
            size = json.loads(docker("image", "inspect", tag).stdout)[0]["Size"]
            print(f"\n[deploy] docker build of {tag}: {seconds:.1f} s, {size / 1e6:.0f} MB", file=sys.stderr)
            built[runtime] = tag
        return built[runtime]

    return image


@pytest.mark.parametrize("runtime", ["onnx", "sklearn", "torch"])
def test_runtime_image_holds_its_pinned_packages(
    docker: Docker, runtime_image: Callable[[str], str], runtime: str
) -> None:
    """The extra's packages at pyproject.toml's versions import in the image, and the pod's runtimes load."""
    wanted = pins(runtime)
    script = (
        "import importlib, importlib.metadata as m, json, sys\n"
        "from aqueduct_service.runtimes import runtime_class\n"
        "names = json.loads(sys.argv[1])\n"
        "for module in names['imports']: importlib.import_module(module)\n"
        "for runtime in names['runtimes']: runtime_class(runtime)\n"
        "print(json.dumps({dist: m.version(dist) for dist in names['dists']}))\n"
    )
    names = {"imports": IMPORTS[runtime], "runtimes": SERVES[runtime], "dists": sorted(wanted)}
    out = docker(
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        runtime_image(runtime),
        "python",
        "-c",
        script,
        json.dumps(names),
    ).stdout
    versions = json.loads(out.splitlines()[-1])
    assert all(fnmatch.fnmatchcase(versions[d], wanted[d]) for d in wanted), (versions, wanted)
    if runtime == "torch":
        assert versions["torch"].endswith("+cpu"), "the torch image holds the CPU build by default"


@pytest.mark.parametrize("runtime", ["onnx", "sklearn", "torch"])
def test_runtime_image_shares_the_base_layers(
    docker: Docker, base_image: str, aqueduct_image: str, runtime_image: Callable[[str], str], runtime: str
) -> None:
    """The base, the user and /opt/venv's dependencies are the aqueduct image's own layers; the runtime's follow."""
    base, own = layers(docker, aqueduct_image), layers(docker, runtime_image(runtime))
    shared = len(os.path.commonprefix([base, own]))
    assert shared >= len(layers(docker, base_image)) + 2, (base, own)


def serve_and_ask(
    docker: Docker, image: str, folder: Path, step: dict[str, Any], inputs: Sequence[np.ndarray]
) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray]]:
    """Serve ``step`` (its model file in ``folder``) from ``image``, ask it once with ``inputs`` (in the order
    the model's metadata lists them, cast to its datatypes); returns (metadata, inputs as sent, outputs)."""
    config = {
        "version": 1,
        "name": "model",
        "steps": [{"name": "model", "batch_size": 16, "batch_timeout": 0.002, **step}],
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(config))
    folder.chmod(0o755)  # read by the pod's uid 10001
    for path in folder.iterdir():
        path.chmod(0o644)
    mount = ("-v", f"{folder}:/models:ro")
    with serving(docker, image, "aqueduct-serve", "--config", "/models/pipeline.yaml", options=mount) as (base, logs):
        status, metadata = http("GET", f"{base}/v2/models/model")
        assert status == 200, metadata
        sent = [
            np.asarray(x, NUMPY_TYPES[spec["datatype"]]) for spec, x in zip(metadata["inputs"], inputs, strict=True)
        ]
        body = {
            "inputs": [
                {"name": spec["name"], "datatype": spec["datatype"], "shape": list(x.shape), "data": x.ravel().tolist()}
                for spec, x in zip(metadata["inputs"], sent, strict=True)
            ]
        }
        status, answer = http("POST", f"{base}/v2/models/model/infer", body, timeout=60)
        assert status == 200, f"{answer}\n--- logs\n{logs()}"
    by_name = {
        o["name"]: np.asarray(o["data"], NUMPY_TYPES[o["datatype"]]).reshape(o["shape"]) for o in answer["outputs"]
    }
    return metadata, sent, [by_name[spec["name"]] for spec in metadata["outputs"]]


def test_onnx_image_serves_a_graph(docker: Docker, runtime_image: Callable[[str], str], tmp_path: Path) -> None:
    """An ONNX classifier built with onnx.helper (dynamic batch): names, datatypes and answers as onnxruntime's."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "weights"),
            numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "model.onnx")
    features = rng.normal(size=(5, 4)).astype(np.float32)

    metadata, _, (probabilities,) = serve_and_ask(
        docker, runtime_image("onnx"), tmp_path, {"runtime": "onnx", "model": "/models/model.onnx"}, [features]
    )
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    (expected,) = onnxruntime.InferenceSession(tmp_path / "model.onnx").run(None, {"features": features})
    np.testing.assert_allclose(probabilities, expected, rtol=1e-6, atol=1e-7)


def tabular_model(runtime: str, folder: Path) -> tuple[dict[str, Any], np.ndarray, Callable[[np.ndarray], Any]]:
    """A small binary classifier of ``runtime`` trained here and saved in its format: (step, rows, predict)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] > 0).astype(np.int64)
    rows = rng.normal(size=(6, 5))
    if runtime == "sklearn":
        import skops.io
        from sklearn.linear_model import LogisticRegression

        classifier = LogisticRegression().fit(x, y)
        skops.io.dump(classifier, folder / "model.skops")
        step = {"runtime": "sklearn", "model": "/models/model.skops", "options": {"method": "predict_proba"}}
        return step, rows, classifier.predict_proba
    if runtime == "xgboost":
        import xgboost

        booster = xgboost.train({"objective": "binary:logistic", "max_depth": 3}, xgboost.DMatrix(x, y), 20)
        booster.save_model(folder / "model.json")
        return (
            {"runtime": "xgboost", "model": "/models/model.json"},
            rows,
            lambda r: booster.predict(xgboost.DMatrix(r)),
        )
    import lightgbm

    gbm = lightgbm.train({"objective": "binary", "num_leaves": 7, "verbose": -1}, lightgbm.Dataset(x, y), 20)
    gbm.save_model(folder / "model.txt")
    return {"runtime": "lightgbm", "model": "/models/model.txt"}, rows, gbm.predict


@pytest.mark.parametrize("runtime", ["sklearn", "xgboost", "lightgbm"])
def test_sklearn_image_serves_a_model(
    docker: Docker, runtime_image: Callable[[str], str], tmp_path: Path, runtime: str
) -> None:
    """A LogisticRegression (skops), an XGBoost and a LightGBM booster, each answered as the library answers."""
    step, rows, predict = tabular_model(runtime, tmp_path)
    metadata, (sent,), outputs = serve_and_ask(docker, runtime_image("sklearn"), tmp_path, step, [rows])
    assert [spec["shape"] for spec in metadata["inputs"]] == [[-1, 5]]
    (answer,) = outputs
    expected = np.asarray(predict(sent))
    np.testing.assert_allclose(answer.reshape(expected.shape), expected, rtol=1e-6, atol=1e-7)


def test_torch_image_serves_an_exported_program(
    docker: Docker, runtime_image: Callable[[str], str], tmp_path: Path
) -> None:
    """A small conv net as a torch.export program (dynamic batch), answered as the program answers here."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    images = torch.randn(3, 1, 8, 8)
    program = torch.export.export(net, (images,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, tmp_path / "model.pt2")
    with torch.inference_mode():
        expected = program.module()(images).numpy()

    metadata, _, (scores,) = serve_and_ask(
        docker, runtime_image("torch"), tmp_path, {"runtime": "torch", "model": "/models/model.pt2"}, [images.numpy()]
    )
    assert [(spec["datatype"], spec["shape"]) for spec in metadata["inputs"]] == [("FP32", [-1, 1, 8, 8])]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
