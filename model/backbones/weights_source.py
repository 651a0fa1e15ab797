"""Where backbone weights come from: a local file, or a remote reference fetched once per node into a cache.

    resolve_weights("/data/swin_large_patch4_window12_384_22k.pth")              # local: used in place
    resolve_weights("https://host/dinat_large_in22k_224.pth#sha256=3f2a...")      # https (or http) URL
    resolve_weights("s3://bucket/weights/convnext_large_22k_224.pth")            # any fsspec URL (needs s3fs, ...)
    resolve_weights("timm:convnext_large.fb_in22k")                               # timm's pretrained weights

Each returns the local path of the file; a URL's last path segment is the file name, and its suffix says how
to read it (.pth, .pkl, .safetensors, ...). Remote files land in the cache directory (the `cache_dir` argument,
else $ONEFORMER_WEIGHTS_CACHE, else ~/.cache/oneformer/weights): URLs under `<sha256 of the URL>/<file name>`,
timm weights in the Hugging Face cache layout under `huggingface/`. A file lock per cached file makes the
worker processes of one node download once; the others wait and then read the finished file. A download is
written under a temporary name and renamed into place, so a cached file is always complete.

Checksums: a `#sha256=<64 hex>` suffix on any reference is verified (for a local file too). For timm weights
the Hugging Face hub publishes each large file's sha256 (its ETag, which names the cached blob); that is
verified after the download. Plain URLs publish none. A mismatch fails naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "ONEFORMER_WEIGHTS_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/oneformer/weights")
TIMM_PREFIX = "timm:"
_SHA256_FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]*)$")
_CHUNK_BYTES = 1 << 20
_HTTP_TIMEOUT_S = 60


class WeightsSourceError(ValueError):
    """A weights reference that cannot be resolved: malformed, unreachable, or failing its checksum."""


@dataclass(frozen=True)
class WeightsReference:
    """A parsed `model.backbone_weights` value. kind: "local", "url" (http/https), "fsspec" (s3://, gs://,
    hf://, ...) or "timm"; location: the path, URL or timm model name without the checksum suffix."""

    text: str
    kind: str
    location: str
    sha256: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.kind != "local"

    @property
    def file_name(self) -> str:
        """Name of the file the reference points at (the last URL path segment)."""
        return Path(urllib.parse.urlparse(self.location).path).name or "weights"


def parse_reference(text: str) -> WeightsReference:
    """Split off an optional `#sha256=` suffix and classify the rest by its scheme."""
    location, sha256 = text, None
    if match := _SHA256_FRAGMENT.search(text):
        sha256 = match.group(1).lower()
        if len(sha256) != 64:
            raise WeightsSourceError(f"weights reference {text}: #sha256= needs 64 hex digits, got {len(sha256)}")
        location = text[: match.start()]
    if location.startswith(TIMM_PREFIX):
        name = location[len(TIMM_PREFIX):]
        if not re.fullmatch(r"[\w-]+(\.[\w-]+)?", name):
            raise WeightsSourceError(f"weights reference {text}: expected timm:<model>[.<tag>], e.g. timm:convnext_large.fb_in22k")
        return WeightsReference(text, "timm", name, sha256)
    scheme = urllib.parse.urlparse(location).scheme
    if "://" not in location or scheme == "file":
        return WeightsReference(text, "local", location.removeprefix("file://"), sha256)
    return WeightsReference(text, "url" if scheme in ("http", "https") else "fsspec", location, sha256)


def weights_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $ONEFORMER_WEIGHTS_CACHE, else ~/.cache/oneformer/weights."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def resolve_weights(reference: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the weights `reference` names, downloading a remote one into the cache first (once)."""
    parsed = parse_reference(os.fspath(reference))
    if parsed.kind == "local":
        return _checked_local_file(parsed)
    cache = weights_cache_dir(cache_dir)
    if parsed.kind == "timm":
        return _fetch_timm_weights(parsed, cache)
    return _fetch_url(parsed, cache)


def _checked_local_file(reference: WeightsReference) -> Path:
    path = Path(reference.location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if reference.sha256 is not None:
        _require_sha256(path, file_sha256(path), reference.sha256)
    return path


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _require_sha256(path: Path | str, actual: str, expected: str) -> None:
    if actual != expected:
        raise WeightsSourceError(f"weights file {path}: sha256 is {actual}, expected {expected}")


# ---- URLs (http, https, and every fsspec protocol) ----

def _fetch_url(reference: WeightsReference, cache: Path) -> Path:
    url_key = hashlib.sha256(reference.location.encode()).hexdigest()[:16]
    target = cache / url_key / reference.file_name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{target}.lock"):
            if not target.exists():  # another process may have finished while this one waited
                _download(reference, target)
    if reference.sha256 is not None:
        _require_sha256(target, _recorded_sha256(target), reference.sha256)
    return target


def _download(reference: WeightsReference, target: Path) -> None:
    """Stream the file to a temporary name beside `target`, hashing on the way; rename when complete.
    The digest is kept beside the file (`.sha256`) so later checks need not re-read gigabytes."""
    log.info("downloading backbone weights %s -> %s", reference.location, target)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as sink, _open_remote(reference) as source:
            hasher = hashlib.sha256()
            while chunk := source.read(_CHUNK_BYTES):
                hasher.update(chunk)
                sink.write(chunk)
        if reference.sha256 is not None:
            _require_sha256(reference.location, hasher.hexdigest(), reference.sha256)
        Path(f"{target}.sha256").write_text(hasher.hexdigest() + "\n")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _open_remote(reference: WeightsReference):
    """A readable binary stream of the remote file; errors become one line naming the URL."""
    if reference.kind == "url":
        try:
            return urllib.request.urlopen(reference.location, timeout=_HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as error:
            raise WeightsSourceError(f"weights {reference.location}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise WeightsSourceError(f"weights {reference.location}: cannot download: {error}") from None
    return _open_with_fsspec(reference.location)


def _open_with_fsspec(url: str):
    import fsspec
    from fsspec.registry import known_implementations

    protocol = urllib.parse.urlparse(url).scheme
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        package = known_implementations[protocol]["class"].split(".")[0]
        raise WeightsSourceError(f"weights {url}: the {package} package is not installed ({protocol}:// needs it)") from None
    except ValueError:
        raise WeightsSourceError(f"weights {url}: unknown protocol {protocol}://") from None
    try:
        return fsspec.open(url, "rb").open()
    except (OSError, ValueError) as error:
        raise WeightsSourceError(f"weights {url}: cannot open: {error}") from None


def _recorded_sha256(path: Path) -> str:
    """The digest written at download time, or the file's own when it was placed in the cache by hand."""
    record = Path(f"{path}.sha256")
    return record.read_text().strip() if record.exists() else file_sha256(path)


# ---- timm pretrained weights (Hugging Face hub) ----

def timm_weights_location(model_name: str) -> tuple[str, str | None, list[str]]:
    """Where timm itself would fetch the pretrained weights `model_name` ("architecture[.tag]") from, by its
    own registry: ("hf-hub", "repo_id[@revision]", [file names to try, in timm's order]) or ("url", URL, [])."""
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source  # timm's own choice of source, pinned timm
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    try:
        config = get_pretrained_cfg(model_name, allow_unregistered=False)
    except RuntimeError as error:
        raise WeightsSourceError(f"weights reference timm:{model_name}: {error}") from None
    source, location = _resolve_pretrained_source(config.to_dict())
    if source == "hf-hub":
        repo, file_name = location if isinstance(location, tuple) else (location, HF_WEIGHTS_NAME)
        candidates = [file_name] if file_name.endswith(".safetensors") else [*_get_safe_alternatives(file_name), file_name]
        return "hf-hub", repo, candidates
    if source == "url":
        return "url", location, []
    raise WeightsSourceError(f"weights reference timm:{model_name}: timm names no downloadable weights for it")


def _fetch_timm_weights(reference: WeightsReference, cache: Path) -> Path:
    source, location, file_names = timm_weights_location(reference.location)
    if source == "url":
        url_reference = WeightsReference(reference.text, "url", location, reference.sha256)
        return _fetch_url(url_reference, cache)
    hub_cache = cache / "huggingface"
    hub_cache.mkdir(parents=True, exist_ok=True)
    with FileLock(hub_cache / f"{location.replace('/', '--')}.lock"):
        path = _download_from_hub(reference, location, file_names, hub_cache)
        _verify_hub_blob(reference, path, hub_cache)
    return path


def _download_from_hub(reference: WeightsReference, repo: str, file_names: list[str], hub_cache: Path) -> Path:
    """huggingface_hub's download into `hub_cache` (its own layout; no request when already cached), trying
    the file names in timm's order."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError
    from timm.models._hub import hf_split

    repo_id, revision = hf_split(repo)
    for file_name in file_names:
        try:
            return Path(hf_hub_download(repo_id, file_name, revision=revision, cache_dir=hub_cache))
        except RemoteEntryNotFoundError:  # the hub answered: no such file; try timm's next name
            continue
        except (HfHubHTTPError, OSError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise WeightsSourceError(f"weights reference {reference.text}: {repo_id}/{file_name}: {first_line}") from None
    raise WeightsSourceError(f"weights reference {reference.text}: {repo_id} has none of {file_names}")


def _verify_hub_blob(reference: WeightsReference, path: Path, hub_cache: Path) -> None:
    """The hub names a large file's blob by its sha256 (the ETag it publishes); huggingface_hub does not check
    the content against it, so check once per blob (a `.verified` marker beside the lock), and the reference's
    own #sha256= if given."""
    blob = path.resolve()
    marker = hub_cache / f"{blob.name}.verified"
    published = blob.name if re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
    expected = [digest for digest in (published, reference.sha256) if digest is not None]
    if not expected or (marker.exists() and reference.sha256 in (None, published)):
        return
    actual = file_sha256(blob)
    for digest in expected:
        _require_sha256(path, actual, digest)
    if published is not None:
        marker.touch()
