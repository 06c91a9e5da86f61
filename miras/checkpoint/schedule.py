"""When to checkpoint and which checkpoints are milestones (retention.py decides which ones stay).

Pure functions of the training clock (seconds of training, counted across resumes) and the step,
so a long run can be simulated in a test with an injected clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CheckpointSchedule:
    every_seconds: float = 300.0  # 0 disables the time trigger
    every_steps: int = 0  # 0 disables the step trigger
    milestone_every_seconds: float = 3600.0  # 0: no milestones
    last_checkpoint_time: float = 0.0  # training time of the last checkpoint
    last_milestone_time: float = 0.0  # training time of the last milestone (the start counts as one)

    def due(self, step: int, training_time: float) -> bool:
        by_time = self.every_seconds > 0 and training_time - self.last_checkpoint_time >= self.every_seconds
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        return by_time or by_steps

    def is_milestone(self, training_time: float) -> bool:
        interval = self.milestone_every_seconds
        return interval > 0 and training_time - self.last_milestone_time >= interval

    def record(self, training_time: float, milestone: bool) -> None:
        self.last_checkpoint_time = training_time
        if milestone:
            self.last_milestone_time = training_time

    def clock_state(self) -> dict[str, float]:
        state = asdict(self)
        return {k: state[k] for k in ("last_checkpoint_time", "last_milestone_time")}

    def load_clock_state(self, state: dict[str, float]) -> None:
        self.last_checkpoint_time = float(state.get("last_checkpoint_time", 0.0))
        self.last_milestone_time = float(state.get("last_milestone_time", 0.0))
