"""Fine-tuning core: the scorers against hand-worked cases (and seqeval), the readers' one-line
errors, packing that gives each sequence the outputs it has alone, subword alignment of
another splitter's tokens, splits by work, and a tiny end-to-end run with its control."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlm_core.finetune import (
    FinetuneConfig, FinetuneModel, encode_examples, finetune, load_finetuned, pack, predict_ids, save_finetuned,
    score, summarize, train_head,
)
from mlm_core.finetune_data import (
    Example, TaskData, TaskDataError, builtin_task, load_task_files, read_conll, seeded_split,
)
from mlm_core.finetune_metrics import accuracy, entities, entity_scores, macro_f1
from mlm_core.model import IGNORE_INDEX, BertForMaskedLM, ModelConfig

# ----------------------------------------------------------------------------- metrics


def test_entities_hand_worked():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # lenient reading of predictions: I- after O starts an entity; a type change splits one
    assert entities(["O", "I-PER", "I-PER", "I-LOC"]) == [("PER", 1, 2), ("LOC", 3, 3)]
    assert entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert entities(["O", "O"]) == []


def test_entity_f1_hand_worked():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "B-ORG"]]
    # gold: PER(0,1) LOC(3) | ORG(0); pred: PER(0,1) ORG(3) | ORG(0) ORG(1): 2 correct of 4 predicted, 3 true
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(2 / 4)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # a span that is one token short is wrong (exact span)
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0


def test_entity_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(7)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(30):
        gold = [[str(t) for t in rng.choice(tags, size=int(rng.integers(1, 9)))] for _ in range(5)]
        pred = [[str(t) for t in rng.choice(tags, size=len(g))] for g in gold]
        ours = entity_scores(gold, pred)
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, pred, zero_division=0))
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, pred, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, pred, zero_division=0))


def test_accuracy_and_macro_f1_hand_worked():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "b"]
    assert accuracy(gold, pred) == 0.5
    # a: p=1 r=.5 f=2/3; b: p=1/3 r=1 f=.5; c: 0
    assert macro_f1(gold, pred) == pytest.approx((2 / 3 + 0.5 + 0) / 3)


# ----------------------------------------------------------------------------- readers


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_conll_reader_and_errors(tmp_path):
    good = _write(tmp_path / "a.conll", "メロス\tB-PER\nは\tO\n\n激怒\tO\nした\tO\n")
    ex = read_conll(good)
    assert [e.tokens for e in ex] == [["メロス", "は"], ["激怒", "した"]]
    assert ex[0].tags == ["B-PER", "O"]
    with pytest.raises(TaskDataError, match=r"b\.conll:2: I-PER after O"):
        read_conll(_write(tmp_path / "b.conll", "は\tO\nメロス\tI-PER\n"))
    with pytest.raises(TaskDataError, match=r"c\.conll:2: 3 columns"):
        read_conll(_write(tmp_path / "c.conll", "メロス\tB-PER\nは\tx\tO\n"))
    with pytest.raises(TaskDataError, match=r"d\.conll:1: tag 'PER'"):
        read_conll(_write(tmp_path / "d.conll", "メロス\tPER\n"))


def test_classification_reader_errors(tmp_path):
    f = _write(tmp_path / "t.jsonl", '{"text": "走った", "tag": "x"}\n')
    with pytest.raises(TaskDataError, match=r"t\.jsonl: no label column 'label' \(columns: text, tag\)"):
        load_task_files(f, "classification")
    rows = [{"text": f"文{i}。", "label": "a" if i % 2 else "b"} for i in range(8)]
    train = _write(tmp_path / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    test = _write(tmp_path / "test.csv", "text,label\n走った。,a\n笑った。,zzz\n")
    with pytest.raises(TaskDataError, match=r"test\.csv:3: label 'zzz' is in the test split but never in train"):
        load_task_files(train, "classification", test=test)
    empty = _write(tmp_path / "empty.csv", "text,label\n")
    with pytest.raises(TaskDataError, match="empty.csv: no examples"):
        load_task_files(train, "classification", test=empty)
    data = load_task_files(train, "classification", test=_write(tmp_path / "ok.csv", "text,label\n走った。,a\n"))
    assert len(data.train) == 8 and len(data.test) == 1 and data.split["method"] == "given files"


def test_seeded_split_keeps_groups_and_kfold():
    exs = [Example(label=str(i % 2), text="x", group=f"w{i // 5}") for i in range(60)]
    tr, dv, te, folds, rec = seeded_split(exs, seed=3)
    side = {}
    for name, part in (("train", tr), ("dev", dv), ("test", te)):
        for e in part:
            assert side.setdefault(e.group, name) == name  # a work is on one side only
    assert len(tr) + len(dv) + len(te) == 60 and te and dv
    assert seeded_split(exs, seed=3)[4] == rec  # recorded and reproducible
    _, _, _, folds, rec = seeded_split(exs, seed=3, kfold_below=100, folds=4)
    assert rec["method"] == "4-fold" and sorted(i for f in folds for i in f) == list(range(60))


# ----------------------------------------------------------------------------- model machinery


@pytest.fixture(scope="module")
def tiny(merosu):
    torch.set_num_threads(1)  # the tests share two cores; more threads only contend
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(merosu.tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(cfg), merosu.tokenizer


def test_packed_outputs_equal_alone(tiny):
    encoder, tok = tiny
    exs = [Example(label="a", text=t) for t in ("メロスは激怒した。", "必ず、かの邪智暴虐の王を除かなければならぬと決意した。", "走れ！")]
    exs.append(Example(label="b", text="メロスには政治がわからぬ。", text_b="けれども邪悪に対しては、人一倍に敏感であった。"))
    enc = encode_examples(exs, tok, "classification", {"a": 0, "b": 1}, 64)
    assert list(enc.types[3][: len(enc.ids[3])]).count(1) > 0  # pairs carry token type 1
    model = FinetuneModel(BertForMaskedLM(encoder.config), 2, "classification").eval()
    packed = pack(enc, range(4), 64, 0, "classification")
    assert packed.n_slots - packed.n_tokens < 64  # rows are filled; padding only at row ends
    from mlm_core.finetune import _tensors

    together = model(**_tensors(packed, torch.device("cpu")))
    for i in range(4):
        alone = model(**_tensors(pack(enc, [i], 64, 0, "classification"), torch.device("cpu")))
        k = [o[0] for o in packed.owners].index(i)
        torch.testing.assert_close(together[k], alone[0], atol=1e-5, rtol=1e-4)


def test_token_alignment_first_subword(tiny):
    encoder, tok = tiny
    # the file's splitter keeps 走れメロス and 激怒した whole; the model splits them further
    ex = Example(tokens=["走れメロス", "は", "激怒した", "。"], tags=["B-WORK", "O", "O", "O"])
    enc = encode_examples([ex], tok, "ner", {"O": 0, "B-WORK": 1}, 64)
    pos, labels = enc.token_pos[0], enc.labels[0]
    assert (pos > 0).all() and list(pos) == sorted(pos)
    assert labels[pos].tolist() == [1, 0, 0, 0]
    assert (labels != IGNORE_INDEX).sum() == 4  # one label per file token, -100 on other subwords
    assert len(enc.ids[0]) > 6  # more subwords than file tokens: the words were split
    model = FinetuneModel(BertForMaskedLM(encoder.config), 2, "ner")
    pred = predict_ids(model, enc, torch.device("cpu"))
    assert len(pred[0]) == 4  # scored on the file's own tokens
    assert set(score("ner", [ex], pred, ["O", "B-WORK"])) >= {"f1", "precision", "recall", "accuracy"}


def test_truncation_counted(tiny):
    _, tok = tiny
    long = "メロスは走った。" * 40
    enc = encode_examples([Example(label="a", text=long), Example(label="a", text="短い。")], tok,
                          "classification", {"a": 0}, 32)
    assert enc.truncated == 1 and max(len(x) for x in enc.ids) == 32


def _keyword_task(merosu) -> TaskData:
    """Does the 走れメロス sentence name メロス? (seeded 80/10/10 split)"""
    from mlm_core.shards import iter_rows

    texts = [r["text"] for b in iter_rows(merosu.shard_paths("train"), ["text"]) for r in b.to_pylist()]
    exs = [Example(label="melos" if "メロス" in t else "other", text=t, where=f"s:{i}") for i, t in enumerate(texts)]
    tr, dv, te, _, rec = seeded_split(exs, 0)
    return TaskData("kw", "classification", tr, dv, te, None, rec)


def test_finetune_learns_and_reports_control(tiny, merosu, tmp_path):
    """A keyword task on 走れメロス sentences: both arms learn it; the summary carries the spread."""
    encoder, tok = tiny
    data = _keyword_task(merosu)
    te = data.test
    messages = []
    res = finetune(encoder, tok, data, FinetuneConfig(epochs=12, seeds=2, learning_rate=3e-3), log=messages.append)
    assert len(res.runs) == 4 and {r["init"] for r in res.runs} == {"pretrained", "random"}
    majority = max(sum(e.label == "melos" for e in te), sum(e.label == "other" for e in te)) / len(te)
    assert res.summary["accuracy"] > majority  # learnt more than the majority class
    assert res.summary["seeds"] == 2 and "gain" in res.summary and "separated" in res.summary
    assert all(r["padding_share"] < 0.2 for r in res.runs)
    assert any("truncated" in m for m in messages) == (res.truncated > 0)
    # the saved model predicts what the in-memory one did
    out = save_finetuned(tmp_path / "ft", res.model, tok, res.labels)
    loaded, _, labels = load_finetuned(out)
    enc = encode_examples(te, tok, "classification", {l: i for i, l in enumerate(labels)}, 64)
    assert predict_ids(loaded, enc, torch.device("cpu")) == predict_ids(res.model, enc, torch.device("cpu"))


def test_interrupted_finetuning_resumes_at_the_first_unfinished_arm(tiny, merosu, tmp_path):
    """Finished arms are recorded as they end; the same fine-tuning run again trains only the
    arms that had not finished, and gives what an uninterrupted run gives."""
    encoder, tok = tiny
    data, cfg, arms = _keyword_task(merosu), FinetuneConfig(max_steps=3, seeds=2), tmp_path / "arms"
    whole = finetune(encoder, tok, data, cfg)

    def recorder(trained: list, stop_at: int | None = None):
        def on_step(tag, seed, step, loss):
            if tag not in trained:
                trained.append(tag)
            if len(trained) == stop_at:
                raise KeyboardInterrupt  # Ctrl-C in the third arm
        return on_step

    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        finetune(encoder, tok, data, cfg, arms_dir=arms, on_step=recorder(first, stop_at=3))
    assert first == ["pretrained/seed 0", "random/seed 0", "pretrained/seed 1"]
    assert sorted(p.name for p in arms.iterdir()) == ["pretrained-seed0.json", "pretrained-seed0.pt",
                                                      "random-seed0.json"]
    second: list[str] = []
    messages: list[str] = []
    resumed = finetune(encoder, tok, data, cfg, arms_dir=arms, on_step=recorder(second), log=messages.append)
    assert second == ["pretrained/seed 1", "random/seed 1"]  # the two finished arms were not trained again
    assert sum("resumed" in m for m in messages) == 2
    assert [(r["init"], r["seed"], r["test"]) for r in resumed.runs] == [
        (r["init"], r["seed"], r["test"]) for r in whole.runs]
    assert resumed.summary == whole.summary
    for name, value in whole.model.state_dict().items():  # the returned model is the recorded one
        assert torch.equal(resumed.model.state_dict()[name], value), name
    # other settings (or weights, or data) are another basis: nothing recorded is reused
    third: list[str] = []
    finetune(encoder, tok, data, FinetuneConfig(max_steps=4, seeds=1), arms_dir=arms, on_step=recorder(third))
    assert third == ["pretrained/seed 0", "random/seed 0"]


def test_kfold_pools_every_example(tiny, tmp_path):
    """A small file without a test split: 5-fold cross-validation, every example predicted once."""
    encoder, tok = tiny
    rows = [{"text": t, "text_b": "走った。", "label": str(i % 3)} for i, t in enumerate(
        ["メロスは激怒した。", "王は笑った。", "妹は眠った。", "友は待った。", "日は沈んだ。", "風が吹いた。"] * 5)]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data = load_task_files(f, "classification", seed=1)
    assert data.split["method"] == "5-fold" and sorted(i for fold in data.folds for i in fold) == list(range(30))
    res = finetune(encoder, tok, data, FinetuneConfig(max_steps=2, seeds=1, baseline="none"))
    (run,) = res.runs
    assert run["test"]["n"] == 30 and run["steps"] == 5 * 2  # five trainings of two steps
    bad = tmp_path / "half.csv"
    bad.write_text("text,text_b,label\n走った。,笑った。,a\n走った。,,b\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"half\.csv:3: empty 'text_b'"):
        load_task_files(bad, "classification")


def test_minutes_budget_stops_training(tiny, merosu):
    encoder, tok = tiny
    exs = [Example(label=str(i % 2), text=t) for i, t in enumerate(["メロスは激怒した。", "王は笑った。"] * 40)]
    enc = encode_examples(exs, tok, "classification", {"0": 0, "1": 1}, 64)
    model = FinetuneModel(BertForMaskedLM(encoder.config), 2, "classification")
    stats = train_head(model, enc, FinetuneConfig(epochs=1000, batch_size=4, minutes=0.5 / 60), 0, torch.device("cpu"))
    assert 1 <= stats.steps < 20 * 1000 and stats.seconds < 5  # the half-second budget ended it, not the epochs


def test_summarize_separation():
    runs = [{"init": i, "seed": s, "test": {"f1": f, "accuracy": f}}
            for i, fs in (("pretrained", [0.8, 0.82]), ("random", [0.5, 0.52])) for s, f in enumerate(fs)]
    s = summarize(runs)
    assert s["gain"] == pytest.approx(0.3) and s["separated"] is True
    runs[1]["test"]["f1"] = 0.4  # the pre-trained spread now overlaps the control
    assert summarize(runs)["separated"] is False


# ----------------------------------------------------------------------------- built-in tasks


@pytest.fixture(scope="module")
def four_works(merosu, tmp_path_factory):
    """The embedded text cut into four .txt 'works', through the real download and tokenize
    stages; two made-up authors with two works each are given in the documents list."""
    from mlm_core.config import DownloadConfig, TokenizeConfig
    from mlm_core.download import download_corpus
    from mlm_core.shards import tokenize_corpus

    root = tmp_path_factory.mktemp("works")
    (text_file,) = (merosu.root / "download" / "docs").glob("*.txt")
    paras = [p for p in text_file.read_text(encoding="utf-8").split("\n") if p.strip()]
    src = root / "src"
    src.mkdir()
    for k in range(4):
        (src / f"work{k}.txt").write_text("\n".join(paras[k::4]) + "\n", encoding="utf-8")
    docs = download_corpus(DownloadConfig(sources=[str(src / f"work{k}.txt") for k in range(4)]),
                           root / "download", root / "raw")
    tokenize_corpus(root / "download" / "docs", [d["doc_id"] for d in docs["documents"]], root / "tokenize",
                    TokenizeConfig(workers=1), docs["fingerprint"])
    documents = [{**d, "author": "甲" if k % 2 else "乙", "work_id": f"w{k}"} for k, d in enumerate(docs["documents"])]
    return root, documents


def test_builtin_tasks_split_by_work(four_works):
    root, documents = four_works
    data = builtin_task("aozora-authors", root / "tokenize", documents, seed=1)
    assert data.kind == "classification" and data.labels == ["乙", "甲"]
    work_of = {f"w{k}" for k in range(4)}
    sides = {name: {e.group for e in getattr(data, name)} for name in ("train", "dev", "test")}
    assert sides["train"] | sides["dev"] | sides["test"] <= work_of
    assert not (sides["train"] & sides["test"]) and not (sides["train"] & sides["dev"])
    assert {e.label for e in data.test} == {"甲", "乙"}  # each author has a work in test
    pos = builtin_task("aozora-pos", root / "tokenize", documents, seed=1)
    assert pos.kind == "tagging" and "名詞-普通名詞" in pos.labels
    assert not ({e.group for e in pos.train} & {e.group for e in pos.test})
    assert all(len(e.tokens) == len(e.tags) for e in pos.test)
    with pytest.raises(TaskDataError, match="at least two authors"):
        builtin_task("aozora-authors", root / "tokenize", [{**d, "author": "甲"} for d in documents[:1]])
