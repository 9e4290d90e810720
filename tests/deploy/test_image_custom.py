"""The "serve your own handler" recipe (examples/custom-image), built by a real Docker engine and asked.

The recipe's Dockerfile starts FROM the image the repository's Dockerfile builds, adds the user's requirements
and package, and is asked twice: as `docker run` runs it (its own command and config), and as the Pipeline
that names it in spec.image (examples/pipelines/custom-image.yaml) is run by the operator: the operator's
rendered container (image, arguments, environment, user) with the rendered config mounted where it says.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.operator import crd

from .conftest import ROOT, Docker, build_image, find_tool, run
from .containers import http, serving

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # a first build downloads the requirements

RECIPE = ROOT / "examples" / "custom-image"
PIPELINE = crd.EXAMPLES / "pipelines" / "custom-image.yaml"
FEATURES = np.array([[0.5, -1.0, 2.0, 0.25], [-2.0, 0.0, 1.5, 3.0]], dtype=np.float32)


def expected_probabilities(features: np.ndarray) -> np.ndarray:
    """The recipe's model run here: softmax(features @ weights + bias) with the weights its package ships."""
    model = json.loads((RECIPE / "mymodel" / "weights.json").read_text())
    logits = features @ np.asarray(model["weights"], np.float32) + np.asarray(model["bias"], np.float32)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def ask(base: str, model: str, logs: Callable[[], str]) -> np.ndarray:
    """One request per row (the config declares one row per request); the answers stacked."""
    rows = []
    for row in FEATURES:
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [4], "data": row.tolist()}]}
        status, answer = http("POST", f"{base}/v2/models/{model}/infer", body, timeout=30)
        assert status == 200, f"{answer}\n--- logs\n{logs()}"
        (output,) = answer["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [3])
        rows.append(output["data"])
    return np.asarray(rows, np.float32)


@pytest.fixture(scope="module")
def user_image(docker: Docker, aqueduct_image: str) -> str:
    """The recipe built FROM this session's aqueduct image, tagged as the example Pipeline's spec.image."""
    tag = crd.load_yaml(PIPELINE)["spec"]["image"]
    seconds, _ = build_image(docker, tag, {"AQUEDUCT_IMAGE": aqueduct_image}, context=RECIPE)
    size = json.loads(docker("image", "inspect", tag).stdout)[0]["Size"]
    print(
        f"\n[deploy] docker build of {tag} (examples/custom-image): {seconds:.1f} s, {size / 1e6:.0f} MB",
        file=sys.stderr,
    )
    return tag


def test_recipe_dockerfile_is_lint_clean() -> None:
    proc = run([find_tool("hadolint"), "--failure-threshold", "info", str(RECIPE / "Dockerfile")], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_user_image_holds_the_requirements(docker: Docker, aqueduct_image: str, user_image: str) -> None:
    """requirements.txt is what brings scipy (the project's image lacks it), at its pin; the server runs as 10001."""
    pin = (RECIPE / "requirements.txt").read_text().split("scipy==")[1].split()[0]
    check = "import importlib.metadata as m, os; print(m.version('scipy'), os.getuid())"
    assert docker("run", "--rm", "--network", "host", user_image, "python", "-c", check).stdout.split() == [
        pin,
        "10001",
    ]
    lacking = docker("run", "--rm", "--network", "host", aqueduct_image, "python", "-c", "import scipy", check=False)
    assert lacking.returncode == 1 and "No module named 'scipy'" in lacking.stderr


def test_user_image_serves_its_handler(docker: Docker, user_image: str) -> None:
    """`docker run` the image as built: its own command and config serve the user's handler."""
    with serving(docker, user_image) as (base, logs):
        status, metadata = http("GET", f"{base}/v2/models/mymodel")
        assert status == 200, metadata
        assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [4]}]
        np.testing.assert_allclose(ask(base, "mymodel", logs), expected_probabilities(FEATURES), rtol=1e-5)


def test_pipeline_naming_the_user_image_is_served_by_it(docker: Docker, user_image: str, tmp_path: Path) -> None:
    """The example Pipeline's Deployment runs the user's image; its container and config, run here, answer."""
    from aqueduct_operator.render import desired_objects

    body = crd.load_yaml(PIPELINE)
    body["metadata"].update(namespace="default", uid="u", generation=1)
    objects = desired_objects(body)
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (serve,) = pod["containers"]
    assert serve["image"] == user_image == "registry.example.com/mymodel:1.0"

    # The ConfigMap's files, mounted where the container mounts its volume.
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    (mount,) = [m for m in serve["volumeMounts"] if m["name"] == volume["name"]]
    mounts: list[str] = []
    for key, text in config_map["data"].items():
        (tmp_path / key).write_text(text)
        (tmp_path / key).chmod(0o644)  # read by the container's uid
        mounts += ["-v", f"{tmp_path / key}:{mount['mountPath']}/{key}:ro"]
    env = [f"--env={e['name']}={e['value']}" for e in serve.get("env", []) if "value" in e]
    user = ["--user", f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"]
    command = [*serve.get("command", []), *serve["args"]]
    with serving(docker, user_image, *command, options=(*mounts, *env, *user)) as (base, logs):
        answers = ask(base, body["metadata"]["name"], logs)
    np.testing.assert_allclose(answers, expected_probabilities(FEATURES), rtol=1e-5)
