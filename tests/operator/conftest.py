"""Integration fixtures: a KubeShim (kmock) API server and the real kopf operator in its own thread.

Pitfalls handled as RECIPES.md section 5 prescribes: the kubeconfig location constant is patched
(the client reads $KUBECONFIG at import), kopf runs in its own thread and event loop (its shutdown
cancels every task of its loop), the test talks to the API with the blocking client through
``asyncio.to_thread`` (never blocking the loop that serves kmock), and the kopf thread must still be
alive when the test ends (a crashed operator fails the test).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kopf
import kubernetes
import pytest
from kubernetes import client

from tests.operator import crd
from tests.operator.kmock_shim import BUILTINS, KubeShim, crd_resources, serving, write_kubeconfig

T = TypeVar("T")


@dataclass
class Kube:
    shim: KubeShim
    url: str
    kubeconfig: str
    api: client.ApiClient

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)


@pytest.fixture
async def kube(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Kube]:
    resources = {**BUILTINS, **crd_resources(crd.crd())}
    for vendored in crd.vendored_crds():
        resources.update(crd_resources(vendored))
    async with serving(resources) as (shim, url):
        path = str(tmp_path / "kubeconfig")
        write_kubeconfig(path, url)
        monkeypatch.setenv("KUBECONFIG", path)
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
        configuration = client.Configuration()
        kubernetes.config.load_kube_config(config_file=path, client_configuration=configuration)
        api = client.ApiClient(configuration)
        try:
            yield Kube(shim, url, path, api)
        finally:
            api.close()


class OperatorThread:
    """kopf.operator() in a thread of its own, with its own event loop."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.ready = threading.Event()
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="kopf-operator", daemon=True)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(kopf.operator(ready_flag=self.ready, stop_flag=self.stop_flag, **self.kwargs))
        except BaseException as e:  # surfaced by the fixture
            self.error = e
        finally:
            loop.close()

    async def start(self) -> None:
        # Wait in a worker thread: the test's loop must keep serving kmock meanwhile.
        self.thread.start()
        if not await asyncio.to_thread(self.ready.wait, 30):
            raise TimeoutError(f"kopf did not get ready: {self.error!r}")

    async def stop(self) -> None:
        alive = self.thread.is_alive()
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 30)
        assert not self.thread.is_alive(), "kopf did not stop within 30 s"
        assert alive, f"the operator died during the test: {self.error!r}"


@pytest.fixture
async def operator(kube: Kube) -> AsyncIterator[OperatorThread]:
    from aqueduct_operator import handlers  # noqa: F401  (registers the handlers)

    settings = kopf.OperatorSettings()
    settings.posting.level = logging.INFO
    settings.watching.reconnect_backoff = 0.2
    thread = OperatorThread(clusterwide=True, standalone=True, settings=settings)
    await thread.start()
    try:
        # Let kopf's watchers connect before the test writes anything.
        await wait_for(lambda: _watching(kube.shim), what="kopf watching pipelines and deployments")
        yield thread
    finally:
        await thread.stop()


def _watching(shim: KubeShim) -> bool:
    paths = {r.url.path for r in shim.requests if r.params.get("watch") == "true"}
    return any(p.endswith("/pipelines") for p in paths) and any(p.endswith("/deployments") for p in paths)


async def wait_for(
    predicate: Callable[[], T], *, timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Poll ``predicate`` (sync, run in a thread: it may call the blocking client) until truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await asyncio.to_thread(predicate)
        except (client.ApiException, KeyError, IndexError, TypeError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)

