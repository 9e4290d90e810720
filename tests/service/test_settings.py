"""Config file loading, environment overrides and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from aqueduct_service.settings import (
    ConfigError,
    ServerSettings,
    Settings,
    StepSettings,
    config_schema,
    load_settings,
    parse_settings,
)

REPO = Path(__file__).resolve().parents[2]


def minimal(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "name": "cats",
        "steps": [{"name": "pre-process", "handler": "a.b:C"}, {"name": "detect", "handler": "a.b:D", "batch_size": 4}],
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize("path", sorted(REPO.glob("examples/*/pipeline.yaml")), ids=lambda p: p.parent.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    settings = load_settings(path, environ={})
    assert settings.steps


def test_defaults_fill_in() -> None:
    settings = parse_settings(minimal(), {})
    assert settings.steps[1] == StepSettings(name="detect", handler="a.b:D", batch_size=4)
    assert settings.server == ServerSettings()
    assert settings.timeout == 5.0


def test_dataclass_defaults_equal_schema_defaults() -> None:
    schema = config_schema()
    pairs = [
        (Settings, schema["properties"]),
        (StepSettings, schema["$defs"]["step"]["properties"]),
        (ServerSettings, schema["properties"]["server"]["properties"]),
    ]
    for cls, properties in pairs:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and "default" in properties[f.name]:
                default = properties[f.name]["default"]
                assert f.default == (tuple(default) if isinstance(default, list) else default), f.name


def test_env_overrides_single_values() -> None:
    env = {
        "AQUEDUCT_STEPS__DETECT__BATCH_SIZE": "32",
        "AQUEDUCT_STEPS__PRE_PROCESS__NPROCS": "3",
        "AQUEDUCT_STEPS__1__BATCH_TIMEOUT": "0.01",
        "AQUEDUCT_SERVER__PORT": "9000",
        "AQUEDUCT_QUEUE_SIZE": "null",
        "AQUEDUCT_TIMEOUT": "2.5",
        "OTHER": "ignored",
    }
    settings = parse_settings(minimal(queue_size=10), env)
    assert settings.steps[1].batch_size == 32
    assert settings.steps[1].batch_timeout == 0.01
    assert settings.steps[0].nprocs == 3
    assert settings.server.port == 9000
    assert settings.queue_size is None
    assert settings.timeout == 2.5


def test_error_names_the_field() -> None:
    doc = minimal()
    doc["steps"][0]["batch_size"] = -1
    with pytest.raises(ConfigError, match=r"steps\[0\]\.batch_size: -1 is less than the minimum of 1"):
        parse_settings(doc, {})


def test_error_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match=r"steps\[1\]\.batch_size: .*\(from AQUEDUCT_STEPS__DETECT__BATCH_SIZE\)"):
        parse_settings(minimal(), {"AQUEDUCT_STEPS__DETECT__BATCH_SIZE": "many"})


@pytest.mark.parametrize(
    ("doc", "env", "message"),
    [
        (minimal(), {"AQUEDUCT_STEPS__NOPE__BATCH_SIZE": "1"}, "no step named 'nope'"),
        (minimal(), {"AQUEDUCT_STEPS__7__NPROCS": "1"}, "index 7 is out of range"),
        (minimal(), {"AQUEDUCT_BOGUS": "1"}, "Additional properties are not allowed"),
        (minimal(steps=[]), {}, r"steps: \[\] should be non-empty"),
        (minimal(steps=[{"name": "a", "handler": "no colon"}]), {}, r"steps\[0\]\.handler"),
        (minimal(steps=[{"name": "a", "handler": "m:C"}, {"name": "a", "handler": "m:C"}]), {}, "used by an earlier"),
        (minimal(name="Bad Name"), {}, "name: 'Bad Name' does not match"),
        ({"version": 1, "name": "x"}, {}, "'steps' is a required property"),
        ([1, 2], {}, "expected a mapping"),
    ],
)
def test_invalid(doc: Any, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(doc, env)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})


def test_load_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(minimal(inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 3]}])))
    settings = load_settings(path, environ={"AQUEDUCT_NAME": "dogs"})
    assert settings.name == "dogs"
    assert settings.inputs[0].shape == (-1, 3)
