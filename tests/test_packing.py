"""Token-budget plans, packing, sparse prediction, the prefetching loader and the schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlm_core.data import collate, eval_sample
from mlm_core.loader import Prefetcher, step_batches
from mlm_core.masking import IGNORE_INDEX, MaskSpec
from mlm_core.model import BertForMaskedLM, ModelConfig, mlm_loss
from mlm_core.packing import TokenBatchPlan, block_diagonal_mask, collate_packed, pack_rows, step_model_flops
from mlm_core.schedule import budget_lr_factor


def test_pack_rows_first_fit_decreasing_fills_rows_within_capacity():
    costs = [60, 10, 50, 30, 64, 5, 40, 20]
    rows = pack_rows(costs, 64)
    assert sorted(i for r in rows for i in r) == list(range(len(costs)))
    assert all(sum(costs[i] for i in r) <= 64 for r in rows)
    assert len(rows) == 5  # sum 279 -> at least 5 rows of 64, FFD reaches it
    assert pack_rows([65, 3], 64) == [[0], [1]]  # an oversize item gets a row of its own


def test_plan_covers_each_epoch_once_within_the_budget(merosu):
    lengths = merosu.train.lengths
    plan = TokenBatchPlan(lengths, 400, seed=3)
    for epoch in (0, 1):
        batches = plan.epoch_batches(epoch)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(lengths)))
        assert all((lengths[b] + 2).sum() <= 400 for b in batches)
        # greedy cut: the next sentence would not have fitted
        assert all((lengths[a] + 2).sum() + lengths[b[0]] + 2 > 400 for a, b in zip(batches, batches[1:]))
    assert not np.array_equal(np.concatenate(plan.epoch_batches(0)), np.concatenate(plan.epoch_batches(1)))


def test_plan_is_a_pure_function_of_seed_and_micro_index(merosu):
    lengths = merosu.train.lengths
    a, b = TokenBatchPlan(lengths, 300, seed=1), TokenBatchPlan(lengths, 300, seed=1)
    per_epoch = a.batches_in_epoch(0)
    probes = [0, per_epoch - 1, per_epoch, 3 * per_epoch + 2]
    forward = [a.indices(m) for m in probes]
    backward = [b.indices(m) for m in reversed(probes)][::-1]  # other order of access, same answer
    for (e1, i1), (e2, i2) in zip(forward, backward):
        assert e1 == e2 and np.array_equal(i1, i2)
    assert a.indices(per_epoch)[0] == 1
    assert a.total_micro_batches(1.0) == per_epoch
    assert a.total_micro_batches(1.5) == per_epoch + -(-a.batches_in_epoch(1) // 2)
    with pytest.raises(ValueError, match="tokens_per_batch \\(10\\).*--tokens-per-batch"):
        TokenBatchPlan(lengths, 10, seed=0)


def test_packed_batch_keeps_each_sentences_mask_and_restarts_positions(merosu):
    tok, corpus = merosu.tokenizer, merosu.train
    idx = np.arange(20, 45)
    keys = [(7, int(i), 0) for i in idx]
    spec = MaskSpec(rate=0.3)
    padded = collate(corpus, idx, tok, spec, keys)
    packed = collate_packed(corpus, idx, tok, spec, keys, max_length=64)
    R, T = packed.input_ids.shape
    assert T <= 64 and R < len(idx)  # several sentences share a row
    assert packed.n_tokens == int((corpus.lengths[idx] + 2).sum()) == padded.n_tokens
    assert packed.padding_share == pytest.approx(1 - packed.n_tokens / (R * T))
    flat_lab = np.full(R * T, IGNORE_INDEX)
    flat_lab[packed.masked_positions] = packed.masked_labels
    # recover each sentence from its segment and compare with the padded collate row by row
    found = 0
    for r in range(R):
        for s in range(1, packed.segment_ids[r].max() + 1):
            cols = np.flatnonzero(packed.segment_ids[r] == s)
            assert packed.position_ids[r, cols].tolist() == list(range(len(cols)))
            ids = packed.input_ids[r, cols]
            labels = flat_lab[r * T + cols]
            match = [b for b in range(len(idx)) if np.array_equal(padded.input_ids[b, : len(cols)], ids)
                     and padded.attention_mask[b].sum() == len(cols)]
            assert match, "a packed sentence differs from its padded, masked form"
            assert np.array_equal(padded.labels[match[0], : len(cols)], labels)
            found += 1
    assert found == len(idx)
    assert (packed.input_ids[packed.segment_ids == 0] == tok.pad_id).all()


def _tiny_model(vocab_size: int) -> BertForMaskedLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    return BertForMaskedLM(cfg).eval()


def test_a_sentence_predicts_the_same_alone_and_packed(merosu):
    """Block-diagonal attention + restarting positions: packing partners change nothing."""
    tok, corpus = merosu.tokenizer, merosu.train
    model = _tiny_model(len(tok))
    idx = np.arange(0, 30)
    keys = [(0, int(i)) for i in idx]
    spec = MaskSpec()
    packed = collate_packed(corpus, idx, tok, spec, keys, max_length=64)
    with torch.no_grad():
        seg = torch.from_numpy(packed.segment_ids)
        logits_packed, _ = model(torch.from_numpy(packed.input_ids), attention_mask=block_diagonal_mask(seg),
                                 position_ids=torch.from_numpy(packed.position_ids))
        checked = 0
        for r in range(packed.input_ids.shape[0]):
            for s in range(1, int(seg[r].max()) + 1):
                cols = np.flatnonzero(packed.segment_ids[r] == s)
                alone, _ = model(torch.from_numpy(packed.input_ids[r, cols])[None])
                torch.testing.assert_close(logits_packed[r, cols], alone[0], atol=2e-5, rtol=1e-4)
                checked += 1
    assert checked == len(idx) and packed.input_ids.shape[0] < len(idx)


def test_sparse_prediction_gives_the_dense_loss_and_gradients(merosu):
    tok, corpus = merosu.tokenizer, merosu.train
    idx = np.arange(40, 70)
    packed = collate_packed(corpus, idx, tok, MaskSpec(), [(0, int(i)) for i in idx], max_length=64)
    inputs = dict(input_ids=torch.from_numpy(packed.input_ids),
                  attention_mask=block_diagonal_mask(torch.from_numpy(packed.segment_ids)),
                  position_ids=torch.from_numpy(packed.position_ids))
    dense_model, sparse_model = _tiny_model(len(tok)), _tiny_model(len(tok))
    dense_labels = torch.full((packed.input_ids.size,), IGNORE_INDEX)
    dense_labels[packed.masked_positions] = torch.from_numpy(packed.masked_labels)
    dense_logits, dense_loss = dense_model(**inputs, labels=dense_labels.view(packed.input_ids.shape))
    sparse_logits, sparse_loss = sparse_model(**inputs, labels=torch.from_numpy(packed.masked_labels),
                                              masked_positions=torch.from_numpy(packed.masked_positions))
    assert sparse_logits.shape == (len(packed.masked_positions), len(tok))
    torch.testing.assert_close(sparse_loss, dense_loss)
    torch.testing.assert_close(sparse_loss, mlm_loss(dense_logits.flatten(0, 1)[packed.masked_positions],
                                                     torch.from_numpy(packed.masked_labels)))
    dense_loss.backward()
    sparse_loss.backward()
    for (name, a), b in zip(dense_model.named_parameters(), sparse_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_model_flops_count_useful_work_only(merosu):
    tok, corpus = merosu.tokenizer, merosu.train
    idx = np.arange(0, 10)
    packed = collate_packed(corpus, idx, tok, MaskSpec(), [(0, int(i)) for i in idx], max_length=64)
    lengths = corpus.lengths[idx] + 2
    expected = (6 * 1000 * lengths.sum() + 12 * 2 * 32 * (lengths.astype(float) ** 2).sum()
                + 6 * (32 * 32 + 32 * 100) * len(packed.masked_positions))
    assert step_model_flops(packed, 1000, 2, 32, 100) == pytest.approx(expected)


def test_ranks_split_each_step_and_together_read_the_single_process_batches(merosu):
    tok, corpus = merosu.tokenizer, merosu.train
    plan = TokenBatchPlan(corpus.lengths, 300, seed=0)
    common = dict(max_length=64, grad_accum=4, start_step=2, stop_step=5, static_masking=False)
    single = list(step_batches(plan, corpus, tok, MaskSpec(), **common))
    ranks = [list(step_batches(plan, corpus, tok, MaskSpec(), rank=r, world=2, **common)) for r in (0, 1)]
    assert [s.step for s in single] == [2, 3, 4]
    for s, r0, r1 in zip(single, *ranks):
        assert len(r0.micro) == len(r1.micro) == 2 and len(s.micro) == 4
        for a, b in zip(s.micro, r0.micro + r1.micro):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.masked_labels, b.masked_labels)
    with pytest.raises(ValueError, match="grad_accum \\(3\\) must be a multiple.*\\(2\\)"):
        next(step_batches(plan, corpus, tok, MaskSpec(), **{**common, "grad_accum": 3}, rank=0, world=2))


def test_prefetcher_yields_the_same_items_and_raises_producer_errors():
    assert list(Prefetcher(iter(range(50)), depth=3)) == list(range(50))
    assert list(Prefetcher(iter(range(5)), depth=0)) == list(range(5))

    def broken():
        yield 1
        raise RuntimeError("loader broke")

    it = iter(Prefetcher(broken(), depth=2))
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="loader broke"):
        next(it)
    endless = Prefetcher(iter(int, 1), depth=2)  # never ends; close() must still stop the thread
    next(iter(endless))
    endless.close()
    assert not endless._thread.is_alive()


def test_budget_schedule_rises_then_decays_to_zero():
    f = [budget_lr_factor(p / 100, 0.1) for p in range(101)]
    assert f[0] > 0 and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))
    assert all(a > b for a, b in zip(f[10:], f[11:]))
    assert f[100] == 0.0 and budget_lr_factor(1.5, 0.1) == 0.0
    assert budget_lr_factor(0.5, 0.0) == pytest.approx(0.5)


def test_eval_sample_is_fixed_seeded_and_only_when_needed():
    assert eval_sample(100, None, 0) is None and eval_sample(100, 100, 0) is None
    a, b = eval_sample(1000, 50, 1234), eval_sample(1000, 50, 1234)
    assert np.array_equal(a, b) and len(np.unique(a)) == 50 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, eval_sample(1000, 50, 1))
