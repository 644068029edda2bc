"""The model as an MLflow Model, for real: two pipeline runs register under one name on an
``mlflow server`` (SQLite backend, artifact store), the champion gate decides, and the
champion is loaded in a fresh process, by the CLI, and served by ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_for_http
from mlm_core.config import EvalConfig, TrainConfig
from tasks.publish import eval_data_key, promotion_decision

pytestmark = pytest.mark.servers

NAME = "melos-test"
TEXT = "メロスは[MASK]した。"
TINY_TRAIN = TrainConfig(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=64, batch_size=32,
    max_steps=6, checkpoint_every=6,
)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs(prefect_harness, mlflow_server, tmp_path_factory):
    """Run 1 registers the first version; run 2 trains the same model but is evaluated with
    another mask seed, so the gate must re-score the champion on run 2's data; run 3 repeats
    run 1 (the nightly case: same data, compare the recorded numbers)."""
    from flows.pretrain import pretrain

    work = tmp_path_factory.mktemp("publish-work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        results = [
            pretrain(train=TINY_TRAIN, evaluate=EvalConfig(passes=1, seed=seed, fill_mask_examples=[TEXT]),
                     workdir=str(work), experiment="melos-publish", register_as=NAME)
            for seed in (1234, 7, 1234)
        ]
        yield results


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_gate_promotes_the_first_and_keeps_an_equal_one_out(runs, mlflow_server):
    first, second, third = runs
    assert first["registered"]["version"] == "1" and first["registered"]["promoted"] is True
    assert second["registered"]["version"] == "2" and second["registered"]["promoted"] is False
    reason = second["registered"]["reason"]
    # same seed and data -> same weights; scored on the same (run 2's) data the two tie, and a
    # tie does not move the alias
    assert "does not beat champion version 1" in reason and "re-scored on this run's held-out data" in reason
    top1 = second["metrics"]["eval/top1_accuracy"]
    assert f"{top1:.4f} does not beat champion version 1's {top1:.4f}" in reason

    client = _client(mlflow_server)
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["melos.promotion"] == "not promoted: " + reason
    assert client.get_model_version(NAME, "1").tags["melos.promotion"].startswith("promoted: first version")
    assert v2.tags["melos.eval_key"] != client.get_model_version(NAME, "1").tags["melos.eval_key"]
    assert v2.run_id == second["mlflow_run_id"]
    top1 = first["metrics"]["eval/top1_accuracy"]
    assert third["metrics"]["eval/top1_accuracy"] == top1
    assert third["registered"] == {
        "name": NAME, "version": "3", "promoted": False, "champion_before": "1",
        "reason": f"held-out top-1 {top1:.4f} does not beat champion version 1's {top1:.4f} "
                  "(measured on the same held-out data)",
    }
    assert client.get_model_version(NAME, "3").tags["melos.eval_key"] == client.get_model_version(NAME, "1").tags["melos.eval_key"]

    # the Prefect artifact of run 2 says so
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["melos-model"])))
    assert any(f"`{NAME}` version 2" in (a.data or "") and "not promoted to this version" in a.data for a in artifacts)


def test_promotion_decision_and_eval_key():
    assert promotion_decision(0.3, None) == (True, "first version with the alias: held-out top-1 0.3000")
    champion = {"version": "4", "top1": 0.25, "basis": "measured on the same held-out data"}
    promoted, why = promotion_decision(0.3, champion)
    assert promoted and "0.3000 beats champion version 4's 0.2500" in why
    assert promotion_decision(0.25, champion)[0] is False and promotion_decision(0.2, champion)[0] is False
    shards, vocab = {"fingerprint": "s"}, {"fingerprint": "v"}
    key = eval_data_key(shards, vocab, 64, EvalConfig())
    assert key == eval_data_key(shards, vocab, 64, EvalConfig(batch_size=8, top_k=3, fill_mask_examples=["[MASK]"]))
    for other in (eval_data_key(shards, vocab, 128, EvalConfig()), eval_data_key(shards, vocab, 64, EvalConfig(seed=1)),
                  eval_data_key({"fingerprint": "t"}, vocab, 64, EvalConfig())):
        assert other != key


def test_pyfunc_loads_in_a_fresh_process(runs, mlflow_server, tmp_path):
    first = runs[0]
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('runs:/{first['mlflow_run_id']}/model')\n"
        f"out = m.predict(pd.DataFrame({{'text': [{TEXT!r}, '[MASK]は[MASK]だ。']}}), params={{'top_k': 3}})\n"
        "print(json.dumps({'rows': out.to_dict('records'), 'input': m.metadata.get_input_schema().to_dict(),\n"
        "                  'example': m.metadata.load_input_example(m.metadata.artifact_path) is not None,\n"
        "                  'transformers': 'transformers' in sys.modules}, ensure_ascii=False, default=list))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(r["text"], r["mask"]) for r in got["rows"]] == [(TEXT, 1), ("[MASK]は[MASK]だ。", 1), ("[MASK]は[MASK]だ。", 2)]
    expected = first["fill_mask"][0]["predictions"][0][:3]
    assert got["rows"][0]["tokens"] == [t for t, _ in expected]
    assert got["rows"][0]["scores"] == pytest.approx([p for _, p in expected], rel=1e-5)
    assert got["input"] == [{"type": "string", "name": "text", "required": True}]
    assert got["transformers"] is False


def test_fill_mask_cli_reads_the_registry(runs, mlflow_server):
    first = runs[0]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "fill-mask", TEXT, "--model", f"models:/{NAME}@champion"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [line.split()[1] for line in out.stdout.strip().splitlines()[1:]] == [
        t for t, _ in first["fill_mask"][0]["predictions"][0]
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fill-mask", TEXT, "--model", "models:/no-such-model@champion"],
         "no model at models:/no-such-model@champion in the MLflow store"),
        (["fill-mask", TEXT, "--model", "runs:/0123456789abcdef0123456789abcdef/model"], "no model at runs:/0123"),
        (["fill-mask", TEXT, "--model", "no-such-model"], "is not an MLflow model URI"),
        (["fill-mask", "メロスは激怒した。", "--model", f"models:/{NAME}/1"], "no [MASK] in"),
        (["fill-mask", "メロスは" * 40 + "[MASK]", "--model", f"models:/{NAME}/1"], "this model reads at most 62"),
        (["export", "--run", "0123456789abcdef0123456789abcdef", "--format", "hf", "OUT"],
         "is not a directory, and no run"),
    ],
)
def test_bad_input_is_one_clear_line(runs, mlflow_server, tmp_path, args, message, capsys):
    from flows.cli import main

    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        with pytest.raises(SystemExit) as exc:
            main(args)
    text = str(exc.value.code)
    assert text.startswith("melos: ") and message in text and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_export_of_a_registered_champion_by_run_id(runs, mlflow_server, tmp_path):
    from flows.cli import main

    first = runs[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        assert main(["export", "--run", first["mlflow_run_id"], "--format", "hf", str(tmp_path / "a")]) == 0
        assert main(["export", "--model", f"models:/{NAME}@champion", "--format", "hf", str(tmp_path / "b")]) == 0
        with pytest.raises(SystemExit, match="already exists and is not empty"):
            main(["export", "--run", first["mlflow_run_id"], "--format", "hf", str(tmp_path / "a")])
    card = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert first["mlflow_run_id"] in card and "ちくま文庫" in card
    assert f"| top-1 accuracy | {first['metrics']['eval/top1_accuracy']:.4f} |" in card
    assert card == (tmp_path / "b" / "README.md").read_text(encoding="utf-8")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_mlflow_models_serve_answers_invocations(runs, mlflow_server, tmp_path):
    first = runs[0]
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` by name, from PATH
    proc = subprocess.Popen(
        [str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": venv_bin + os.pathsep + os.environ["PATH"]},
        cwd=tmp_path, start_new_session=True,
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
        url = f"http://127.0.0.1:{port}/invocations"
        reply = httpx.post(url, json={"dataframe_split": {"columns": ["text"], "data": [[TEXT]]}, "params": {"top_k": 5}},
                           timeout=60)
        assert reply.status_code == 200, reply.text
        [row] = reply.json()["predictions"]
        expected = first["fill_mask"][0]["predictions"][0]
        assert row["text"] == TEXT and row["mask"] == 1 and row["tokens"] == [t for t, _ in expected]
        assert row["scores"] == pytest.approx([p for _, p in expected], rel=1e-5)

        bad = httpx.post(url, json={"dataframe_records": [{"text": "メロスは激怒した。"}]}, timeout=60)
        assert bad.status_code == 400 and "no [MASK] in" in bad.json()["message"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            proc.wait(timeout=30)


def test_a_run_without_a_model_is_one_clear_line(runs, mlflow_server, tmp_path):
    from flows.cli import main

    client = _client(mlflow_server)
    empty = client.create_run(client.get_experiment_by_name("melos-publish").experiment_id).info.run_id
    client.set_terminated(empty, "FAILED")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        with pytest.raises(SystemExit, match=f"MLflow run {empty} has no train stage with a model"):
            main(["export", "--run", empty, "--format", "hf", str(tmp_path / "out")])
        with pytest.raises(SystemExit, match=f"no model at runs:/{empty}/model"):
            main(["fill-mask", TEXT, "--model", f"runs:/{empty}/model"])
    assert not (tmp_path / "out").exists()


def test_cli_options_for_registry_and_export():
    from flows.cli import build_parser

    assert build_parser().parse_args(["pretrain", "--register-as", "melos-ja"]).register_as == "melos-ja"
    assert build_parser().parse_args(["pretrain"]).register_as is None
    ns = build_parser().parse_args(["export", "--model", "models:/m@champion", "--format", "hf", "out"])
    assert (ns.model, ns.run, ns.format, ns.out) == ("models:/m@champion", None, "hf", "out")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "pretrain", "--register-as", " "],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--register-as needs a registered model name" in out.stderr
    assert "Traceback" not in out.stderr
