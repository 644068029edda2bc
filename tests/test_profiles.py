"""Budget profiles: which row a budget and a device buy, and that what the user gives wins."""

from __future__ import annotations

import pytest

from mlm_core.config import RuntimeConfig, TrainConfig, VocabConfig
from mlm_core.profiles import PROFILES, REFERENCE_FLOPS, apply_profile, choose
from mlm_core.train import device_compute

CPU2 = REFERENCE_FLOPS  # the development machine: 2 threads


def test_every_profile_is_a_valid_training_config_and_says_where_it_came_from():
    assert {p.kind for p in PROFILES} == {"cpu", "gpu"}
    for p in PROFILES:
        cfg = TrainConfig(**p.train, budget_minutes=1.0)
        assert cfg.hidden_size % cfg.num_heads == 0 and cfg.tokens_per_batch >= cfg.max_length
        assert p.evidence.startswith("measured" if p.kind == "cpu" else "derived"), p.name


@pytest.mark.parametrize("minutes, flops, kind, name", [
    (2.5, CPU2, "cpu", "cpu-2.5min"),
    (1.0, CPU2, "cpu", "cpu-2.5min"),
    (10.0, CPU2, "cpu", "cpu-10min"),
    (40.0, CPU2, "cpu", "cpu-40min"),
    (600.0, CPU2, "cpu", "cpu-40min"),  # beyond the measured range: the largest measured row
    (10.0, 4 * CPU2, "cpu", "cpu-40min"),  # 8 threads buy four times the compute of 2
    (5.0, 989e12, "gpu", "gpu-large"),  # an H100/H200 at bf16
    (1.0, 65e12, "gpu", "gpu-small"),  # a T4
])
def test_the_row_follows_the_compute_the_budget_buys(minutes, flops, kind, name):
    profile, reference = choose(minutes, flops, kind)
    assert profile.name == name and profile.kind == kind
    assert reference == pytest.approx(minutes * flops / REFERENCE_FLOPS)


def test_unset_settings_come_from_the_profile_and_given_ones_win():
    given = TrainConfig(budget_minutes=10, learning_rate=5e-4, num_layers=3)
    train, vocab, choice = apply_profile(given, VocabConfig(), CPU2, "cpu")
    profile = choice.profile
    assert profile.name == "cpu-10min"
    assert (train.learning_rate, train.num_layers, train.budget_minutes) == (5e-4, 3, 10)
    for field in ("hidden_size", "num_heads", "intermediate_size", "dropout", "tokens_per_batch", "mask_rate",
                  "warmup_ratio", "max_length"):
        assert getattr(train, field) == profile.train[field], field
    assert vocab.vocab_size == profile.vocab_size
    assert set(choice.kept) == {"learning_rate", "num_layers"} and "learning_rate" not in choice.applied
    assert "cpu-10min" in choice.describe() and "yours kept: num_layers, learning_rate" in choice.describe()
    # applying it again (a deployment re-running the flow with these configs) changes nothing
    again, vocab2, _ = apply_profile(train, vocab, CPU2, "cpu")
    assert again == train and vocab2 == vocab


def test_a_given_width_keeps_heads_and_feed_forward_in_proportion():
    train, _, _ = apply_profile(TrainConfig(budget_minutes=10, hidden_size=320), VocabConfig(), CPU2, "cpu")
    assert train.hidden_size % train.num_heads == 0 and train.intermediate_size == 4 * 320


def test_a_given_vocabulary_size_wins_and_no_budget_means_no_profile():
    _, vocab, choice = apply_profile(TrainConfig(budget_minutes=2), VocabConfig(vocab_size=3000), CPU2, "cpu")
    assert vocab.vocab_size == 3000 and "vocab_size" in choice.kept
    plain = TrainConfig(max_steps=10)
    assert apply_profile(plain, VocabConfig(), CPU2, "cpu") == (plain, VocabConfig(), None)


def test_the_device_compute_counts_threads_and_processes():
    assert device_compute(RuntimeConfig(device="cpu", num_threads=2)) == (2 * 80e9, "cpu")
    assert device_compute(RuntimeConfig(device="cpu", num_threads=3, nproc_per_node=2)) == (6 * 80e9, "cpu")
    assert device_compute(RuntimeConfig(device="cpu", peak_tflops=1.0)) == (1e12, "cpu")
