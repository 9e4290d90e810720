"""KubeShim: kmock 0.8's KubernetesEmulator plus what real clients (kopf, kubernetes, kubectl) need.

The seven gaps of /work/shared/k8s/RECIPES.md section 5, and one more (8), fixed here:

1. create fills ``metadata.uid``, ``resourceVersion``, ``creationTimestamp``, ``generation`` and the
   namespace from the URL, and turns ``generateName`` into a name;
2. every write bumps ``resourceVersion``; ``generation`` goes up when ``spec`` changes;
3. with a declared ``status`` subresource, creates and object patches drop ``status``, and
   ``/status`` patches change nothing but ``status``;
4. create answers 201 (the kubernetes client returns None on kmock's 200);
5. core discovery says ``groupVersion: v1`` (kmock says ``/v1``);
6. lists carry ``kind: XList`` and ``apiVersion``;
7. PUT and server-side apply get a clear 501 (kmock answers PUT with 404 and ignores apply).
8. A JSON patch whose ``test`` fails gets 422, as from the API server (kmock answers 500, which kopf
   retries unchanged for a long while instead of re-reading: a stale finalizer patch held deletions).

Extras: writes to a kind nobody declared get 404 (kmock would store them); deleting an object
deletes its dependents (ownerReferences by uid; a foreground-free, immediate stand-in for the garbage
collector), and ``GET /api/v1/namespaces`` lists the namespaces in use (kmock 0.8 cannot parse that
path). Still missing: label/field selectors, validation, RBAC, watch resourceVersions (watches replay
everything), strategic merge (applied as JSON merge).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts

# What kopf needs to be discoverable before it starts any watcher (RECIPES section 5).
KOPF_BACKBONE: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "singular": "namespace", "namespaced": False,
                      "verbs": ["get", "list", "watch"]},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition", "singular": "customresourcedefinition", "namespaced": False,
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
}
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]
# Built-ins the aqueduct operator and its tests touch.
BUILTINS: dict[str, dict[str, Any]] = {
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap", "namespaced": True, "verbs": VERBS},
    "v1/services": {"kind": "Service", "singular": "service", "namespaced": True, "verbs": VERBS,
                    "subresources": ["status"]},
    "v1/events": {"kind": "Event", "singular": "event", "namespaced": True, "verbs": VERBS},
    "v1/pods": {"kind": "Pod", "singular": "pod", "namespaced": True, "verbs": VERBS, "subresources": ["status"]},
    "v1/secrets": {"kind": "Secret", "singular": "secret", "namespaced": True, "verbs": VERBS},
    "v1/serviceaccounts": {"kind": "ServiceAccount", "singular": "serviceaccount", "namespaced": True,
                           "verbs": VERBS},
    "apps/v1/deployments": {"kind": "Deployment", "singular": "deployment", "namespaced": True, "verbs": VERBS,
                            "subresources": ["status", "scale"]},
    "events.k8s.io/v1/events": {"kind": "Event", "singular": "event", "namespaced": True, "verbs": VERBS},
    "autoscaling/v2/horizontalpodautoscalers": {"kind": "HorizontalPodAutoscaler",
                                                "singular": "horizontalpodautoscaler", "namespaced": True,
                                                "verbs": VERBS, "subresources": ["status"]},
    "policy/v1/poddisruptionbudgets": {"kind": "PodDisruptionBudget", "singular": "poddisruptionbudget",
                                       "namespaced": True, "verbs": VERBS, "subresources": ["status"]},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "singular": "networkpolicy",
                                             "namespaced": True, "verbs": VERBS},
}


def crd_resources(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Resource declarations for a CustomResourceDefinition document (every served version)."""
    spec, names = crd["spec"], crd["spec"]["names"]
    return {
        f"{spec['group']}/{version['name']}/{names['plural']}": {
            "kind": names["kind"],
            "singular": names.get("singular", names["kind"].lower()),
            "namespaced": spec["scope"] == "Namespaced",
            "verbs": VERBS,
            "shortnames": names.get("shortNames", []),
            "categories": names.get("categories", []),
            "subresources": sorted(version.get("subresources") or {}),
        }
        for version in spec["versions"] if version.get("served", True)
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "code": status, "reason": reason, "message": message,
    }, status=status)


@attrs.define(kw_only=True)
class KubeShim(kmock.KubernetesEmulator):
    """A Kubernetes API stand-in good enough for kopf, the kubernetes client and kubectl."""

    garbage_collect: bool = True
    _counter: Iterable[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _gone_uids: set[str] = attrs.field(factory=set, init=False)

    @property
    def requests(self) -> list[kmock.Request]:
        """A snapshot of every request served so far (safe to read from another thread)."""
        return list(self._requests)

    def declare(self, resources: dict[str, dict[str, Any]]) -> None:
        for key, info in resources.items():
            self.resources[key] = dict(info)

    def _next_rv(self) -> str:
        return str(next(self._counter))  # type: ignore[call-overload]

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        return next((info for res, info in self.resources._resources.items() if res == resource), None)

    def _has_status(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":  # kmock 0.8 cannot parse this path
            await raw_request.read()
            if raw_request.method != "GET" or raw_request.query.get("watch") in ("true", "1"):
                return _error(501, "NotImplemented", "only listing namespaces is emulated")
            return aiohttp.web.json_response(self._namespace_list())
        return await super().__call__(raw_request)

    def _namespace_list(self) -> dict[str, Any]:
        names = {"default"} | {ns for _, ns, _ in self.objects if ns}
        return {
            "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
            "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "uid": n},
                       "status": {"phase": "Active"}} for n in sorted(names)],
        }

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        method = str(request.method.value).upper()
        content_type = str(request.headers.get("Content-Type", ""))
        if method == "PUT":  # gap 7
            return _error(501, "NotImplemented", "PUT (replace) is not emulated: use PATCH")
        if method == "PATCH" and "apply-patch" in content_type:  # gap 7
            return _error(501, "NotImplemented", "server-side apply is not emulated: use a JSON (merge) patch")
        if request.resource is None or request.resource.plural is None or request.action is None:
            return await self._discovery(request)

        action = request.action
        if action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE) and self._info(
            request.resource
        ) is None:  # kmock would store it; a real server does not serve kinds it has no (CRD) definition of
            return _error(404, "NotFound", f"the server could not find the requested resource ({request.url.path})")
        if action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            async with self._write_lock:
                original = request
                if action == kmock.action.CREATE:
                    request = self._prepare_create(request)
                elif action == kmock.action.UPDATE:
                    try:
                        request = self._prepare_update(request)
                    except jsonpatch.JsonPatchTestFailed as e:  # as the API server: 422, kopf re-reads
                        return _error(422, "Invalid", f"the JSON patch's test failed: {e}")
                else:
                    self._prepare_delete(request)
                # kmock matches reactions by the request's identity in its log: swap the prepared request
                # in while it is served, then put the original (what the client sent) back.
                index = next(i for i, r in enumerate(self._requests) if r is original)
                self._requests[index] = request
                try:
                    response = await super()._handle(request)
                finally:
                    self._requests[index] = original
                if action == kmock.action.CREATE and response.status == 200:
                    response.set_status(201)  # gap 4
                if action != kmock.action.CREATE and response.status == 200 and self.garbage_collect:
                    await self._collect(request)
                if action == kmock.action.CREATE and response.status == 201 and self.garbage_collect:
                    await self._collect_orphan(request)
                return response

        response = await super()._handle(request)
        if action == kmock.action.LIST and response.status == 200:
            self._fix_list(request, response)  # gap 6
        return response

    async def _discovery(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is None or str(request.method.value).upper() != "GET":
            return await super()._handle(request)
        # Serve group/version discovery directly: kmock's routes miss trailing slashes ("/api/v1/").
        try:
            if resource.version is not None:
                body = await self._serve_version(request)
                if resource.group == "":
                    body["groupVersion"] = "v1"  # gap 5
            elif resource.group:
                body = await self._serve_group(request)
            else:
                return await super()._handle(request)
        except kmock.KubernetesError as e:
            return _error(e.status, e.reason or "NotFound", e.message or "")
        return aiohttp.web.json_response(body)

    def _fix_list(self, request: kmock.Request, response: aiohttp.web.StreamResponse) -> None:
        if not isinstance(response, aiohttp.web.Response) or request.resource is None:
            return
        body = json.loads(response.body)
        info = self._info(request.resource)
        kind = info.kind if info is not None and info.kind else str(request.resource.plural).capitalize()
        group, version = request.resource.group, request.resource.version
        body["kind"] = f"{kind}List"
        body["apiVersion"] = f"{group}/{version}" if group else str(version)
        body.setdefault("metadata", {})["resourceVersion"] = str(self._current_rv())
        response.body = json.dumps(body).encode()

    def _current_rv(self) -> int:
        rvs = [int(obj.last.get("metadata", {}).get("resourceVersion") or 0) for _, obj in self.objects.items()
               if not obj.empty]
        return max(rvs, default=0)

    def _prepare_create(self, request: kmock.Request) -> kmock.Request:
        data = copy.deepcopy(request.data) if isinstance(request.data, dict) else {}
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):  # gap 1
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), creationTimestamp=_now(), generation=1)
        if request.resource is not None and self._has_status(request.resource):  # gap 3
            data.pop("status", None)
        return attrs.evolve(request, data=data)

    def _live(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _prepare_update(self, request: kmock.Request) -> kmock.Request:
        live = self._live(request)
        if live is None:  # kmock answers 404
            return request
        patch = request.data if isinstance(request.data, (dict, list)) else {}
        new = copy.deepcopy(dict(dicts.patch_dict(copy.deepcopy(live), patch)))
        if request.resource is not None and self._has_status(request.resource):  # gap 3
            if request.subresource == "status":
                new = {**live, "status": new.get("status")}
                if new["status"] is None:
                    del new["status"]
            elif "status" in live:
                new["status"] = live["status"]
            else:
                new.pop("status", None)
        meta, old_meta = new.setdefault("metadata", {}), live.get("metadata", {})
        for key in ("uid", "name", "namespace", "creationTimestamp"):
            if key in old_meta:
                meta[key] = old_meta[key]
        meta["resourceVersion"] = self._next_rv()  # gap 2
        if new.get("spec") != live.get("spec"):
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        return attrs.evolve(request, data=[{"op": "replace", "path": "", "value": new}])

    def _prepare_delete(self, request: kmock.Request) -> None:
        live = self._live(request)
        if live is not None and live.get("metadata", {}).get("finalizers"):
            key = (request.resource, request.namespace, request.name)
            self.objects[key].patch({"metadata": {"resourceVersion": self._next_rv()}})

    async def _collect(self, request: kmock.Request) -> None:
        """Delete (recursively) every object whose ownerReferences name a deleted object's uid."""
        deleted = {
            obj.last.get("metadata", {}).get("uid")
            for (res, ns, name), obj in self.objects.items()
            if res == request.resource and ns == request.namespace and name == request.name and obj.deleted
        }
        while deleted:
            dependents = [
                (key, obj) for key, obj in self.objects.items()
                if not obj.deleted and any(
                    ref.get("uid") in deleted for ref in obj.last.get("metadata", {}).get("ownerReferences") or []
                )
            ]
            self._gone_uids |= deleted
            deleted = set()
            for (resource, _, _), obj in dependents:
                raw = obj.raw
                obj.delete()
                deleted.add(raw.get("metadata", {}).get("uid"))
                await self._buses[resource].put({"type": "DELETED", "object": raw})


    async def _collect_orphan(self, request: kmock.Request) -> None:
        """A dependent created after its owner was deleted goes too (as the garbage collector does)."""
        data = request.data if isinstance(request.data, dict) else {}
        owners = {ref.get("uid") for ref in data.get("metadata", {}).get("ownerReferences") or []}
        if owners and owners <= self._gone_uids:
            meta = data["metadata"]
            key = (request.resource, meta.get("namespace"), meta.get("name"))
            if key in self.objects and not self.objects[key].deleted:
                raw = self.objects[key].raw
                self.objects[key].delete()
                self._gone_uids.add(meta.get("uid"))
                await self._buses[request.resource].put({"type": "DELETED", "object": raw})


def write_kubeconfig(path: str, server: str, namespace: str = "default") -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": namespace}}],
        "current-context": "kmock",
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


@contextlib.asynccontextmanager
async def serving(
    resources: dict[str, dict[str, Any]], host: str = "127.0.0.1", port: int | None = None
) -> AsyncIterator[tuple[KubeShim, str]]:
    """Run a KubeShim with ``resources`` declared on ``host:port`` (random port by default)."""
    shim = KubeShim()
    shim.declare({**KOPF_BACKBONE, **resources})
    async with shim, kmock.Server(shim, host=host, port=port) as server:
        yield shim, f"http://{server.host}:{server.port}"
