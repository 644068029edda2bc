"""Tests for mlm_core.data: encoded corpora, collation, batch plans, fixed evaluation masks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlm_core.data import (
    BatchPlan,
    EncodedCorpus,
    collate,
    encode_key,
    encode_shards,
    fixed_eval_batches,
)
from mlm_core.masking import IGNORE_INDEX, MaskSpec
from mlm_core.shards import iter_rows
from mlm_core.tokenizer import WordPieceTokenizer


@dataclass
class Prepared:
    root: Path
    train_paths: list[Path]
    heldout_paths: list[Path]
    tokenizer: WordPieceTokenizer
    train_words: list[list[str]]
    heldout_words: list[list[str]]
    train: EncodedCorpus  # max_length 64
    heldout: EncodedCorpus  # max_length 64


def words_of(paths: list[Path]) -> list[list[str]]:
    return [w for batch in iter_rows(paths, ["words"]) for w in batch.column(0).to_pylist()]


@pytest.fixture(scope="module")
def prep(merosu) -> Prepared:
    """The session's 走れメロス shards, vocabulary and encodings (max_length 64, from conftest)."""
    train_paths, heldout_paths = merosu.shard_paths("train"), merosu.shard_paths("heldout")
    return Prepared(merosu.root, train_paths, heldout_paths, merosu.tokenizer, words_of(train_paths),
                    words_of(heldout_paths), merosu.train, merosu.heldout)


# --- encode_shards / EncodedCorpus ---------------------------------------------------------------


def test_encoded_ids_are_the_tokenizer_ids(prep: Prepared, tmp_path: Path) -> None:
    out = encode_shards(prep.train_paths, prep.tokenizer, tmp_path / "enc", 4096, "key-1")
    corpus = EncodedCorpus(out)
    expected = prep.tokenizer.encode_words_batch(prep.train_words)
    assert len(corpus) == len(expected) == 319  # long enough windows: one sequence per sentence
    for i, ids in enumerate(expected):
        assert corpus[i].tolist() == ids
    assert corpus.meta == {
        "key": "key-1", "dtype": "uint16", "sequences": 319, "tokens": sum(map(len, expected)),
        "max_length": 4096, "vocab_size": len(prep.tokenizer),
    }
    assert corpus.num_tokens == sum(map(len, expected))
    np.testing.assert_array_equal(corpus.lengths, [len(ids) for ids in expected])
    assert corpus.lengths.sum() == corpus.num_tokens
    assert sorted(p.name for p in out.iterdir()) == ["ids.bin", "meta.json", "offsets.npy", "pos.bin", "starts.bin"]
    assert (out / "ids.bin").stat().st_size == 2 * corpus.num_tokens


def test_long_sentences_are_split_into_windows_without_loss(prep: Prepared, tmp_path: Path) -> None:
    window = 16 - 2
    corpus = EncodedCorpus(encode_shards(prep.train_paths, prep.tokenizer, tmp_path / "enc", 16, "key-16"))
    full = prep.tokenizer.encode_words_batch(prep.train_words)
    assert max(map(len, full)) > 3 * window  # some sentences need several windows
    assert len(corpus) == sum(math.ceil(len(ids) / window) for ids in full)
    assert corpus.lengths.max() <= window and corpus.lengths.min() >= 1
    # every sentence is its windows, in order: nothing lost, duplicated or reordered
    seq = 0
    for ids in full:
        pieces = []
        while sum(map(len, pieces)) < len(ids):
            pieces.append(corpus[seq].tolist())
            seq += 1
        assert [t for p in pieces for t in p] == ids
        assert all(len(p) == window for p in pieces[:-1])
    assert seq == len(corpus)
    assert corpus.num_tokens == sum(map(len, full))


def test_encode_is_skipped_only_for_the_same_key(prep: Prepared, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    encode_shards(prep.heldout_paths, prep.tokenizer, out, 64, "key-a")
    (out / "marker").write_text("kept while the key matches")
    assert encode_shards(prep.heldout_paths, prep.tokenizer, out, 64, "key-a") == out
    assert (out / "marker").exists()
    encode_shards(prep.heldout_paths, prep.tokenizer, out, 32, "key-b")
    assert not (out / "marker").exists()
    corpus = EncodedCorpus(out)
    assert corpus.meta["key"] == "key-b" and corpus.meta["max_length"] == 32
    assert corpus.lengths.max() <= 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_empty_corpus(prep: Prepared, tmp_path: Path) -> None:
    corpus = EncodedCorpus(encode_shards([], prep.tokenizer, tmp_path / "enc", 64, "empty"))
    assert len(corpus) == 0 and corpus.num_tokens == 0 and corpus.lengths.tolist() == []
    with pytest.raises(ValueError, match="no training sequences"):
        BatchPlan(corpus.lengths, 8, 0)


def test_large_vocabulary_is_stored_as_int32(prep: Prepared, tmp_path: Path) -> None:
    big = WordPieceTokenizer(prep.tokenizer.vocab + [f"filler{i}" for i in range(70_000 - len(prep.tokenizer))])
    corpus = EncodedCorpus(encode_shards(prep.heldout_paths, big, tmp_path / "enc", 64, "big"))
    assert corpus.meta["dtype"] == "int32" and corpus.meta["vocab_size"] == 70_000
    assert (tmp_path / "enc" / "ids.bin").stat().st_size == 4 * corpus.num_tokens
    assert [corpus[i].tolist() for i in range(len(corpus))] == [
        prep.heldout[i].tolist() for i in range(len(prep.heldout))
    ]


def test_encode_key_follows_inputs() -> None:
    base = encode_key("s", "v", "train", 64)
    assert base == encode_key("s", "v", "train", 64)
    assert len({base, encode_key("s2", "v", "train", 64), encode_key("s", "v2", "train", 64),
                encode_key("s", "v", "heldout", 64), encode_key("s", "v", "train", 128)}) == 5


# --- collate ---------------------------------------------------------------------------------


def test_collate_layout(prep: Prepared) -> None:
    tok, corpus = prep.tokenizer, prep.train
    lengths = corpus.lengths
    idx = np.array([int(np.argmax(lengths)), int(np.argmin(lengths)), 5, 17])
    spec = MaskSpec(rate=0.15, mask_token_prob=0.0, random_token_prob=0.0)  # selected, never changed
    batch = collate(corpus, idx, tok, spec, [(0, int(i)) for i in idx])
    T = int(lengths[idx].max()) + 2
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.labels.shape == (4, T)
    assert batch.attention_mask.dtype == bool and batch.input_ids.dtype == np.int64
    for b, i in enumerate(idx):
        n = int(lengths[i])
        row = batch.input_ids[b]
        assert row[0] == tok.cls_id
        assert row[1 : n + 1].tolist() == corpus[int(i)].tolist()
        assert row[n + 1] == tok.sep_id
        assert (row[n + 2 :] == tok.pad_id).all()
        assert batch.attention_mask[b].tolist() == [True] * (n + 2) + [False] * (T - n - 2)
        labels = batch.labels[b]
        assert labels[0] == labels[n + 1] == IGNORE_INDEX and (labels[n + 2 :] == IGNORE_INDEX).all()
        selected = labels != IGNORE_INDEX
        assert (labels[selected] == row[selected]).all()
        assert selected.sum() in (math.floor(0.15 * n), math.ceil(0.15 * n))
    assert batch.n_tokens == int((lengths[idx] + 2).sum())


def test_collate_masks_with_mask_ids_and_never_unk(prep: Prepared) -> None:
    tok, corpus = prep.tokenizer, prep.heldout
    with_unk = [i for i in range(len(corpus)) if tok.unk_id in corpus[i].tolist()]
    assert with_unk  # the held-out split has words the vocabulary does not know
    idx = np.array(with_unk)
    batch = collate(corpus, idx, tok, MaskSpec(rate=0.9, mask_token_prob=1.0, random_token_prob=0.0),
                    [(1, int(i)) for i in idx])
    for b, i in enumerate(idx):
        ids = corpus[int(i)]
        n = len(ids)
        labels = batch.labels[b, 1 : n + 1]
        masked = batch.input_ids[b, 1 : n + 1]
        assert (labels[ids == tok.unk_id] == IGNORE_INDEX).all()  # [UNK] is no prediction target
        assert (masked[labels != IGNORE_INDEX] == tok.mask_id).all()
        assert (masked[labels == IGNORE_INDEX] == ids[labels == IGNORE_INDEX]).all()
        regular = int((ids >= tok.num_special).sum())
        assert (labels != IGNORE_INDEX).sum() in (math.floor(0.9 * regular), math.ceil(0.9 * regular))


# --- BatchPlan ---------------------------------------------------------------------------------


def epoch_batches(plan: BatchPlan, epoch: int) -> list[np.ndarray]:
    out = []
    for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
        e, idx = plan.indices(step)
        assert e == epoch
        out.append(idx)
    return out


@pytest.mark.parametrize("group_size", [1, 50])
def test_each_epoch_visits_every_sequence_once(prep: Prepared, group_size: int) -> None:
    n = len(prep.train)
    plan = BatchPlan(prep.train.lengths, 24, seed=3, group_size=group_size)
    assert plan.steps_per_epoch == math.ceil(n / 24)
    for epoch in range(3):
        batches = epoch_batches(plan, epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))
        sizes = sorted(len(b) for b in batches)
        assert sizes == [n % 24 or 24] + [24] * (len(batches) - 1)


def test_indices_are_a_pure_function_of_seed_and_step(prep: Prepared) -> None:
    lengths = prep.train.lengths
    sequential = BatchPlan(lengths, 16, seed=5, group_size=50)
    total = 4 * sequential.steps_per_epoch
    reference = [sequential.indices(s)[1].copy() for s in range(total)]
    for step in (total - 1, 37, 3, 37, 0, 2 * sequential.steps_per_epoch + 1):
        fresh = BatchPlan(lengths, 16, seed=5, group_size=50)  # as after a restart
        epoch, idx = fresh.indices(step)
        assert epoch == step // sequential.steps_per_epoch
        np.testing.assert_array_equal(idx, reference[step])
    jumping = BatchPlan(lengths, 16, seed=5, group_size=50)
    for step in (40, 2, 70, 2, 41):
        np.testing.assert_array_equal(jumping.indices(step)[1], reference[step])


def test_seeds_and_epochs_give_different_orders(prep: Prepared) -> None:
    lengths = prep.train.lengths
    for group_size in (1, 50):
        a = BatchPlan(lengths, 16, seed=1, group_size=group_size)
        b = BatchPlan(lengths, 16, seed=2, group_size=group_size)
        a0, a1, b0 = epoch_batches(a, 0), epoch_batches(a, 1), epoch_batches(b, 0)
        assert not np.array_equal(np.concatenate(a0), np.concatenate(a1))
        assert not np.array_equal(np.concatenate(a0), np.concatenate(b0))
        assert not np.array_equal(np.concatenate(a0), np.arange(len(lengths)))


def padding_fraction(lengths: np.ndarray, plan: BatchPlan, epoch: int) -> float:
    padded = real = 0
    for idx in epoch_batches(plan, epoch):
        real += int(lengths[idx].sum())
        padded += int(lengths[idx].max()) * len(idx)
    return 1 - real / padded


def test_length_grouping_reduces_padding() -> None:
    lengths = np.random.default_rng(0).integers(1, 127, size=3000)
    plain = BatchPlan(lengths, 16, seed=0, group_size=1)
    grouped = BatchPlan(lengths, 16, seed=0, group_size=50)
    for epoch in range(2):
        p, g = padding_fraction(lengths, plain, epoch), padding_fraction(lengths, grouped, epoch)
        assert p > 0.3  # random batches of uniform lengths waste ~45%
        assert g < p / 5
    # grouped batches are still shuffled, not served shortest first
    means = [lengths[idx].mean() for idx in epoch_batches(grouped, 0)]
    assert means != sorted(means) and means != sorted(means, reverse=True)
    assert grouped.steps_per_epoch == plain.steps_per_epoch == 188


def test_length_grouping_on_the_real_corpus(prep: Prepared) -> None:
    lengths = prep.train.lengths
    plain = BatchPlan(lengths, 8, seed=0, group_size=1)
    grouped = BatchPlan(lengths, 8, seed=0, group_size=10)
    assert padding_fraction(lengths, grouped, 0) < padding_fraction(lengths, plain, 0)


def test_total_steps() -> None:
    plan = BatchPlan(np.ones(100, dtype=np.int64), 10, seed=0)
    assert plan.steps_per_epoch == 10
    assert plan.total_steps(1, None) == 10
    assert plan.total_steps(2.5, None) == 25
    assert plan.total_steps(1.15, None) == 12  # 11.5 steps: the partial step runs
    assert plan.total_steps(0.3, None) == 3
    assert plan.total_steps(0.01, None) == 1  # never zero
    assert plan.total_steps(40, 3) == 3  # max_steps wins
    assert plan.total_steps(0.01, 500) == 500
    assert BatchPlan(np.ones(101, dtype=np.int64), 10, seed=0).steps_per_epoch == 11
    hundred = BatchPlan(np.ones(1000, dtype=np.int64), 10, seed=0)
    # 1.1 * 100 is 110.00000000000001 in floating point: still 110 steps
    assert [hundred.total_steps(e, None) for e in (1.1, 0.07, 0.55, 2.2, 2.205)] == [110, 7, 55, 220, 221]
    # a step past the first epoch belongs to the next one
    assert plan.indices(10)[0] == 1 and plan.indices(9)[0] == 0


# --- iter_batches: resume and dynamic/static masking ------------------------------------------


def test_resume_reproduces_the_same_batches(prep: Prepared) -> None:
    plan = BatchPlan(prep.train.lengths, 32, seed=7, group_size=50)
    total = plan.total_steps(2, None)
    spec = MaskSpec()
    full = list(plan.iter_batches(prep.train, prep.tokenizer, spec, 0, total, static_masking=False))
    assert [s for s, _, _ in full] == list(range(total))
    start = total // 2 + 1
    fresh = BatchPlan(prep.train.lengths, 32, seed=7, group_size=50)
    resumed = list(fresh.iter_batches(prep.train, prep.tokenizer, spec, start, total, static_masking=False))
    assert [s for s, _, _ in resumed] == list(range(start, total))
    for (s1, e1, b1), (s2, e2, b2) in zip(full[start:], resumed):
        assert (s1, e1) == (s2, e2)
        np.testing.assert_array_equal(b1.input_ids, b2.input_ids)
        np.testing.assert_array_equal(b1.labels, b2.labels)
        np.testing.assert_array_equal(b1.attention_mask, b2.attention_mask)


def masks_by_sentence(plan: BatchPlan, prep: Prepared, epoch: int, static: bool) -> dict[int, np.ndarray]:
    steps = plan.steps_per_epoch
    out = {}
    batches = plan.iter_batches(prep.train, prep.tokenizer, MaskSpec(), epoch * steps, (epoch + 1) * steps, static)
    for step, _, batch in batches:
        _, idx = plan.indices(step)
        for b, i in enumerate(idx):
            n = len(prep.train[int(i)]) + 2
            out[int(i)] = batch.labels[b, :n].copy()
    return out


def test_dynamic_masking_changes_per_epoch_static_does_not(prep: Prepared) -> None:
    plan = BatchPlan(prep.train.lengths, 32, seed=7, group_size=50)
    long_ones = [i for i in range(len(prep.train)) if len(prep.train[i]) >= 10]
    dyn0, dyn1 = masks_by_sentence(plan, prep, 0, False), masks_by_sentence(plan, prep, 1, False)
    differ = [not np.array_equal(dyn0[i], dyn1[i]) for i in long_ones]
    assert np.mean(differ) > 0.9
    st0, st1 = masks_by_sentence(plan, prep, 0, True), masks_by_sentence(plan, prep, 2, True)
    assert all(np.array_equal(st0[i], st1[i]) for i in range(len(prep.train)))


# --- fixed evaluation batches -------------------------------------------------------------------


def eval_masks(prep: Prepared, batch_size: int, passes: int = 1, seed: int = 1234) -> list[dict[int, tuple]]:
    corpus = prep.heldout
    per_pass: list[dict[int, tuple]] = [{} for _ in range(passes)]
    n_batches = math.ceil(len(corpus) / batch_size)
    batches = list(fixed_eval_batches(corpus, prep.tokenizer, MaskSpec(), seed, batch_size, passes))
    assert len(batches) == passes * n_batches
    for k, batch in enumerate(batches):
        p, start = divmod(k, n_batches)
        for b in range(batch.input_ids.shape[0]):
            i = start * batch_size + b
            n = len(corpus[i]) + 2
            per_pass[p][i] = (batch.input_ids[b, :n].tolist(), batch.labels[b, :n].tolist())
    for masks in per_pass:
        assert sorted(masks) == list(range(len(corpus)))  # corpus order, every sentence once
    return per_pass


def test_eval_masks_are_fixed_and_independent_of_batch_size(prep: Prepared) -> None:
    (a,) = eval_masks(prep, 4)
    (b,) = eval_masks(prep, 4)
    (c,) = eval_masks(prep, 64)
    (d,) = eval_masks(prep, 7)
    assert a == b
    assert a == c  # batch size changes the padding, never the mask
    assert a == d
    selected = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in a.values())
    assert selected > 0


def test_eval_passes_draw_different_masks(prep: Prepared) -> None:
    passes = eval_masks(prep, 8, passes=3)
    (single,) = eval_masks(prep, 8, passes=1)
    assert passes[0] == single  # pass p's mask does not depend on how many passes run
    long_ones = [i for i in range(len(prep.heldout)) if len(prep.heldout[i]) >= 10]
    for p, q in ((0, 1), (1, 2), (0, 2)):
        differ = [passes[p][i][1] != passes[q][i][1] for i in long_ones]
        assert np.mean(differ) > 0.9
    (other_seed,) = eval_masks(prep, 8, seed=99)
    assert np.mean([other_seed[i][1] != single[i][1] for i in long_ones]) > 0.9
