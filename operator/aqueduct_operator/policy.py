"""What a Pipeline may ask of the cluster: the operator's policy (chart value ``pipelinePolicy``).

Whoever may create a Pipeline gets pods running code of their choice (``spec.image``, handlers). Without a
policy they would also get whatever the pod spec can reach: a hostPath of the node, any service account of
the namespace, the token of one, any Secret. The operator refuses those unless the chart allows them:

- ``volumeTypes``: the kinds of ``spec.volumes`` allowed (default: configMap, secret, emptyDir,
  persistentVolumeClaim, downwardAPI, projected). hostPath, csi, ephemeral, nfs, ... are refused.
- ``serviceAccounts``: names ``spec.serviceAccountName`` may take besides ``default`` (``*``: any).
- ``serviceAccountTokens``: whether a projected volume may hold a service-account token (default: no).
- ``secrets``: names of the Secrets a Pipeline may read: secret volumes, projected secret sources,
  ``env[].valueFrom.secretKeyRef``, ``model.s3.secretName`` (``*``: any; default: none, since the pod's code
  is the Pipeline author's and whatever it can read, its author can).
- ``resources``: requests and limits the serving container gets where the Pipeline sets none.
- ``networkPolicy``: the defaults of ``spec.networkPolicy``.

The chart passes the value as JSON in ``AQUEDUCT_PIPELINE_POLICY``; without it the defaults above hold.
A violation is an :class:`~aqueduct_operator.spec.InvalidSpec` naming the field and the chart value.
Pure functions: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils.quantity import parse_quantity

POLICY_ENV = "AQUEDUCT_PIPELINE_POLICY"
VALUE = "pipelinePolicy"
ANY = "*"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_VOLUME_TYPES = ("configMap", "secret", "emptyDir", "persistentVolumeClaim", "downwardAPI", "projected")
# The serving container's requests and limits when the Pipeline sets none: never a BestEffort pod, no CPU
# limit (throttling adds latency; the request reserves the CPU), a memory limit that holds the arenas in
# /dev/shm, a request body being decoded and a small model.
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"memory": "2Gi"},
}
POLICY_KEYS = frozenset(
    {"volumeTypes", "serviceAccounts", "serviceAccountTokens", "secrets", "resources", "networkPolicy"}
)
NETWORK_KEYS = frozenset({"enabled", "ingressNamespaces", "metricsNamespaces"})


class PolicyError(ValueError):
    """The operator's policy (``AQUEDUCT_PIPELINE_POLICY``) is malformed; ``key`` names the bad value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{VALUE}.{key}: {message}")
        self.key = key


class Violation(ValueError):
    """A Pipeline asks for what the policy refuses: ``field`` is its path under ``spec``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class NetworkAccess:
    """Who may reach a Pipeline's pods: its own namespace, plus ``ingress_namespaces`` (inference) and
    ``metrics_namespaces`` (``/metrics``; the same port, see :func:`aqueduct_operator.render.network_policy`)."""

    enabled: bool = False
    ingress_namespaces: tuple[str, ...] = ()
    metrics_namespaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    """The operator's policy; the defaults are the chart's."""

    volume_types: frozenset[str] = frozenset(DEFAULT_VOLUME_TYPES)
    service_accounts: frozenset[str] = frozenset()
    service_account_tokens: bool = False
    secrets: frozenset[str] = frozenset()
    resources: Mapping[str, Mapping[str, str | int]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    network_policy: NetworkAccess = NetworkAccess()

    def allows_secret(self, name: str) -> bool:
        return ANY in self.secrets or name in self.secrets

    def allows_service_account(self, name: str) -> bool:
        return name == DEFAULT_SERVICE_ACCOUNT or ANY in self.service_accounts or name in self.service_accounts


def _names(raw: Any, key: str) -> frozenset[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
        raise PolicyError(key, f"must be a list of names, got {raw!r}")
    return frozenset(raw)


def _bool(raw: Any, key: str) -> bool:
    if not isinstance(raw, bool):
        raise PolicyError(key, f"must be true or false, got {raw!r}")
    return raw


def quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity's value (``"500m"`` -> 0.5). Raises ValueError for a malformed one."""
    result: Decimal = parse_quantity(value)  # type: ignore[no-untyped-call]
    return result


def _quantity(raw: Any, key: str) -> Decimal:
    try:
        return quantity(raw)
    except (ValueError, TypeError, InvalidOperation):
        raise PolicyError(key, f"must be a Kubernetes quantity, got {raw!r}") from None


def _resources(raw: Any) -> dict[str, dict[str, str | int]]:
    if not isinstance(raw, Mapping) or set(raw) - {"requests", "limits"}:
        raise PolicyError("resources", f"must be an object with requests and/or limits, got {raw!r}")
    result: dict[str, dict[str, str | int]] = {}
    for kind, values in raw.items():
        if not isinstance(values, Mapping):
            raise PolicyError(f"resources.{kind}", f"must be an object, got {values!r}")
        for name, value in values.items():
            _quantity(value, f"resources.{kind}.{name}")
        result[kind] = dict(values)
    return result


def _network(raw: Any) -> NetworkAccess:
    if not isinstance(raw, Mapping) or set(raw) - NETWORK_KEYS:
        raise PolicyError("networkPolicy", f"must be an object with keys {', '.join(sorted(NETWORK_KEYS))}")
    return NetworkAccess(
        enabled=_bool(raw.get("enabled", False), "networkPolicy.enabled"),
        ingress_namespaces=tuple(sorted(_names(raw.get("ingressNamespaces", []), "networkPolicy.ingressNamespaces"))),
        metrics_namespaces=tuple(sorted(_names(raw.get("metricsNamespaces", []), "networkPolicy.metricsNamespaces"))),
    )


def from_json(text: str) -> Policy:
    """The policy the chart wrote (``pipelinePolicy`` as JSON); keys left out keep their defaults.

    Raises:
        PolicyError: naming the bad key.
    """
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise PolicyError("", f"not JSON: {e}") from None
    if not isinstance(raw, Mapping):
        raise PolicyError("", f"must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - POLICY_KEYS)
    if unknown:
        raise PolicyError(unknown[0], f"unknown key (known: {', '.join(sorted(POLICY_KEYS))})")
    default = Policy()
    return Policy(
        volume_types=_names(raw["volumeTypes"], "volumeTypes") if "volumeTypes" in raw else default.volume_types,
        service_accounts=_names(raw.get("serviceAccounts", []), "serviceAccounts"),
        service_account_tokens=_bool(raw.get("serviceAccountTokens", False), "serviceAccountTokens"),
        secrets=_names(raw.get("secrets", []), "secrets"),
        resources=_resources(raw["resources"]) if "resources" in raw else default.resources,
        network_policy=_network(raw.get("networkPolicy", {})),
    )


def from_environ(environ: Mapping[str, str]) -> Policy:
    """The policy in ``AQUEDUCT_PIPELINE_POLICY``, or the default one when it is unset or empty."""
    text = environ.get(POLICY_ENV, "").strip()
    return from_json(text) if text else Policy()


def _listed(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def _secret(policy: Policy, name: Any, where: str) -> None:
    if isinstance(name, str) and not policy.allows_secret(name):
        raise Violation(where, f"Secret {name!r} is not allowed by this operator's policy "
                               f"({VALUE}.secrets: {_listed(policy.secrets)})")


def _volume(policy: Policy, volume: Mapping[str, Any], where: str) -> None:
    kinds = [key for key in volume if key != "name"]
    if len(kinds) != 1:
        raise Violation(where, f"a volume needs exactly one source, got {', '.join(sorted(kinds)) or 'none'}")
    kind = kinds[0]
    if kind not in policy.volume_types:
        raise Violation(f"{where}.{kind}", f"{kind} volumes are not allowed by this operator's policy "
                                           f"({VALUE}.volumeTypes: {_listed(policy.volume_types)})")
    source = volume[kind] if isinstance(volume[kind], Mapping) else {}
    if kind == "secret":
        _secret(policy, source.get("secretName"), f"{where}.secret.secretName")
    if kind != "projected":
        return
    for j, item in enumerate(source.get("sources") or []):
        item = item if isinstance(item, Mapping) else {}
        at = f"{where}.projected.sources[{j}]"
        if "serviceAccountToken" in item and not policy.service_account_tokens:
            raise Violation(f"{at}.serviceAccountToken", "service-account tokens are not allowed by this operator's "
                                                         f"policy ({VALUE}.serviceAccountTokens: false)")
        if isinstance(item.get("secret"), Mapping):
            _secret(policy, item["secret"].get("name"), f"{at}.secret.name")


def check(
    policy: Policy,
    *,
    volumes: Iterable[Mapping[str, Any]] = (),
    env: Iterable[Mapping[str, Any]] = (),
    service_account: str | None = None,
    s3_secret: str | None = None,
) -> None:
    """Refuse what ``policy`` does not allow, in the order the fields appear in a Pipeline.

    Raises:
        Violation: naming the first offending field (relative to ``spec``).
    """
    if service_account is not None and not policy.allows_service_account(service_account):
        raise Violation("serviceAccountName", f"service account {service_account!r} is not allowed by this "
                                              f"operator's policy ({VALUE}.serviceAccounts: "
                                              f"{_listed(policy.service_accounts)}; 'default' always is)")
    for i, item in enumerate(env):
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if isinstance(ref, Mapping):
            _secret(policy, ref.get("name"), f"env[{i}].valueFrom.secretKeyRef.name")
    if s3_secret is not None:
        _secret(policy, s3_secret, "model.s3.secretName")
    for i, volume in enumerate(volumes):
        _volume(policy, volume, f"volumes[{i}]")


def with_default_resources(
    resources: Mapping[str, Mapping[str, str | int]], defaults: Mapping[str, Mapping[str, str | int]]
) -> dict[str, dict[str, str | int]]:
    """``resources`` with what it leaves out taken from ``defaults``, resource by resource, never inconsistent.

    A default request is added only for a resource without a limit (Kubernetes requests the limit then, so a
    Guaranteed pod stays Guaranteed); a default limit below the request becomes the request. GPUs and other
    resources ``defaults`` does not name are never added.
    """
    result = {kind: dict(values) for kind, values in resources.items()}
    requests, limits = result.setdefault("requests", {}), result.setdefault("limits", {})
    for name, default in (defaults.get("requests") or {}).items():
        if name not in requests and name not in limits:
            requests[name] = default
    for name, default in (defaults.get("limits") or {}).items():
        if name not in limits:
            request = requests.get(name)
            below = request is not None and quantity(default) < quantity(request)
            limits[name] = request if below and request is not None else default
    return {kind: values for kind, values in result.items() if values}
