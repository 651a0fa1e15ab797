"""Backbone weights from a reference, end to end: a real HTTP server on 127.0.0.1 (also posing as the Hugging
Face hub for timm names), real worker processes sharing one cache, and strict loading that names keys."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from timm.models.convnext import ConvNeXt as TimmConvNeXt

from model.backbones import build_backbone
from model.backbones.weights import load_backbone_weights
from model.backbones.weights_source import (
    CACHE_ENV_VAR,
    WeightsSourceError,
    parse_reference,
    resolve_weights,
    timm_weights_location,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS_PER_NODE = 8
SMALL_CONVNEXT = {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128]}


class WeightsServer:
    """http.server in a thread on 127.0.0.1 serving `files` (URL path -> bytes, with optional extra headers),
    recording every request; `delay_s` holds each GET before its body so that concurrent clients overlap."""

    def __init__(self, delay_s: float = 0.0):
        self.files: dict[str, bytes] = {}
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str]] = []
        self.delay_s = delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def gets(self, path: str) -> int:
        return self.requests.count(("GET", path))

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self._respond(with_body=False)

            def do_GET(self):
                self._respond(with_body=True)

            def _respond(self, with_body: bool):
                owner.requests.append((self.command, self.path))
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if with_body:
                    time.sleep(owner.delay_s)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                for name, value in owner.extra_headers.get(self.path, {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args):  # keep the test output clean
                pass

        return Handler

    def __enter__(self) -> WeightsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def weights_cache_in_tmp(tmp_path, monkeypatch):
    """Loads without a cache_dir use $ONEFORMER_WEIGHTS_CACHE: keep them out of the home directory."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "default_cache"))


@pytest.fixture
def server():
    with WeightsServer() as running:
        yield running


def saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buffer)
    return buffer.getvalue()


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_backbone("tiny").state_dict()


def tmp_cache_path(message: str) -> str:
    """The cached file an error message names (it must lie in the redirected default cache)."""
    path = message.removeprefix("weights file ").split(" does not fit")[0]
    assert path.startswith(os.environ[CACHE_ENV_VAR]), path
    return path


def assert_backbone_holds(backbone: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = backbone.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)


# ---- references ----

def test_references_are_classified_and_checksums_split_off():
    digest = "ab" * 32
    assert parse_reference("/data/w.pth").kind == "local"
    assert parse_reference("file:///data/w.pth").location == "/data/w.pth"
    url = parse_reference(f"https://host/dir/w.pkl#sha256={digest}")
    assert (url.kind, url.location, url.sha256, url.file_name) == ("url", "https://host/dir/w.pkl", digest, "w.pkl")
    assert parse_reference("s3://bucket/w.safetensors").kind == "fsspec"
    timm_reference = parse_reference("timm:convnext_large.fb_in22k")
    assert (timm_reference.kind, timm_reference.location) == ("timm", "convnext_large.fb_in22k")
    with pytest.raises(WeightsSourceError, match="64 hex digits"):
        parse_reference("https://host/w.pth#sha256=abc")
    with pytest.raises(WeightsSourceError, match=r"timm:<model>\[.<tag>\]"):
        parse_reference("timm:convnext large")


def test_timm_names_resolve_through_timms_registry():
    assert timm_weights_location("convnext_large.fb_in22k") == (
        "hf-hub", "timm/convnext_large.fb_in22k", ["model.safetensors", "pytorch_model.bin"])
    assert timm_weights_location("swin_large_patch4_window12_384.ms_in22k")[1] == (
        "timm/swin_large_patch4_window12_384.ms_in22k")
    with pytest.raises(WeightsSourceError, match=r"timm:convnext_large.nosuchtag: Invalid pretrained tag"):
        timm_weights_location("convnext_large.nosuchtag")


# ---- https/http URLs ----

def test_url_is_downloaded_once_and_loaded_exactly(server, tmp_path):
    state = tiny_state()
    server.files["/weights/tiny.pth"] = saved(state)
    url = f"{server.url}/weights/tiny.pth"
    for _ in range(2):
        torch.manual_seed(1)
        backbone = build_backbone("tiny")
        report = load_backbone_weights(backbone, url, cache_dir=tmp_path)
        assert_backbone_holds(backbone, state)
    assert server.gets("/weights/tiny.pth") == 1
    assert report.source == url and report.path.parent.parent == tmp_path and report.path.name == "tiny.pth"
    assert report.loaded == report.backbone_tensors == len(state)
    assert report.skipped == report.kept_initialisation == ()
    assert not list(tmp_path.rglob("*.part")), "temporary download left behind"


def _resolve_in_worker(barrier, url: str, cache: str, results) -> None:
    barrier.wait()  # all workers ask at the same moment, as the workers of one node do at start-up
    try:
        results.put(str(resolve_weights(url, cache_dir=cache)))
    except Exception as error:  # reported to the parent, which fails the test with it
        results.put(f"error: {error}")


@pytest.mark.slow  # 8 worker processes
def test_workers_of_one_node_download_once(tmp_path):
    # fork: the children need only the already-imported resolver, and the server thread stays in the parent
    context = multiprocessing.get_context("fork")
    with WeightsServer(delay_s=0.5) as server:
        body = saved(tiny_state())
        server.files["/tiny.pth"] = body
        barrier, results = context.Barrier(WORKERS_PER_NODE), context.Queue()
        workers = [context.Process(target=_resolve_in_worker, args=(barrier, f"{server.url}/tiny.pth", str(tmp_path), results))
                   for _ in range(WORKERS_PER_NODE)]
        for worker in workers:
            worker.start()
        paths = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
        assert server.gets("/tiny.pth") == 1
    assert len(set(paths)) == 1 and not paths[0].startswith("error"), paths
    assert Path(paths[0]).read_bytes() == body


def test_checksum_is_verified_and_a_mismatch_names_the_file(server, tmp_path):
    body = saved(tiny_state())
    server.files["/tiny.pth"] = body
    good = hashlib.sha256(body).hexdigest()
    wrong = hashlib.sha256(b"other weights").hexdigest()
    with pytest.raises(WeightsSourceError, match=rf"weights file {server.url}/tiny.pth: sha256 is {good}, expected {wrong}"):
        resolve_weights(f"{server.url}/tiny.pth#sha256={wrong}", cache_dir=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")], "bad file kept"
    path = resolve_weights(f"{server.url}/tiny.pth#sha256={good}", cache_dir=tmp_path)
    assert path.read_bytes() == body
    # the cached copy is checked against a checksum given later too, without downloading again
    with pytest.raises(WeightsSourceError, match=rf"weights file {path}: sha256 is {good}, expected {wrong}"):
        resolve_weights(f"{server.url}/tiny.pth#sha256={wrong}", cache_dir=tmp_path)
    assert server.gets("/tiny.pth") == 2
    local = tmp_path / "local.pth"
    local.write_bytes(body)
    with pytest.raises(WeightsSourceError, match=rf"weights file {local}: sha256"):
        resolve_weights(f"{local}#sha256={wrong}")


def test_missing_url_fails_naming_it(server, tmp_path):
    with pytest.raises(WeightsSourceError, match=rf"weights {server.url}/absent.pth: HTTP 404"):
        resolve_weights(f"{server.url}/absent.pth", cache_dir=tmp_path)


# ---- strict loading ----

def test_file_of_another_architecture_fails_naming_keys(server, tmp_path):
    torch.manual_seed(0)
    swin = build_backbone("swin", embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7).state_dict()
    server.files["/swin.pth"] = saved(swin)
    tiny = build_backbone("tiny").state_dict()
    missing = [k for k in tiny if k not in swin]
    unexpected = [k for k in swin if k not in tiny]
    mis_shaped = [k for k in tiny if k in swin and tiny[k].shape != swin[k].shape]
    assert missing and unexpected and mis_shaped  # the file really is of another architecture
    with pytest.raises(ValueError) as failure:
        build_backbone("tiny", weights=f"{server.url}/swin.pth")  # default cache: see weights_cache_in_tmp
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"weights file {tmp_cache_path(message)}")
    assert f"does not fit DiNAT: {len(missing)} missing keys {missing[:8]} and {len(missing) - 8} more; " in message
    assert f"{len(unexpected)} unexpected keys {unexpected[:8]} and {len(unexpected) - 8} more; " in message
    assert f"{len(mis_shaped)} mis-shaped tensors ['{mis_shaped[0]} " in message

    # the same key names with other shapes: named with both shapes
    state = tiny_state()
    state["levels.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    server.files["/misshaped.pth"] = saved(state)
    with pytest.raises(ValueError, match=r"misshaped.pth does not fit DiNAT: 0 missing keys \[\]; 0 unexpected keys \[\]; 1 mis-shaped tensors "
                                         r"\['levels.0.blocks.0.attn.qkv.weight \(3, 3\) \(backbone \(96, 32\)\)'\]"):
        load_backbone_weights(build_backbone("tiny"), f"{server.url}/misshaped.pth", cache_dir=tmp_path)


def test_build_backbone_reports_counts_and_skips_only_the_documented_set(server, tmp_path):
    """An ImageNet-style file: classifier head and final norm present (skipped), output norms absent (kept)."""
    state = tiny_state()
    imagenet_style = {k: v for k, v in state.items() if not k.startswith(("norm0.", "norm1.", "norm2.", "norm3."))}
    imagenet_style |= {"norm.weight": torch.ones(256), "head.weight": torch.zeros(10, 256)}
    server.files["/in22k.pth"] = saved(imagenet_style)
    backbone = build_backbone("tiny", weights=f"{server.url}/in22k.pth")
    report = backbone.weights_report
    assert report.backbone_tensors == len(state)
    assert report.loaded == len(state) - 8
    assert report.skipped == ("head.weight", "norm.weight")
    assert report.kept_initialisation == tuple(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report.path.is_relative_to(tmp_path / "default_cache")
    assert report.summary() == (f"{len(state) - 8}/{len(state)} backbone tensors from {server.url}/in22k.pth "
                                "(8 output-norm tensors keep their initialisation)")
    assert_backbone_holds(backbone, {k: v for k, v in imagenet_style.items() if k in state})


def test_timm_layout_convnext_loads_with_head_skipped(server, tmp_path):
    """A file in timm's own ConvNeXt layout (made by timm's class, with its classifier head)."""
    torch.manual_seed(0)
    timm_state = TimmConvNeXt(depths=tuple(SMALL_CONVNEXT["depths"]), dims=tuple(SMALL_CONVNEXT["dims"]),
                              num_classes=10).state_dict()
    server.files["/convnext.pth"] = saved(timm_state)
    backbone = build_backbone("convnext", drop_path_rate=0.0, **SMALL_CONVNEXT)
    report = load_backbone_weights(backbone, f"{server.url}/convnext.pth", cache_dir=tmp_path)
    assert report.skipped == ("head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight")
    assert report.loaded == len(timm_state) - 4 == report.backbone_tensors - 8
    assert_backbone_holds(backbone, {k: v for k, v in timm_state.items() if not k.startswith("head.")})


# ---- object stores (fsspec) ----

def test_fsspec_url_is_fetched_into_the_cache(tmp_path):
    """fsspec's in-memory filesystem stands in for an object store: same code path as s3:// or gs://."""
    import fsspec

    body = saved(tiny_state())
    with fsspec.open("memory://bucket/tiny.pth", "wb") as handle:
        handle.write(body)
    try:
        path = resolve_weights("memory://bucket/tiny.pth", cache_dir=tmp_path)
    finally:
        fsspec.filesystem("memory").rm("memory://bucket/tiny.pth")
    assert path.is_relative_to(tmp_path) and path.read_bytes() == body


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="gcsfs is installed here (the project pins only s3fs), so the message cannot arise")
def test_a_store_whose_package_is_missing_is_named(tmp_path):
    with pytest.raises(WeightsSourceError, match=r"^weights gs://bucket/w.pth: the gcsfs package is not installed"):
        resolve_weights("gs://bucket/w.pth", cache_dir=tmp_path)


# ---- timm names through the Hugging Face hub machinery ----

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_PATH = "/timm/convnext_atto.d2_in1k/resolve/main/model.safetensors"


def serve_as_hub(server: WeightsServer, body: bytes, published_sha256: str) -> None:
    """The headers huggingface_hub reads from the hub: the commit and the ETag (an LFS file's sha256)."""
    server.files[HUB_PATH] = body
    server.extra_headers[HUB_PATH] = {"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{published_sha256}"'}


def load_timm_name_in_subprocess(server: WeightsServer, cache: Path, out: Path) -> subprocess.CompletedProcess:
    """huggingface_hub reads HF_ENDPOINT when imported, so the load runs in a fresh process pointed at us."""
    script = textwrap.dedent(f"""
        import json, torch
        from model.backbones import build_backbone
        from model.backbones.weights import load_backbone_weights
        backbone = build_backbone("convnext", drop_path_rate=0.0, **{SMALL_CONVNEXT!r})
        report = load_backbone_weights(backbone, "timm:convnext_atto.d2_in1k", cache_dir={str(cache)!r})
        torch.save(backbone.state_dict(), {str(out)!r})
        print(json.dumps({{"loaded": report.loaded, "skipped": report.skipped, "path": str(report.path)}}))
    """)
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": ""}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # child processes against the local hub
def test_timm_name_downloads_from_the_hub_once_and_verifies_its_sha256(server, tmp_path):
    torch.manual_seed(0)
    timm_state = TimmConvNeXt(depths=tuple(SMALL_CONVNEXT["depths"]), dims=tuple(SMALL_CONVNEXT["dims"]),
                              num_classes=10).state_dict()
    from safetensors.torch import save as safetensors_bytes

    body = safetensors_bytes({k: v.contiguous() for k, v in timm_state.items()})
    serve_as_hub(server, body, hashlib.sha256(body).hexdigest())
    for _ in range(2):
        result = load_timm_name_in_subprocess(server, tmp_path / "cache", tmp_path / "loaded.pt")
        assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert server.gets(HUB_PATH) == 1
    assert report["loaded"] == len(timm_state) - 4 and report["path"].startswith(str(tmp_path / "cache"))
    loaded = torch.load(tmp_path / "loaded.pt")
    for key, value in timm_state.items():
        if not key.startswith("head."):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)

    # a blob whose content is not what the hub published fails, naming the file
    serve_as_hub(server, body, hashlib.sha256(b"other").hexdigest())
    result = load_timm_name_in_subprocess(server, tmp_path / "other_cache", tmp_path / "unused.pt")
    assert result.returncode != 0
    assert f"model.safetensors: sha256 is {hashlib.sha256(body).hexdigest()}, expected" in result.stderr
