"""``BaseTaskHandler``: the contract between a flow and your code."""

from __future__ import annotations

from collections.abc import Callable

from .task import BaseTask

HandleConditionType = Callable[[BaseTask], bool]


class BaseTaskHandler:
    """Base class for your handlers; each step of a flow runs one in its worker processes.

    - ``on_start()`` runs once in every worker process before it takes tasks: load the model here,
      so that it lives in the worker (on the GPU) and not in the parent. If it raises, the flow's
      ``start()`` fails with ``FlowStartError``.
    - ``handle(*tasks)`` gets between 1 and the step's ``batch_size`` tasks. Read their input
      fields and set result fields on them; the fields reach the caller's task objects. Return
      nothing.
    - If ``handle`` raises, the engine finds the task(s) that make it raise by running smaller
      groups of the batch (unless the step was made with ``bisect=False``); those tasks fail with
      ``TaskError``, the others complete. A handler may therefore see a task more than once.

    Example:
        class Doubler(BaseTaskHandler):
            def on_start(self):
                self.model = load_model()

            def handle(self, *tasks):
                outputs = self.model(np.stack([t.array for t in tasks]))
                for task, out in zip(tasks, outputs):
                    task.result = out
    """

    #: Index of the worker process running this handler within its step (0 .. nprocs-1), set before ``on_start``.
    worker_index: int = 0

    @classmethod
    def get_step_name(cls, step_number: int) -> str:
        """Default name of the step at 1-based ``step_number`` running this handler."""
        return f"step{step_number}_{cls.__name__}"

    def on_start(self) -> None:
        """Called once in each worker process before it handles tasks."""

    def handle(self, *tasks: BaseTask) -> None:
        """Handle a batch of tasks in place."""
        raise NotImplementedError
