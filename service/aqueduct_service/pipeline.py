"""Build the ``Flow`` a configuration describes."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from aqueduct import BaseTaskHandler, Flow, FlowStep
from aqueduct.cpus import available_cpus

from .settings import ConfigError, Settings, StepSettings


def import_object(reference: str, where: str) -> Any:
    """Import ``"package.module:Name"``; ``where`` names the config field in the error."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None


def make_handler(handler_class: type[BaseTaskHandler], step: StepSettings, index: int) -> BaseTaskHandler:
    """Call ``handler_class(**step.options)``, after checking that its constructor takes those options.

    Raises:
        ConfigError: naming the step and the option its constructor does not accept (or the one it
            requires and did not get), or carrying what the constructor raised.
    """
    where = f"steps[{index}].options"
    try:
        signature = inspect.signature(handler_class)
    except (TypeError, ValueError):  # no introspectable signature: let the call itself decide
        signature = None
    if signature is not None:
        params = signature.parameters.values()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named = {p.name for p in params if p.kind in keyword_kinds}
        for option in step.options:
            if not takes_any and option not in named:
                accepted = ", ".join(sorted(named)) or "no options"
                raise ConfigError(
                    f"{where}.{option}: step {step.name!r}: {step.handler} does not accept option {option!r} "
                    f"(its constructor takes: {accepted})"
                )
        try:
            signature.bind(**step.options)
        except TypeError as e:
            raise ConfigError(f"{where}: step {step.name!r}: {step.handler}: {e}") from None
    try:
        return handler_class(**step.options)
    except Exception as e:
        raise ConfigError(f"steps[{index}].handler: {step.handler}() raised {type(e).__name__}: {e}") from e


def build_flow(settings: Settings) -> Flow:
    """Import every step's handler (and handle condition) and build the flow; nothing starts yet.

    Raises:
        ConfigError: a handler or condition cannot be imported, is not a ``BaseTaskHandler`` subclass
            or a callable, its constructor does not take the step's options, or it raised.
    """
    steps = []
    for index, step in enumerate(settings.steps):
        where = f"steps[{index}].handler"
        handler_class = import_object(step.handler, where)
        if not (isinstance(handler_class, type) and issubclass(handler_class, BaseTaskHandler)):
            raise ConfigError(f"{where}: {step.handler!r} is not a BaseTaskHandler subclass")
        handler = make_handler(handler_class, step, index)
        extra: dict[str, Any] = {}
        if step.handle_condition is not None:
            condition = import_object(step.handle_condition, f"steps[{index}].handle_condition")
            if not callable(condition):
                raise ConfigError(f"steps[{index}].handle_condition: {step.handle_condition!r} is not callable")
            extra["handle_condition"] = condition
        steps.append(
            FlowStep(
                handler,
                nprocs=step.nprocs,
                batch_size=step.batch_size,
                batch_timeout=step.batch_timeout,
                latency_target=step.latency_target,
                gpu_per_worker=step.gpus == "per_worker",
                name=step.name,
                **extra,
            )
        )
    front_ends = settings.server.front_ends
    return Flow(
        *steps,
        queue_size=settings.queue_size,
        queue_priorities=settings.queue_priorities,
        # front-end processes take a CPU each; the workers' math libraries share the rest
        worker_cpus=max(1.0, available_cpus() - front_ends) if front_ends > 1 else None,
        # one process: it reads request bodies into the flow's arena (front ends have arenas of their own)
        arena_bytes=settings.server.arena_bytes if front_ends == 1 else 0,
    )
