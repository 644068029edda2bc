"""`melos finetune` end to end: a tiny model pre-trained on a local Aozora site of two authors
(two works each), fine-tuned on the built-in tasks and on a file, logged as an MLflow run linked
to the model's run with the fine-tuned model as a logged model; bad input gives one line."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from mlm_core.catalogue import CATALOGUE_PATH
from mlm_core.config import DownloadConfig, EvalConfig, TrainConfig
from tests.test_sources import SITE, catalogue_zip, row, work_text

TINY_TRAIN = TrainConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64,
                         batch_size=32, max_steps=6, checkpoint_every=6)
FAST = ["--seeds", "2", "--epochs", "1", "--learning-rate", "3e-3", "--threads", "1", "--device", "cpu"]


def local_site(root: Path, merosu_text: str) -> None:
    """Two authors x two works; each work's body is a quarter of 走れメロス's paragraphs."""
    rows = [row(1, "一の話", 35, "太宰", "治"), row(2, "二の話", 35, "太宰", "治"),
            row(3, "三の話", 879, "芥川", "竜之介"), row(4, "四の話", 879, "芥川", "竜之介")]
    (root / CATALOGUE_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / CATALOGUE_PATH).write_bytes(catalogue_zip(rows))
    paras = [p for p in merosu_text.split("\n") if p.strip()]
    for k, r in enumerate(rows):
        path = root / r["テキストファイルURL"][len(SITE):]
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "\r\n".join(paras[k::4])
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"work{k + 1}.txt", work_text(r["作品名"], r["姓"] + r["名"], body))


@pytest.fixture(scope="module")
def pretrained(prefect_harness, merosu, tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("ftcli")
    (text_file,) = (merosu.root / "download" / "docs").glob("*.txt")
    local_site(tmp / "site", text_file.read_text(encoding="utf-8"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from flows.pretrain import pretrain

    trained = pretrain(download=DownloadConfig(sources=["aozora:all"], aozora_base_url=str(tmp / "site")),
                       train=TINY_TRAIN, evaluate=EvalConfig(passes=1, fill_mask_examples=[], pll_sentences=0),
                       workdir=str(tmp / "work"), experiment="melos-ft")
    yield tmp, uri, trained
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_finetune_builtin_authors_logged_and_linked(pretrained, capsys, monkeypatch):
    tmp, uri, trained = pretrained
    monkeypatch.chdir(tmp)
    from mlflow.tracking import MlflowClient

    from flows.cli import main
    from flows.runs import list_runs

    argv = ["finetune", "--run", trained["mlflow_run_id"], "--task", "aozora-authors", "--workdir", str(tmp / "work"),
            "--experiment", "melos-ft", "--json", *FAST]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("f1", "f1_std", "random_f1", "random_f1_std", "gain", "accuracy", "random_accuracy"):
        assert f"finetune/aozora-authors/{key}" in out
    assert out["finetune/aozora-authors/gain"] == pytest.approx(
        out["finetune/aozora-authors/f1"] - out["finetune/aozora-authors/random_f1"])
    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["melos.model_run_id"] == trained["mlflow_run_id"]
    assert run.data.metrics["finetune/aozora-authors/f1"] == pytest.approx(out["finetune/aozora-authors/f1"])
    assert run.data.params["split.method"] == "by work"
    assert out["model_uri"].startswith("models:/")
    # the logged model is the fine-tuned model, loadable by Melos
    from mlflow.artifacts import download_artifacts

    from mlm_core.finetune import load_finetuned

    local = download_artifacts(artifact_uri=out["model_uri"], dst_path=str(tmp / "dl"), tracking_uri=uri)
    model, _, labels = load_finetuned(local)
    assert sorted(labels) == ["太宰治", "芥川竜之介"] and model.kind == "classification"
    hf = Path(download_artifacts(run_id=out["mlflow_run_id"], artifact_path="hf", dst_path=str(tmp / "dl-hf"),
                                 tracking_uri=uri))
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert sorted(config["label2id"]) == ["太宰治", "芥川竜之介"] and (hf / "vocab.txt").is_file()
    # the Prefect table artifact names the MLflow run and has a row per seed and arm
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["melos-finetune"])))
    [mine] = [a for a in artifacts if out["mlflow_run_id"] in (a.description or "")]
    table = mine.data if isinstance(mine.data, list) else json.loads(mine.data)
    assert sorted((r["init"], r["seed"]) for r in table) == [("pretrained", 0), ("pretrained", 1), ("random", 0),
                                                            ("random", 1)]
    # the same command again reads every finished arm back instead of training it (as after a
    # Ctrl-C, where it resumes at the first unfinished arm): same scores, same recorded timings
    first = json.loads((Path(out["model_dir"]).parent / "result.json").read_text(encoding="utf-8"))
    assert len(list((Path(out["model_dir"]).parent / "arms").glob("*.json"))) == 4
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    second = json.loads((Path(again["model_dir"]).parent / "result.json").read_text(encoding="utf-8"))
    assert again["mlflow_run_id"] != out["mlflow_run_id"] and second["runs"] == first["runs"]
    assert again["finetune/aozora-authors/f1"] == out["finetune/aozora-authors/f1"]
    # a fine-tuning run is not a pretrain run: `latest` still means the model
    rows, _ = list_runs(uri, "melos-ft", None, 10)
    assert [r["run_id"] for r in rows] == [trained["mlflow_run_id"]]


def test_finetune_pos_and_file_tasks_from_a_directory(pretrained, capsys, monkeypatch):
    tmp, uri, trained = pretrained
    monkeypatch.chdir(tmp)
    from flows.cli import main

    model_dir = trained["model_dir"]
    assert main(["finetune", "--run", model_dir, "--task", "aozora-pos", "--workdir", str(tmp / "work"),
                 "--experiment", "melos-ft", *FAST, "--seeds", "1", "--baseline", "none"]) == 0
    text = capsys.readouterr().out
    assert "pre-trained: macro F1" in text and "random init" not in text
    conll = tmp / "ner.conll"
    sents = [["メロス", "は", "激怒", "した", "。"], ["セリヌンティウス", "は", "待っ", "た", "。"],
             ["王", "は", "笑っ", "た", "。"], ["メロス", "は", "走っ", "た", "。"]] * 5
    tags = {"メロス": "B-PER", "セリヌンティウス": "B-PER", "王": "B-PER"}
    conll.write_text("\n\n".join("\n".join(f"{w}\t{tags.get(w, 'O')}" for w in s) for s in sents) + "\n",
                     encoding="utf-8")
    assert main(["finetune", "--run", model_dir, "--task", str(conll), "--workdir", str(tmp / "work"),
                 "--experiment", "melos-ft", "--json", *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["finetune/ner/f1"] <= 1.0 and "finetune/ner/random_f1" in out


def test_finetune_bad_input_is_one_line(pretrained, tmp_path, monkeypatch):
    tmp, uri, trained = pretrained
    from flows.cli import main

    bad = tmp_path / "bad.conll"
    bad.write_text("メロス\tO\nは\tI-PER\n", encoding="utf-8")
    common = ["--workdir", str(tmp / "work"), "--experiment", "melos-ft", *FAST]
    with pytest.raises(SystemExit, match=r"^melos: .*bad\.conll:2: I-PER after O"):
        main(["finetune", "--run", trained["model_dir"], "--task", str(bad), *common])
    with pytest.raises(SystemExit, match=r"^melos: --task nope\.jsonl: no such file, and not a built-in task"):
        main(["finetune", "--run", trained["model_dir"], "--task", "nope.jsonl", *common])
    import shutil

    no_vocab = tmp_path / "novocab"
    shutil.copytree(trained["model_dir"], no_vocab)
    (no_vocab / "vocab.txt").unlink()
    with pytest.raises(SystemExit, match=r"^melos: .*novocab: the model has no tokenizer"):
        main(["finetune", "--run", str(no_vocab), "--task", "aozora-pos", *common])
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^melos: .*hf: the Hugging Face model has no tokenizer"):
        main(["finetune", "--run", str(hf_like), "--task", str(bad), *common])


def test_compare_downstream_scores_with_control(pretrained, capsys, monkeypatch):
    tmp, uri, trained = pretrained
    monkeypatch.chdir(tmp)
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    tiny = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--max-length", "64",
            "--batch-size", "32", "--max-steps", "3", "--checkpoint-every", "3", "--eval-passes", "1",
            "--eval-pll-sentences", "0", "--example", "メロスは[MASK]した。", "--threads", "1"]
    argv = ["compare", "--grid", "masking=static,dynamic", "--seeds", "2", *tiny, "--source", "aozora:all",
            "--aozora-base-url", str(tmp / "site"), "--downstream", "aozora-authors", "--downstream-epochs", "1",
            "--downstream-learning-rate", "3e-3", "--workdir", str(tmp / "work"), "--experiment", "cmp-ft", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["setting"]: r for r in out["rows"]}
    assert set(rows) == {"masking=static", "masking=dynamic", "random init (control)"}
    for r in rows.values():
        assert 0.0 <= r["finetune/aozora-authors/f1"] <= 1.0
        assert r["finetune/aozora-authors/f1:spread"] >= 0.0 and r["runs"] == 2
    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`melos.comparison` = '{out['mlflow_run_id']}'")
    assert len(children) == 4 and all("finetune/aozora-authors/f1" in c.data.metrics for c in children)
    # the table's mean is the children's
    static = [c.data.metrics["finetune/aozora-authors/f1"] for c in children
              if c.data.tags["melos.setting"] == "masking=static"]
    assert rows["masking=static"]["finetune/aozora-authors/f1"] == pytest.approx(sum(static) / 2)
    # the report reads the table: each row against the first setting, and the rankings side by side
    md = Path(client.download_artifacts(out["mlflow_run_id"], "comparison/comparison.md", str(tmp / "cmp-md"))
              ).read_text(encoding="utf-8")
    assert "| random init (control) | – " in md and "Δ finetune/aozora-authors/f1" in md
    assert "- by `finetune/aozora-authors/f1`: " in md and "Kendall τ of `finetune/aozora-authors/f1`" in md
    arts = {a.path for a in client.list_artifacts(out["mlflow_run_id"], "comparison")}
    assert "comparison/downstream.png" in arts
    local = client.download_artifacts(out["mlflow_run_id"], "comparison/comparison.csv", str(tmp / "cmp-dl"))
    assert "finetune/aozora-authors/f1" in Path(local).read_text(encoding="utf-8").splitlines()[0]
