"""The MLflow Model Registry side of training: the exported best and final models of a run become versions of
one registered model (by default named after the experiment), and `models:/<name>/<version>` or
`models:/<name>@<alias>` gives back a model file anywhere a model file is taken.

A version's source is the run's artifact folder (`runs:/<run id>/model` or `.../best`: model.pt, classes.json,
metrics.json, job_config.json); its tags carry the run id, the step, the role (final, best) and the metrics, and
the job config as JSON. A run registers its best model (when another step's) before its final one, so
`models:/<name>/latest` is the final model of the run that finished last; the alias `best` moves to a version only
when its validation PQ beats the version holding it.

    python -m pipeline.registry fetch models:/demo_cpu/1     # prints the local path of model.pt
    python -m pipeline.registry list demo_cpu                 # versions, their runs, steps, PQ and aliases
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

BEST_ALIAS = "best"
BEST_METRIC = "val/PQ"
MODEL_FILE = "model.pt"


class RegistryError(ValueError):
    """A model URI that cannot be resolved; the message names it."""


@dataclasses.dataclass
class ExportedModel:
    """A model folder logged to the run under `artifact_path`, with its role(s) and the metrics at its step."""

    artifact_path: str
    roles: tuple[str, ...]
    step: int
    metrics: dict[str, float]


def register_exported_models(client, name: str, run_id: str, models: list[ExportedModel], job_config: dict) -> list[str]:
    """One version per exported model, in the order given; returns 'name vN (roles)' for each."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="OneFormer models exported by training runs")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    registered = []
    earlier = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    for model in models:
        already = [v for v in earlier if v.tags.get("step") == str(model.step)
                   and set(model.roles) <= set(v.tags.get("roles", "").split(","))]
        if already:  # an earlier job of a continued run registered these weights
            registered.append(f"{name} v{already[0].version} ({', '.join(model.roles)}, registered before)")
            continue
        tags = {"run_id": run_id, "step": str(model.step), "roles": ",".join(model.roles),
                "job_config": json.dumps(job_config, sort_keys=True),
                **{f"metric.{key}": repr(float(value)) for key, value in model.metrics.items()
                   if isinstance(value, int | float)}}
        version = client.create_model_version(name, source=f"runs:/{run_id}/{model.artifact_path}", run_id=run_id,
                                              tags=tags, description=f"{'/'.join(model.roles)} model of run "
                                                                     f"{run_id} at step {model.step}")
        if "best" in model.roles and _beats_best(client, name, model.metrics.get(BEST_METRIC)):
            client.set_registered_model_alias(name, BEST_ALIAS, version.version)
        registered.append(f"{name} v{version.version} ({', '.join(model.roles)})")
    return registered


def _beats_best(client, name: str, score: float | None) -> bool:
    from mlflow.exceptions import MlflowException

    if score is None:
        return False
    try:
        holder = client.get_model_version_by_alias(name, BEST_ALIAS)
    except MlflowException:
        return True  # no version holds the alias yet
    held = holder.tags.get(f"metric.{BEST_METRIC}")
    return held is None or score > float(held)


def versions_of_run(client, run_id: str) -> list[str]:
    """'name vN (aliases)' for every registered version made from the run, oldest first."""
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    aliases_by_model = {name: client.get_registered_model(name).aliases for name in {v.name for v in versions}}
    labels = []
    for version in sorted(versions, key=lambda v: (v.name, int(v.version))):
        held = [alias for alias, number in aliases_by_model[version.name].items() if str(number) == str(version.version)]
        aliases = f" @{',@'.join(sorted(held))}" if held else ""  # search results leave aliases out
        labels.append(f"{version.name} v{version.version} {version.tags.get('roles', '')}{aliases}".strip())
    return labels


def is_model_uri(value: str) -> bool:
    return value.startswith("models:/")


def local_model_file(uri: str, tracking_uri: str | None = None) -> str:
    """A model file for `uri`: a `models:/name/version`, `models:/name/latest` or `models:/name@alias` is
    downloaded from the registry at `tracking_uri` (into a temporary folder) and the path of its model.pt
    returned; anything else is returned as is."""
    if not is_model_uri(uri):
        return uri
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.compare import default_tracking_uri, open_client

    tracking_uri = tracking_uri or default_tracking_uri()
    try:
        version = _model_version(open_client(tracking_uri), uri)
        folder = mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri)
    except MlflowException as error:
        raise RegistryError(f"{uri}: not in the model registry at {tracking_uri} "
                            f"({error.message.splitlines()[0]})") from None
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise RegistryError(f"{uri}: the registered folder has no {MODEL_FILE} "
                            f"(found {sorted(p.name for p in Path(folder).iterdir())})")
    return str(path)


def _model_version(client, uri: str):
    """The registry entry `uri` names (the client's own registry, not MLflow's process-wide one)."""
    name, _, version = uri.removeprefix("models:/").partition("/")
    if "@" in name and not version:
        name, alias = name.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    if version == "latest":
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RegistryError(f"{uri}: the registered model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")
    return client.get_model_version(name, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else the local store")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download a registered model; print the path of its model.pt")
    fetch.add_argument("uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    listing = commands.add_parser("list", help="the versions of a registered model")
    listing.add_argument("name")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from pipeline.compare import CompareError, default_tracking_uri, open_client

    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        if args.command == "fetch":
            print(local_model_file(args.uri, tracking_uri))
            return 0
        client = open_client(tracking_uri)
        aliases_by_version: dict[str, list[str]] = {}
        for alias, number in client.get_registered_model(args.name).aliases.items():
            aliases_by_version.setdefault(str(number), []).append(alias)
        for version in sorted(client.search_model_versions(f"name = '{args.name}'"), key=lambda v: int(v.version)):
            aliases = ",".join(aliases_by_version.get(str(version.version), [])) or "-"
            print(f"v{version.version}\trun {version.run_id}\tstep {version.tags.get('step', '?')}\t"
                  f"{version.tags.get('roles', '')}\tPQ {version.tags.get(f'metric.{BEST_METRIC}', '-')}\t"
                  f"aliases {aliases}")
    except (RegistryError, CompareError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except MlflowException as error:
        print(f"error: {args.name if args.command == 'list' else args.uri}: {error.message.splitlines()[0]}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
