"""``aqueduct-operator``: ``kopf run`` for the Pipeline handlers, with namespace selection and liveness."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Sequence

import kopf

from aqueduct_operator import logs, policy

DEFAULT_LIVENESS = "http://0.0.0.0:8081/healthz"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aqueduct-operator", description="Reconciles aqueduct.dev Pipelines.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable; globs such as 'team-*' allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--liveness", default=DEFAULT_LIVENESS, metavar="URL",
                        help=f"liveness endpoint to serve (default {DEFAULT_LIVENESS}; '' disables it)")
    ha = parser.add_mutually_exclusive_group()
    ha.add_argument("--standalone", action="store_true",
                    help="do not coordinate with other operator replicas (kopf peering)")
    ha.add_argument("--peering", metavar="NAME",
                    help="run as one of several replicas: only the highest-priority live one reconciles, the others "
                         "wait and take over when it is gone (kopf peering; the (Cluster)KopfPeering NAME must exist)")
    parser.add_argument("--priority", type=int, metavar="N",
                        help="peering priority (default with --peering: random, so that exactly one replica is active)")
    parser.add_argument("--verbose", action="store_true", help="verbose logging")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="auto",
                        help="json: JSON lines; text: plain lines; auto (default): text on a terminal, else JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        policy.from_environ(os.environ)  # read again at each reconcile; a bad one stops the operator here
    except policy.PolicyError as e:
        raise SystemExit(f"aqueduct-operator: {policy.POLICY_ENV}: {e}") from None
    priority = args.priority
    if args.peering and priority is None:
        # kopf pauses every replica that shares the highest priority: distinct ones make exactly one active.
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    logs.configure_logging(args.log_format, verbose=args.verbose, debug=args.debug)
    from aqueduct_operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespaces or (),
        liveness_endpoint=args.liveness or None,
        standalone=args.standalone or None,
        peering_name=args.peering,
        priority=priority,
    )


if __name__ == "__main__":
    main()
