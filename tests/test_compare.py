"""pipeline.compare against real MLflow stores: a SQLite file written by the real client, and a real
`mlflow server` process over http."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image
from servers import MlflowServer, free_port

from pipeline.compare import CompareError, compare, default_tracking_uri, main, metric_series

pytestmark = pytest.mark.slow  # every test shares a real MLflow server started with the module

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "compare_test"
START = 1_700_000_000_000  # ms; explicit timestamps make "latest at a step" well defined
# Two runs shaped like the trainer's: flattened config params, per-step metrics, validation at some steps.
# alpha repeats step 4 later (the trainer's final log), so its final loss is 1.25, not 1.5; beta never logs AP.
RUNS = {
    "alpha": {
        "params": {"model.preset": "tiny", "training.max_steps": "4", "deepspeed.zero_stage": "2",
                   "deepspeed.precision": "fp32", "scaling.num_workers": "1"},
        "metrics": {"loss": [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.5), (4, 1.25)],
                    "images_per_second": [(1, 10.0), (2, 12.0), (3, 11.0), (4, 12.5)],
                    "val/PQ": [(2, 10.0), (4, 20.0)], "val/AP": [(4, 5.0)], "val/mIoU": [(2, 30.0), (4, 41.0)]},
    },
    "beta": {
        "params": {"model.preset": "swin_l", "training.max_steps": "4", "deepspeed.zero_stage": "3",
                   "deepspeed.precision": "bf16", "scaling.num_workers": "2"},
        "metrics": {"loss": [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.5)],
                    "images_per_second": [(1, 20.0), (2, 24.0), (3, 23.0), (4, 25.0)],
                    "val/PQ": [(2, 25.0), (4, 33.0)], "val/mIoU": [(2, 40.0), (4, 44.0)]},
    },
}
FINAL = {"alpha": {"loss": 1.25, "val/PQ": 20.0, "val/AP": 5.0, "val/mIoU": 41.0, "images_per_second": 12.5},
         "beta": {"loss": 2.5, "val/PQ": 33.0, "val/mIoU": 44.0, "images_per_second": 25.0}}


def log_runs(client: MlflowClient, artifact_root: Path) -> dict[str, str]:
    """Create the experiment with both runs (in start order) and an empty experiment; returns name -> id."""
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifact_root.as_uri())
    client.create_experiment("empty", artifact_location=(artifact_root / "empty").as_uri())
    run_ids = {}
    for offset, (name, spec) in enumerate(RUNS.items()):
        run = client.create_run(experiment_id, start_time=START + offset * 1000, run_name=name)
        points = [Metric(key, value, START + index, step) for key, history in spec["metrics"].items()
                  for index, (step, value) in enumerate(history)]
        client.log_batch(run.info.run_id, metrics=points, params=[Param(k, v) for k, v in spec["params"].items()],
                         tags=[RunTag("git_commit", "abc123"), RunTag("cluster_shape", "1 workers x 1.0 CPU")])
        client.set_terminated(run.info.run_id)
        run_ids[name] = run.info.run_id
    return run_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    run_ids = log_runs(MlflowClient(tracking_uri=uri), folder / "artifacts")
    return uri, run_ids


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipeline.compare", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def pixels_near(path: Path, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(rgb)).max(axis=-1) <= tolerance).sum())


TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's first two line colours: alpha, beta


def assert_csv_matches_runs(path: Path) -> None:
    rows = {row["run"]: row for row in csv.DictReader(path.open())}
    assert list(rows) == ["alpha", "beta"]
    for name, finals in FINAL.items():
        assert {k: float(rows[name][k]) for k in finals} == finals
        assert rows[name]["model.preset"] == RUNS[name]["params"]["model.preset"]
    assert rows["beta"]["val/AP"] == ""


# ------------------------------------------------------------------------------------------ sqlite store
def test_function_reports_final_values_and_writes_plots(store, tmp_path):
    uri, run_ids = store
    comparison = compare(uri, experiment=EXPERIMENT, out=tmp_path / "plots", csv_path=tmp_path / "table.csv")

    assert [row.label for row in comparison.runs] == ["alpha", "beta"]
    assert [row.run_id for row in comparison.runs] == [run_ids["alpha"], run_ids["beta"]]
    for row in comparison.runs:
        assert row.metrics == FINAL[row.label]
        assert row.params == RUNS[row.label]["params"]
        assert row.status == "FINISHED"
    assert comparison.absent_metrics == [] and comparison.absent_params == []
    assert_csv_matches_runs(tmp_path / "table.csv")

    assert sorted(p.name for p in comparison.plots) == ["loss.png", "throughput.png", "validation.png"]
    for plot in comparison.plots:
        width, height = Image.open(plot).size
        assert width >= 600 and height >= 400
        # one line per run, in each run's colour
        assert pixels_near(plot, TAB_BLUE) > 200 and pixels_near(plot, TAB_ORANGE) > 200, plot.name
    # three validation panels side by side, one loss panel
    plots = tmp_path / "plots"
    assert Image.open(plots / "validation.png").size[0] > 2.5 * Image.open(plots / "loss.png").size[0]


def test_metric_series_keeps_the_latest_value_per_step(store):
    uri, run_ids = store
    steps, values = metric_series(MlflowClient(tracking_uri=uri), run_ids["alpha"], "loss")
    assert steps == [1, 2, 3, 4]
    assert values == [4.0, 3.0, 2.0, 1.25]


def test_command_line_prints_both_runs(store, tmp_path):
    uri, _ = store
    result = run_cli("--tracking-uri", uri, "--experiment", EXPERIMENT, "--out", str(tmp_path / "plots"),
                     "--csv", str(tmp_path / "table.csv"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "alpha" in line)
    assert header.index("alpha") < header.index("beta")
    loss_row = next(line for line in lines if line.strip("│ ").startswith("loss"))
    assert loss_row.split() == ["│", "loss", "│", "1.25", "│", "2.5", "│"]
    ap_row = next(line for line in lines if "val/AP" in line)
    assert ap_row.split() == ["│", "val/AP", "│", "5", "│", "-", "│"]
    assert "swin_l" in result.stdout and "bf16" in result.stdout
    assert_csv_matches_runs(tmp_path / "table.csv")
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "throughput.png", "validation.png"}


def test_runs_select_by_name_and_id_in_the_given_order(store):
    uri, run_ids = store
    by_name = compare(uri, runs=["beta"])
    assert [row.label for row in by_name.runs] == ["beta"]
    mixed = compare(uri, experiment=EXPERIMENT, runs=["beta", run_ids["alpha"]])
    assert [row.run_id for row in mixed.runs] == [run_ids["beta"], run_ids["alpha"]]
    assert mixed.runs[1].metrics == FINAL["alpha"]


def test_runs_sharing_a_name_are_told_apart(store):
    uri, run_ids = store
    comparison = compare(uri, runs=["alpha", run_ids["alpha"]])
    assert [row.label for row in comparison.runs] == [f"alpha ({run_ids['alpha'][:8]})"] * 2


def test_metric_absent_from_all_runs_warns_and_shows_a_dash(store, tmp_path):
    uri, _ = store
    warnings = []
    comparison = compare(uri, experiment=EXPERIMENT, metrics=["loss", "val/nope"], params=["model.preset", "x.y"],
                         out=tmp_path / "plots", csv_path=tmp_path / "t.csv", warn=warnings.append)
    assert comparison.absent_metrics == ["val/nope"] and comparison.absent_params == ["x.y"]
    assert any("'val/nope'" in w for w in warnings) and any("'x.y'" in w for w in warnings)
    assert any("validation.png not written" in w for w in warnings)
    assert sorted(p.name for p in comparison.plots) == ["loss.png", "throughput.png"]
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert [row["val/nope"] for row in rows] == ["", ""]


@pytest.mark.parametrize("kwargs, message", [
    ({"experiment": "no_such_experiment"}, "no experiment named 'no_such_experiment' (known: Default, compare_test, empty)"),
    ({"experiment": "empty"}, "experiment 'empty' has no runs"),
    ({"runs": ["gamma"]}, "no run named or with id 'gamma'"),
    ({"experiment": "empty", "runs": ["alpha"]}, "no run named or with id 'alpha' in experiment(s) 'empty'"),
    ({}, "give --experiment NAME or --runs"),
])
def test_errors_name_the_problem(store, kwargs, message):
    uri, _ = store
    with pytest.raises(CompareError) as caught:
        compare(uri, **kwargs)
    assert message in str(caught.value)


def test_missing_database_is_an_error_not_a_new_store(tmp_path):
    database = tmp_path / "absent" / "mlflow.db"
    with pytest.raises(CompareError, match="no MLflow database"):
        compare(f"sqlite:///{database}", experiment=EXPERIMENT)
    assert not database.exists()


def test_main_exits_2_with_the_error_on_stderr(store, capsys):
    uri, _ = store
    assert main(["--tracking-uri", uri, "--runs", "gamma"]) == 2
    assert "no run named or with id 'gamma'" in capsys.readouterr().err


def test_default_tracking_uri_follows_the_job_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ONEFORMER_WORKDIR", str(tmp_path))
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------------------ mlflow server
@pytest.fixture(scope="module", autouse=True)
def mlflow_server(store, tmp_path_factory):
    """A server over a copy of the module's store: already migrated and holding both runs, so the test reads
    over http exactly what the SQLite tests read directly. Started with the module (autouse) so that its
    slow start-up overlaps the other tests; the http test waits for it to answer."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(folder)
    shutil.copyfile(store[0].removeprefix("sqlite:///"), server.database)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_command_works_against_a_tracking_server(mlflow_server, tmp_path, capsys):
    mlflow_server.wait_until_healthy()
    url = mlflow_server.url
    exit_code = main(["--tracking-uri", url, "--experiment", EXPERIMENT, "--runs", "alpha", "beta",
                      "--out", str(tmp_path / "plots"), "--csv", str(tmp_path / "table.csv")])
    assert exit_code == 0, capsys.readouterr().err
    assert_csv_matches_runs(tmp_path / "table.csv")
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "throughput.png", "validation.png"}
    assert pixels_near(tmp_path / "plots" / "validation.png", TAB_ORANGE) > 200
    assert main(["--tracking-uri", url, "--experiment", "no_such_experiment"]) == 2
    assert "no experiment named 'no_such_experiment'" in capsys.readouterr().err


def test_unreachable_server_fails_fast():
    with pytest.raises(CompareError, match="cannot connect to 127.0.0.1"):
        compare(f"http://127.0.0.1:{free_port()}", experiment=EXPERIMENT)
