"""Mask-rate schedules: the training mask rate as a pure function of training progress.

Written as a plain float (``0.15``: constant) or as ``START:END:KIND``:

* ``0.3:0.15:linear`` — straight line from 30% at the first step to 15% at the last;
* ``0.3:0.15:cosine`` — half a cosine from 30% down to 15% (slow at both ends);
* ``0.4,0.3,0.2:step`` — training cut into equal parts, one rate each.

The rate of step ``s`` depends only on ``s / total_steps``, never on wall time or on which
steps ran before, so a resumed run draws exactly the masks the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine", "step")
FORMS = "a rate such as 0.15, START:END:linear, START:END:cosine or R1,R2,...:step (e.g. 0.3:0.15:linear)"


@dataclass(frozen=True)
class RateSchedule:
    kind: str
    rates: tuple[float, ...]

    @property
    def constant(self) -> bool:
        return self.kind == "constant"

    def at(self, progress: float) -> float:
        """The mask rate at ``progress`` in [0, 1] (the share of training steps done)."""
        p = min(max(progress, 0.0), 1.0)
        first, last = self.rates[0], self.rates[-1]
        if self.kind == "constant":
            return first
        if self.kind == "linear":
            return first + (last - first) * p
        if self.kind == "cosine":
            return last + (first - last) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.rates[min(int(p * len(self.rates)), len(self.rates) - 1)]  # step

    def rate_for_step(self, step: int, total_steps: int | None) -> float:
        """The rate of 0-based optimiser step ``step`` of ``total_steps``."""
        if self.constant:
            return self.rates[0]
        if not total_steps:
            raise ValueError(
                f"mask-rate schedule {self} needs a known number of steps: set --max-steps or --epochs "
                "(a time budget alone gives no fixed end to schedule towards)"
            )
        return self.at(step / max(total_steps - 1, 1))

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.rates[0]:g}"
        if self.kind == "step":
            return ",".join(f"{r:g}" for r in self.rates) + ":step"
        return f"{self.rates[0]:g}:{self.rates[1]:g}:{self.kind}"


def _rate(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"mask rate {whole!r} is not valid: {text!r} is not a number; write {FORMS}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"mask rate {whole!r} is not valid: {value:g} is outside (0, 1); write {FORMS}")
    return value


def parse_rate(value: float | str) -> RateSchedule:
    """Parse a mask-rate setting; a clear one-line error names the bad value and the forms."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return RateSchedule("constant", (_rate(str(value), str(value)),))
    text = str(value).strip()
    parts = text.split(":")
    if len(parts) == 1:
        return RateSchedule("constant", (_rate(parts[0], text),))
    kind = parts[-1].strip().lower()
    if kind == "step" and len(parts) == 2:
        rates = tuple(_rate(r, text) for r in parts[0].split(","))
        return RateSchedule("step", rates)
    if kind in ("linear", "cosine") and len(parts) == 3:
        return RateSchedule(kind, (_rate(parts[0], text), _rate(parts[1], text)))
    raise ValueError(f"mask rate {text!r} is not valid; write {FORMS}")


def normalise_rate(value: float | str) -> float | str:
    """The canonical stored form: a float for a constant rate (so existing fingerprints stay
    the same), else the schedule's canonical text."""
    schedule = parse_rate(value)
    return schedule.rates[0] if schedule.constant else str(schedule)
