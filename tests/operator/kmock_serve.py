"""Serve the KubeShim (kmock + gap fixes) on 127.0.0.1 until SIGTERM/SIGINT, and write a kubeconfig.

    python -m tests.operator.kmock_serve --port 6443 --kubeconfig /tmp/kmock.kubeconfig

Declares the Pipeline CRD's resource (from deploy/helm/aqueduct/crds/pipelines.yaml), what kopf needs
for discovery (namespaces, customresourcedefinitions) and the built-ins the operator uses
(deployments, services, configmaps, events, ...). For running the operator image against it in CI:
``docker run --network host -v KUBECONFIG:/kubeconfig:ro -e KUBECONFIG=/kubeconfig IMAGE aqueduct-operator -A``.
With kubectl: ``kubectl --kubeconfig PATH get pipelines`` (create/apply need ``--validate=false``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tests.operator import crd
from tests.operator.kmock_shim import BUILTINS, crd_resources, serving, write_kubeconfig


async def serve(port: int, kubeconfig: str, host: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serving({**BUILTINS, **crd_resources(crd.crd())}, host=host, port=port) as (_, url):
        write_kubeconfig(kubeconfig, url)
        print(f"kmock serving on {url}; kubeconfig {kubeconfig}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.operator.kmock_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kubeconfig", required=True, help="where to write the kubeconfig")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.kubeconfig, args.host))
    sys.exit(0)


if __name__ == "__main__":
    main()
