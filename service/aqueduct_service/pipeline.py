"""Build the ``Flow`` a configuration describes, and the pod's tensors its runtime steps' models give."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from aqueduct import BaseTaskHandler, Flow, FlowStep
from aqueduct.cpus import available_cpus

from .runtimes import ModelLoadError, ModelRuntime, runtime_class
from .runtimes.base import normalise_options
from .settings import ConfigError, Settings, StepSettings, TensorSpec

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def import_object(reference: str, where: str) -> Any:
    """Import ``"package.module:Name"``; ``where`` names the config field in the error."""
    module_name, _, attr = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        hint = _import_hint(module_name, e) if isinstance(e, ModuleNotFoundError) else ""
        raise ConfigError(f"{where}: cannot import module {module_name!r}: {type(e).__name__}: {e}{hint}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}") from None


def _import_hint(module_name: str, error: ModuleNotFoundError) -> str:
    """Where a handler's module is looked for, when that module (not one it imports) was not found."""
    missing = error.name or ""
    top = module_name.partition(".")[0]
    if missing == top:
        return (
            f" (handler modules are looked for under --app-dir, by default the directory aqueduct-serve runs in, "
            f"then on PYTHONPATH: run it where {top}/ is, or pass --app-dir)"
        )
    if module_name == missing or module_name.startswith(missing + "."):
        return ""  # the package is there, the module in it is not: the message says so
    return f" (imported by {module_name!r}: install it in this environment, or in the image)"


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
        named = {p.name for p in params if p.kind in _KEYWORD_KINDS}
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


def make_runtime(
    step: StepSettings, index: int, inputs: Sequence[TensorSpec] = (), outputs: Sequence[TensorSpec] = ()
) -> ModelRuntime:
    """The runtime a step names, with its options, after reading its model file's metadata.

    ``inputs`` and ``outputs`` are the tensors the config declares for this step (the pod's inputs
    when it is the first step, its outputs when the last), served by formats that record none.

    Raises:
        ConfigError: naming the step, the runtime and the model file: the runtime is unknown or not
            installed, an option is unknown or has a bad value, or the file cannot be served.
    """
    assert step.runtime is not None and step.model is not None
    where = f"steps[{index}] ({step.name!r})"
    try:
        runtime_cls = runtime_class(step.runtime)
    except ModelLoadError as e:
        raise ConfigError(f"{where}: cannot serve model file {step.model!r}: {e}") from e
    parameters = inspect.signature(runtime_cls).parameters.values()
    accepted = [p.name for p in parameters if p.kind in _KEYWORD_KINDS][1:]  # the first is the model file
    try:
        options = normalise_options(step.options, accepted, step.runtime, f"steps[{index}].options")
    except ModelLoadError as e:
        raise ConfigError(str(e)) from e
    try:
        runtime = runtime_cls(step.model, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"steps[{index}].options: runtime {step.runtime!r}: {e}") from e
    runtime.declare(inputs, outputs)
    try:
        runtime.metadata()
    except ModelLoadError as e:
        raise ConfigError(f"{where}: {e}") from e
    return runtime


def build_flow(settings: Settings) -> Flow:
    """Make every step's handler (importing it, or a runtime that reads its model file's metadata) and
    build the flow; nothing starts yet.

    Raises:
        ConfigError: a handler or condition cannot be imported, is not a ``BaseTaskHandler`` subclass
            or a callable, its constructor does not take the step's options, or it raised; a runtime
            step's model file cannot be served (see ``make_runtime``).
    """
    steps = []
    for index, step in enumerate(settings.steps):
        handler: BaseTaskHandler
        if step.runtime is not None:
            last = index == len(settings.steps) - 1
            handler = make_runtime(step, index, settings.inputs if index == 0 else (), settings.outputs if last else ())
        else:
            assert step.handler is not None
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


def resolve_settings(settings: Settings, flow: Flow) -> Settings:
    """``settings`` with the pod's tensors from its runtime steps' models (read by ``build_flow``).

    The inputs are the first step's model's when that step is a runtime, the outputs the last
    step's; tensors the config declares must agree with them (the same names and datatypes, the same
    shapes, where the config may fix a dimension the model leaves open). ``batch_dim`` left unset
    becomes true when the first step is a runtime whose model is batched and every declared shape
    starts with -1. With ``batch_dim``, every input and output shape must start with -1.

    Raises:
        ConfigError: a declared tensor disagrees with the model (naming both), or ``batch_dim`` is
            true where a model or a declared shape has no batch dimension.
    """
    handlers = [step.handler for step in flow.steps]
    first = handlers[0] if isinstance(handlers[0], ModelRuntime) else None
    last = handlers[-1] if isinstance(handlers[-1], ModelRuntime) else None
    inputs, outputs = settings.inputs, settings.outputs
    if first is not None:
        inputs = _agree("inputs", settings.inputs, first.metadata().inputs, first)
    if last is not None:
        outputs = _agree("outputs", settings.outputs, last.metadata().outputs, last)
    batch_dim = settings.batch_dim
    tensors = [("inputs", i, t) for i, t in enumerate(inputs)] + [("outputs", i, t) for i, t in enumerate(outputs)]
    if batch_dim is None:
        batch_dim = first is not None and first.metadata().batched and all(t.shape[:1] == (-1,) for *_, t in tensors)
    elif batch_dim:
        for runtime in (first, last):
            if runtime is not None and not runtime.metadata().batched:
                raise ConfigError(
                    f"batch_dim: true, but model file {runtime.model_path!r} (runtime {runtime.name!r}) has no "
                    "dynamic first dimension in every input and output"
                )
        for kind, index, tensor in tensors:
            if tensor.shape[:1] != (-1,):
                raise ConfigError(
                    f"{kind}[{index}] ({tensor.name!r}): shape {list(tensor.shape)}: with batch_dim, the first "
                    "dimension is the batch and must be declared -1"
                )
    return dataclasses.replace(settings, inputs=inputs, outputs=outputs, batch_dim=batch_dim)


def _agree(
    kind: str, declared: Sequence[TensorSpec], model: Sequence[TensorSpec], runtime: ModelRuntime
) -> tuple[TensorSpec, ...]:
    """The config's ``declared`` tensors, in the model's order, when they agree with the model's; else the model's."""
    if not declared:
        return tuple(model)
    by_name = {spec.name: spec for spec in declared}
    agrees = set(by_name) == {spec.name for spec in model} and all(_fits(by_name[spec.name], spec) for spec in model)
    if not agrees:
        raise ConfigError(
            f"{kind}: the config declares {_describe(declared)}, but model file {runtime.model_path!r} "
            f"(runtime {runtime.name!r}) has {_describe(model)}"
        )
    return tuple(by_name[spec.name] for spec in model)


def _fits(declared: TensorSpec, model: TensorSpec) -> bool:
    """Same datatype and rank, each dimension the model's or one it leaves open (-1)."""
    return (
        declared.datatype == model.datatype
        and len(declared.shape) == len(model.shape)
        and all(m in (-1, d) for d, m in zip(declared.shape, model.shape, strict=True))
    )


def _describe(tensors: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in tensors) or "none"
