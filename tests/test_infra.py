"""Every file in infra/ is checked here, offline: the cluster-launcher YAML against Ray's own schema, Kubernetes
manifests against the core schemas of kubernetes-validate and the vendored KubeRay CRD subset, the compose file
against the compose spec, the Dockerfiles' pins against pyproject.toml, the scripts by running them; and the
MLflow server for real, against a PostgreSQL started on 127.0.0.1 and stopped again by the test."""

from __future__ import annotations

import configparser
import functools
import importlib.resources
import importlib.util
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml
from referencing import Registry, Resource
from servers import infra_mlflow_server

from pipeline.config import WORKDIR_ENV, parse_job

pytestmark = pytest.mark.slow  # infrastructure files and a real PostgreSQL-backed MLflow server

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
SCHEMAS = INFRA / "schemas"
# The oldest Kubernetes minor the manifests promise to apply on (schemas shipped by kubernetes-validate).
KUBERNETES_VERSION = "1.30.0"
KUBERAY_SCHEMA = SCHEMAS / "kuberay-ray.io-v1.schema.json"
COMPOSE_SCHEMA = SCHEMAS / "compose-spec-docker-compose-1.29.2.json"
# Ray's own cluster-launcher schema, shipped in the ray package (found without importing ray, which is slow).
RAY_SCHEMA = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"

CLUSTER_LAUNCHER_FILES = sorted((INFRA / "cluster-launcher").glob("*.yaml"))
KUBERNETES_FILES = sorted((INFRA / "kuberay").glob("*.yaml")) + sorted((INFRA / "mlflow" / "k8s").glob("*.yaml"))
COMPOSE_FILE = INFRA / "mlflow" / "compose.yaml"
COMPOSE_ENV_EXAMPLE = INFRA / "mlflow" / "mlflow.env.example"
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "mlflow" / "Dockerfile"]
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
START_SERVER = INFRA / "mlflow" / "start-server.sh"
K8S_UP = INFRA / "mlflow" / "k8s" / "up.sh"
AUTH_INI = INFRA / "mlflow" / "basic_auth.ini"
POSTGRES_INIT = INFRA / "mlflow" / "postgres-init.sql"
READMES = [INFRA / "README.md", SCHEMAS / "README.md"]
VENDORED_SCHEMAS = [KUBERAY_SCHEMA, COMPOSE_SCHEMA]
# Pinned in the MLflow server image only; everything else pinned in a Dockerfile must match pyproject.toml.
SERVER_ONLY_PINS = {"boto3": "S3 client of the server's artifact proxy; clients never talk to S3",
                    "psycopg2-binary": "PostgreSQL driver of the tracking and auth stores"}
PLACEHOLDER = "CHANGE_ME"


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def covered_files() -> set[Path]:
    return {*CLUSTER_LAUNCHER_FILES, *KUBERNETES_FILES, COMPOSE_FILE, COMPOSE_ENV_EXAMPLE, *DOCKERFILES, DOCKERIGNORE,
            START_SERVER, K8S_UP, AUTH_INI, POSTGRES_INIT, *READMES, *VENDORED_SCHEMAS}


def infra_files() -> set[Path]:
    """Files of infra/ that git would commit (untracked included, ignored left out); every file without git."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "infra"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return {ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()}
    return {p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_every_infra_file_is_validated():
    unchecked = sorted(str(p.relative_to(ROOT)) for p in infra_files() - covered_files())
    assert not unchecked, f"files in infra/ that no check of tests/test_infra.py covers: {unchecked}"
    missing = sorted(str(p.relative_to(ROOT)) for p in covered_files() if not p.is_file())
    assert not missing, f"files the checks expect but infra/ lacks: {missing}"


# ------------------------------------------------------------------------------------------ schema validators
@functools.cache
def ray_cluster_validator() -> jsonschema.Validator:
    schema = json.loads(RAY_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@functools.cache
def kubernetes_definitions() -> dict:
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


def kuberay_validator(kind: str) -> jsonschema.Validator:
    """The vendored CRD subset; its pod templates refer to the strict Kubernetes core definitions."""
    if kind not in ("RayCluster", "RayJob"):
        raise ValueError(f"kind: the vendored KubeRay schema covers RayCluster and RayJob, got {kind!r}")
    crd, definitions = json.loads(KUBERAY_SCHEMA.read_text()), kubernetes_definitions()
    registry = Registry().with_resources([(definitions["$id"], Resource.from_contents(definitions)),
                                          (crd["$id"], Resource.from_contents(crd))])
    return jsonschema.Draft202012Validator({"$ref": f"{crd['$id']}#/$defs/{kind}"}, registry=registry)


def compose_validator() -> jsonschema.Validator:
    return jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))


def validate_manifest(document: dict) -> None:
    """Raise jsonschema.ValidationError when a Kubernetes object breaks its schema."""
    import kubernetes_validate

    if document.get("apiVersion") == "ray.io/v1":
        error = jsonschema.exceptions.best_match(kuberay_validator(document.get("kind")).iter_errors(document))
        if error is not None:
            raise error
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def describe(error: jsonschema.ValidationError) -> str:
    return f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message[:300]}"


@pytest.mark.parametrize("path", CLUSTER_LAUNCHER_FILES, ids=lambda p: p.name)
def test_cluster_launcher_config_matches_ray_schema(path):
    config = yaml.safe_load(path.read_text())
    errors = [describe(e) for e in ray_cluster_validator().iter_errors(config)]
    assert not errors, f"{path.name} breaks ray/autoscaler/ray-schema.json: {errors}"
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    for name, node_type in node_types.items():
        bounds = node_type.get("min_workers", 0), node_type.get("max_workers", 0), config["max_workers"]
        assert bounds[0] <= bounds[1] <= bounds[2], f"{name}: min_workers <= max_workers <= cluster max_workers: {bounds}"


@pytest.mark.parametrize("path", KUBERNETES_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kubernetes_manifests_match_their_schemas(path):
    documents = load_documents(path)
    assert documents, f"{path} holds no Kubernetes object"
    for document in documents:
        try:
            validate_manifest(document)
        except jsonschema.ValidationError as error:
            pytest.fail(f"{path.name}: {document.get('kind')} {document['metadata'].get('name')}: {describe(error)}")


def test_compose_file_matches_the_compose_spec():
    errors = [describe(e) for e in compose_validator().iter_errors(yaml.safe_load(COMPOSE_FILE.read_text()))]
    assert not errors, errors


def _typo_in_pod_template(document: dict) -> dict:
    spec = document["spec"].get("rayClusterSpec", document["spec"])
    spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resorces"] = {}
    return document


@pytest.mark.parametrize("case", ["launcher", "raycluster", "rayjob", "core", "compose"])
def test_validators_reject_a_broken_file(case):
    """Each validator catches a mistake a person makes: a misspelt key or a wrong type."""
    if case == "launcher":
        config = yaml.safe_load(CLUSTER_LAUNCHER_FILES[0].read_text())
        config["max_worker"] = config.pop("max_workers")
        assert list(ray_cluster_validator().iter_errors(config))
    elif case in ("raycluster", "rayjob"):
        document = _typo_in_pod_template(load_documents(INFRA / "kuberay" / f"{case}.yaml")[0])
        with pytest.raises(jsonschema.ValidationError, match="resorces"):
            validate_manifest(document)
    elif case == "core":
        document = load_documents(INFRA / "kuberay" / "storage.yaml")[0]
        document["spec"]["resources"]["requests"] = "500Gi"
        with pytest.raises(jsonschema.ValidationError):
            validate_manifest(document)
    else:
        compose = yaml.safe_load(COMPOSE_FILE.read_text())
        compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_ready"
        assert list(compose_validator().iter_errors(compose))


def test_vendored_schemas_are_valid_json_schemas():
    for path in VENDORED_SCHEMAS:
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)
    assert "v1.3" in json.loads(KUBERAY_SCHEMA.read_text())["description"], "state the KubeRay version vendored"


# ---------------------------------------------------------------------------------- the cluster and the job
def _job(path: str):
    return parse_job(yaml.safe_load((ROOT / path).read_text()), path)


def _env(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def test_raycluster_and_rayjob_run_the_main_job_on_shared_storage():
    cluster = load_documents(INFRA / "kuberay" / "raycluster.yaml")[0]
    ray_job = load_documents(INFRA / "kuberay" / "rayjob.yaml")[0]
    assert ray_job["spec"]["rayClusterSpec"] == cluster["spec"], "raycluster.yaml and rayjob.yaml define different clusters"

    entrypoint = ray_job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "pipeline.job"], entrypoint
    job_file = entrypoint[3].removeprefix("/app/")
    job = _job(job_file)

    claims = {doc["metadata"]["name"] for doc in load_documents(INFRA / "kuberay" / "storage.yaml")
              if doc["kind"] == "PersistentVolumeClaim"}
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        workdir = _env(container)[WORKDIR_ENV]["value"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounted[workdir]["persistentVolumeClaim"]["claimName"] in claims, f"{WORKDIR_ENV} is not the shared claim"
        assert _env(container)["MLFLOW_TRACKING_URI"]["value"] == job.tracking.tracking_uri

    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert job.scaling.use_gpu and int(limits["nvidia.com/gpu"]) == 1
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert job.scaling.num_workers == (4, 8), "the main job is elastic"
    assert group["maxReplicas"] >= job.scaling.max_workers, "the cluster cannot hold the job's workers"
    assert group["minReplicas"] <= job.scaling.num_workers[0], "the autoscaler keeps nodes the job can do without"
    assert float(limits["cpu"]) >= job.scaling.cpus_per_worker


def test_cluster_launcher_fits_the_main_job():
    config = yaml.safe_load((INFRA / "cluster-launcher" / "aws-gpu.yaml").read_text())
    job = _job("jobs/train_dinat_l.yaml")
    workers = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert sum(t["max_workers"] for t in workers) >= job.scaling.max_workers
    assert all(t["resources"]["CPU"] >= job.scaling.cpus_per_worker for t in workers)
    run_options = " ".join(config["docker"]["run_options"])
    assert f"--env {WORKDIR_ENV}=/mnt/shared" in run_options and "--volume /mnt/shared:/mnt/shared" in run_options
    mounted_env = next(iter(config["file_mounts"]))
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert ". " + mounted_env.replace("/home/ubuntu", "~") in command, "Ray must start with the MLflow settings"


def test_mlflow_service_is_the_address_the_clusters_use():
    cluster = load_documents(INFRA / "kuberay" / "raycluster.yaml")[0]
    uri = _env(cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0])["MLFLOW_TRACKING_URI"]["value"]
    name, namespace, port = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", uri).groups()
    services = [d for d in load_documents(INFRA / "mlflow" / "k8s" / "mlflow.yaml") if d["kind"] == "Service"]
    service = next(s for s in services if (s["metadata"]["name"], s["metadata"]["namespace"]) == (name, namespace))
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    deployment = next(d for d in load_documents(INFRA / "mlflow" / "k8s" / "mlflow.yaml")
                      if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
    allowed = _env(deployment["spec"]["template"]["spec"]["containers"][0])["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{name}.{namespace}.svc:{port}" in allowed, "the server would refuse the clusters' Host header"


def _secret_references(documents: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}

    def walk(node):
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                found.setdefault(node["secretKeyRef"]["name"], set()).add(node["secretKeyRef"]["key"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(documents)
    return found


def test_every_referenced_secret_is_created_somewhere_documented():
    readme = (INFRA / "README.md").read_text()
    for path in KUBERNETES_FILES:
        for name, keys in _secret_references(load_documents(path)).items():
            if path.parent.name == "k8s":
                source = K8S_UP.read_text()
            else:
                match = re.search(rf"kubectl create secret generic {name}\b[^\n]*(?:\\\n[^\n]*)*", readme)
                assert match, f"{path.name} uses Secret {name}, which infra/README.md never creates"
                source = match.group(0)
            created = set(re.findall(r"--from-literal=([a-z0-9-]+)=", source))
            assert keys <= created, f"Secret {name}: keys {keys - created} used by {path.name} are never created"


def test_postgres_init_configmap_matches_the_sql_file():
    configmap = next(d for d in load_documents(INFRA / "mlflow" / "k8s" / "mlflow.yaml") if d["kind"] == "ConfigMap")
    assert list(configmap["data"].values()) == [POSTGRES_INIT.read_text()]


# ------------------------------------------------------------------------------------------- compose secrets
def test_compose_variables_come_from_the_env_example_and_hold_only_placeholders():
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    example = dict(line.split("=", 1) for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used == set(example), f"compose uses {sorted(used - set(example))}, example has {sorted(set(example) - used)}"
    for name, value in example.items():
        if "PASSWORD" in name or "SECRET" in name:
            assert value == PLACEHOLDER, f"{name} in {COMPOSE_ENV_EXAMPLE.name} must be the placeholder {PLACEHOLDER}"
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for service in compose["services"].values():
        for value in service.get("environment", {}).values():
            secretish = re.search(r"(?i)password|secret", str(value))
            assert not secretish or str(value).startswith("${"), f"hard-coded secret-like value {value!r}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (COMPOSE_FILE.parent / source).is_file(), volume
    assert (COMPOSE_FILE.parent / compose["services"]["mlflow"]["build"] / "Dockerfile").is_file()


# ------------------------------------------------------------------------------------------------ Dockerfiles
def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values()
                                              for r in extra]
    return {_normalise(r.split("==")[0]): r.split("==")[1] for r in requirements if "==" in r}


def dockerfile_pins(path: Path) -> list[tuple[str, str, int]]:
    """(package, version, line number) of every `pip install name==version` of the Dockerfile."""
    pins = []
    text = path.read_text().replace("\\\n", " ")
    for number, line in enumerate(text.splitlines()):
        if line.startswith("RUN") and "pip install" in line:
            for name, version in re.findall(r'"?([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)==([0-9][^\s"]*)"?', line):
                pins.append((_normalise(name), version, number))
    return pins


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pins_match_pyproject(path):
    expected = pyproject_pins()
    pins = dockerfile_pins(path)
    assert pins, f"{path} pins nothing"
    for name, version, _ in pins:
        if name in expected:
            assert version == expected[name], f"{path.relative_to(ROOT)}: {name}=={version}, pyproject.toml: {expected[name]}"
        else:
            assert name in SERVER_ONLY_PINS and path.parent.name == "mlflow", f"{name} is pinned nowhere in pyproject.toml"
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", path.read_text(), re.MULTILINE):
        context = ROOT if path.parent.name == "docker" else path.parent
        for item in source.split():
            assert item == "." or (context / item).exists(), f"{path}: COPY source {item} is not in the build context"


def test_training_image_installs_torch_then_deepspeed_like_the_makefile():
    import torch

    pins = {name: line for name, _, line in dockerfile_pins(DOCKERFILES[0])}
    assert pins["torch"] == pins["torchvision"] < pins["deepspeed"], "torch must be installed before DeepSpeed builds"
    text = DOCKERFILES[0].read_text().replace("\\\n", " ")
    deepspeed_line = next(line for line in text.splitlines() if "deepspeed==" in line)
    assert "--no-build-isolation" in deepspeed_line and "DS_BUILD_CPU_ADAM=1" in deepspeed_line
    assert "DS_BUILD_FUSED_ADAM=1" not in text, "the trainer uses torch AdamW: FusedAdam is dead weight"
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-devel", text, re.MULTILINE)
    assert base and base.group(1) == torch.version.cuda, f"base CUDA {base and base.group(1)} vs torch's {torch.version.cuda}"
    assert re.search(r"python3\.11\b", text)
    assert "ENV ONEFORMER_WORKDIR=/mnt/shared" in text


def test_dockerignore_keeps_local_state_out_of_the_context():
    def patterns(path: Path) -> set[str]:
        lines = (line.strip() for line in path.read_text().splitlines())
        return {line.removeprefix("**/").strip("/") for line in lines if line and not line.startswith("#")}

    missing = patterns(ROOT / ".gitignore") - patterns(DOCKERIGNORE)
    assert not missing, f"git-ignored local state that would enter the image: {sorted(missing)}"
    assert {".git", ".venv", "data", "runs", "mlruns"} <= patterns(DOCKERIGNORE)


# ----------------------------------------------------------------------------------- scripts, config, readmes
def _run_script(script: Path, env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_start_server_refuses_missing_and_placeholder_secrets():
    base = {"PATH": os.environ["PATH"], "PGHOST": "127.0.0.1", "PGUSER": "mlflow", "PGPASSWORD": "pw",
            "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw", "MLFLOW_FLASK_SERVER_SECRET_KEY": "key",
            "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/none"}
    missing = _run_script(START_SERVER, {k: v for k, v in base.items() if k != "PGPASSWORD"})
    assert missing.returncode == 2 and "PGPASSWORD must be set" in missing.stderr
    placeholder = _run_script(START_SERVER, {**base, "MLFLOW_AUTH_ADMIN_PASSWORD": PLACEHOLDER})
    assert placeholder.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD still holds the placeholder" in placeholder.stderr


def test_k8s_up_script_creates_the_secret_and_applies_the_manifests(tmp_path):
    # A stand-in kubectl that records its arguments and what it was fed.
    fake = tmp_path / "kubectl"
    fake.write_text('#!/bin/sh\necho "ARGS $*" >> "$KUBECTL_LOG"\n[ "$1" = apply ] && cat >> "$KUBECTL_LOG"\n'
                    'case "$*" in *--dry-run=client*) echo "kind: Secret" ;; esac\nexit 0\n')
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "KUBECTL_LOG": str(log)}
    refused = _run_script(K8S_UP, {**env, "POSTGRES_PASSWORD": "p", "MINIO_ROOT_PASSWORD": "m"})
    assert refused.returncode == 2 and "MLFLOW_ADMIN_PASSWORD" in refused.stderr and not log.exists()

    secrets = {"POSTGRES_PASSWORD": "pg-secret", "MINIO_ROOT_PASSWORD": "minio-secret", "MLFLOW_ADMIN_PASSWORD": "adm"}
    done = _run_script(K8S_UP, {**env, **secrets})
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    assert "name: mlflow" in calls and "create secret generic mlflow-secrets" in calls
    assert "--from-literal=postgres-password=pg-secret" in calls and "--dry-run=client" in calls
    assert f"apply -f {K8S_UP.parent}/mlflow.yaml" in calls
    assert calls.index("create secret") < calls.index("mlflow.yaml"), "the Secret must exist before the pods"


def test_auth_config_is_read_by_mlflow_and_holds_no_secret(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    assert "admin_password" not in parser["mlflow"], "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_INI))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-env")
    config = read_auth_config()
    assert config.admin_password == "from-env" and config.database_uri == "postgresql+psycopg2:///mlflow_auth"
    assert config.default_permission == "READ" and config.auth_cache_ttl_seconds > 0


def test_shell_scripts_parse():
    for script in (START_SERVER, K8S_UP):
        shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
        subprocess.run([shell, "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("path", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_names_only_files_that_exist(path):
    mentioned = set(re.findall(r"(?<![\w/.~-])((?:infra|jobs)/[\w./-]+\w)", path.read_text()))
    assert mentioned, f"{path} names no file"
    absent = sorted(m for m in mentioned if not (ROOT / m).exists())
    assert not absent, f"{path.relative_to(ROOT)} names files that do not exist: {absent}"


# --------------------------------------------------------------------------- the MLflow server, for real
def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        import base64
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_mlflow_server_with_postgres_and_basic_auth_logs_and_reads_back_a_run(tmp_path, monkeypatch):
    with infra_mlflow_server(tmp_path) as server:
        search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(search) == 401, "basic-auth is off"
        assert http_status(search, "admin", "wrong") == 401
        assert http_status(search, "admin", server.admin_password) == 200
        _log_and_read_back_a_run(server.url, server.admin_password, server.artifacts, server.pg_env,
                                 server.binaries, tmp_path, monkeypatch)


def _log_and_read_back_a_run(base, admin_password, artifacts, pg_env, binaries, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
    client = MlflowClient(tracking_uri=base)
    experiment = client.create_experiment("infra-test")
    run = client.create_run(experiment, run_name="postgres-roundtrip")
    client.log_param(run.info.run_id, "preset", "dinat_l")
    for step, loss in enumerate([3.0, 2.5, 2.25]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    (tmp_path / "table.txt").write_text("PQ 50.5\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "table.txt"), "results")
    client.set_terminated(run.info.run_id)

    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"preset": "dinat_l"} and stored.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.5, 2.25]
    downloaded = client.download_artifacts(run.info.run_id, "results/table.txt", str(tmp_path / "down"))
    assert Path(downloaded).read_text() == "PQ 50.5\n"
    assert [p.read_text() for p in artifacts.rglob("table.txt")] == ["PQ 50.5\n"], "artifact not proxied to the store"
    rows = subprocess.run([str(binaries / "psql"), "-d", "mlflow", "-tAc",
                           f"SELECT status FROM runs WHERE run_uuid = '{run.info.run_id}'"],
                          env=pg_env, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    assert rows == "FINISHED", "the run is not in PostgreSQL"

    # default_permission = READ: a new user reads the admin's experiment but cannot write to it.
    reader_password = "reader-" + os.urandom(6).hex()
    AuthServiceClient(base).create_user("reader", reader_password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader_password)
    assert client.get_run(run.info.run_id).data.params == {"preset": "dinat_l"}
    with pytest.raises(MlflowException, match="(?i)permission"):
        client.create_run(experiment, run_name="not-allowed")
