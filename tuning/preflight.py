"""Checks that run before anything expensive: where results will be written, and the MLflow store.

`check_storage(runs_dir, tracking_uri)` is called by the entry points after the configuration is
resolved and before the data is prepared or Ray starts. It raises `ConfigError` with one line that
names the flag (or `MLFLOW_TRACKING_URI`), the folder or URI and the reason, and writes nothing:

- `--runs-dir` (Ray's results and checkpoints, the default MLflow store) must be a folder that can
  be created and written;
- a `sqlite:` store's folder (and the database file, if there is one) must be writable, as must a
  `file:` store's folder;
- an `http(s):` tracking server must answer within a few seconds (a TCP connect, then one REST call
  through MLflow's own request code, so its credentials from the environment apply). MLflow's
  client would otherwise retry for minutes, after the data was prepared and Ray started.

Other stores (databases, Databricks) are left to MLflow.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from cfcml.config import ConfigError

CHECK_ENDPOINT = "/api/2.0/mlflow/experiments/search"


def tracking_uri_choice(tracking_uri: str | None, runs_dir: Path) -> tuple[str, str]:
    """(the tracking URI a command will use, what chose it): the flag, else $MLFLOW_TRACKING_URI,
    else a SQLite store in `runs_dir`. Nothing is created."""
    if tracking_uri:
        return tracking_uri, "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}", "--runs-dir"


def unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be created or written (None if it can), without leaving anything behind:
    the nearest existing folder on its path must be a folder that takes a (nameless) temporary file."""
    existing = Path(folder).absolute()
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} is not writable ({(exc.strerror or str(exc)).lower()})"
    return None


def check_runs_dir(runs_dir: Path) -> None:
    reason = unwritable(runs_dir)
    if reason:
        raise ConfigError(f"--runs-dir {Path(runs_dir).absolute()}: cannot write results there: {reason}")


def _local_store_path(uri: str) -> tuple[Path, bool] | None:
    """(path, is a database file) of a local store URI; None for remote stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        return (Path(path), True) if path and path != ":memory:" else None
    if parsed.scheme == "file":
        return Path(parsed.path), False
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path: a file store
        return Path(uri), False
    return None


def _unreachable(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"host {host!r} not found"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as exc:
        return f"{(exc.strerror or type(exc).__name__).lower()} at {host}:{port}"


def check_tracking_uri(uri: str, what: str = "--tracking-uri", timeout: float = 5.0) -> None:
    """Raise ConfigError (naming `what` and `uri`) if the MLflow store at `uri` cannot be used."""
    local = _local_store_path(uri)
    if local is not None:
        path, is_db = local
        folder = path.parent if is_db else path
        reason = unwritable(folder)
        if reason is None and is_db and path.exists() and not (path.is_file() and os.access(path, os.W_OK)):
            reason = f"{path} is not a writable file"
        if reason:
            raise ConfigError(f"{what} {uri}: cannot write the MLflow store there: {reason}")
        return
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    reason = _unreachable(host, port, timeout)
    if reason:
        raise ConfigError(f"{what} {uri}: MLflow tracking server unreachable ({reason})")
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), CHECK_ENDPOINT, "GET", max_retries=0, timeout=timeout,
                                raise_on_status=False, params={"max_results": 1})
    except Exception as exc:
        raise ConfigError(f"{what} {uri}: MLflow tracking server did not answer ({type(exc).__name__})") from None
    status = response.status_code
    if status in (401, 403):
        raise ConfigError(f"{what} {uri}: MLflow tracking server refused access (HTTP {status}); set "
                          f"MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
    if status != 200:
        raise ConfigError(f"{what} {uri}: HTTP {status} for {CHECK_ENDPOINT}; is this an MLflow tracking server?")


def check_storage(runs_dir: Path, tracking_uri: str | None, timeout: float = 5.0, source: str | None = None) -> str:
    """Check `runs_dir` and the tracking store a command will use; returns that store's URI.
    Raises ConfigError with one line naming the flag (or `source`: where `tracking_uri` came from,
    e.g. a resumed search's state file), the folder or URI and the reason."""
    check_runs_dir(runs_dir)
    uri, what = tracking_uri_choice(tracking_uri, runs_dir)
    check_tracking_uri(uri, source if tracking_uri and source else what, timeout)
    return uri
