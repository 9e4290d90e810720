"""Hypothesis strategies for valid Pipeline objects (as a user could write them, camelCase)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)
CLASS = st.from_regex(r"[A-Z][A-Za-z0-9_]{0,10}", fullmatch=True)
STEP_NAME = st.from_regex(r"[a-z0-9]([-a-z0-9_]{0,8}[a-z0-9])?", fullmatch=True)
PIPELINE_NAME = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
REF = st.builds(lambda mods, cls: ".".join(mods) + ":" + cls, st.lists(IDENT, min_size=1, max_size=3), CLASS)
OPTION_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(IDENT, inner, max_size=3),
    max_leaves=6,
)
RUNTIMES = ["onnx", "torch", "sklearn", "xgboost", "lightgbm"]
MODEL_PATH = st.from_regex(r"(/[A-Za-z0-9_.-]{1,12}){1,4}", fullmatch=True)
QUANTITY = st.one_of(
    st.integers(1, 64),
    st.sampled_from(["100m", "500m", "1", "2", "0.5", "128Mi", "1Gi", "2G", "1.5Gi"]),
)


@st.composite
def steps(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(st.lists(STEP_NAME, min_size=1, max_size=4, unique=True))
    result = []
    for name in names:
        step: dict[str, Any] = {"name": name}
        if draw(st.booleans()):
            step["handler"] = draw(REF)
        else:
            step["runtime"] = draw(st.sampled_from(RUNTIMES))
            step["model"] = draw(MODEL_PATH)
        if draw(st.booleans()):
            step["nprocs"] = draw(st.integers(1, 64))
        if draw(st.booleans()):
            step["batchSize"] = draw(st.integers(1, 4096))
        if draw(st.booleans()):
            step["batchTimeout"] = draw(st.one_of(st.integers(0, 2), st.floats(0, 2.5, allow_nan=False)))
        if draw(st.booleans()):
            step["handleCondition"] = draw(REF)
        if draw(st.booleans()):
            step["gpus"] = draw(st.sampled_from(["all", "per_worker"]))
        if draw(st.booleans()):
            step["options"] = draw(st.dictionaries(IDENT, OPTION_VALUE, max_size=3))
        result.append(step)
    return result


@st.composite
def pipelines(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": draw(st.sampled_from(["aqueduct:dev", "registry.example.com/a/b:1.2"])),
                            "steps": draw(steps())}
    if draw(st.booleans()):
        spec["replicas"] = draw(st.integers(0, 20))
    if draw(st.booleans()):
        queue: dict[str, Any] = {}
        if draw(st.booleans()):
            queue["size"] = draw(st.integers(1, 100_000))
        if draw(st.booleans()):
            queue["priorities"] = draw(st.integers(1, 16))
        spec["queue"] = queue
    if draw(st.booleans()):
        spec["timeout"] = draw(st.floats(3, 600, allow_nan=False))
    if draw(st.booleans()):
        spec["startTimeout"] = draw(st.floats(0.5, 3600, allow_nan=False))
    if draw(st.booleans()):
        spec["server"] = {
            "logLevel": draw(st.sampled_from(["critical", "error", "warning", "info", "debug"])),
            "gracefulTimeout": draw(st.floats(0, 300, allow_nan=False)),
            "maxBodyBytes": draw(st.integers(1024, 2**31)),
            "workers": draw(st.integers(1, 256)),
            "arenaBytes": draw(st.integers(0, 2**31)),
        }
    if draw(st.booleans()):
        gpus = draw(st.integers(1, 8))
        spec["resources"] = {
            "limits": {"memory": draw(QUANTITY), "nvidia.com/gpu": gpus},
            "requests": {"cpu": draw(QUANTITY), "nvidia.com/gpu": gpus},
        }
    if draw(st.booleans()):
        spec["env"] = [{"name": f"VAR_{i}", "value": draw(st.text(max_size=5))} for i in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        spec["nodeSelector"] = {"kubernetes.io/arch": "amd64"}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if draw(st.booleans()):
        spec["imagePullSecrets"] = [{"name": "regcred"}]
    if draw(st.booleans()):
        spec["model"] = draw(st.sampled_from([
            {"storageUri": "pvc://models/resnet50"},
            {"storageUri": "https://models.example.com/r50.pt", "sha256": "0" * 64},
            {"storageUri": "s3://bucket/r50.pt", "s3": {"endpoint": "http://minio:9000", "secretName": "creds"}},
        ]))
        for step in spec["steps"]:  # a runtime step without model serves spec.model's file
            if "runtime" in step and draw(st.booleans()):
                del step["model"]
    if draw(st.booleans()):
        spec["batchDim"] = draw(st.booleans())
    if draw(st.booleans()):
        spec["volumes"] = [{"name": "cache", "emptyDir": {}}]
        spec["volumeMounts"] = [{"name": "cache", "mountPath": "/var/cache/models", "readOnly": draw(st.booleans())}]
    if draw(st.booleans()):
        spec["autoscaling"] = draw(autoscaling())
        if spec["autoscaling"]["metric"] == "cpu":
            spec.setdefault("resources", {}).setdefault("requests", {}).setdefault("cpu", "500m")
    if draw(st.booleans()):
        spec["disruption"] = {"minAvailable": draw(st.one_of(st.integers(0, 5), st.sampled_from(["50%", "100%"])))}
    if draw(st.booleans()):
        spec["topologySpreadConstraints"] = [{
            "maxSkew": draw(st.integers(1, 3)),
            "whenUnsatisfiable": draw(st.sampled_from(["DoNotSchedule", "ScheduleAnyway"])),
            "topologyKey": draw(st.sampled_from(["topology.kubernetes.io/zone", "kubernetes.io/hostname"])),
        }]
    if draw(st.booleans()):
        spec.setdefault("server", {})["drainDelay"] = draw(st.floats(0, 30, allow_nan=False))
    return {
        "apiVersion": "aqueduct.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": draw(PIPELINE_NAME), "namespace": draw(st.sampled_from(["default", "ml-team"])),
                     "uid": "0b9c8f4e-1111-4222-8333-444455556666", "generation": draw(st.integers(1, 5))},
        "spec": spec,
    }


@st.composite
def autoscaling(draw: st.DrawFn) -> dict[str, Any]:
    """``spec.autoscaling`` with an HPA (what kubernetes-validate can check; KEDA's CRD is checked elsewhere)."""
    metric = draw(st.sampled_from(["queueDepth", "inFlight", "cpu"]))
    low = draw(st.integers(1, 10))
    auto: dict[str, Any] = {"minReplicas": low, "maxReplicas": draw(st.integers(low, 50)), "metric": metric}
    if draw(st.booleans()):  # else the operator's default target
        if metric == "cpu":
            auto["target"] = draw(st.integers(1, 200))
        else:
            auto["target"] = draw(st.one_of(st.integers(1, 1000), st.floats(0.01, 1000, allow_nan=False)))
    if draw(st.booleans()):
        auto["scaleDownStabilizationSeconds"] = draw(st.integers(0, 3600))
    return auto
