"""Budget profiles: the model and optimisation settings a training budget buys.

With ``--budget-minutes`` every training setting the user did not give (shape, dropout, tokens
per step, learning rate, warm-up, mask rate, and the vocabulary size) comes from one row of
``PROFILES``. The row is chosen by how much compute the budget buys, measured in *reference
minutes*: minutes on the 2-core development CPU (2 torch threads, 0.16 TFLOP/s by
``peak_flops``'s rule), so ``reference_minutes = budget_minutes x device peak / 0.16 TFLOP/s``.
A 10-minute budget on this CPU is 10 reference minutes; on an 8-thread CPU it is 40; on a GPU
it is thousands, and picks a GPU row. Among the rows of the device's kind (cpu or gpu) the one
nearest in log-compute wins.

The CPU rows were chosen by measured sweeps (README, "Budget profiles"); the GPU rows are
derived from throughput and the CPU trend, not measured, and say so in ``evidence``.
Pure: no Prefect, MLflow or CLI imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import TrainConfig, VocabConfig

REFERENCE_FLOPS = 0.16e12  # the development CPU: 2 threads x 80 GFLOP/s (mlm_core.train.peak_flops)


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # "cpu" or "gpu"
    reference_minutes: float  # the compute this row was chosen for
    train: dict = field(default_factory=dict)  # TrainConfig fields
    vocab_size: int = 8000
    evidence: str = ""


def _shape(width: int, layers: int) -> dict:
    return {"hidden_size": width, "num_layers": layers, "num_heads": max(2, width // 64),
            "intermediate_size": 4 * width}


_COMMON = {"dropout": 0.0, "max_length": 128, "warmup_ratio": 0.06}

PROFILES: tuple[Profile, ...] = (
    # measured (README, "Budget profiles"): held-out top-1 on the four authors, one seed each
    Profile("cpu-2.5min", "cpu", 2.5, {**_shape(128, 2), **_COMMON, "tokens_per_batch": 2048,
                                        "learning_rate": 2e-3, "mask_rate": 0.25},
            evidence="measured: best of 6 shapes and 3 learning rates at 2.5 minutes, top-1 0.331"),
    Profile("cpu-10min", "cpu", 10.0, {**_shape(128, 2), **_COMMON, "tokens_per_batch": 2048,
                                       "learning_rate": 2e-3, "mask_rate": 0.25},
            evidence="measured: 3 shapes at 10 minutes, top-1 0.476 (2x128) ~ 0.478 (4x128) > 0.355 (2x192)"),
    Profile("cpu-40min", "cpu", 40.0, {**_shape(128, 4), **_COMMON, "tokens_per_batch": 2048,
                                       "learning_rate": 2e-3, "mask_rate": 0.25},
            evidence="measured: one 40-minute run, top-1 0.564; the shape extrapolated, not swept"),
    # derived: non-embedding parameters ~ sqrt(compute / 150) (about 25 tokens per parameter, as
    # the CPU runs that won), learning rate 2e-3 x 128 / width; not measured on a GPU
    Profile("gpu-small", "gpu", 4000.0, {**_shape(384, 4), **_COMMON, "tokens_per_batch": 32768,
                                         "learning_rate": 7e-4, "mask_rate": 0.25},
            vocab_size=16000, evidence="derived from throughput and the CPU trend, not measured"),
    Profile("gpu-large", "gpu", 30000.0, {**_shape(512, 8), **_COMMON, "tokens_per_batch": 65536,
                                          "learning_rate": 5e-4, "mask_rate": 0.25},
            vocab_size=32000, evidence="derived from throughput and the CPU trend, not measured"),
)


@dataclass(frozen=True)
class Choice:
    profile: Profile
    reference_minutes: float
    applied: dict  # field -> value taken from the profile
    kept: list[str]  # profile fields the user set, left as given

    def describe(self) -> str:
        text = (f"budget profile {self.profile.name} ({self.profile.evidence}), the nearest to the "
                f"{self.reference_minutes:g} minutes of the 2-core reference CPU that this budget buys")
        if self.kept:
            text += "; yours kept: " + ", ".join(self.kept)
        return text


def choose(budget_minutes: float, device_flops: float, kind: str) -> tuple[Profile, float]:
    """The row for a budget on a device of ``device_flops`` peak FLOP/s and ``kind`` cpu|gpu."""
    reference = budget_minutes * device_flops / REFERENCE_FLOPS
    rows = [p for p in PROFILES if p.kind == kind] or [p for p in PROFILES if p.kind == "cpu"]
    best = min(rows, key=lambda p: abs(math.log(reference / p.reference_minutes)))
    return best, reference


def apply_profile(train: TrainConfig, vocab: VocabConfig, device_flops: float, kind: str
                  ) -> tuple[TrainConfig, VocabConfig, Choice | None]:
    """Fill what the user left unset from the budget's profile; explicit settings always win.

    Returns the configs unchanged and ``None`` without a budget. A setting counts as given when
    it is in the config's ``model_fields_set`` (a CLI flag, a deployment parameter).
    """
    if not train.budget_minutes:
        return train, vocab, None
    profile, reference = choose(train.budget_minutes, device_flops, kind)
    given = train.model_fields_set
    applied = {k: v for k, v in profile.train.items() if k not in given}
    kept = [k for k in profile.train if k in given]
    if "vocab_size" in vocab.model_fields_set:
        kept.append("vocab_size")
    else:
        applied["vocab_size"] = profile.vocab_size
    # a shape half given (e.g. --hidden-size 256 alone) keeps heads and feed-forward in proportion
    if "hidden_size" in given:
        width = train.hidden_size
        if "num_heads" not in given and "num_heads" in applied:
            applied["num_heads"] = max(1, math.gcd(width, max(2, width // 64)))
        if "intermediate_size" not in given and "intermediate_size" in applied:
            applied["intermediate_size"] = 4 * width
    new_train = TrainConfig(**{**train.model_dump(include=given), **{k: v for k, v in applied.items()
                                                                      if k in TrainConfig.model_fields}})
    new_vocab = vocab if "vocab_size" not in applied else VocabConfig(
        **{**vocab.model_dump(include=vocab.model_fields_set), "vocab_size": applied["vocab_size"]})
    return new_train, new_vocab, Choice(profile, round(reference, 3), applied, kept)
