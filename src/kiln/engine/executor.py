"""Executor: runs each step's SchedulerOutput on the model runner(s) and returns one ModelOutput.

The engine talks to an executor, never to a runner: with tensor parallelism every rank's runner
executes the same step in its own process, and the executor hands them the (plain, picklable)
SchedulerOutput and brings one ModelOutput back. :class:`InProcessExecutor` is the single-process
case: one runner, called directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kiln.engine.io import ModelOutput, SchedulerOutput
from kiln.engine.runner import ModelRunner


class Executor(ABC):
    """Where a step's forward pass and sampling happen."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        """Run one step on every runner; their sampled tokens, in batch order."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device the (first rank's) model runs on."""

    @property
    @abstractmethod
    def block_size(self) -> int:
        """Tokens per KV block: the scheduler's block accounting must match the runners'."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release what the executor holds (worker processes, for a multi-process one)."""


class InProcessExecutor(Executor):
    """One :class:`ModelRunner` in this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        return self.runner.execute(scheduler_output)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def block_size(self) -> int:
        return self.runner.block_size

    def shutdown(self) -> None:
        """Nothing runs beside this process; the runner's tensors go with the last reference."""
