"""Tests for mask-rate schedules and whole-word masking (issue 7, part 1)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mlm_core.config import TrainConfig
from mlm_core.mask_schedule import parse_rate
from mlm_core.masking import IGNORE_INDEX, MaskSpec, mask_batch

PAD, CLS, SEP, MASK = 0, 2, 3, 4
FIRST_REGULAR, VOCAB = 5, 1000


# --- schedules --------------------------------------------------------------------------------


def test_constant_rate_from_float_or_text() -> None:
    for value in (0.3, "0.3", " 0.3 "):
        s = parse_rate(value)
        assert s.constant and s.at(0.0) == s.at(1.0) == 0.3
        assert s.rate_for_step(7, None) == 0.3  # no total needed


def test_linear_and_cosine_run_from_start_to_end() -> None:
    lin, cos = parse_rate("0.3:0.15:linear"), parse_rate("0.3:0.15:cosine")
    assert lin.at(0.0) == pytest.approx(0.3) and lin.at(1.0) == pytest.approx(0.15)
    assert lin.at(0.5) == pytest.approx(0.225)
    assert cos.at(0.0) == pytest.approx(0.3) and cos.at(1.0) == pytest.approx(0.15)
    assert cos.at(0.5) == pytest.approx(0.225)
    assert cos.at(0.1) > lin.at(0.1)  # cosine lingers near the start rate
    # first and last optimiser steps get exactly the end points
    assert lin.rate_for_step(0, 11) == pytest.approx(0.3)
    assert lin.rate_for_step(10, 11) == pytest.approx(0.15)
    rates = [lin.rate_for_step(s, 11) for s in range(11)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_step_schedule_cuts_training_into_equal_parts() -> None:
    s = parse_rate("0.4,0.3,0.2:step")
    assert [s.rate_for_step(i, 9) for i in range(9)] == [0.4] * 3 + [0.3] * 3 + [0.2] * 3
    assert str(s) == "0.4,0.3,0.2:step"


def test_schedule_needs_a_known_number_of_steps() -> None:
    with pytest.raises(ValueError, match="max-steps"):
        parse_rate("0.3:0.15:linear").rate_for_step(3, None)


@pytest.mark.parametrize("bad", ["0", "1.2", "abc", "0.3:0.15", "0.3:0.15:exp", "0.3:x:linear", "0.3:step:linear"])
def test_bad_rates_are_refused_naming_the_value(bad: str) -> None:
    with pytest.raises(ValueError, match="mask rate"):
        parse_rate(bad)
    with pytest.raises(ValidationError, match="START:END:linear"):
        TrainConfig(mask_rate=bad)


def test_config_keeps_plain_floats_and_canonical_schedules() -> None:
    assert TrainConfig(mask_rate="0.15").mask_rate == 0.15
    assert TrainConfig().fingerprint_fields()["mask_rate"] == 0.15
    assert TrainConfig(mask_rate="0.30:0.150:Linear").mask_rate == "0.3:0.15:linear"
    with pytest.raises(ValidationError, match="--max-steps"):
        TrainConfig(mask_rate="0.3:0.15:linear", budget_minutes=1.0)
    assert TrainConfig(mask_rate="0.3:0.15:linear", budget_minutes=1.0, max_steps=10).max_steps == 10


# --- whole-word masking ------------------------------------------------------------------------


def run(ids, maskable, keys, spec, starts=None):
    return mask_batch(ids, maskable, keys, spec, mask_id=MASK, vocab_size=VOCAB,
                      first_regular_id=FIRST_REGULAR, word_starts=starts)


def make_rows(rng, B=64, T=60):
    """Rows of [CLS] words [SEP] [PAD]...; words of 1-4 subwords."""
    ids = np.full((B, T), PAD, dtype=np.int64)
    starts = np.ones((B, T), dtype=bool)
    for b in range(B):
        n = int(rng.integers(5, T - 2))
        ids[b, 0], ids[b, 1 : n + 1], ids[b, n + 1] = CLS, rng.integers(FIRST_REGULAR, VOCAB, n), SEP
        t = 1
        while t <= n:
            w = int(rng.integers(1, 5))
            starts[b, t + 1 : min(t + w, n + 1)] = False
            t += w
    return ids, ids >= FIRST_REGULAR, starts


def test_whole_word_selects_all_subwords_of_a_word_and_counts_tokens() -> None:
    rng = np.random.default_rng(1)
    spec = MaskSpec(rate=0.3, whole_word=True)
    chosen = total = 0
    for step in range(30):
        ids, maskable, starts = make_rows(rng)
        keys = [(0, step, b) for b in range(len(ids))]
        masked, labels = run(ids, maskable, keys, spec, starts)
        selected = labels != IGNORE_INDEX
        assert not (selected & ~maskable).any()
        np.testing.assert_array_equal(labels[selected], ids[selected])
        # a continuation is selected exactly when the subword before it is
        cont = ~starts & maskable
        cont[:, 0] = False
        prev = np.zeros_like(selected)
        prev[:, 1:] = selected[:, :-1]
        np.testing.assert_array_equal(selected[cont], prev[cont])
        # each row's count lands within half the longest word (4 tokens) of rate * n
        err = selected.sum(1) - 0.3 * maskable.sum(1)
        assert (np.abs(err) <= 3).all()
        chosen += int(selected.sum())
        total += int(maskable.sum())
    assert abs(chosen / total - 0.3) < 0.01  # rate counted in tokens, unbiased
    # and the same keys give the same mask again
    again = run(ids, maskable, keys, spec, starts)
    np.testing.assert_array_equal(again[1], labels)


def test_whole_word_on_single_token_words_equals_token_masking() -> None:
    rng = np.random.default_rng(2)
    ids, maskable, _ = make_rows(rng)
    keys = [(4, b) for b in range(len(ids))]
    token = run(ids, maskable, keys, MaskSpec(rate=0.25))
    word = run(ids, maskable, keys, MaskSpec(rate=0.25, whole_word=True), np.ones_like(maskable))
    np.testing.assert_array_equal(token[0], word[0])
    np.testing.assert_array_equal(token[1], word[1])


def test_whole_word_needs_word_starts() -> None:
    ids = np.array([[CLS, 10, 11, SEP]])
    with pytest.raises(ValueError, match="word_starts"):
        run(ids, ids >= FIRST_REGULAR, [(0,)], MaskSpec(whole_word=True))


# --- encoded word boundaries and the training loader ---------------------------------------------


def test_encoded_word_starts_mark_each_words_first_subword(merosu) -> None:
    corpus, tok = merosu.train, merosu.tokenizer
    assert corpus.starts is not None and len(corpus.starts) == corpus.num_tokens
    multi = 0
    for i in range(len(corpus)):
        ids, starts = corpus[i].tolist(), corpus.word_starts(i)
        assert starts[0]
        continuation = np.array([tok.vocab[t].startswith("##") for t in ids])
        np.testing.assert_array_equal(starts[1:], ~continuation[1:])
        multi += int((~starts).sum())
    assert multi > 0  # the corpus has words of several subwords


def test_scheduled_rate_follows_the_step_and_resumes_exactly(merosu) -> None:
    from mlm_core.loader import step_batches
    from mlm_core.packing import TokenBatchPlan

    corpus, tok = merosu.train, merosu.tokenizer
    plan = TokenBatchPlan(corpus.lengths, 512, seed=3)
    schedule = parse_rate("0.5:0.1:linear")
    spec = MaskSpec(0.5, whole_word=True)
    common = dict(max_length=64, grad_accum=1, stop_step=6, static_masking=False, rate_schedule=schedule)
    full = list(step_batches(plan, corpus, tok, spec, start_step=0, **common))
    shares = [len(sb.micro[0].masked_positions) / (sb.micro[0].n_tokens - 2 * (sb.micro[0].segment_ids.max(1)).sum())
              for sb in full]
    assert shares[0] > 0.4 and shares[-1] < 0.2  # from ~50% down to ~10% of the maskable tokens
    resumed = list(step_batches(plan, corpus, tok, spec, start_step=4, **common))
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a.micro[0].input_ids, b.micro[0].input_ids)
        np.testing.assert_array_equal(a.micro[0].masked_positions, b.micro[0].masked_positions)


def test_encoded_parts_of_speech_follow_the_shard_words(merosu, tmp_path) -> None:
    from mlm_core.data import POS_CLASSES, EncodedCorpus, encode_shards, pos_class
    from mlm_core.shards import iter_rows

    paths = merosu.shard_paths("train")
    corpus = EncodedCorpus(encode_shards(paths, merosu.tokenizer, tmp_path / "enc", 4096, "long"))
    rows = [r for b in iter_rows(paths, ["words", "pos"]) for r in zip(*(c.to_pylist() for c in b.columns))]
    assert len(rows) == len(corpus)  # windows long enough: one sequence per sentence
    for i, (words, tags) in enumerate(rows):
        starts = corpus.word_starts(i)
        per_word = np.asarray(corpus.pos[corpus.offsets[i] : corpus.offsets[i + 1]])[starts]
        assert starts.sum() == len(words)
        assert per_word.tolist() == [pos_class(t) for t in tags]
    assert pos_class("名詞-普通名詞") == POS_CLASSES.index("名詞") and POS_CLASSES[pos_class("未知語")] == "その他"


def test_masking_flags_map_onto_the_train_config_and_runs_table_shows_schedules() -> None:
    from flows.cli import build_parser, configs_from_args
    from flows.runs import format_table

    ns = build_parser().parse_args(
        ["pretrain", "--mask-rate", "0.3:0.15:cosine", "--whole-word", "--mask-token-prob", "0.9",
         "--random-token-prob", "0.05", "--eval-pll-sentences", "7"]
    )
    cfg = configs_from_args(ns)
    assert cfg["train"].mask_rate == "0.3:0.15:cosine" and cfg["train"].whole_word is True
    assert (cfg["train"].mask_token_prob, cfg["train"].random_token_prob) == (0.9, 0.05)
    assert cfg["evaluate"].pll_sentences == 7
    assert configs_from_args(build_parser().parse_args(["pretrain"]))["train"].whole_word is False
    row = {"run_id": "r", "name": "n", "started": "s", "status": "FINISHED", "corpus": [], "layers": 2,
           "hidden_size": 64, "masking": "dynamic", "mask_rate": "0.3:0.15:linear", "top1": None, "top5": None,
           "unigram_top1": None, "unigram_top5": None, "wall_s": None}
    assert "dynamic 0.3:0.15:linear" in format_table([row])
    assert "dynamic 15%" in format_table([{**row, "mask_rate": 0.15}])
