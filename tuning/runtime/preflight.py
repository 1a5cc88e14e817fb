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

The same way (one line naming the flag or variable, exit 2, nothing written), the entry points
also run `check_utf8` (a path or name with letters beyond ASCII needs a Python that reads and
writes file names as UTF-8), `check_name` (a search's or comparison's name can be a folder and a filter value),
`check_experiment` through `check_storage(experiment=...)` (the dataset's experiment is not
deleted in the store), `check_ray_address` (the cluster of --address or $RAY_ADDRESS answers)
and, once the data is prepared, `check_free_space` with the estimate of `search_bytes`.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cfcml.config import ConfigError

if TYPE_CHECKING:
    from cfcml.config import ExperimentConfig
    from cfcml.data.spec import DatasetSpec

CHECK_ENDPOINT = "/api/2.0/mlflow/experiments/search"
NAME_MAX_BYTES = 255  # NAME_MAX of Linux, macOS and Windows file systems: one folder name, in bytes
# The longest folder name built from a search's or comparison's name: Ray Train's run of the final
# model, "final_<name>_<trial id>", and a comparison's Tune experiment, "compare-<name>-<date>-<time>".
NAME_SUFFIX_BYTES = 32
PATH_MAX_BYTES = 4096  # PATH_MAX of Linux
PATH_BELOW_NAME_BYTES = 400  # trial, Ray Train run and checkpoint folders below a search's folder


def check_name(name: str, flag: str = "--name", parent: Path | None = None) -> str:
    """Raise ConfigError (one line naming `flag`) unless `name` can name a search or comparison.

    The name is a folder under `parent` (--runs-dir/ray), a Ray Tune experiment name, an MLflow
    run name and a tag value that run look-ups filter on. So: not empty or blank, at most
    255 - 32 bytes in UTF-8 (the longest folder name made from it adds up to 32, NAME_MAX is 255),
    no path separator (`/`, `\\`), not `.` or `..`, no NUL or other control character, no
    leading `-` (it would read as a flag) or surrounding spaces, and not both quote characters
    (MLflow's filter strings have no escape: `tuning.tracking.store.filter_literal`). Apostrophes,
    double quotes, spaces and non-ASCII letters are fine. With `parent`, the folder's whole path
    must also leave room below it within PATH_MAX (4096 bytes). Returns `name`.
    """
    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{flag} {name!r}: {reason}")

    if not name or not name.strip():
        raise bad("empty; a name names a folder")
    size = len(name.encode("utf-8", "surrogateescape"))
    limit = NAME_MAX_BYTES - NAME_SUFFIX_BYTES
    if size > limit:
        raise bad(f"{size} bytes long; at most {limit} (folder names hold {NAME_MAX_BYTES} bytes, "
                  f"and folders named after it add up to {NAME_SUFFIX_BYTES})")
    if name in (".", ".."):
        raise bad("names the folder itself or its parent, not a folder of its own")
    for ch in name:
        if ch in "/\\":
            raise bad(f"holds the path separator {ch!r}; a name is one folder, not a path")
        if ord(ch) < 32 or ord(ch) == 127:
            raise bad(f"holds the control character {ch!r}")
    if name.startswith("-"):
        raise bad("starts with '-', which reads as a command-line flag")
    if name != name.strip():
        raise bad("starts or ends with a space")
    if "'" in name and '"' in name:
        raise bad("holds both an apostrophe and a double quote; MLflow's search filters can hold one of "
                  "them, not both")
    if parent is not None:
        path = len(str(Path(parent).absolute() / name).encode("utf-8", "surrogateescape"))
        if path + PATH_BELOW_NAME_BYTES > PATH_MAX_BYTES:
            raise bad(f"its folder's path is {path} bytes; with the {PATH_BELOW_NAME_BYTES} bytes of folders "
                      f"below it that exceeds PATH_MAX ({PATH_MAX_BYTES}); use a shorter --runs-dir or name")
    return name


def check_utf8(*named: tuple[str, Any]) -> None:
    """Raise ConfigError (one line naming the flag) if a path or name given as (flag, value) cannot
    be written the same by every process of a run.

    Every path and name the platform writes (runs folder, search name, data root, patient ids,
    MLflow artifact paths) is UTF-8 on disk and in MLflow, and the processes of a local Ray run in
    UTF-8 mode (`tuning.runtime.ray_cluster.LOCAL_RAY_ENV`: PYTHONUTF8=1). Python is in UTF-8 mode under
    LANG=C / LC_ALL=C / POSIX by itself (PEP 540) and under any *.UTF-8 locale; under another
    locale (ISO-8859-1, or PYTHONUTF8=0) this process would encode a non-ASCII name otherwise than
    Ray's workers, or could not decode it at all (undecodable bytes), so it is refused here,
    before anything is written: ASCII values always pass."""
    import codecs
    import locale
    import sys

    encoding = sys.getfilesystemencoding()
    utf8 = codecs.lookup(encoding).name == "utf-8"
    for flag, value in named:
        if value is None:
            continue
        text = str(value)
        try:
            text.encode("utf-8")
            decodable = True
        except UnicodeEncodeError:  # bytes this Python's file-system encoding could not decode
            decodable = False
        if decodable and (utf8 or text.isascii()):
            continue
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise ConfigError(f"{flag} {shown}: holds letters beyond ASCII, and this Python reads and writes file names "
                          f"as {encoding} (locale {locale.setlocale(locale.LC_CTYPE)}, UTF-8 mode off); run it "
                          f"with PYTHONUTF8=1 (or LC_ALL=C.UTF-8) so that every process writes them as UTF-8")


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


def local_store_path(uri: str) -> tuple[Path, bool] | None:
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
    local = local_store_path(uri)
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


def check_storage(runs_dir: Path, tracking_uri: str | None, timeout: float = 5.0, source: str | None = None,
                  experiment: str | None = None) -> str:
    """Check `runs_dir` and the tracking store a command will use (and, given its name, that the
    `experiment` in it is not deleted); returns that store's URI.
    Raises ConfigError with one line naming the flag (or `source`: where `tracking_uri` came from,
    e.g. a resumed search's state file), the folder or URI and the reason."""
    check_runs_dir(runs_dir)
    uri, what = tracking_uri_choice(tracking_uri, runs_dir)
    what = source if tracking_uri and source else what
    check_tracking_uri(uri, what, timeout)
    if experiment is not None:
        check_experiment(uri, experiment, what)
    return uri


def check_experiment(uri: str, name: str, what: str = "--tracking-uri") -> None:
    """Raise ConfigError (one line) if the store at `uri` holds the experiment `name` in a state a
    run cannot be logged to: deleted (the UI's delete, `mlflow experiments delete`), which MLflow
    refuses only at the first run, after the data was prepared and Ray started. A local store that
    does not exist yet is not created here."""
    local = local_store_path(uri)
    if local is not None and not local[0].exists():
        return
    from mlflow.tracking import MlflowClient

    try:
        exp = MlflowClient(uri).get_experiment_by_name(name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{what} {uri}: cannot read the MLflow store ({type(exc).__name__}: {first})") from None
    if exp is not None and exp.lifecycle_stage != "active":
        raise ConfigError(
            f"{what} {uri}: the MLflow experiment {name!r} (id {exp.experiment_id}) is {exp.lifecycle_stage}; "
            f"restore it (MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
            f"{exp.experiment_id}) or use another store (--tracking-uri)")


def ray_address_choice(address: str | None) -> tuple[str | None, str]:
    """(the Ray address a command will join, what chose it): --address, else $RAY_ADDRESS (as
    `ray.init()` does), else None: a local Ray. "local" also means a local Ray."""
    if address:
        return (None if address == "local" else address), "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env != "local":
        return env, "RAY_ADDRESS"
    return None, "--address"


RAY_GCS_PORT, RAY_CLIENT_PORT = 6379, 10001


def check_ray_address(address: str | None, timeout: float = 5.0) -> str | None:
    """Raise ConfigError (one line naming --address or RAY_ADDRESS) if the Ray cluster to join does
    not answer a TCP connect within `timeout` s; Ray itself retries "Failed to connect to GCS" for
    minutes. Returns the address joined (None: a local Ray). "auto" (find a cluster started on
    this machine) is left to Ray, which fails at once when there is none."""
    chosen, what = ray_address_choice(address)
    if chosen is None or chosen == "auto":
        return chosen
    client = chosen.startswith("ray://")
    target = chosen[len("ray://"):] if client else chosen.split("://", 1)[-1]
    parsed = urlparse(f"//{target}")
    try:
        host, port = parsed.hostname, parsed.port or (RAY_CLIENT_PORT if client else RAY_GCS_PORT)
    except ValueError:
        host, port = None, None
    hint = "; unset RAY_ADDRESS to start a local Ray, or pass --address" if what == "RAY_ADDRESS" else ""
    if not host:
        raise ConfigError(f"{what} {chosen}: not a Ray address (host:port, ray://host:port or auto){hint}")
    assert port is not None  # None only together with host
    reason = _unreachable(host, port, timeout)
    if reason:
        raise ConfigError(f"{what} {chosen}: no Ray cluster answers there ({reason}){hint}")
    return chosen


SPACE_FLOOR_BYTES = 64 * 2**20  # Tune's state, trial results, MLflow's store and artifacts of a small search
CHECKPOINTS_KEPT = 2  # tuning.hpo.trainer.fit keeps two checkpoints a Ray Train run, plus one being written
STATE_COPIES = 3  # a fold's weights plus Adam's two moments in a checkpoint


def model_parameters(experiment: ExperimentConfig, spec: DatasetSpec) -> int:
    """Parameters and buffers of the network `experiment.model` builds for `spec` (0 if it cannot
    be built here, e.g. pretrained weights on another machine)."""
    try:
        from cfcml.networks.cfcml import build_model

        model = build_model(spec, experiment.model)
        return sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    except Exception:
        return 0


def checkpoint_bytes(parameters: int, folds: int) -> int:
    """Bytes of one trial checkpoint of `folds` fold states (weights and Adam's two moments)."""
    return 4 * STATE_COPIES * parameters * max(folds, 1)


def search_bytes(parameters: int, folds: int, trials: int, *, searches: int = 1, cv_runs: int = 0) -> int:
    """Bytes a command leaves under --runs-dir, estimated: `searches` searches of `trials` trials
    each on `folds` folds, plus `cv_runs` further cross-validation runs.

    Every trial keeps CHECKPOINTS_KEPT checkpoints (and writes one more before dropping the oldest)
    of `folds` fold states (float32 weights and Adam's two moments: 12 bytes a parameter); every
    search adds its final model's run (the same for one fold, and its registered copy, 4 bytes a
    parameter); so does each further cross-validation run (`cv_runs`: what tuning bought, a
    comparison's variants x seeds, which keep CHECKPOINTS_KEPT + 1 checkpoints of `folds` states).
    SPACE_FLOOR_BYTES covers everything else (Tune's state, MLflow's store and artifacts).

    searches: 1 for a search; 1 + K with `--outer-folds K` (each outer search retrains its
        winner); a comparison's `--tune-each` searches, one per variant.
    cv_runs: 2 x `bought_seeds` for a search; variants x seeds for a comparison.
    """
    state = 4 * STATE_COPIES * parameters
    trial_runs = trials * CHECKPOINTS_KEPT * folds * state + state * folds  # + the one being written
    final = (CHECKPOINTS_KEPT + 1) * state + 4 * parameters * max(folds, 1)
    others = cv_runs * (CHECKPOINTS_KEPT + 1) * max(folds, 1) * state
    return SPACE_FLOOR_BYTES + searches * (trial_runs + final) + others


def check_free_space(folder: Path, needed: int, what: str = "--runs-dir") -> None:
    """Raise ConfigError (one line naming `what`, the folder, the free and the needed space) if the
    file system holding `folder` (or its nearest existing parent) has less than `needed` bytes free."""
    import shutil

    existing = Path(folder).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"{what} {Path(folder).absolute()}: {free / 2**20:.0f} MB free on its disk, about "
                          f"{needed / 2**20:.0f} MB needed (checkpoints of every trial and the final model, "
                          f"MLflow's store); free space or use another --runs-dir")
