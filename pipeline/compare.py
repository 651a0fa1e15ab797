"""Compare training runs logged to MLflow: a table of chosen params and final metrics, and PNG plots of the
validation metrics, the throughput and the loss over steps, one line per run.

    python -m pipeline.compare --experiment demo_cpu --out comparison --csv comparison/runs.csv
    python -m pipeline.compare --runs demo_cpu 3f2a...e1 --metrics loss val/PQ

Works on the local SQLite store the trainer writes and on a tracking server (--tracking-uri http://host:5000).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console
from rich.table import Table

from pipeline.config import TrackingSettings, resolve_path
from pipeline.registry import versions_of_run

DEFAULT_PARAMS = ("model.preset", "training.max_steps", "deepspeed.zero_stage", "deepspeed.precision",
                  "scaling.num_workers")
DEFAULT_METRICS = ("loss", "val/PQ", "val/AP", "val/mIoU", "images_per_second")
VALIDATION_PREFIX = "val/"
LOSS_METRIC = "loss"
THROUGHPUT_METRIC = "images_per_second"
MISSING = "-"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_SEARCH_PAGE = 1000


class CompareError(ValueError):
    """The comparison cannot be made: unknown experiment or run, no runs, unreachable store."""


@dataclass
class RunSummary:
    """One table row: what identifies the run, its chosen params and the final value of each chosen metric."""

    label: str
    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    model_versions: list[str] = field(default_factory=list)
    """Registered model versions made from the run ('name vN roles @aliases', pipeline/registry.py)."""


@dataclass
class Comparison:
    """What `compare` found and wrote. `absent_metrics`/`absent_params` were logged by none of the runs."""

    runs: list[RunSummary]
    params: list[str]
    metrics: list[str]
    absent_params: list[str] = field(default_factory=list)
    absent_metrics: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    csv_path: Path | None = None


# ------------------------------------------------------------------------------------------ finding runs
def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the job default resolved as a job file's would be (under the work directory)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or TrackingSettings.model_fields["tracking_uri"].default
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + resolve_path(uri.removeprefix("sqlite:///"))
    return uri


def open_client(tracking_uri: str):
    """An MlflowClient; a SQLite store that does not exist is an error rather than a new empty database."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise CompareError(f"--tracking-uri: no MLflow database at {database} "
                               "(set --tracking-uri or MLFLOW_TRACKING_URI)")
    elif tracking_uri.startswith(("http://", "https://")):
        _check_reachable(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def _check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """MLflow's REST client retries a refused connection for minutes; a wrong host or port should fail now."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise CompareError(f"--tracking-uri: cannot connect to {parts.hostname}:{port} ({err})") from None


def find_runs(client, experiment: str | None, run_refs: Sequence[str] | None) -> list:
    """The runs to compare: `run_refs` (names or ids, in the order given; a name matches every run of that
    name) within `experiment` when given, else every run of `experiment` oldest first."""
    experiments = [_experiment_by_name(client, experiment)] if experiment else None
    if run_refs:
        return [run for ref in run_refs for run in _runs_for_ref(client, ref, experiments)]
    if experiments is None:
        raise CompareError("give --experiment NAME or --runs NAME_OR_ID ...")
    runs = _search(client, [experiments[0].experiment_id], "")
    if not runs:
        raise CompareError(f"--experiment: experiment '{experiment}' has no runs")
    return runs


def _experiment_by_name(client, name: str):
    found = client.get_experiment_by_name(name)
    if found is None:
        known = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"--experiment: no experiment named '{name}' (known: {', '.join(known) or 'none'})")
    return found


def _runs_for_ref(client, ref: str, experiments: list | None) -> list:
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(ref):
        try:
            return [client.get_run(ref)]
        except MlflowException:
            pass  # a 32-hex-digit string can still be a run name
    experiments = experiments or client.search_experiments()
    runs = _search(client, [e.experiment_id for e in experiments], f"attributes.run_name = {_quoted(ref)}")
    if not runs:
        where = ", ".join(f"'{e.name}'" for e in experiments)
        raise CompareError(f"--runs: no run named or with id '{ref}' in experiment(s) {where}")
    return runs


def _quoted(value: str) -> str:
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise CompareError(f"--runs: a run name cannot contain both quote characters: {value!r}")


def _search(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=_SEARCH_PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# ------------------------------------------------------------------------------------------ the table
def summarize(runs: list, params: Sequence[str], metrics: Sequence[str]) -> list[RunSummary]:
    """Final metric values are MLflow's latest (highest step, then latest time), as the trainer logs the end
    of training last."""
    labels = _labels(runs)
    return [RunSummary(label=label, run_id=run.info.run_id, status=run.info.status,
                       params={key: run.data.params[key] for key in params if key in run.data.params},
                       metrics={key: run.data.metrics[key] for key in metrics if key in run.data.metrics})
            for label, run in zip(labels, runs)]


def _labels(runs: list) -> list[str]:
    """Run names, with a short id appended where several runs share a name."""
    names = [run.info.run_name or run.info.run_id[:8] for run in runs]
    return [f"{name} ({run.info.run_id[:8]})" if names.count(name) > 1 else name for name, run in zip(names, runs)]


def _format_value(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def render_table(summaries: list[RunSummary], params: Sequence[str], metrics: Sequence[str]) -> Table:
    """One column per run and one row per param or metric (as MLflow's own compare view): a few runs fit a
    terminal however long the flattened config keys are."""
    table = Table(title=f"{len(summaries)} run(s)")
    table.add_column("", style="bold", overflow="fold")
    for row in summaries:
        table.add_column(row.label, justify="right", overflow="fold")
    table.add_row("run id", *(row.run_id[:8] for row in summaries))
    table.add_row("status", *(row.status for row in summaries))
    table.add_row("model versions", *("\n".join(row.model_versions) or MISSING for row in summaries))
    table.add_section()
    for name in params:
        table.add_row(name, *(row.params.get(name, MISSING) for row in summaries))
    if params:
        table.add_section()
    for name in metrics:
        table.add_row(name, *(_format_value(row.metrics[name]) if name in row.metrics else MISSING
                              for row in summaries))
    return table


def write_csv(path: Path, summaries: list[RunSummary], params: Sequence[str], metrics: Sequence[str]) -> None:
    """Full-precision values; a value the run did not log is an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "run_id", "status", "model_versions", *params, *metrics])
        for row in summaries:
            writer.writerow([row.label, row.run_id, row.status, "; ".join(row.model_versions),
                             *(row.params.get(name, "") for name in params),
                             *(repr(row.metrics[name]) if name in row.metrics else "" for name in metrics)])


# ------------------------------------------------------------------------------------------ the plots
def metric_series(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, one value per step: a resumed run or the trainer's final log can
    repeat a step, and the latest value logged at a step is the one that counts."""
    latest: dict[int, tuple[int, float]] = {}
    for point in client.get_metric_history(run_id, key):
        if point.step not in latest or point.timestamp >= latest[point.step][0]:
            latest[point.step] = (point.timestamp, point.value)
    steps = sorted(latest)
    return steps, [latest[step][1] for step in steps]


def plot_metrics(client, summaries: list[RunSummary], keys: Sequence[str], title: str, path: Path) -> bool:
    """One panel per metric, one line per run. False (and nothing written) when no run logged any of `keys`."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.ticker import MaxNLocator

    series = {key: [(row.label, *metric_series(client, row.run_id, key)) for row in summaries] for key in keys}
    keys = [key for key in keys if any(steps for _, steps, _ in series[key])]
    if not keys:
        return False
    figure = Figure(figsize=(6.4 * len(keys), 4.2), layout="constrained")
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        for index, (label, steps, values) in enumerate(series[key]):
            if steps:  # a run keeps its colour in every panel, even where another run is missing
                axes.plot(steps, values, color=f"C{index % 10}", marker="o" if len(steps) < 30 else None,
                          markersize=4, label=label)
        axes.set(title=key, xlabel="step", ylabel=key)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    if len(keys) > 1:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return True


def write_plots(client, summaries: list[RunSummary], metrics: Sequence[str], out: Path,
                warn=lambda message: None) -> list[Path]:
    """validation.png (the chosen val/ metrics), throughput.png and loss.png under `out`."""
    plots = {
        "validation.png": ("validation metrics", [m for m in metrics if m.startswith(VALIDATION_PREFIX)]),
        "throughput.png": ("throughput", [THROUGHPUT_METRIC]),
        "loss.png": ("training loss", [LOSS_METRIC]),
    }
    written = []
    for filename, (title, keys) in plots.items():
        if keys and plot_metrics(client, summaries, keys, title, out / filename):
            written.append(out / filename)
        elif keys:
            warn(f"no run logged {', '.join(keys)}: {filename} not written")
    return written


# ------------------------------------------------------------------------------------------ entry points
def compare(tracking_uri: str, experiment: str | None = None, runs: Sequence[str] | None = None,
            params: Sequence[str] = DEFAULT_PARAMS, metrics: Sequence[str] = DEFAULT_METRICS,
            out: str | os.PathLike | None = None, csv_path: str | os.PathLike | None = None,
            console: Console | None = None, warn=None) -> Comparison:
    """Find the runs, print the table to `console` (if given), write plots under `out` and the table to
    `csv_path` (each if given). Raises CompareError for an unknown experiment or run, or no runs."""
    from mlflow.exceptions import MlflowException

    warn = warn or (lambda message: None)
    try:
        client = open_client(tracking_uri)
        found = find_runs(client, experiment, runs)
        summaries = summarize(found, params, metrics)
        for row in summaries:
            row.model_versions = versions_of_run(client, row.run_id)
        comparison = Comparison(runs=summaries, params=list(params), metrics=list(metrics))
        comparison.absent_params = [p for p in params if not any(p in row.params for row in summaries)]
        comparison.absent_metrics = [m for m in metrics if not any(m in row.metrics for row in summaries)]
        for kind, names in (("param", comparison.absent_params), ("metric", comparison.absent_metrics)):
            for name in names:
                warn(f"{kind} '{name}' was logged by none of the {len(summaries)} run(s)")
        if console is not None:
            console.print(render_table(summaries, params, metrics))
        if csv_path is not None:
            comparison.csv_path = Path(csv_path)
            write_csv(comparison.csv_path, summaries, params, metrics)
        if out is not None:
            comparison.plots = write_plots(client, summaries, metrics, Path(out), warn)
    except MlflowException as err:
        raise CompareError(f"MLflow at {tracking_uri}: {err.message}") from None
    return comparison


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlruns/mlflow.db)")
    parser.add_argument("--experiment", help="experiment name: all its runs, or the one --runs are searched in")
    parser.add_argument("--runs", nargs="+", metavar="NAME_OR_ID", help="run names or ids, in table order")
    parser.add_argument("--params", nargs="+", default=list(DEFAULT_PARAMS), help="flattened job-config keys")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="final values shown")
    parser.add_argument("--out", default="comparison", help="folder for the PNG plots (default: ./comparison)")
    parser.add_argument("--csv", default=None, help="also write the table to this CSV file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    errors = Console(stderr=True)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        comparison = compare(tracking_uri, args.experiment, args.runs, args.params, args.metrics, args.out,
                             args.csv, console=Console(), warn=lambda m: errors.print(f"[yellow]warning:[/] {m}"))
    except CompareError as err:
        errors.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    for path in comparison.plots:
        errors.print(f"wrote {path}", highlight=False)
    if comparison.csv_path is not None:
        errors.print(f"wrote {comparison.csv_path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
