"""The compare flow (issue 7, part 5): grids, seeds, one MLflow child run per setting and seed,
table and plots; sequential here, fanned out to a deployment in test_compare_deployment.py."""

from __future__ import annotations

import csv
import io

from pathlib import Path

import pytest

from mlm_core.config import TrainConfig
from mlm_core.grid import (
    check_grid,
    csv_table,
    markdown_table,
    mean_spread,
    parse_grid_arg,
    setting_configs,
    summarise,
)

TINY_ARGS = ["--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--max-length", "64",
             "--batch-size", "32", "--max-steps", "4", "--checkpoint-every", "4", "--eval-passes", "1",
             "--eval-pll-sentences", "3", "--example", "メロスは[MASK]した。"]


def test_grid_args_and_settings() -> None:
    assert parse_grid_arg("mask_rate=0.15, 0.3,0.4") == ("mask_rate", ["0.15", "0.3", "0.4"])
    assert parse_grid_arg("whole-word=false,true") == ("whole_word", ["false", "true"])
    for bad in ("mask_rate", "mask_rate=", "=0.1"):
        with pytest.raises(ValueError, match="FIELD=V1,V2"):
            parse_grid_arg(bad)
    with pytest.raises(ValueError, match="not a training setting.*mask_rate"):
        check_grid({"mask_rat": [0.1]})
    with pytest.raises(ValueError, match="same steps and seeds"):
        check_grid({"max_steps": [10, 20]})
    with pytest.raises(ValueError, match="empty"):
        check_grid({})

    base = TrainConfig(seed=7, max_steps=10)
    jobs = setting_configs(base, {"mask_rate": ["0.15", "0.3:0.15:linear"], "masking": ["static", "dynamic"]}, 2)
    assert [(label, seed) for label, seed, _ in jobs] == [
        (f"mask_rate={r} masking={m}", s) for r in ("0.15", "0.3:0.15:linear") for m in ("static", "dynamic")
        for s in (7, 8)
    ]
    assert {cfg.max_steps for _, _, cfg in jobs} == {10}  # same compute for every setting
    assert jobs[4][2].mask_rate == "0.3:0.15:linear" and jobs[0][2].mask_rate == 0.15
    with pytest.raises(ValueError, match="setting mask_rate=2: mask rate '2' is not valid"):  # no pydantic prefix
        setting_configs(base, {"mask_rate": ["2"]}, 1)
    with pytest.raises(ValueError, match="budget"):
        setting_configs(TrainConfig(budget_minutes=1.0), {"masking": ["static"]}, 1)


def test_summary_table_is_mean_and_sample_spread() -> None:
    assert mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_spread([0.5]) == (0.5, 0.0)
    results = [{"label": "a", "metrics": {"m": 0.1}}, {"label": "a", "metrics": {"m": 0.3}},
               {"label": "b", "metrics": {"m": 0.5}}]
    rows = summarise(results, ["m"])
    assert [(r["setting"], r["runs"], r["m"]) for r in rows] == [("a", 2, pytest.approx(0.2)), ("b", 1, 0.5)]
    assert "| a | 2 | 0.2000 ± 0.1414 |" in markdown_table(rows, ["m"])
    assert "| b | 1 | 0.5000 (n=1) |" in markdown_table(rows, ["m"])  # one run: no "± 0.0000"
    parsed = list(csv.DictReader(io.StringIO(csv_table(rows, ["m"]))))
    assert parsed[0]["setting"] == "a" and float(parsed[0]["m_spread"]) == pytest.approx(0.1414, abs=1e-4)


def test_compare_cli_runs_each_setting_and_seed_under_one_comparison(prefect_harness, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    from flows.cli import main

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("masking: [static, dynamic]\n", encoding="utf-8")
    argv = ["compare", "--grid-file", str(grid_file), "--grid", "whole_word=false", "--seeds", "2", *TINY_ARGS,
            "--workdir", str(tmp_path / "work"), "--experiment", "cmp"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plots = Path(out.split("table and plots:")[1].split()[0])  # the command names files a person can open
    assert {"comparison.md", "accuracy.png", "loss_curves.png"} <= {f.name for f in plots.iterdir()}
    assert "| masking=static whole_word=false | 2 |" in out and "| masking=dynamic whole_word=false | 2 |" in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("melos.comparison") == "parent"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("melos.comparison") == parent.info.run_id]
    assert sorted((c.data.tags["melos.setting"], c.data.tags["melos.seed"]) for c in children) == [
        ("masking=dynamic whole_word=false", "0"), ("masking=dynamic whole_word=false", "1"),
        ("masking=static whole_word=false", "0"), ("masking=static whole_word=false", "1"),
    ]
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "eval/top1_accuracy" in c.data.metrics and "eval/pseudo_perplexity" in c.data.metrics
        assert c.data.params["train.max_steps"] == "4"
    # the data stages ran once, under the comparison run
    stages = [r.data.tags.get("melos.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(s for s in stages if s != "setting") == ["download", "tokenize", "vocab"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert artifacts == {f"comparison/{f}" for f in
                         ("comparison.md", "comparison.csv", "loss_curves.png", "accuracy.png", "pos_accuracy.png")}
    local = client.download_artifacts(parent.info.run_id, "comparison", str(tmp_path / "dl"))
    for png in ("loss_curves.png", "accuracy.png", "pos_accuracy.png"):
        assert (tmp_path / "dl" / "comparison" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader(open(f"{local}/comparison.csv", encoding="utf-8")))
    assert [row["runs"] for row in table] == ["2", "2"]
    # the table's means are the children's metrics
    for row in table:
        mine = [c.data.metrics["eval/top1_accuracy"] for c in children if c.data.tags["melos.setting"] == row["setting"]]
        assert float(row["eval/top1_accuracy"]) == pytest.approx(sum(mine) / 2, rel=1e-5)


def test_compare_cli_refuses_bad_grids_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from flows.cli import main

    with pytest.raises(SystemExit, match="not a training setting"):
        main(["compare", "--grid", "mask_rat=0.1,0.2", "--workdir", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="mask rate"):
        main(["compare", "--grid", "mask_rate=0.1,7", "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_settings_listed_one_by_one(tmp_path, monkeypatch) -> None:
    """A study that changes one thing at a time around a baseline: a YAML list of settings."""
    base = TrainConfig(seed=3, max_steps=10, mask_rate=0.15)
    listed = [{}, {"mask_rate": "0.3"}, {"mask_rate": "0.3:0.15:linear"}, {"masking": "static"}, {"whole_word": True}]
    jobs = setting_configs(base, check_grid(listed), 2)
    assert [label for label, _, _ in jobs[::2]] == [
        "baseline", "mask_rate=0.3", "mask_rate=0.3:0.15:linear", "masking=static", "whole_word=True"]
    assert [seed for _, seed, _ in jobs[:2]] == [3, 4]
    cfgs = {label: cfg for label, seed, cfg in jobs if seed == 3}
    assert cfgs["baseline"] == base.model_copy(update={"seed": 3})  # the shared settings alone
    assert cfgs["masking=static"].mask_rate == 0.15 and cfgs["masking=static"].masking == "static"
    assert cfgs["whole_word=True"].whole_word and not cfgs["mask_rate=0.3"].whole_word
    with pytest.raises(ValueError, match="repeat"):
        check_grid([{"mask_rate": 0.3}, {"mask_rate": 0.3}])
    with pytest.raises(ValueError, match="must be a mapping"):
        check_grid([{}, "mask_rate=0.3"])
    with pytest.raises(ValueError, match="same steps and seeds"):
        check_grid([{"max_steps": 5}])

    from flows.cli import main
    from flows.compare import compare

    assert compare.validate_parameters({"grid": listed})["grid"] == listed  # the flow takes the list as is
    assert check_grid([{"whole-word": True}]) == [{"whole_word": True}]  # spelled as the flag, too
    assert check_grid({"mask-rate": [0.3]}) == {"mask_rate": [0.3]}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    grid_file = tmp_path / "study.yaml"
    grid_file.write_text("- {}\n- {mask_rate: 0.3}\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="lists its settings one by one"):
        main(["compare", "--grid-file", str(grid_file), "--grid", "masking=static", "--workdir", str(tmp_path / "w")])
    grid_file.write_text("- {}\n- {mask_rat: 0.3}\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="study.yaml: --grid mask_rat: not a training setting"):
        main(["compare", "--grid-file", str(grid_file), "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_differences_against_the_first_setting_and_rank_agreement() -> None:
    from mlm_core.grid import beyond_noise, differences_table, kendall_tau, ranking

    results = [{"label": label, "metrics": {"acc": a, "eval/pseudo_perplexity": p}}
               for label, runs in (("base", [(0.30, 90.0), (0.32, 92.0)]), ("far", [(0.40, 70.0), (0.42, 71.0)]),
                                   ("near", [(0.31, 95.0), (0.34, 80.0)]), ("one", [(0.5, 60.0)]))
               for a, p in runs]
    rows = summarise(results, ["acc", "eval/pseudo_perplexity"])
    base, far, near, one = rows
    assert beyond_noise(far, base, "acc") is True  # 0.41 ± 0.014 against 0.31 ± 0.014
    assert beyond_noise(near, base, "acc") is False  # 0.325 ± 0.021 overlaps 0.31 ± 0.014
    assert beyond_noise(one, base, "acc") is None  # one run: no spread to judge by
    table = differences_table(rows, ["acc"])
    assert "| far | +0.1000 **beyond** |" in table and "| near | +0.0150 within |" in table
    assert "| one | +0.1900 (n=1) |" in table and "| base |" not in table
    assert ranking(rows, "acc") == "one > far > near > base"
    assert ranking(rows, "eval/pseudo_perplexity") == "one > far > near > base"  # lower is better
    assert kendall_tau(rows, "acc", "eval/pseudo_perplexity") == 1.0  # the same order, each the right way round
    assert kendall_tau(rows, "acc", "acc") == 1.0
    flipped = [{**r, "m": -r["acc"]} for r in rows]
    assert kendall_tau(flipped, "acc", "m") == -1.0
    swapped = [{**r, "m": {"one": 2, "far": 3, "near": 1, "base": 0}[r["setting"]]} for r in rows]
    assert kendall_tau(swapped, "acc", "m") == pytest.approx(4 / 6)  # one pair of six out of order
    tied = [{**r, "m": 0.36 if r["setting"] in ("far", "near") else r["acc"]} for r in rows]
    assert kendall_tau(tied, "acc", "m") == pytest.approx(5 / 6) and "far = near" in ranking(tied, "m")
    assert "| one | 1 | 0.5000 (n=1) | 60.0000 (n=1) |" in markdown_table(rows, ["acc", "eval/pseudo_perplexity"])
    nan_row = summarise([{"label": "ctl", "metrics": {"f1": 0.5}}, {"label": "ctl", "metrics": {"f1": 0.6}}],
                        ["acc", "f1"])
    assert "| ctl | 2 | – | 0.5500 ± 0.0707 |" in markdown_table(nan_row, ["acc", "f1"])  # no "nan ± nan"
