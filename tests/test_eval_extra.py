"""Tests for the richer evaluation (issue 7, part 2): whole-word accuracy, word-l2r
pseudo-perplexity, accuracy per part of speech, and masks/resume with a rate schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlm_core.checkpoint import load_pretrained
from mlm_core.config import EvalConfig, RuntimeConfig, TrainConfig
from mlm_core.evaluate import POS_NAMES, class_unigram_counts, evaluate_heldout, render_markdown, unigram_counts
from mlm_core.pll import pseudo_log_likelihood, word_l2r_queries
from mlm_core.train import train_model

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64,
            batch_size=16, learning_rate=3e-3, checkpoint_every=4, keep_checkpoints=2)
CPU = RuntimeConfig(device="cpu")


@pytest.fixture(scope="module")
def model_dir(merosu, tmp_path_factory):
    cfg = TrainConfig(**TINY, max_steps=24, mask_rate="0.4:0.15:linear", whole_word=True)
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path_factory.mktemp("ww") / "run",
                         data_fingerprint=merosu.data_fingerprint)
    return result.model_dir


def test_word_l2r_masks_the_token_and_the_rest_of_its_word() -> None:
    ids = np.array([10, 11, 12, 13, 14])
    starts = np.array([True, False, False, True, True])  # words: [10 11 12] [13] [14]
    rows = word_l2r_queries(ids, starts, cls_id=2, sep_id=3, mask_id=4)
    assert rows.tolist() == [
        [2, 4, 4, 4, 13, 14, 3],
        [2, 10, 4, 4, 13, 14, 3],
        [2, 10, 11, 4, 13, 14, 3],
        [2, 10, 11, 12, 4, 14, 3],
        [2, 10, 11, 12, 13, 4, 3],
    ]


def test_pll_equals_a_direct_computation(merosu, model_dir) -> None:
    model, tok = load_pretrained(model_dir)
    heldout = merosu.heldout
    sentences = np.array([0, 3, 5])
    got = pseudo_log_likelihood(model, tok, heldout, sentences)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in sentences:
            ids = heldout[int(i)].tolist()
            starts = heldout.word_starts(int(i))
            for t in range(len(ids)):
                row = [tok.cls_id, *ids, tok.sep_id]
                end = t + 1
                while end < len(ids) and not starts[end]:
                    end += 1
                for j in range(t, end):
                    row[j + 1] = tok.mask_id
                logits, _ = model(torch.tensor([row]))
                total += float(logits[0, t + 1].float().log_softmax(-1)[ids[t]])
                n += 1
    assert got["eval/pll_tokens"] == n
    assert got["eval/pll_per_token"] == pytest.approx(total / n, rel=1e-4)
    assert got["eval/pseudo_perplexity"] == pytest.approx(math.exp(-total / n), rel=1e-3)


def test_heldout_metrics_add_whole_word_pos_and_pll_and_keep_token_numbers(merosu, model_dir) -> None:
    model, tok = load_pretrained(model_dir)
    counts = unigram_counts(merosu.train, len(tok))
    by_class = class_unigram_counts(merosu.train, len(tok))
    assert by_class.sum() == counts.sum() and (by_class.sum(axis=0) == counts).all()
    cfg = EvalConfig(passes=2, pll_sentences=5)
    plain = evaluate_heldout(model, tok, merosu.heldout, counts, cfg)
    full = evaluate_heldout(model, tok, merosu.heldout, counts, cfg, train_class_counts=by_class)
    for key, value in plain.items():
        if not key.startswith("eval/pos/"):
            assert full[key] == value  # the fixed 15% token-mask numbers do not change
    assert full["eval/pll_sentences"] == 5 and full["eval/pseudo_perplexity"] > 1.0
    assert 0.0 <= full["eval/wwm_top1_accuracy"] <= full["eval/wwm_top5_accuracy"] <= 1.0
    assert full["eval/wwm_masked_tokens"] > 0
    per_class = [name for _, name in POS_NAMES if f"eval/pos/{name}/masked_tokens" in full]
    assert {"noun", "particle"} <= set(per_class)
    assert sum(full[f"eval/pos/{n}/masked_tokens"] for n in per_class) == full["eval/masked_tokens"]
    # the per-class top-1 hits add up to the overall top-1 hits
    hits = sum(full[f"eval/pos/{n}/top1_accuracy"] * full[f"eval/pos/{n}/masked_tokens"] for n in per_class)
    assert hits == pytest.approx(full["eval/top1_accuracy"] * full["eval/masked_tokens"])
    report = render_markdown(full, [], {"eval mask": "15%"})
    assert "助詞 (particle)" in report and "pseudo-perplexity" in report and "whole-word" in report
    skip = evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=1, pll_sentences=0))
    assert "eval/pseudo_perplexity" not in skip


def test_whole_word_mask_keeps_words_whole_in_evaluation(merosu) -> None:
    from mlm_core.data import fixed_eval_batches
    from mlm_core.masking import IGNORE_INDEX, MaskSpec

    spec = MaskSpec(0.15, 1.0, 0.0, whole_word=True)
    split = 0
    for batch in fixed_eval_batches(merosu.heldout, merosu.tokenizer, spec, 1234, 16, 1):
        for b, i in enumerate(batch.indices):
            n = len(merosu.heldout[int(i)])
            chosen = batch.labels[b, 1 : n + 1] != IGNORE_INDEX
            starts = merosu.heldout.word_starts(int(i))
            word = np.cumsum(starts)
            for w in np.unique(word[chosen]):
                assert chosen[word == w].all()  # every piece of a chosen word
            split += int((~starts).sum())
    assert split > 0


def test_packed_evaluation_scores_what_the_padded_layout_scores(merosu, model_dir) -> None:
    """Issue 18: held-out sentences are packed as in training; every metric (token mask,
    whole-word mask, per part of speech, pseudo-perplexity) equals the padded layout's
    within float rounding, and progress counts every token read up to its announced total."""
    model, tok = load_pretrained(model_dir)
    counts = unigram_counts(merosu.train, len(tok))
    by_class = class_unigram_counts(merosu.train, len(tok))
    # batch_size 4: many packed groups and padded batches, rows of sentences of mixed lengths
    cfg = EvalConfig(passes=2, batch_size=4, pll_sentences=3)
    calls: list[tuple[int, int]] = []
    packed = evaluate_heldout(model, tok, merosu.heldout, counts, cfg, train_class_counts=by_class,
                              progress=lambda d, t: calls.append((d, t)))
    padded = evaluate_heldout(model, tok, merosu.heldout, counts, cfg, train_class_counts=by_class, layout="padded")
    assert packed.keys() == padded.keys()
    assert any(k.startswith("eval/pos/") for k in packed) and "eval/wwm_top1_accuracy" in packed
    n, n_ww = packed["eval/masked_tokens"], packed["eval/wwm_masked_tokens"]
    for key, want in padded.items():
        got = packed[key]
        if key.endswith("masked_tokens") or key in ("eval/sentences", "eval/pll_tokens", "eval/pll_sentences"):
            assert got == want, key  # the same positions are scored: counts are exact
        elif "accuracy" in key:
            # a top-k hit could flip only on a float near-tie; allow one position of the mask
            assert abs(got - want) <= 1.0 / min(n, n_ww) + 1e-12, key
        else:
            assert got == pytest.approx(want, rel=1e-5), key
    # at least the headline numbers are identical here (no near-ties in this small sample)
    assert packed["eval/top1_accuracy"] == padded["eval/top1_accuracy"]
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len({t for _, t in calls}) == 1
    assert calls[-1][0] == calls[-1][1] > 0
    with pytest.raises(ValueError, match="layout"):
        evaluate_heldout(model, tok, merosu.heldout, counts, cfg, layout="dense")
