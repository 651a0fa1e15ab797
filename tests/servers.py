"""Real server processes for tests (an MLflow tracking server over SQLite, the infra's MLflow server over
PostgreSQL with basic-auth, a Ray head), on 127.0.0.1 only, each in its own process group so that stopping it
stops its workers too."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INFRA_MLFLOW = ROOT / "infra" / "mlflow"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to the process's group, SIGKILL if it is still there after `grace_s`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class MlflowServer:
    """`mlflow server` over a SQLite store on 127.0.0.1; `start` again after `stop` serves the same store on
    the same port."""

    def __init__(self, folder: Path, database: Path | None = None):
        self.folder = folder
        self.database = database or folder / "server.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.database}",
             "--artifacts-destination", (self.folder / "artifacts").as_uri()],
            # the job executor is a further process that these tests never use
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def wait_until_healthy(self, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}; see {self.folder / 'server.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server at {self.url} not healthy after {timeout} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


# ------------------------------------------------------------------------------------------ PostgreSQL + MLflow
def postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: .ci/run must install it "
                           "(`apt-get update && apt-get install -y --no-install-recommends postgresql`)")
    return found[-1].parent


# Durability is pointless for a database deleted after the test, and fsyncs dominate MLflow's schema migrations.
THROWAWAY_SETTINGS = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"


@contextmanager
def postgres_server(password: str) -> Iterator[tuple[Path, int]]:
    """A throwaway PostgreSQL on 127.0.0.1 with password auth for user `mlflow`; stopped and deleted after.
    Yields (binaries folder, port)."""
    binaries = postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="oneformer-pg-"))
    # initdb refuses to run as root: run the server as the `postgres` account the Debian package creates.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "postgres")
    (folder / "password").write_text(password)
    port = free_port()
    data = folder / "data"
    try:
        if as_user:
            shutil.chown(folder / "password", "postgres")
        subprocess.run(as_user + [str(binaries / "initdb"), "-D", str(data), "-U", "mlflow", "--pwfile",
                                  str(folder / "password"), "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(as_user + [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
                                  "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} {THROWAWAY_SETTINGS}", "start"],
                       check=True, capture_output=True, timeout=120)
        yield binaries, port
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_user + [str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_health(url: str, process: subprocess.Popen, log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"mlflow server not healthy after {seconds}s:\n{log.read_text()[-3000:]}")


@dataclasses.dataclass
class InfraMlflowServer:
    url: str
    admin_password: str
    artifacts: Path
    pg_env: dict[str, str]
    binaries: Path

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (a driver, a Ray worker) needs to log to it as the admin."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": "admin",
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}


@contextmanager
def infra_mlflow_server(folder: Path) -> Iterator[InfraMlflowServer]:
    """The tracking server as infra/ deploys it: PostgreSQL prepared by its init script, then
    infra/mlflow/start-server.sh (basic-auth, proxied artifacts under `folder`), on 127.0.0.1."""
    db_password, admin_password = "pg-" + os.urandom(8).hex(), "admin-" + os.urandom(8).hex()
    with postgres_server(db_password) as (binaries, pg_port):
        pg_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg_port), "PGUSER": "mlflow",
                  "PGPASSWORD": db_password}
        # What the official postgres image does with POSTGRES_DB, then our init script, as on first start.
        subprocess.run([str(binaries / "createdb"), "mlflow"], env=pg_env, check=True, timeout=60)
        subprocess.run([str(binaries / "psql"), "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-f",
                        str(INFRA_MLFLOW / "postgres-init.sql")], env=pg_env, check=True, capture_output=True, timeout=60)
        port, artifacts, log = free_port(), folder / "artifacts", folder / "mlflow.log"
        server_env = {**pg_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                      "MLFLOW_AUTH_CONFIG_PATH": str(INFRA_MLFLOW / "basic_auth.ini"),
                      "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),
                      "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts), "MLFLOW_HOST": "127.0.0.1",
                      "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
        with log.open("w") as sink:
            server = subprocess.Popen([str(INFRA_MLFLOW / "start-server.sh")], env=server_env, cwd=folder, stdout=sink,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_health(f"{url}/health", server, log)
            yield InfraMlflowServer(url, admin_password, artifacts, pg_env, binaries)
        finally:
            stop_process_group(server, grace_s=5)  # nothing is in flight by then; it waited out 30 s here


# ------------------------------------------------------------------------------------------ Ray head
# Token authentication with a token of this test session's own (a fresh machine has no ~/.ray/auth_token):
# the head, the jobs it runs and the `ray job` client all read it from the environment.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
HEAD_NOT_READY = ("Failed to connect", "No available agent to submit job")


@contextmanager
def ray_head(log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`ray start --head --block` on 127.0.0.1 in its own process group, stopped on exit (so that later
    `ray.init()` calls start their own local Ray). The job's driver finds `python` (for the job file's
    shebang) in this interpreter's folder. Ray's socket paths must stay under 107 bytes, so its temporary
    folder is a short one. Yields the head process and its job-submission address."""
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    dashboard_port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **RAY_AUTH}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
         "--num-cpus", "3", "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield head, f"http://127.0.0.1:{dashboard_port}"
    finally:
        stop_process_group(head, grace_s=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, head: subprocess.Popen, job_file: Path, env_vars: dict) -> subprocess.CompletedProcess:
    """`ray job submit` of a job file with the repository as working directory; waits for the job's end."""
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", str(job_file)]
    deadline = time.monotonic() + 120
    while True:  # the job API answers, and then gets an agent, some seconds after the head starts (more under load)
        submitted = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **RAY_AUTH})
        printed = submitted.stdout + submitted.stderr
        if submitted.returncode == 0 or not any(sign in printed for sign in HEAD_NOT_READY):
            return submitted
        if head.poll() is not None:
            raise RuntimeError("ray start --head exited")
        if time.monotonic() > deadline:
            raise TimeoutError(printed)
        time.sleep(2)


# ------------------------------------------------------------------------------------------ S3
class MotoS3Server:
    """moto's S3-compatible server (`python -m moto.server`) on 127.0.0.1: a real HTTP object store that s3fs,
    pyarrow (Ray's storage) and botocore talk to through AWS_ENDPOINT_URL, as they would to MinIO or S3."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The usual AWS variables a client (a driver, a Ray worker) reads."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> MotoS3Server:
        with (self.folder / "moto.log").open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited; see {self.folder / 'moto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"moto server not listening on {self.port} after 60 s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


class ConnectionCutter:
    """A TCP proxy on 127.0.0.1 in front of `target_port` that closes the first `cuts` connections whose
    request names `path_part` and whose response is longer than `after_bytes`, once that many bytes are
    through: a store dropping long reads."""

    def __init__(self, target_port: int, after_bytes: int, cuts: int, path_part: str = ""):
        self.target_port, self.after_bytes, self.cuts_left = target_port, after_bytes, cuts
        self.path_part = path_part.encode()
        self.cut = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        requests: list[bytes] = []
        threading.Thread(target=self._pipe, args=(client, upstream, None, requests), daemon=True).start()
        self._pipe(upstream, client, self.after_bytes, requests)

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None, requests: list[bytes]) -> None:
        """Copy source to sink; `requests` collects what the client sent, to tell which responses to cut."""
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is None:
                    requests.append(data[:512])
                elif sent + len(data) > limit and self.path_part in b"".join(requests) and self._take_cut():
                    sink.sendall(data[: max(0, limit - sent)])
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cut += 1
            return True

    def close(self) -> None:
        self.listener.close()
