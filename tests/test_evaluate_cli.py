"""`melos evaluate`: score a pretrain run's model on another corpus, logged as its own MLflow
run linked to the model's run (issue 7, part 4)."""

from __future__ import annotations

import json

import pytest

from mlm_core.config import EvalConfig, TrainConfig

TINY_TRAIN = TrainConfig(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64, batch_size=32,
    max_steps=6, checkpoint_every=3,
)
OTHER_AUTHOR = "\n".join([
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "吾輩はここで始めて人間というものを見た。",
    "しかもあとで聞くとそれは書生という人間中で一番獰悪な種族であったそうだ。",
    "この書生というのは時々我々を捕えて煮て食うという話である。",
    "しかしその当時は何という考もなかったから別段恐しいとも思わなかった。",
    "ただ彼の掌に載せられてスーと持ち上げられた時何だかフワフワした感じがあったばかりである。",
] * 3)


def test_evaluate_scores_a_run_on_another_corpus_and_links_the_runs(prefect_harness, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from flows.pretrain import pretrain
    from flows.runs import list_runs

    trained = pretrain(train=TINY_TRAIN, evaluate=EvalConfig(passes=1, fill_mask_examples=["メロスは[MASK]した。"]),
                       workdir=str(tmp_path / "work"), experiment="melos-ev")
    novel = tmp_path / "neko.txt"
    novel.write_text(OTHER_AUTHOR, encoding="utf-8")
    argv = ["evaluate", "--run", trained["mlflow_run_id"], "--source", str(novel), "--workdir", str(tmp_path / "work"),
            "--experiment", "melos-ev", "--eval-passes", "1", "--eval-pll-sentences", "4", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = printed["metrics"]
    assert printed["model_run_id"] == trained["mlflow_run_id"]
    for key in ("eval/top1_accuracy", "eval/unigram_top1_accuracy", "eval/wwm_top1_accuracy",
                "eval/pseudo_perplexity", "eval/pos/noun/top1_accuracy"):
        assert key in metrics
    assert metrics["eval/sentences"] == 27  # every sentence of the corpus (9 a copy), both splits
    assert metrics["eval/pll_sentences"] == 4

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("melos-ev")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`melos.stage` = 'evaluate-corpus'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert printed["mlflow_run_id"] == run.info.run_id
    assert run.data.tags["melos.model_run_id"] == trained["mlflow_run_id"]
    assert run.data.metrics["eval/top1_accuracy"] == pytest.approx(metrics["eval/top1_accuracy"])
    stages = {c.data.tags["melos.stage"] for c in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    assert stages == {"download", "tokenize"}
    # an evaluation is not a pretrain run: `melos runs` and `--run latest` still mean the model
    rows, _ = list_runs(uri, "melos-ev", None, 10)
    assert [r["run_id"] for r in rows] == [trained["mlflow_run_id"]]

    # the same corpus again: the data stages are cached, the numbers identical
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == metrics


def test_evaluate_refuses_an_unknown_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from flows.cli import main

    with pytest.raises(SystemExit, match="no-such-run"):
        main(["evaluate", "--run", "no-such-run", "--source", "embedded", "--workdir", str(tmp_path / "w")])
