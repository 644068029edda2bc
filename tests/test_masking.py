"""Tests for mlm_core.masking: seeded, per-row masked-LM masking."""

from __future__ import annotations

import numpy as np
import pytest

from mlm_core.masking import IGNORE_INDEX, MaskSpec, mask_batch

PAD, CLS, SEP, MASK = 0, 2, 3, 4
FIRST_REGULAR = 5
VOCAB = 1000


def make_batch(rng: np.random.Generator, B: int = 32, T: int = 64, min_len: int = 0):
    """Rows of [CLS] w1..wn [SEP] [PAD]...; maskable only at the words."""
    ids = np.full((B, T), PAD, dtype=np.int64)
    maskable = np.zeros((B, T), dtype=bool)
    lengths = rng.integers(min_len, T - 1, size=B)  # words per row, 0..T-2
    for b, n in enumerate(lengths):
        ids[b, 0] = CLS
        ids[b, 1 : n + 1] = rng.integers(FIRST_REGULAR, VOCAB, size=n)
        ids[b, n + 1] = SEP
        maskable[b, 1 : n + 1] = True
    return ids, maskable


def run(ids, maskable, keys, spec=MaskSpec()):
    return mask_batch(ids, maskable, keys, spec, mask_id=MASK, vocab_size=VOCAB, first_regular_id=FIRST_REGULAR)


def check_invariants(ids, maskable, masked, labels) -> None:
    selected = labels != IGNORE_INDEX
    assert masked.dtype == np.int64 and labels.dtype == np.int64
    assert masked.shape == labels.shape == ids.shape
    # only maskable positions are ever selected, and their label is the original id
    assert not (selected & ~maskable).any()
    np.testing.assert_array_equal(labels[selected], ids[selected])
    # nothing outside the selection changes: specials, padding and unselected words
    np.testing.assert_array_equal(masked[~selected], ids[~selected])
    # every selected position holds [MASK], a regular id, or its own id
    changed = masked[selected]
    assert ((changed == MASK) | ((changed >= FIRST_REGULAR) & (changed < VOCAB))).all()


@pytest.fixture(scope="module")
def many_batches():
    """200 batches of 32 x 64 with varied lengths and padding, dynamic keys."""
    rng = np.random.default_rng(7)
    out = []
    for step in range(200):
        ids, maskable = make_batch(rng)
        keys = [(0, step * 32 + b, 0) for b in range(32)]
        out.append((ids, maskable, keys))
    return out


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.5])
def test_statistics_over_many_batches(many_batches, rate: float) -> None:
    spec = MaskSpec(rate=rate)
    n_maskable = n_selected = n_mask = n_random = n_kept = 0
    per_row_error = []
    for ids, maskable, keys in many_batches:
        masked, labels = run(ids, maskable, keys, spec)
        check_invariants(ids, maskable, masked, labels)
        selected = labels != IGNORE_INDEX
        n_maskable += int(maskable.sum())
        n_selected += int(selected.sum())
        n_mask += int((masked[selected] == MASK).sum())
        n_kept += int((masked[selected] == ids[selected]).sum())
        n_random += int(((masked[selected] != MASK) & (masked[selected] != ids[selected])).sum())
        # each row selects floor or ceil of rate * its maskable count
        per_row_error.append(selected.sum(axis=1) - rate * maskable.sum(axis=1))
    assert n_maskable > 180_000
    errors = np.concatenate(per_row_error)
    assert (errors > -1).all() and (errors < 1).all()
    # Only the rounding is random: the share's std is ~sqrt(rows/4)/n ~ 2e-4.
    assert abs(n_selected / n_maskable - rate) < 0.002
    assert abs(errors.mean()) < 0.03  # the rounding is unbiased
    # 80/10/10 among ~27k..90k selected tokens: std <= 0.0025; a random id equal to the
    # original (p ~ 1/995) counts as kept, a 0.01% shift
    assert abs(n_mask / n_selected - 0.8) < 0.012
    assert abs(n_random / n_selected - 0.1) < 0.01
    assert abs(n_kept / n_selected - 0.1) < 0.01
    assert n_mask + n_random + n_kept == n_selected


def test_random_replacements_cover_the_regular_ids_uniformly(many_batches) -> None:
    spec = MaskSpec(rate=0.5, mask_token_prob=0.0, random_token_prob=1.0)
    replacements = []
    for ids, maskable, keys in many_batches[:100]:
        masked, labels = run(ids, maskable, keys, spec)
        check_invariants(ids, maskable, masked, labels)
        selected = labels != IGNORE_INDEX
        assert not (masked[selected] == MASK).any()
        replacements.append(masked[selected])
    r = np.concatenate(replacements)
    assert r.min() >= FIRST_REGULAR and r.max() < VOCAB
    # ~90k draws over 995 ids: every id appears, and no bucket is far off uniform
    counts = np.bincount(r - FIRST_REGULAR, minlength=VOCAB - FIRST_REGULAR)
    assert (counts > 0).all()
    assert counts.max() < 2 * counts.mean()


def test_mask_only_and_keep_only_specs(many_batches) -> None:
    ids, maskable, keys = many_batches[0]
    masked, labels = run(ids, maskable, keys, MaskSpec(mask_token_prob=1.0, random_token_prob=0.0))
    selected = labels != IGNORE_INDEX
    assert selected.any() and (masked[selected] == MASK).all()
    masked, labels = run(ids, maskable, keys, MaskSpec(mask_token_prob=0.0, random_token_prob=0.0))
    assert (labels != IGNORE_INDEX).any()
    np.testing.assert_array_equal(masked, ids)  # selected for the loss, shown unchanged


def test_same_keys_give_identical_output(many_batches) -> None:
    ids, maskable, keys = many_batches[3]
    a = run(ids, maskable, keys)
    b = run(ids.copy(), maskable.copy(), [tuple(k) for k in keys])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_different_keys_give_different_masks(many_batches) -> None:
    ids, maskable, keys = many_batches[3]
    _, base = run(ids, maskable, keys)
    for other in (
        [(0, i, 1) for _, i, _ in keys],  # next epoch
        [(1, i, 0) for _, i, _ in keys],  # other seed
        [(0, i + 1, 0) for _, i, _ in keys],  # other sentence ids
    ):
        _, labels = run(ids, maskable, other)
        rows_differ = [(labels[b] != base[b]).any() for b in range(len(keys)) if maskable[b].sum() >= 8]
        assert np.mean(rows_differ) > 0.9


def test_input_arrays_are_not_modified(many_batches) -> None:
    ids, maskable, keys = many_batches[5]
    ids_before, maskable_before = ids.copy(), maskable.copy()
    run(ids, maskable, keys)
    np.testing.assert_array_equal(ids, ids_before)
    np.testing.assert_array_equal(maskable, maskable_before)


def test_a_rows_mask_does_not_depend_on_the_rest_of_the_batch() -> None:
    """Same sentence, same key: same mask whether it is alone, next to other rows, at
    another position, or padded to a longer batch (resume and evaluation rely on it)."""
    rng = np.random.default_rng(3)
    sentence = rng.integers(FIRST_REGULAR, VOCAB, size=20)
    key = (11, 42, 3)

    def row_alone(T: int):
        ids = np.full((1, T), PAD, dtype=np.int64)
        ids[0, 0], ids[0, 1:21], ids[0, 21] = CLS, sentence, SEP
        return ids, ids >= FIRST_REGULAR

    ids, maskable = row_alone(22)
    ref_masked, ref_labels = run(ids, maskable, [key])
    assert (ref_labels != IGNORE_INDEX).sum() == 3  # 0.15 * 20 = 3 exactly
    for T in (23, 40, 64, 130):
        ids, maskable = row_alone(T)
        masked, labels = run(ids, maskable, [key])
        np.testing.assert_array_equal(masked[0, :22], ref_masked[0])
        np.testing.assert_array_equal(labels[0, :22], ref_labels[0])
        assert (labels[0, 22:] == IGNORE_INDEX).all() and (masked[0, 22:] == PAD).all()
    for trial in range(5):
        others, other_mask = make_batch(np.random.default_rng(100 + trial), B=7, T=50)
        others[2], other_mask[2] = PAD, False
        others[2, :22], other_mask[2, :22] = ids[0, :22], maskable[0, :22]
        assert other_mask.sum(axis=1).max() > 20  # some neighbour is longer: padding differs
        keys = [(9, trial, r) for r in range(7)]
        keys[2] = key
        masked, labels = run(others, other_mask, keys)
        np.testing.assert_array_equal(masked[2, :22], ref_masked[0])
        np.testing.assert_array_equal(labels[2, :22], ref_labels[0])


def test_rows_without_maskable_tokens_and_empty_batches() -> None:
    ids = np.array([[CLS, SEP, PAD, PAD], [CLS, 10, 11, SEP], [PAD, PAD, PAD, PAD]], dtype=np.int64)
    maskable = ids >= FIRST_REGULAR
    masked, labels = run(ids, maskable, [(1, 0), (1, 1), (1, 2)], MaskSpec(rate=0.5))
    np.testing.assert_array_equal(masked[[0, 2]], ids[[0, 2]])
    assert (labels[[0, 2]] == IGNORE_INDEX).all()
    assert (labels[1] != IGNORE_INDEX).sum() == 1  # 0.5 * 2
    check_invariants(ids, maskable, masked, labels)

    masked, labels = run(np.zeros((0, 5), dtype=np.int64), np.zeros((0, 5), dtype=bool), [])
    assert masked.shape == labels.shape == (0, 5)
    masked, labels = run(np.zeros((2, 0), dtype=np.int64), np.zeros((2, 0), dtype=bool), [(0,), (1,)])
    assert masked.shape == labels.shape == (2, 0)


def test_short_rows_are_masked_at_the_expected_rate() -> None:
    """A 3-word row at rate 0.15 selects exactly 0 or 1 word (floor or ceil of 0.45),
    and 1 word 45% of the time, so the expected count is exact."""
    ids = np.array([[CLS, 10, 11, 12, SEP]], dtype=np.int64)
    maskable = ids >= FIRST_REGULAR
    counts = [int((run(ids, maskable, [(5, i)])[1] != IGNORE_INDEX).sum()) for i in range(2000)]
    assert set(counts) == {0, 1}
    assert abs(np.mean(counts) - 0.45) < 0.05  # std ~0.011


def test_integer_maskable_behaves_like_boolean(many_batches) -> None:
    ids, maskable, keys = many_batches[1]
    a = run(ids, maskable, keys)
    b = run(ids, maskable.astype(np.int64), keys)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_keys_are_checked_against_rows() -> None:
    ids = np.full((2, 4), FIRST_REGULAR, dtype=np.int64)
    with pytest.raises(ValueError, match="one key per row"):
        run(ids, ids >= FIRST_REGULAR, [(1, 2)])
    with pytest.raises(ValueError, match="shape"):
        run(ids, np.ones((2, 3), dtype=bool), [(1,), (2,)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0.0},
        {"rate": 1.0},
        {"rate": -0.1},
        {"rate": 1.5},
        {"mask_token_prob": -0.1},
        {"random_token_prob": -0.01},
        {"mask_token_prob": 0.95, "random_token_prob": 0.1},
    ],
)
def test_mask_spec_validation(kwargs) -> None:
    with pytest.raises(ValueError):
        MaskSpec(**kwargs)


def test_mask_spec_accepts_edges() -> None:
    assert MaskSpec(rate=0.999, mask_token_prob=1.0, random_token_prob=0.0).rate == 0.999
    assert MaskSpec(mask_token_prob=0.0, random_token_prob=1.0).random_token_prob == 1.0
    assert MaskSpec() == MaskSpec(rate=0.15, mask_token_prob=0.8, random_token_prob=0.1)
