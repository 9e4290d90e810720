"""The contract every built-in model runtime keeps: read metadata, load in the worker, run a batch.

A runtime is an ordinary ``BaseTaskHandler`` that serves one model file. Its constructor runs in the
pod's main process at config time and only keeps the path and the options; ``metadata()`` also runs
there, before any worker starts, reads the file (never touching a GPU) and fails with
``ModelLoadError`` naming the file and the runtime when it is missing, corrupt or of another
format, so that a bad model is a config error (exit status 2) before the port is bound.
``on_start`` loads the model in each worker; ``handle`` joins its tasks' inputs into one call.

A runtime whose library starts thread pools while it reads a file (XGBoost, LightGBM and
scikit-learn start OpenMP's) sets ``read_in_child``: GNU OpenMP hangs in a process forked after its
threads started, so ``read_metadata`` then runs in a fresh Python process and only the
``ModelMetadata`` comes back; the pod's main process, which forks the workers, stays clean whatever
ran in it before. A file that crashes the library there is a ``ModelLoadError`` too, not a dead pod.

A runtime step reads each model input from the task's ``outputs`` when an earlier step set it
there (a Python pre-processing step, say), else from the request's ``inputs``; it sets every model
output in ``task.outputs``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from aqueduct import BaseTaskHandler
from aqueduct.cpus import available_cpus

from ..settings import TensorSpec
from ..task import InferenceTask


class ModelLoadError(Exception):
    """The model file cannot be served by this runtime; the message names the file and the runtime."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a model file says of its tensors.

    ``batched``: the first dimension of every input and output is a dynamic batch dimension
    (declared as ``-1``), so requests may carry N rows and the runtime joins tasks along it.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool


class ModelRuntime(BaseTaskHandler):
    """Base class of the built-in runtimes (one module per model format).

    Subclasses set ``name`` and ``packages`` and implement ``read_metadata``, ``load`` and ``run``.
    """

    #: The ``runtime:`` value of a step that uses this runtime, e.g. ``"onnx"``.
    name: ClassVar[str]
    #: Import names this runtime needs; a missing one is a config error naming the image to use.
    packages: ClassVar[tuple[str, ...]] = ()
    #: ``read_metadata`` runs in a child process (see the module docstring).
    read_in_child: ClassVar[bool] = False
    #: Bound on reading the file in a child process, seconds.
    read_timeout: ClassVar[float] = 300.0

    def __init__(self, model: str) -> None:
        self.model_path = model
        self.declared_inputs: tuple[TensorSpec, ...] = ()
        self.declared_outputs: tuple[TensorSpec, ...] = ()
        self._metadata: ModelMetadata | None = None

    def declare(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Give the tensors the config declares (``inputs:``/``outputs:``), before ``metadata()``.

        A format that records no shapes (TorchScript) serves these; the others read their own from the
        file and ignore them (the pipeline checks that the two agree).
        """
        self.declared_inputs = tuple(inputs)
        self.declared_outputs = tuple(outputs)
        self._metadata = None

    # ------------------------------------------------------------------ main process, config time
    def metadata(self) -> ModelMetadata:
        """The model's tensors, read from the file once (in the main process: no GPU is touched).

        Raises:
            ModelLoadError: the runtime's packages are not installed, or the file is missing,
                unreadable, corrupt or of another format.
        """
        if self._metadata is None:
            missing = [p for p in self.packages if importlib.util.find_spec(p) is None]
            if missing:
                raise ModelLoadError(
                    f"runtime {self.name!r} needs the Python package(s) {', '.join(missing)}, which this image "
                    f"lacks: use the aqueduct-{self.name} image (or pip install them)"
                )
            if not os.path.isfile(self.model_path):
                raise ModelLoadError(f"runtime {self.name!r}: model file {self.model_path!r} does not exist")
            self._metadata = self._read_in_child() if self.read_in_child else self._read()
        return self._metadata

    def _read(self) -> ModelMetadata:
        try:
            return self.read_metadata()
        except ModelLoadError:
            raise
        except Exception as e:
            first_line = str(e).strip().split("\n", 1)[0]  # XGBoost's errors go on with a native stack trace
            raise ModelLoadError(
                f"runtime {self.name!r} cannot load model file {self.model_path!r}: {type(e).__name__}: {first_line}"
            ) from e

    def _read_in_child(self) -> ModelMetadata:
        """``read_metadata`` in a fresh Python process (``python -m aqueduct_service.runtimes.reader``)."""
        where = f"runtime {self.name!r} cannot load model file {self.model_path!r}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "aqueduct_service.runtimes.reader"],
                input=pickle.dumps(self),
                capture_output=True,
                env=env,
                timeout=self.read_timeout,
            )
        except subprocess.TimeoutExpired:
            raise ModelLoadError(f"{where}: reading it took longer than {self.read_timeout:.0f} s") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise ModelLoadError(
                f"{where}: the process reading it exited with status {done.returncode}: {' '.join(tail)}"
            )
        ok, value = pickle.loads(done.stdout)
        if not ok:
            raise ModelLoadError(value)
        assert isinstance(value, ModelMetadata)
        return value

    def read_metadata_here(self) -> tuple[bool, ModelMetadata | str]:
        """What ``read_metadata`` gives in this process: (True, the metadata) or (False, the error's message)."""
        try:
            return True, self._read()
        except ModelLoadError as e:
            return False, str(e)

    def read_metadata(self) -> ModelMetadata:
        """Read the file's tensors (in the main process); raise on a bad file."""
        raise NotImplementedError

    # ------------------------------------------------------------------ worker
    def on_start(self) -> None:
        self.metadata()
        self.load()

    def load(self) -> None:
        """Load the model for ``run`` (in each worker process; the GPU may be used here)."""
        raise NotImplementedError

    def run(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Run the model on one batch: ``inputs`` by name, rows along axis 0 when batched."""
        raise NotImplementedError

    def handle(self, *tasks: InferenceTask) -> None:  # type: ignore[override]
        meta = self.metadata()
        names = [spec.name for spec in meta.inputs]
        if not meta.batched:
            for task in tasks:
                task.outputs.update(self.run({name: _input_of(task, name) for name in names}))
            return
        per_task = [[_input_of(task, name) for name in names] for task in tasks]
        rows = [len(arrays[0]) for arrays in per_task]
        if len(tasks) == 1:
            joined = dict(zip(names, per_task[0], strict=True))
        else:
            joined = {name: np.concatenate([arrays[i] for arrays in per_task]) for i, name in enumerate(names)}
        outputs = self.run(joined)
        for name, array in outputs.items():
            start = 0
            for task, count in zip(tasks, rows, strict=True):  # slices: np.split costs a few µs a part
                task.outputs[name] = array[start : start + count]
                start += count


def quiet_openmp() -> None:
    """Let the OpenMP threads of the model's library sleep between calls instead of spinning.

    GNU OpenMP's threads (XGBoost, LightGBM, scikit-learn) spin after each parallel region by default,
    which on a pod of few CPUs takes the CPU the HTTP side needs: on 2 CPUs, XGBoost with 2 threads
    burned 4,600 µs of CPU per request at c = 1 against 1,570 with 1, and fell to a fifth of its
    throughput while another process held a core. Call before the library is first imported in the
    worker; a user's own ``OMP_WAIT_POLICY`` wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def worker_threads() -> int:
    """Threads a runtime's own pool should use in this worker: its share of the pod's CPUs.

    The engine sets ``OMP_NUM_THREADS`` in each worker to its share before ``on_start`` (unless the
    user set it, which then wins); outside a worker, the CPUs this process may use.
    """
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        threads = 0
    return threads if threads > 0 else max(1, int(available_cpus()))


def _input_of(task: InferenceTask, name: str) -> np.ndarray:
    """A model input: set by an earlier step in ``task.outputs``, else the request's."""
    value = task.outputs.get(name)
    return task.inputs[name] if value is None else value


def option_key(key: str) -> str:
    """Runtime options match case- and underscore-blind: ``trustPickle``, ``trust_pickle`` and the
    ``trustpickle`` an environment override gives are one option."""
    return key.replace("_", "").replace("-", "").lower()


def normalise_options(options: Mapping[str, Any], accepted: Sequence[str], runtime: str, where: str) -> dict[str, Any]:
    """Map the step's ``options`` onto the runtime constructor's parameter names (``accepted``).

    Raises:
        ModelLoadError: an option the runtime does not take, naming those it does.
    """
    by_key = {option_key(name): name for name in accepted}
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = by_key.get(option_key(key))
        if name is None:
            raise ModelLoadError(
                f"{where}.{key}: runtime {runtime!r} has no option {key!r} (it takes: {', '.join(accepted) or 'none'})"
            )
        out[name] = value
    return out
