"""The Helm chart, checked with real helm 3 and helm 4 and validated offline against Kubernetes' schemas."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from .conftest import CHART, ROOT, find_tool, run, validate_manifests

HELMS = ["helm3", "helm4"]
NAMESPACE = "aqueduct-system"
KUBE_VERSIONS = ["1.28.0", "1.30.0", "1.37.0"]  # oldest the chart supports (Chart.yaml kubeVersion), default, newest
VALUE_SETS = {
    "defaults": [],
    "namespaced": ["--set", "operator.watchNamespaces={team-a,team-b}", "--set", "operator.logLevel=debug"],
    "ha-monitored": ["--set", "operator.replicas=3", "--set", "prometheusRule.enabled=true",
                     "--set", "prometheusRule.labels.release=kube-prometheus-stack"],
    "custom": [
        "--set",
        "image.repository=registry.example.com/aqueduct",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "image.pullPolicy=Always",
        "--set",
        "imagePullSecrets[0].name=regcred",
        "--set",
        "serviceAccount.name=aq",
        "--set",
        "fullnameOverride=aq",
        "--set",
        "operator.logLevel=warning",
        "--set",
        "operator.nodeSelector.pool=system",
    ],
    "locked-down": [
        "--set", "operator.networkPolicy.enabled=true",
        "--set", "operator.networkPolicy.egress[0].ports[0].port=6443",
        "--set", "operator.networkPolicy.egress[0].to[0].ipBlock.cidr=10.0.0.1/32",
        "--set", "pipelinePolicy.volumeTypes={configMap,emptyDir}",
        "--set", "pipelinePolicy.secrets={model-credentials}",
        "--set", "pipelinePolicy.networkPolicy.enabled=true",
        "--set", "pipelinePolicy.networkPolicy.metricsNamespaces={monitoring}",
    ],
}
RBAC_RULES = CHART / "files" / "operator-rbac-rules.yaml"


def template(helm: str, *args: str) -> str:
    proc = run([find_tool(helm), "template", "rel", str(CHART), "-n", NAMESPACE, *args])
    return proc.stdout


def objects(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


@pytest.mark.parametrize("helm", HELMS)
def test_lint_strict(helm: str) -> None:
    proc = run([find_tool(helm), "lint", "--strict", str(CHART)])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict_with_values(helm: str, values: str) -> None:
    run([find_tool(helm), "lint", "--strict", str(CHART), *VALUE_SETS[values]])


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("values", VALUE_SETS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_template_is_valid_kubernetes(helm: str, values: str, kube_version: str) -> None:
    rendered = template(helm, "--include-crds", "--kube-version", kube_version, *VALUE_SETS[values])
    vendored = ["--crd", str(ROOT / "deploy" / "vendor-crds")]  # the PrometheusRule's CRD
    proc = validate_manifests("--kube-version", kube_version, *vendored, "-", stdin=rendered, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ", 0 invalid" in proc.stdout


@pytest.mark.parametrize(
    "bad",
    [
        "operator.healthPort=0",
        "operator.logLevel=verbose",
        "operator.watchNamespaces={Not_A_Namespace}",
        "image.pullPolicy=Sometimes",
        "operator.resources.limits.memory=lots",
        "operator.unknownKey=1",
        "unknownTopLevel=1",
        "runtimeImages.tensorflow=tf:1",
        "pipelinePolicy.volumeTypes={hostpath}",
        "pipelinePolicy.secrets=db",
        "pipelinePolicy.networkPolicy.metricsNamespaces={Monitoring}",
        "pipelinePolicy.resources.limits.memory=lots",
        "operator.networkPolicy.ingress=[]",
    ],
)
def test_values_schema_rejects(bad: str) -> None:
    proc = run([find_tool("helm3"), "template", "rel", str(CHART), "--set", bad], check=False)
    assert proc.returncode != 0, f"--set {bad} rendered without error"
    assert "schema" in proc.stderr.lower() or "values don't meet" in proc.stderr.lower(), proc.stderr


def test_crd_is_shipped_as_is() -> None:
    """The single CRD source (crds/pipelines.yaml, kept by the operator) is rendered unchanged, and only once;
    kopf's peering CRDs come with it."""
    docs = objects(template("helm3", "--include-crds"))
    crds = by_kind(docs, "CustomResourceDefinition")
    pipelines = yaml.safe_load((CHART / "crds" / "pipelines.yaml").read_text())
    assert [c for c in crds if c["metadata"]["name"] == "pipelines.aqueduct.dev"] == [pipelines]
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "pipelines.aqueduct.dev"
    ]
    assert not by_kind(objects(template("helm3")), "CustomResourceDefinition"), "a CRD leaked into templates/"


def test_rbac_rules_come_from_the_single_source() -> None:
    source = yaml.safe_load(RBAC_RULES.read_text())
    assert isinstance(source, list) and source, f"{RBAC_RULES} must be a non-empty YAML list of PolicyRules"

    docs = objects(template("helm3"))
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == source
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    (sa,) = by_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": cluster_role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")


def test_rbac_with_watched_namespaces_is_namespaced() -> None:
    source = yaml.safe_load(RBAC_RULES.read_text())
    docs = objects(template("helm3", *VALUE_SETS["namespaced"]))
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    cluster_rules = [rule for cr in by_kind(docs, "ClusterRole") for rule in cr["rules"]]
    for role in roles:
        # Every rule of the source is granted exactly once: namespaced ones per namespace, the rest cluster-wide.
        granted = role["rules"] + cluster_rules
        assert sorted(map(repr, granted)) == sorted(map(repr, source))
        for rule in role["rules"]:
            assert not {"namespaces", "customresourcedefinitions"} & set(rule["resources"])
    for rule in cluster_rules:
        assert {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"} & set(rule["resources"]), rule
    (deployment,) = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--standalone",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--debug",
    ]


def test_operator_deployment() -> None:
    docs = objects(template("helm3"))
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "aqueduct:0.1.0"  # tag defaults to appVersion
    # Pipelines without spec.image run the operator's own image (aqueduct_operator.handlers.IMAGE_ENV).
    assert {"name": "AQUEDUCT_OPERATOR_IMAGE", "value": "aqueduct:0.1.0"} in container["env"]
    assert container["command"] == ["aqueduct-operator"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The uid the image was built with (Dockerfile: useradd --uid 10001), so kopf finds a passwd entry.
    assert pod["securityContext"]["runAsUser"] == 10001
    assert re.search(r"--uid 10001\b", (ROOT / "Dockerfile").read_text())
    assert pod["serviceAccountName"] == by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # aqueduct-operator's command line (operator/aqueduct_operator/__main__.py): all namespaces, one replica.
    assert container["args"] == [
        "--all-namespaces",
        "--standalone",
        "--liveness=http://0.0.0.0:8081/healthz",
        "--verbose",
    ]
    assert container["ports"] == [{"name": "health", "containerPort": 8081, "protocol": "TCP"}]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}


def runtime_images(*values: str) -> dict[str, str]:
    """The runtime images the chart gives the operator, as the operator reads them from its environment."""
    from aqueduct_operator import images

    (deployment,) = by_kind(objects(template("helm3", *values)), "Deployment")
    env = {item["name"]: item["value"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in item}
    return images.from_environ(env)


def test_runtime_images_default_to_the_names_the_operator_derives() -> None:
    """Pipelines with runtime steps and no spec.image run their runtime's image: by default
    `<image.repository>-<onnx|torch|sklearn>:<tag>` (the sklearn image also serving xgboost and lightgbm), the
    same name the operator derives from its own image when run without the chart."""
    from aqueduct_operator import images

    defaults = runtime_images()
    assert defaults == {"onnx": "aqueduct-onnx:0.1.0", "torch": "aqueduct-torch:0.1.0",
                        "sklearn": "aqueduct-sklearn:0.1.0", "xgboost": "aqueduct-sklearn:0.1.0",
                        "lightgbm": "aqueduct-sklearn:0.1.0"}
    assert defaults == {runtime: images.derived("aqueduct:0.1.0", runtime) for runtime in images.RUNTIMES}
    custom = runtime_images(*VALUE_SETS["custom"])
    assert custom["torch"] == "registry.example.com/aqueduct-torch:1.2.3"
    assert custom == {runtime: images.derived("registry.example.com/aqueduct:1.2.3", runtime)
                      for runtime in images.RUNTIMES}


def test_runtime_images_can_be_set_one_by_one() -> None:
    chosen = runtime_images("--set", "runtimeImages.sklearn=mirror.example.com/ml/sk:7",
                            "--set", "runtimeImages.lightgbm=mirror.example.com/ml/lgbm:2",
                            "--set", "runtimeImages.onnx=mirror.example.com/ml/onnx-cuda:7")
    assert chosen == {"onnx": "mirror.example.com/ml/onnx-cuda:7", "torch": "aqueduct-torch:0.1.0",
                      "sklearn": "mirror.example.com/ml/sk:7",
                      "xgboost": "mirror.example.com/ml/sk:7",  # xgboost follows the sklearn image
                      "lightgbm": "mirror.example.com/ml/lgbm:2"}


def pipeline_policy(*values: str) -> Any:
    """The policy the chart gives the operator, as the operator reads it from its environment."""
    from aqueduct_operator import policy

    (deployment,) = by_kind(objects(template("helm3", *values)), "Deployment")
    env = {item["name"]: item["value"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in item}
    return policy.from_environ(env)


def test_the_default_pipeline_policy_is_the_operators() -> None:
    """Without values the chart passes the same policy the operator applies when run without the chart."""
    from aqueduct_operator.policy import DEFAULT_RESOURCES, DEFAULT_VOLUME_TYPES, Policy

    assert pipeline_policy() == Policy()
    values = yaml.safe_load((CHART / "values.yaml").read_text())["pipelinePolicy"]
    assert values["volumeTypes"] == list(DEFAULT_VOLUME_TYPES) and values["resources"] == DEFAULT_RESOURCES


def test_the_pipeline_policy_reaches_the_operator() -> None:
    from aqueduct_operator.policy import NetworkAccess

    got = pipeline_policy(*VALUE_SETS["locked-down"], "--set", "pipelinePolicy.serviceAccounts={reader}",
                          "--set", "pipelinePolicy.serviceAccountTokens=true",
                          "--set", "pipelinePolicy.resources.limits.memory=4Gi")
    assert got.volume_types == {"configMap", "emptyDir"} and got.secrets == {"model-credentials"}
    assert got.service_accounts == {"reader"} and got.service_account_tokens is True
    assert got.resources == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    assert got.network_policy == NetworkAccess(True, (), ("monitoring",))


def test_the_operators_network_policy() -> None:
    assert not by_kind(objects(template("helm3")), "NetworkPolicy")
    docs = objects(template("helm3", "--set", "operator.networkPolicy.enabled=true"))
    (netpol,) = by_kind(docs, "NetworkPolicy")
    (deployment,) = by_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert netpol["spec"]["policyTypes"] == ["Ingress"] and netpol["spec"]["ingress"] == []
    (netpol,) = by_kind(objects(template("helm3", *VALUE_SETS["locked-down"])), "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert netpol["spec"]["egress"] == [{"ports": [{"port": 6443}], "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}]


def test_operator_args_are_accepted_by_the_operator() -> None:
    """The chart's args parse with the operator's own argument parser (no drift between the two)."""
    from aqueduct_operator.__main__ import parse_args

    for values in VALUE_SETS.values():
        (deployment,) = by_kind(objects(template("helm3", *values)), "Deployment")
        parse_args(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_has_recommended_labels(values: str) -> None:
    for doc in objects(template("helm3", *VALUE_SETS[values])):
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by", "part-of", "component"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], key)
        assert len(doc["metadata"]["name"]) <= 63


def test_long_release_name_is_truncated() -> None:
    name = "r" * 70
    proc = run([find_tool("helm3"), "template", name[:53], str(CHART)])
    for doc in objects(proc.stdout):
        assert len(doc["metadata"]["name"]) <= 63


def _leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values and prefix.count(".") < 2:
        return [p for key, value in values.items() for p in _leaf_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_documented() -> None:
    """Each key in values.yaml (down to two levels) has a "# --" comment, as the values table in README.md."""
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    documented: set[str] = set()
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not lines[j].strip().startswith("# --"):
            j -= 1
        if j >= 0 and lines[j].strip().startswith("# --"):
            documented.add(".".join(k for _, k in stack))
    values = yaml.safe_load(text)
    missing = [p for p in _leaf_paths(values) if p not in documented]
    assert not missing, f"values.yaml keys without a '# --' comment: {missing}"
    readme = (ROOT / "README.md").read_text()
    undocumented_in_readme = [p for p in _leaf_paths(values) if f"`{p}`" not in readme]
    assert not undocumented_in_readme, f"README.md values table misses {undocumented_in_readme}"


def test_example_pipelines_match_the_crd() -> None:
    """examples/*.yaml (the Pipelines users kubectl apply) are valid against the chart's CRD, strictly."""
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert ROOT / "examples" / "pipeline.yaml" in examples, "examples/pipeline.yaml (deploy/kind/up.sh applies it)"
    proc = validate_manifests("--crd", str(CHART / "crds"), *map(str, examples), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (example,) = [
        doc for doc in objects((ROOT / "examples" / "pipeline.yaml").read_text()) if doc["kind"] == "Pipeline"
    ]
    assert example["spec"]["image"] == "aqueduct:dev", "deploy/kind/up.sh builds and loads the image as aqueduct:dev"


@pytest.mark.parametrize("values", VALUE_SETS)
def test_notes_tell_what_to_do_next(values: str, tmp_path: Any) -> None:
    """NOTES.txt renders (helm 4 renders it offline with --dry-run=client; helm 3 wants a cluster)."""
    env = {"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = run(
        [find_tool("helm4"), "install", "rel", str(CHART), "-n", NAMESPACE, "--dry-run=client", *VALUE_SETS[values]],
        env=env,
    )
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert (
        "rollout status deployment/rel-aqueduct-operator" in notes or "rollout status deployment/aq-operator" in notes
    )
    assert "kubectl apply" in notes and "examples/pipeline.yaml" in notes
    assert "/v2/models/catdetector" in notes
    if values == "namespaced":
        assert "namespaces: team-a, team-b" in notes and "kubectl apply -n team-a" in notes
    else:
        assert "all namespaces" in notes


def test_several_operator_replicas_peer_with_one_active() -> None:
    docs = objects(template("helm3", *VALUE_SETS["ha-monitored"]))
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=rel-aqueduct-operator" in args and "--standalone" not in args
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "rel-aqueduct-operator"
    (role,) = by_kind(docs, "ClusterRole")
    assert any("clusterkopfpeerings" in rule["resources"] and "patch" in rule["verbs"] for rule in role["rules"])
    namespaced = objects(template("helm3", "--set", "operator.replicas=2", "--set", "operator.watchNamespaces={a,b}"))
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == ["a", "b"]
    assert not by_kind(objects(template("helm3")), "ClusterKopfPeering")  # one replica: standalone


def test_prometheus_rule_ships_the_rule_file() -> None:
    docs = objects(template("helm3", *VALUE_SETS["ha-monitored"]))
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert not by_kind(objects(template("helm3")), "PrometheusRule")  # opt-in
