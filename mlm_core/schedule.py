"""Learning-rate schedules as pure functions: over optimizer steps, or over a time budget.

Both are a linear warm-up to the peak, then a linear decay to zero. The budget schedule
(as in Cramming) follows the share of the wall-clock budget already spent, so a 10-minute
and a 10-hour run have the same shape.
"""

from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - warmup_steps
    return max(0.0, (total_steps - step) / remaining) if remaining > 0 else 1.0


def budget_lr_factor(progress: float, warmup_ratio: float) -> float:
    """Factor at ``progress`` = elapsed / budget in [0, 1]: up over ``warmup_ratio``, then down to 0."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return max(progress / warmup_ratio, 1e-3)  # never exactly 0: the first step still learns
    return (1.0 - progress) / (1.0 - warmup_ratio) if warmup_ratio < 1 else 1.0
