"""The console script's arguments (kopf run itself is exercised by the kmock tests)."""

from __future__ import annotations

import pytest
from aqueduct_operator.__main__ import DEFAULT_LIVENESS, parse_args


def test_namespaces_are_repeatable() -> None:
    args = parse_args(["--namespace", "a", "-n", "b"])
    assert args.namespaces == ["a", "b"] and not args.all_namespaces and args.liveness == DEFAULT_LIVENESS


def test_all_namespaces_excludes_namespace() -> None:
    assert parse_args(["-A", "--standalone"]).all_namespaces
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "x"])
    with pytest.raises(SystemExit):
        parse_args([])


def test_never_imports_the_engine_or_the_service() -> None:
    import subprocess
    import sys

    code = ("import sys; import aqueduct_operator.handlers, aqueduct_operator.__main__; "
            "bad = [m for m in sys.modules if m == 'aqueduct' or m.startswith(('aqueduct.', 'aqueduct_service'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "operator"}, cwd=_root())


def _root() -> str:
    from tests.operator.crd import ROOT

    return str(ROOT)
