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


def test_peering_for_several_replicas() -> None:
    args = parse_args(["-A", "--peering", "aqueduct"])
    assert args.peering == "aqueduct" and not args.standalone and args.priority is None
    with pytest.raises(SystemExit):
        parse_args(["-A", "--peering", "aqueduct", "--standalone"])


def test_peering_replicas_get_distinct_priorities(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf
    from aqueduct_operator import __main__

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **kwargs: None)
    for _ in range(3):
        __main__.main(["-A", "--peering", "aqueduct", "--liveness", ""])
    __main__.main(["-n", "a", "--standalone", "--liveness", ""])
    priorities = {call["priority"] for call in calls[:3]}
    assert len(priorities) == 3 and all(call["peering_name"] == "aqueduct" for call in calls[:3])
    assert calls[3]["peering_name"] is None and calls[3]["standalone"] is True and calls[3]["priority"] is None


def test_json_log_lines() -> None:
    """The operator's records (kopf's per-object ones too) as JSON lines with the serving pod's fields."""
    import json
    import subprocess
    import sys

    code = (
        "import logging; from aqueduct_operator.logs import configure_logging; "
        "configure_logging('auto', False, False); "
        "ref = {'kind': 'Pipeline', 'namespace': 'ns', 'name': 'iris'}; "
        "logging.getLogger('kopf.objects').info('reconciled', extra={'k8s_ref': ref, 'k8s_skip': True}); "
        "logging.getLogger('aqueduct_operator.handlers').warning('plain')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": "operator"}, cwd=_root())
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # stderr is no terminal: auto is JSON
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("INFO", "kopf.objects", "reconciled"), ("WARNING", "aqueduct_operator.handlers", "plain")
    ]
    assert lines[0]["object"] == {"kind": "Pipeline", "namespace": "ns", "name": "iris"} and "time" in lines[0]
    assert "k8s_skip" not in lines[0] and "object" not in lines[1]
