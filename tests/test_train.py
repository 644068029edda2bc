"""Training loop, checkpoints and resume, on the real embedded corpus with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlm_core.checkpoint import (
    CONFIG,
    MODEL,
    OPTIMIZER,
    TRAINER,
    VOCAB,
    latest_checkpoint,
    list_checkpoints,
    load_pretrained,
    load_training_state,
    save_checkpoint,
)
from mlm_core.config import EvalConfig, RuntimeConfig, TrainConfig
from mlm_core.evaluate import evaluate_heldout, fill_mask, unigram_counts
from mlm_core.model import BertForMaskedLM
from mlm_core.train import TrainCallback, lr_factor, model_config_for, train_model

TINY = dict(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64,
    batch_size=16, learning_rate=3e-3, checkpoint_every=4, keep_checkpoints=2,
)
CPU = RuntimeConfig(device="cpu")


class Interrupt(Exception):
    pass


class Recorder(TrainCallback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.logged: list[tuple[int, dict]] = []
        self.history: list[list[float]] | None = None
        self.checkpoints: list[int] = []
        self.info: dict | None = None

    def on_start(self, info):
        self.info = info

    def on_history(self, history):
        self.history = history

    def on_log(self, step, metrics):
        self.logged.append((step, metrics))
        if self.stop_at is not None and step == self.stop_at:
            raise Interrupt(f"simulated crash at step {step}")

    def on_checkpoint(self, step, path):
        self.checkpoints.append(step)


def _params(model_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_pretrained(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warmup_then_linear_decay():
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm) for s in range(total)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))  # rising during warm-up
    assert all(a > b for a, b in zip(factors[10:], factors[11:]))  # then strictly falling
    assert factors[-1] == pytest.approx(1 / 90)
    assert lr_factor(total, total, warm) == 0.0


def test_training_lowers_the_loss_and_writes_checkpoints(merosu, tmp_path):
    cfg = TrainConfig(**TINY, max_steps=40)
    rec = Recorder()
    result = train_model(
        merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "run", data_fingerprint=merosu.data_fingerprint,
        callback=rec,
    )
    losses = [m["train/loss"] for _, m in rec.logged]
    assert len(losses) == 40 and [s for s, _ in rec.logged] == list(range(1, 41))
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert all(m["train/tokens_per_s"] > 0 for _, m in rec.logged)
    assert rec.info["parameters"] == sum(p.numel() for p in BertForMaskedLM(
        model_config_for(cfg, len(merosu.tokenizer), 0)).parameters())
    # every 4 steps and at the end; only the last two are kept
    assert rec.checkpoints == list(range(4, 41, 4))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000036", "step-0000040"]
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    for name in (CONFIG, VOCAB, MODEL, OPTIMIZER, TRAINER):
        assert (ckpt / name).is_file(), name
    meta = json.loads((ckpt / CONFIG).read_text())
    assert meta["step"] == 40 and meta["model"]["vocab_size"] == len(merosu.tokenizer)
    assert (ckpt / VOCAB).read_text(encoding="utf-8").split("\n")[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    state = torch.load(ckpt / TRAINER, weights_only=True)
    assert state["step"] == 40 and len(state["history"]) == 40 and "torch" in state["rng"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"
    # the exported model and the final checkpoint hold the same weights
    final, last = _params(result.model_dir), _params(ckpt)
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)


def test_checkpoint_round_trip_restores_every_tensor(merosu, tmp_path):
    cfg = TrainConfig(**TINY)
    torch.manual_seed(0)
    model = BertForMaskedLM(model_config_for(cfg, len(merosu.tokenizer), 0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    ids = torch.randint(5, len(merosu.tokenizer), (4, 12))
    for _ in range(3):  # give the optimizer real state to save
        _, loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    path = save_checkpoint(tmp_path, 3, model, merosu.tokenizer, opt, sched, [[1, 2.0, 0.1]], {"fingerprint": "x"}, 2)
    rng_after_save = torch.get_rng_state()

    torch.manual_seed(123)  # a different model, optimizer, schedule and RNG
    model2 = BertForMaskedLM(model_config_for(cfg, len(merosu.tokenizer), 0))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    assert not torch.equal(model2.embeddings.word.weight, model.embeddings.word.weight)
    state = load_training_state(path, model2, opt2, sched2, torch.device("cpu"))

    assert state["step"] == 3 and state["history"] == [[1, 2.0, 0.1]]
    for (k, a), (k2, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for name, value in s1["state"][pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][pid][name])), (pid, name)
    assert sched2.state_dict()["last_epoch"] == 3
    assert torch.equal(torch.get_rng_state(), rng_after_save)
    # the same checkpoint also loads as a standalone model for inference
    standalone, tok = load_pretrained(path)
    assert tok.vocab == merosu.tokenizer.vocab
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), standalone.state_dict().values()))


@pytest.mark.parametrize("masking", ["dynamic", "static"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(merosu, tmp_path, masking):
    cfg = TrainConfig(**TINY, max_steps=12, masking=masking)
    args = dict(data_fingerprint=merosu.data_fingerprint)
    full = Recorder()
    train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "a", callback=full, **args)

    crashed = Recorder(stop_at=7)  # dies after step 7; the last checkpoint is step 4
    with pytest.raises(Interrupt):
        train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "b", callback=crashed, **args)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-0000004"
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "running"
    assert not (tmp_path / "b" / "model").exists()

    resumed = Recorder()
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "b", resume=True, callback=resumed, **args)
    assert result.resumed_from_step == 4
    assert [s for s, _ in resumed.logged] == list(range(5, 13))  # continues at the same step
    # the loss curve continues: history up to the checkpoint, then the same losses as the full run
    assert [h[0] for h in resumed.history] == [1, 2, 3, 4]
    full_losses = [m["train/loss"] for _, m in full.logged]
    assert [h[1] for h in resumed.history] == full_losses[:4]
    assert [m["train/loss"] for _, m in resumed.logged] == full_losses[4:]
    assert [h[1] for h in result.history] == full_losses
    a, b = _params(tmp_path / "a" / "model"), _params(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_resume_refuses_a_checkpoint_from_other_settings(merosu, tmp_path):
    cfg = TrainConfig(**TINY, max_steps=4)
    train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "r", data_fingerprint=merosu.data_fingerprint)
    other = cfg.model_copy(update={"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="other data or settings"):
        train_model(
            merosu.train, merosu.tokenizer, other, CPU, tmp_path / "r", data_fingerprint=merosu.data_fingerprint,
            resume=True,
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_model(
            merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "empty", data_fingerprint=merosu.data_fingerprint,
            resume=True,
        )


def test_static_and_dynamic_masking_differ_only_after_the_first_epoch(merosu, tmp_path):
    """Static masking reuses a sentence's mask every epoch; dynamic draws a new one."""
    from mlm_core.data import BatchPlan
    from mlm_core.masking import MaskSpec

    plan = BatchPlan(merosu.train.lengths, 16, seed=0, group_size=1)
    spe = plan.steps_per_epoch
    epoch_steps = {e: range(e * spe, (e + 1) * spe) for e in (0, 1)}

    def masks(static: bool) -> dict[int, dict[int, tuple]]:
        out: dict[int, dict[int, tuple]] = {0: {}, 1: {}}
        for e, steps in epoch_steps.items():
            for step, _, batch in plan.iter_batches(
                merosu.train, merosu.tokenizer, MaskSpec(), steps.start, steps.stop, static_masking=static
            ):
                _, idx = plan.indices(step)
                for row, i in enumerate(idx):
                    out[e][int(i)] = tuple((batch.labels[row] != -100).nonzero()[0])
        return out

    static, dynamic = masks(True), masks(False)
    assert static[0] == static[1]
    same = sum(dynamic[0][i] == dynamic[1][i] for i in dynamic[0])
    assert same < 0.3 * len(dynamic[0])


def test_evaluation_metrics_are_consistent_and_fill_mask_returns_top_k(merosu, tmp_path):
    cfg = TrainConfig(**TINY, max_steps=30)
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "e", data_fingerprint=merosu.data_fingerprint)
    model, tok = load_pretrained(result.model_dir)
    counts = unigram_counts(merosu.train, len(tok))
    assert counts.sum() == merosu.train.num_tokens
    m1 = evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=2))
    m2 = evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=2, batch_size=7))
    assert m1 == pytest.approx(m2)  # fixed mask: independent of batching
    assert m1["eval/masked_tokens"] > 0
    assert 0.0 <= m1["eval/top1_accuracy"] <= m1["eval/top5_accuracy"] <= 1.0
    assert m1["eval/unigram_top1_accuracy"] <= m1["eval/unigram_top5_accuracy"]
    assert m1["eval/perplexity"] == pytest.approx(torch.tensor(m1["eval/loss"]).exp().item(), rel=1e-5)
    preds = fill_mask(model, tok, "メロスは[MASK]した。", top_k=5)
    assert len(preds) == 1 and len(preds[0]) == 5
    assert all(t not in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]") for t, _ in preds[0])
    assert not any(t.startswith("##") for t, _ in preds[0])  # a [MASK] stands for a whole word
    wide = fill_mask(model, tok, "メロスは[MASK]した。", top_k=len(tok) // 2)[0]
    assert not any(t.startswith("##") for t, _ in wide)  # however deep the list goes
    probs = [p for _, p in preds[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        fill_mask(model, tok, "メロスは激怒した。")


def test_evaluation_equals_a_full_logits_computation(merosu, tmp_path):
    """Scoring only masked positions must give exactly what full (B, T, V) logits give."""
    from mlm_core.data import fixed_eval_batches
    from mlm_core.masking import MaskSpec

    cfg = TrainConfig(**TINY, max_steps=10)
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "f", data_fingerprint=merosu.data_fingerprint)
    model, tok = load_pretrained(result.model_dir)
    ecfg = EvalConfig(passes=2, batch_size=16)
    metrics = evaluate_heldout(model, tok, merosu.heldout, unigram_counts(merosu.train, len(tok)), ecfg)

    spec = MaskSpec(rate=ecfg.mask_rate, mask_token_prob=1.0, random_token_prob=0.0)
    total, n, top1 = 0.0, 0, 0
    with torch.no_grad():
        for batch in fixed_eval_batches(merosu.heldout, tok, spec, ecfg.seed, 16, ecfg.passes):
            logits, _ = model(torch.from_numpy(batch.input_ids), attention_mask=torch.from_numpy(batch.attention_mask))
            labels = torch.from_numpy(batch.labels)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            scored = labels != -100
            n += int(scored.sum())
            top1 += int((logits.argmax(-1)[scored] == labels[scored]).sum())
            # every scored position reads [MASK] at evaluation
            assert (torch.from_numpy(batch.input_ids)[scored] == tok.mask_id).all()
    assert metrics["eval/masked_tokens"] == n
    assert metrics["eval/loss"] == pytest.approx(total / n, rel=1e-5)
    assert metrics["eval/top1_accuracy"] == pytest.approx(top1 / n)


def test_steps_log_padding_share_and_mfu_and_accumulate_micro_batches(merosu, tmp_path):
    cfg = TrainConfig(**{**TINY, "tokens_per_batch": 256, "grad_accum": 3}, max_steps=4)
    rec = Recorder()
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "m",
                         data_fingerprint=merosu.data_fingerprint, callback=rec)
    assert rec.info["tokens_per_step"] == 768 and rec.info["processes"] == 1
    for _, m in rec.logged:
        assert 0.0 <= m["train/padding_share"] < 0.5  # packed rows: little padding
        assert 0.0 < m["train/mfu"] < 1.0
        assert m["train/masked_tokens"] > 0
    # three micro-batches of at most 256 tokens each per step: more than two budgets' worth
    assert 2 * 256 < result.tokens_seen / 4 <= 3 * 256


def test_budget_run_stops_on_time_and_saves_the_schedule_position(merosu, tmp_path):
    cfg = TrainConfig(**TINY, budget_minutes=0.05, warmup_ratio=0.2)  # 3 seconds
    rec = Recorder()
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "b",
                         data_fingerprint=merosu.data_fingerprint, callback=rec)
    lrs = [m["train/lr"] for _, m in rec.logged]
    used = [m["train/budget_used"] for _, m in rec.logged]
    assert result.steps == len(lrs) > 3 and used[-1] == 1.0 and used == sorted(used)
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and lrs[-1] < 0.5 * max(lrs) and max(lrs) <= cfg.learning_rate
    state = torch.load(latest_checkpoint(tmp_path / "b" / "checkpoints") / TRAINER, weights_only=True)
    assert state["elapsed_s"] >= 3.0 and state["step"] == result.steps
    assert json.loads((tmp_path / "b" / "run.json").read_text())["steps"] == result.steps

    # resuming a spent budget continues from the saved position: one more step at most, at lr ~0
    again = Recorder()
    train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "b", data_fingerprint=merosu.data_fingerprint,
                resume=True, callback=again)
    assert [s for s, _ in again.logged] == [result.steps + 1]
    assert again.logged[0][1]["train/lr"] == 0.0


def test_evaluation_of_a_sample_scores_the_sampled_sentences_with_their_own_masks(merosu, tmp_path):
    from mlm_core.data import eval_sample

    cfg = TrainConfig(**TINY, max_steps=2)
    result = train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "s", data_fingerprint=merosu.data_fingerprint)
    model, tok = load_pretrained(result.model_dir)
    counts = unigram_counts(merosu.train, len(tok))
    full = evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=1))
    assert full["eval/sentences"] == len(merosu.heldout)  # the default sample is larger: all, as before
    assert full == evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=1, max_sentences=None))
    k = len(merosu.heldout) // 2
    part = evaluate_heldout(model, tok, merosu.heldout, counts, EvalConfig(passes=1, max_sentences=k))
    assert part["eval/sentences"] == k and 0 < part["eval/masked_tokens"] < full["eval/masked_tokens"]
    # the sampled sentences keep the masks they have in the full evaluation
    from mlm_core.data import fixed_eval_batches
    from mlm_core.masking import MaskSpec

    chosen = eval_sample(len(merosu.heldout), k, EvalConfig().seed)
    spec = MaskSpec(rate=0.15, mask_token_prob=1.0, random_token_prob=0.0)
    alone = list(fixed_eval_batches(merosu.heldout, tok, spec, EvalConfig().seed, 1, 1))
    assert part["eval/masked_tokens"] == sum(int((alone[i].labels != -100).sum()) for i in chosen)


def test_cli_options_for_fast_and_distributed_training_reach_the_configs():
    from flows.cli import build_parser, configs_from_args

    ns = build_parser().parse_args([
        "pretrain", "--tokens-per-batch", "4096", "--grad-accum", "4", "--budget-minutes", "10",
        "--eval-max-sentences", "3000", "--compile", "--prefetch", "0", "--peak-tflops", "989",
        "--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:29500", "--rdzv-id", "job7",
    ])
    c = configs_from_args(ns)
    assert (c["train"].tokens_per_batch, c["train"].grad_accum, c["train"].budget_minutes) == (4096, 4, 10.0)
    assert c["evaluate"].max_sentences == 3000
    r = c["runtime"]
    assert (r.compile, r.prefetch, r.peak_tflops, r.nproc_per_node, r.nnodes) == (True, 0, 989.0, 2, 2)
    assert (r.rdzv_endpoint, r.rdzv_id, r.distributed) == ("10.0.0.1:29500", "job7", True)
    assert configs_from_args(build_parser().parse_args(["pretrain"]))["runtime"].compile is False
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        RuntimeConfig(nnodes=2)


def test_worker_processes_collate_the_same_batches_as_the_thread(merosu, tmp_path):
    """--loader-workers: batches collated in processes train exactly the same weights, a
    resume with workers continues exactly, and no worker outlives the run."""
    import multiprocessing

    cfg = TrainConfig(**TINY, max_steps=8, masking="dynamic")
    args = dict(data_fingerprint=merosu.data_fingerprint)
    thread, workers = Recorder(), Recorder()
    train_model(merosu.train, merosu.tokenizer, cfg, CPU, tmp_path / "a", callback=thread, **args)
    pool = RuntimeConfig(device="cpu", loader_workers=2)
    train_model(merosu.train, merosu.tokenizer, cfg, pool, tmp_path / "b", callback=workers, **args)
    assert [m["train/loss"] for _, m in workers.logged] == [m["train/loss"] for _, m in thread.logged]
    a, b = _params(tmp_path / "a" / "model"), _params(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)

    crashed = Recorder(stop_at=6)
    with pytest.raises(Interrupt):
        train_model(merosu.train, merosu.tokenizer, cfg, pool, tmp_path / "c", callback=crashed, **args)
    assert not multiprocessing.active_children(), "a loader worker outlived the interrupted run"
    result = train_model(merosu.train, merosu.tokenizer, cfg, pool, tmp_path / "c", resume=True, **args)
    assert result.resumed_from_step == 4
    c = _params(tmp_path / "c" / "model")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not multiprocessing.active_children()
