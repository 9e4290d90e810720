"""Unit layer: runtime steps (``runtime`` + ``model``), the runtime's image, ``batchDim``, and a serving container
that exits 2 (a config or model it cannot serve) reported on the Pipeline."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
from aqueduct_operator import images, status
from aqueduct_operator.render import desired_objects
from aqueduct_operator.spec import InvalidSpec, parse

from tests.operator.test_render import K8S_VERSION, by_kind, config_of

OPERATOR_IMAGE = "registry.example.com:5000/ml/aqueduct:0.2.0"
RUNTIME_IMAGES = {"onnx": "registry.example.com/aqueduct-onnx:0.2.0", "torch": "registry.example.com/aqueduct-torch:1",
                  "sklearn": "registry.example.com/aqueduct-sklearn:0.2.0"}
NOW = "2026-12-04T00:00:00Z"


def pipeline(*steps: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aqueduct.dev/v1alpha1", "kind": "Pipeline",
        "metadata": {"name": "iris", "namespace": "default", "uid": "u-1", "generation": 1},
        "spec": {"steps": list(steps), **spec},
    }


SKLEARN = {"name": "model", "runtime": "sklearn", "model": "/models/iris.skops", "batchSize": 64,
           "batchTimeout": 0.002, "options": {"method": "predict_proba", "trustPickle": False}}


def objects(body: dict[str, Any], runtime_images: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    objs = desired_objects(body, OPERATOR_IMAGE, RUNTIME_IMAGES if runtime_images is None else runtime_images)
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return by_kind(objs)


def serve_container(objs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_a_runtime_step_is_rendered_as_runtime_and_model_with_its_options() -> None:
    config = config_of(list(objects(pipeline(SKLEARN)).values()))
    assert config["steps"] == [{
        "name": "model", "runtime": "sklearn", "model": "/models/iris.skops", "nprocs": 1, "batch_size": 64,
        "batch_timeout": 0.002, "latency_target": None, "handle_condition": None,
        "options": {"method": "predict_proba", "trustPickle": False},
    }]
    # Tensors come from the model: none declared, none written (the pod derives them).
    assert "inputs" not in config and "outputs" not in config and "batch_dim" not in config


def test_a_runtime_step_next_to_a_handler_step() -> None:
    pre = {"name": "pre", "handler": "mypkg.pre:Normalize", "options": {"scale": 0.5}}
    onnx = {"name": "net", "runtime": "onnx", "model": "/models/net.onnx", "options": {"device": "cuda"}}
    objs = objects(pipeline(pre, onnx))
    steps = config_of(list(objs.values()))["steps"]
    assert steps[0]["handler"] == "mypkg.pre:Normalize" and "runtime" not in steps[0]
    assert (steps[1]["runtime"], steps[1]["model"], steps[1]["options"]) == ("onnx", "/models/net.onnx",
                                                                            {"device": "cuda"})
    assert "handler" not in steps[1]
    assert serve_container(objs)["image"] == RUNTIME_IMAGES["onnx"]  # the runtime's image runs the handler too


@pytest.mark.parametrize(("uri", "path"), [
    ("pvc://model-store/iris/v3/iris.skops", "/mnt/models/iris/v3/iris.skops"),
    ("https://models.example.com/iris.skops", "/mnt/models/iris.skops"),
])
def test_model_left_out_is_the_file_spec_model_gives(uri: str, path: str) -> None:
    step = {key: value for key, value in SKLEARN.items() if key != "model"}
    objs = objects(pipeline(step, model={"storageUri": uri}))
    (rendered,) = config_of(list(objs.values()))["steps"]
    assert rendered["model"] == path
    assert {"name": "MODEL_PATH", "value": path} in serve_container(objs)["env"]
    for init in objs["Deployment"]["spec"]["template"]["spec"].get("initContainers", []):
        assert init["image"] == RUNTIME_IMAGES["sklearn"]  # the download runs in the same image
    # A model named in the step wins over spec.model's.
    (rendered,) = config_of(list(objects(pipeline(SKLEARN, model={"storageUri": uri})).values()))["steps"]
    assert rendered["model"] == "/models/iris.skops"


@pytest.mark.parametrize(("step", "field"), [
    ({"name": "m", "runtime": "sklearn"}, "spec.steps[0].model"),  # no model and no spec.model
    ({"name": "m", "runtime": "sklearn", "handler": "pkg.mod:Handler", "model": "/m"}, "spec.steps[0].handler"),
    ({"name": "m"}, "spec.steps[0].handler"),
    ({"name": "m", "handler": "pkg.mod:Handler", "model": "/m"}, "spec.steps[0].model"),
    ({"name": "m", "runtime": "tensorflow", "model": "/m"}, "spec.steps[0].runtime"),
    ({"name": "m", "runtime": "onnx", "model": "models/m.onnx"}, "spec.steps[0].model"),
    ({"name": "m", "runtime": "onnx", "model": ""}, "spec.steps[0].model"),
    ({"name": "m", "runtime": "onnx", "model": "/m", "options": {"trust-pickle": True}}, "spec.steps[0].options"
     ".trust-pickle"),
])
def test_runtime_step_mistakes_name_the_field(step: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        parse(pipeline(step), OPERATOR_IMAGE, RUNTIME_IMAGES)
    assert info.value.field == field


def image_of(body: dict[str, Any], runtime_images: dict[str, str] | None = None) -> str:
    return parse(body, OPERATOR_IMAGE, RUNTIME_IMAGES if runtime_images is None else runtime_images).image


def step(runtime: str, name: str | None = None) -> dict[str, Any]:
    return {"name": name or runtime, "runtime": runtime, "model": f"/models/{runtime}.bin"}


def test_the_runtimes_image_serves_a_pipeline_without_spec_image() -> None:
    assert image_of(pipeline(step("onnx"))) == RUNTIME_IMAGES["onnx"]
    assert image_of(pipeline(step("torch"))) == RUNTIME_IMAGES["torch"]
    # xgboost and lightgbm are served by the sklearn image, so they mix with sklearn steps.
    assert image_of(pipeline(step("xgboost"), step("lightgbm"), step("sklearn"))) == RUNTIME_IMAGES["sklearn"]
    # A handler-only Pipeline keeps the operator's (base) image; spec.image always wins.
    assert image_of(pipeline({"name": "h", "handler": "pkg.mod:Handler"})) == OPERATOR_IMAGE
    assert image_of(pipeline(step("onnx"), image="me/mine:1")) == "me/mine:1"


def test_runtime_images_not_given_are_derived_from_the_operators() -> None:
    assert image_of(pipeline(step("onnx")), {}) == "registry.example.com:5000/ml/aqueduct-onnx:0.2.0"
    assert image_of(pipeline(step("lightgbm")), {}) == "registry.example.com:5000/ml/aqueduct-sklearn:0.2.0"
    assert image_of(pipeline(step("xgboost")), {"sklearn": "sk:9"}) == "sk:9"  # the sklearn image holds it
    assert images.derived("aqueduct", "torch") == "aqueduct-torch"
    assert images.derived("localhost:5000/aqueduct", "onnx") == "localhost:5000/aqueduct-onnx"
    assert images.derived("aqueduct@sha256:" + "0" * 64, "onnx") is None
    body = pipeline(step("onnx"))
    with pytest.raises(InvalidSpec, match=r"^spec\.image: is required: the operator has no image for runtime onnx"):
        parse(body, "aqueduct@sha256:" + "0" * 64, {})
    with pytest.raises(InvalidSpec, match=r"^spec\.image: is required"):
        parse(body)


def test_runtimes_of_different_images_need_spec_image() -> None:
    with pytest.raises(InvalidSpec) as info:
        image_of(pipeline(step("onnx"), step("torch")))
    assert info.value.field == "spec.image"
    assert "onnx, torch" in info.value.message and RUNTIME_IMAGES["onnx"] in info.value.message
    # The same images configured for both: no conflict.
    same = {"onnx": "all:1", "torch": "all:1"}
    assert image_of(pipeline(step("onnx"), step("torch")), same) == "all:1"


def test_runtime_images_come_from_the_operators_environment() -> None:
    environ = {"AQUEDUCT_RUNTIME_IMAGE_ONNX": "r/onnx:1", "AQUEDUCT_RUNTIME_IMAGE_TORCH": "",
               "AQUEDUCT_OPERATOR_IMAGE": "r/base:1", "PATH": "/bin"}
    assert images.from_environ(environ) == {"onnx": "r/onnx:1"}


def test_batch_dim_and_declared_tensors() -> None:
    tensors = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
               "outputs": [{"name": "p", "datatype": "FP32", "shape": [-1, 3]}]}
    config = config_of(list(objects(pipeline(SKLEARN, batchDim=True, **tensors)).values()))
    assert config["batch_dim"] is True
    assert config["inputs"] == tensors["inputs"] and config["outputs"] == tensors["outputs"]
    assert config_of(list(objects(pipeline(SKLEARN, batchDim=False)).values()))["batch_dim"] is False
    # A handler pipeline's config is as before: empty tensor lists, no batch_dim.
    config = config_of(list(objects(pipeline({"name": "h", "handler": "pkg.mod:Handler"})).values()))
    assert (config["inputs"], config["outputs"]) == ([], []) and "batch_dim" not in config
    with pytest.raises(InvalidSpec, match=r"^spec\.batchDim: must be true or false"):
        parse(pipeline(SKLEARN, batchDim="yes"), OPERATOR_IMAGE)


def test_the_serving_containers_error_becomes_its_termination_message() -> None:
    assert serve_container(objects(pipeline(SKLEARN)))["terminationMessagePolicy"] == "FallbackToLogsOnError"


def serving_pod(name: str, state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    serve = {"name": "serve", "ready": False, "restartCount": 3, "state": state, "lastState": last or {}}
    return {"metadata": {"name": name}, "status": {"containerStatuses": [serve]}}


ERROR = "aqueduct-serve: steps[0] (model): runtime 'sklearn': model file '/models/iris.skops' does not exist"
# FallbackToLogsOnError: the log's tail, with whatever the pod printed before its error.
EXITED_2 = {"terminated": {"exitCode": 2, "reason": "Error", "message": f"some warning\n{ERROR}\n"}}
DEPLOYMENT = {"metadata": {"generation": 1},
              "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 0}}


def conditions_of(new: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in new["conditions"]}


@pytest.mark.parametrize("pod", [
    serving_pod("iris-7c9-x1", {"waiting": {"reason": "CrashLoopBackOff"}}, EXITED_2),
    serving_pod("iris-7c9-x1", EXITED_2),
])
def test_a_serving_container_that_exits_2_makes_the_pipeline_not_ready_with_its_error(pod: dict[str, Any]) -> None:
    spec = parse(pipeline(SKLEARN), OPERATOR_IMAGE)
    healthy = serving_pod("iris-7c9-a0", {"running": {}})
    conditions = conditions_of(status.compute(spec, DEPLOYMENT, {}, NOW, [pod, healthy]))
    message = f"pod iris-7c9-x1: the serving container cannot start (exit code 2): {ERROR}"
    assert conditions["Ready"] == ("False", "ServingConfigInvalid", message)
    assert conditions["Degraded"] == ("True", "ServingConfigInvalid", message)
    assert conditions["Progressing"][:2] == ("False", "ServingConfigInvalid")


def test_a_rollout_whose_new_pods_exit_2_stays_ready_but_degraded() -> None:
    spec = parse(pipeline(SKLEARN), OPERATOR_IMAGE)
    deployment = copy.deepcopy(DEPLOYMENT)
    deployment["status"].update(replicas=2, readyReplicas=1, availableReplicas=1)  # the old pod still serves
    pod = serving_pod("iris-new", {"waiting": {"reason": "CrashLoopBackOff"}}, EXITED_2)
    conditions = conditions_of(status.compute(spec, deployment, {}, NOW, [pod]))
    assert conditions["Ready"][:2] == ("True", "AllReplicasReady")
    assert conditions["Degraded"][:2] == ("True", "ServingConfigInvalid")
    # The rollout's deadline passing later does not hide what the pods say.
    deployment["status"]["conditions"] = [{"type": "Progressing", "status": "False",
                                           "reason": "ProgressDeadlineExceeded", "message": "timed out"}]
    assert conditions_of(status.compute(spec, deployment, {}, NOW, [pod]))["Degraded"][1] == "ServingConfigInvalid"


@pytest.mark.parametrize("pod", [
    serving_pod("p", {"waiting": {"reason": "CrashLoopBackOff"}},
                {"terminated": {"exitCode": 1, "reason": "Error", "message": "Traceback ..."}}),  # a crash: not ours
    serving_pod("p", {"running": {}}, EXITED_2),  # restarted and running now (e.g. the model file appeared)
    serving_pod("p", {"terminated": {"exitCode": 0, "reason": "Completed"}}),
])
def test_other_container_states_are_not_reported_as_config_errors(pod: dict[str, Any]) -> None:
    assert status.serve_failure([pod]) is None


def test_a_long_log_tail_is_cut_to_the_pods_error() -> None:
    noise = "\n".join(f"line {i}" for i in range(80))
    pod = serving_pod("p", {"terminated": {"exitCode": 2, "message": f"{noise}\n{ERROR}\n  detail line\n"}})
    assert status.serve_failure([pod]) == (
        f"pod p: the serving container cannot start (exit code 2): {ERROR}\n  detail line"
    )
    pod = serving_pod("p", {"terminated": {"exitCode": 2, "message": "x" * 5000}})
    failure = status.serve_failure([pod])
    assert failure is not None and failure.endswith("..." + "x" * status.MESSAGE_LIMIT)
