"""Continued pre-training (``--init-from``): a small IPAdic checkpoint built with transformers
goes through the real pipeline (Prefect + MLflow), which splits words with IPAdic, adopts the
checkpoint's vocabulary, scores it untouched, trains from its weights and exports it back in
the format it came in; resuming is exact; a bad SOURCE fails in one line before any server."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlm_core.config import EvalConfig, RuntimeConfig, TokenizeConfig, TrainConfig
from mlm_core.hf_import import describe_init, load_init
from mlm_core.shards import tokenize_key
from test_hf_import import build_checkpoint, corpus_sentences

transformers = pytest.importorskip("transformers")
pytest.importorskip("ipadic")


@pytest.fixture(scope="module")
def checkpoint(merosu, tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("init") / "tiny-ipadic", corpus_sentences(merosu), dic="ipadic")


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_pretrain_init_from_end_to_end(prefect_harness, sqlite_tracking, checkpoint, tmp_path) -> None:
    from flows.init_from import finetune_train_config, resolve_init
    from flows.pretrain import pretrain
    from flows.runs import format_table, list_runs
    from mlm_core.checkpoint import load_pretrained
    from mlm_core.evaluate import fill_mask
    from mlm_core.hf_export import export_hf

    init = resolve_init(str(checkpoint))
    given = TrainConfig(max_steps=40, learning_rate=2e-3, tokens_per_batch=2048, checkpoint_every=40, max_length=64)
    train = finetune_train_config(given, init)
    assert (train.hidden_size, train.num_layers, train.learning_rate, train.dropout) == (32, 2, 2e-3, 0.1)
    assert finetune_train_config(TrainConfig(), init).learning_rate == 5e-5  # not given: the fine-tuning default
    result = pretrain(train=train, evaluate=EvalConfig(passes=1, pll_sentences=0), runtime=RuntimeConfig(num_threads=1),
                      workdir=str(tmp_path / "work"), experiment="melos-init", init_from=str(checkpoint))

    initial, final = result["initial_metrics"], result["metrics"]
    assert final["eval/loss"] < initial["eval/initial_loss"]  # continued training lowers held-out loss
    assert initial["eval/initial_masked_tokens"] == final["eval/masked_tokens"]  # the same fixed masks
    run = sqlite_tracking.get_run(result["mlflow_run_id"])
    assert run.data.metrics["eval/initial_top1_accuracy"] == initial["eval/initial_top1_accuracy"]
    assert run.data.params["init_from"] == str(checkpoint)
    report = Path(result["report"]).read_text(encoding="utf-8")
    assert f"{initial['eval/initial_top1_accuracy']:.3f} → {final['eval/top1_accuracy']:.3f}" in report
    rows, _ = list_runs(None, "melos-init", None, 5)
    assert "→" in format_table(rows) and rows[0]["init_from"] == str(checkpoint)

    # words split by IPAdic (its pos1-pos2 tags), the checkpoint's vocabulary adopted as is
    work = tmp_path / "work"
    shards = json.loads(next((work / "tokenize").glob("*/manifest.json")).read_text(encoding="utf-8"))
    assert shards["config"]["word_splitter"] == "mecab:ipadic"
    import pyarrow.parquet as pq

    pos = {p for row in pq.read_table(next((work / "tokenize").glob("*/train-*.parquet"))).column("pos").to_pylist()
           for p in row}
    assert "名詞-サ変接続" in pos and "名詞-普通名詞" not in pos
    vocab_dir = next((work / "vocab").glob("*/vocab.txt")).parent
    assert (vocab_dir / "vocab.txt").read_text(encoding="utf-8") == (checkpoint / "vocab.txt").read_text(encoding="utf-8")
    # a from-scratch run of the same corpus never meets these outputs: other tokenize key, no adopted vocab
    assert tokenize_key("x", TokenizeConfig()) != tokenize_key("x", TokenizeConfig(word_splitter="mecab:ipadic"))

    # the trained model starts from the checkpoint (not re-initialised): its position table
    # rows beyond max_length never see a gradient, so only weight decay (< 0.1% here) moved them
    model, tokenizer = load_pretrained(result["model_dir"])
    start, _ = load_init(checkpoint)
    unused, before = model.embeddings.position.weight[100:], start.embeddings.position.weight[100:]
    assert torch.allclose(unused, before, rtol=1e-3, atol=0) and not torch.equal(unused, before)
    assert not torch.equal(model.embeddings.word.weight, start.embeddings.word.weight)

    # run:latest continues this run's own model (a Melos directory, its IPAdic tokenizer kept)
    again = resolve_init("run:latest", tmp_path / "work")
    assert again["source"] == f"run:{result['mlflow_run_id']}" and again["format"] == "melos"
    assert again["tokenizer"]["splitter"] == "mecab:ipadic" and again["model"]["num_layers"] == 2
    continued, _ = load_init(again["dir"])
    assert all(torch.equal(a, b) for a, b in zip(continued.state_dict().values(), model.state_dict().values()))

    # export: the same tokenizer format it came in, and transformers' fill-mask agrees with Melos's
    out = export_hf(result["model_dir"], tmp_path / "export",
                    json.loads((Path(result["model_dir"]).parent / "card.json").read_text(encoding="utf-8")))
    tc = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tc["mecab_kwargs"] == {"mecab_dic": "ipadic"} and tc["word_tokenizer_type"] == "mecab"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert str(checkpoint) in card and "走れメロス" in card and "license" in card.lower()
    fill = transformers.pipeline("fill-mask", model=transformers.BertForMaskedLM.from_pretrained(out),
                                 tokenizer=transformers.BertJapaneseTokenizer.from_pretrained(out), top_k=40)
    for text in ("メロスは[MASK]した。", "私は、[MASK]を信じている。"):
        ours = [t for t, _ in fill_mask(model, tokenizer, text, 5)[0]]
        theirs = [p["token_str"].replace(" ", "") for p in fill(text)
                  if p["token"] >= tokenizer.num_special and not tokenizer.vocab[p["token"]].startswith("##")][:5]
        assert ours == theirs, text


def test_resume_of_a_continued_run_is_exact(merosu, checkpoint, tmp_path) -> None:
    """Stopped after 4 of 8 steps and resumed, the weights equal an uninterrupted run's."""
    from mlm_core.data import EncodedCorpus, encode_key, encode_shards
    from mlm_core.tokenizer import WordPieceTokenizer
    from mlm_core.train import TrainCallback, TrainingStopped, train_model

    init = describe_init(checkpoint, "tiny")
    tokenizer = WordPieceTokenizer.from_file(checkpoint / "vocab.txt", **init["tokenizer"])
    # the merosu shards are UniDic words: good enough for the loop, which only sees ids
    paths = merosu.shard_paths("train")
    corpus = EncodedCorpus(encode_shards(paths, tokenizer, tmp_path / "enc", 64, encode_key("t", "v", "train", 64)))
    cfg = TrainConfig(max_steps=8, checkpoint_every=100, tokens_per_batch=1024, learning_rate=1e-3, max_length=64,
                      hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    runtime = RuntimeConfig(device="cpu", num_threads=1, prefetch=0)

    class StopAt(TrainCallback):
        def __init__(self) -> None:
            self.step = 0

        def on_log(self, step, metrics) -> None:
            self.step = step

        def stop_requested(self) -> bool:
            return self.step == 4

    whole = train_model(corpus, tokenizer, cfg, runtime, tmp_path / "a", data_fingerprint="d", init=init)
    with pytest.raises(TrainingStopped):
        train_model(corpus, tokenizer, cfg, runtime, tmp_path / "b", data_fingerprint="d", init=init, callback=StopAt())
    resumed = train_model(corpus, tokenizer, cfg, runtime, tmp_path / "b", data_fingerprint="d", init=init, resume=True)
    assert resumed.resumed_from_step == 4
    a = torch.load(whole.model_dir / "model.pt", weights_only=True)
    b = torch.load(resumed.model_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isclose(whole.final_loss, resumed.final_loss)
    meta = json.loads((whole.model_dir / "config.json").read_text(encoding="utf-8"))
    assert meta["init_from"]["source"] == "tiny" and meta["tokenizer"]["splitter"] == "mecab:ipadic"


@pytest.mark.parametrize("case", ["missing", "no config", "roberta", "hub id not cached", "model size"])
def test_bad_init_from_fails_in_one_line_before_any_server(case, checkpoint, tmp_path, capsys) -> None:
    from flows.cli import main

    src = tmp_path / "ck"
    args = []
    if case != "missing":
        shutil.copytree(checkpoint, src)
    if case == "no config":
        (src / "config.json").unlink()
    elif case == "roberta":
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}), encoding="utf-8")
    elif case == "model size":
        args = ["--hidden-size", "64"]
    source = "melos-test/never-cached" if case == "hub id not cached" else str(src)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--init-from", source, "--workdir", str(tmp_path / "w"), *args])
    message = str(exc.value)
    assert message.startswith("melos: ") and "\n" not in message
    assert {"missing": "no such directory", "no config": "no config.json", "roberta": "'roberta'",
            "hub id not cached": "HF_HUB_OFFLINE", "model size": "hidden_size 32"}[case] in message
    assert time.monotonic() - started < 20 and not (tmp_path / "w").exists()  # nothing ran


def test_compare_scratch_against_a_checkpoint(prefect_harness, sqlite_tracking, checkpoint, tmp_path) -> None:
    """``--grid init-from=none,DIR``: each starting point gets its own tokenizer's data stages,
    both are scored on the same held-out sentences, and per character, as their tokenizers differ."""
    from flows.compare import compare

    train = TrainConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64, max_steps=4,
                        checkpoint_every=4, tokens_per_batch=1024)
    result = compare(grid={"init_from": ["none", str(checkpoint)]}, train=train,
                     evaluate=EvalConfig(passes=1, pll_sentences=6), runtime=RuntimeConfig(num_threads=1),
                     workdir=str(tmp_path / "work"), experiment="melos-compare-init")
    runs = {r["label"]: r for r in result["runs"]}
    scratch, adapted = runs["init_from=none"], runs[f"init_from={checkpoint}"]
    for r in (scratch, adapted):
        assert np.isfinite(r["metrics"]["eval/pll_per_char"]) and r["metrics"]["eval/pll_per_char"] < 0
    assert scratch["metrics"]["eval/pll_chars"] == adapted["metrics"]["eval/pll_chars"]  # the same sentences
    assert "pll_per_char" in result["markdown"] and "different tokenizers" in result["markdown"]
    params = {label: sqlite_tracking.get_run(r["mlflow_run_id"]).data.params for label, r in runs.items()}
    scratch_p, adapted_p = params["init_from=none"], params[f"init_from={checkpoint}"]
    assert (scratch_p["train.num_layers"], scratch_p["train.learning_rate"]) == ("1", "0.001")
    # the checkpoint's size, and the continued pre-training learning rate (left at its default here)
    assert (adapted_p["train.num_layers"], float(adapted_p["train.learning_rate"])) == ("2", 5e-05)
    assert len(list((tmp_path / "work" / "tokenize").glob("*/manifest.json"))) == 2  # unidic-lite and IPAdic words
