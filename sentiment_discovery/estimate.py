"""What a pre-training run will cost on this machine, from the measured time of its first steps.

main.py's default (a 4,096-unit mLSTM on 50,000 reviews) takes days on a CPU; this says so within its
first batches, and names a --nhid that fits in a day.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .model import ModelConfig, RNNModel

DAY = 24 * 3600.0
WARMUP_STEPS = 1  # the first step allocates buffers and warms caches: not timed
MEASURE_STEPS = 3  # steps timed after it...
MEASURE_SECONDS = 10.0  # ...or fewer, once they took this long (a large model on a CPU)
LONG_FIRST_STEP = 60.0  # a first step this slow is estimate enough: waiting for more would take minutes


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY:.1f} days"


def compute_parameters(config: ModelConfig) -> int:
    """Parameters every byte goes through (the embedding is a lookup, left out): a step's time grows in
    proportion, the recurrent weights (~5 nhid^2 for an mLSTM) dominating."""
    with torch.device("meta"):  # shapes only, no memory
        model = RNNModel(config)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("encoder."))


def smaller_nhid(config: ModelConfig, run_seconds: float, budget: float = DAY) -> tuple[int, float] | None:
    """The largest of nhid/2, nhid/4, ... whose run fits in ``budget`` seconds, with its estimated time
    (``run_seconds`` scaled by the compute parameters), or None when even nhid 1 does not."""
    full = compute_parameters(config)
    nhid = config.nhid // 2
    while nhid >= 1:
        seconds = run_seconds * compute_parameters(replace(config, nhid=nhid)) / full
        if seconds <= budget:
            return nhid, seconds
        nhid //= 2
    return None


def cost_lines(
    step_seconds: float, steps_per_epoch: int, run_steps: int, config: ModelConfig, device: str
) -> list[str]:
    """What the run costs at ``step_seconds`` per batch; on a CPU, past a day, a --nhid that fits."""
    run_seconds = step_seconds * run_steps
    lines = [
        f"cost on this machine ({device}): {format_duration(step_seconds)} per batch -> "
        f"{format_duration(step_seconds * steps_per_epoch)} per epoch ({steps_per_epoch:,} batches), "
        f"{format_duration(run_seconds)} for the {run_steps:,} batches this run trains (training alone; "
        "validations add to it)"
    ]
    if device == "cpu" and run_seconds > DAY:
        found = None if config.tied else smaller_nhid(config, run_seconds)
        if found:
            nhid, seconds = found
            lines.append(
                f"  that is more than a day on a CPU: --nhid {nhid} would take about "
                f"{format_duration(seconds)}; or use a GPU, or fewer --train_iters"
            )
        else:
            lines.append("  that is more than a day on a CPU: use a GPU, or fewer --train_iters")
    return lines


class RunCost:
    """Times the first training steps of a run; ``add_step`` returns ``cost_lines`` once, as soon as
    enough steps were timed (nothing for a run that ends before)."""

    def __init__(self, config: ModelConfig, steps_per_epoch: int, run_steps: int, device: str):
        self.config, self.device = config, device
        self.steps_per_epoch, self.run_steps = steps_per_epoch, run_steps
        self.seen, self.timed, self.done = 0, [], False

    def add_step(self, seconds: float) -> list[str]:
        if self.done:
            return []
        self.seen += 1
        if self.seen > WARMUP_STEPS:
            self.timed.append(seconds)
        elif seconds >= LONG_FIRST_STEP and self.seen < self.run_steps:
            # the 4096-unit default on a CPU: say it now, from the first step (which over-estimates a bit)
            self.done = True
            lines = cost_lines(seconds, self.steps_per_epoch, self.run_steps, self.config, self.device)
            return [*lines, "(estimated from the first step alone, which also warms up: a little high)"]
        if self.seen >= self.run_steps:  # the run is over: nothing left to estimate
            self.done = True
            return []
        if len(self.timed) < MEASURE_STEPS and sum(self.timed) < MEASURE_SECONDS:
            return []
        self.done = True
        step_seconds = sum(self.timed) / len(self.timed)
        return cost_lines(step_seconds, self.steps_per_epoch, self.run_steps, self.config, self.device)
