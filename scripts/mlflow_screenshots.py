"""Screenshots of the MLflow UI after a small real search, for the README (docs/images/).

    python scripts/mlflow_screenshots.py                 # a fresh smoke search in a temporary folder
    python scripts/mlflow_screenshots.py --store sqlite:////path/to/runs/mlflow.db   # an existing store

Runs the `smoke` search on a tiny synthetic MEN dataset (3 trials, up to 4 epochs, final model),
starts `mlflow ui` on a free local port over that store, and drives headless Chromium (Debian's
`chromium` package: `apt-get install -y chromium`) over its DevTools protocol to photograph the
experiment's runs page, the longest trial's metric charts and its system metrics. The UI's own
remembered settings (localStorage) close the assistant panel and expand the search's runs; nothing
is clicked that a user could not. The server and Chromium are stopped (by process group) before the
script returns. Needs no network beyond 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_search(work: Path) -> str:
    """A real smoke search with a final model, in `work`; returns its tracking URI."""
    data = work / "men"
    subprocess.run([sys.executable, str(ROOT / "pipelines" / "make_synthetic.py"), "--dataset", "men",
                    "--data-root", str(data), "--patients", "48", "--image-size", "32", "32", "8"], check=True)
    uri = f"sqlite:///{work / 'runs' / 'mlflow.db'}"
    subprocess.run([sys.executable, str(ROOT / "tuning" / "search.py"), "--dataset", "men", "--search", "smoke",
                    "--data-root", str(data), "--runs-dir", str(work / "runs"), "--tracking-uri", uri,
                    "--num-samples", "3", "--max-epochs", "4", "--name", "men-smoke"], check=True, cwd=ROOT)
    return uri


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    mlflow = VENV_BIN / "mlflow"
    proc = subprocess.Popen([str(mlflow if mlflow.exists() else "mlflow"), "ui", "--host", "127.0.0.1",
                             "--port", str(port), "--backend-store-uri", uri], stdout=log.open("w", encoding="utf-8"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # its own group: stopped as one
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"mlflow ui did not answer on port {port} within 120 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started here with start_new_session, and its children (its process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("error: no chromium on PATH; install it with `apt-get install -y chromium` (Debian)")


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, which Ray
    brings along): the UI's remembered settings are set in localStorage, rows are expanded and
    panels closed by clicks, and the page is photographed once what it shows has rendered."""

    def __init__(self, work: Path, size: tuple[int, int] = (1600, 1000)):
        self.port = free_port()
        self.size = size
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={work / 'chromium-profile'}",
             f"--window-size={size[0]},{size[1]}", f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._ids = 0

    async def __aenter__(self) -> Browser:
        import aiohttp

        self._http = aiohttp.ClientSession()
        deadline = time.time() + 60
        while True:
            try:
                async with self._http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                    page = next(t for t in await r.json() if t["type"] == "page")
                break
            except (aiohttp.ClientError, StopIteration):
                if time.time() > deadline:
                    raise RuntimeError("chromium's DevTools endpoint did not come up") from None
                await asyncio.sleep(0.5)
        self._ws = await self._http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ws.close()
        await self._http.close()
        stop(self.proc)

    async def send(self, method: str, **params: object) -> dict:
        self._ids += 1
        await self._ws.send_json({"id": self._ids, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json()
            if msg.get("id") == self._ids:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str) -> object:
        out = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return out.get("result", {}).get("value")

    async def goto(self, url: str, ready: str = "true", timeout: float = 60) -> None:
        """Open `url` and wait until the JS expression `ready` holds (then a moment for charts)."""
        await self.send("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not await self.js(f"document.readyState === 'complete' && Boolean({ready})"):
            if time.time() > deadline:
                raise RuntimeError(f"{url}: the page did not show what was expected ({ready}) in {timeout:g} s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)

    async def screenshot(self, out: Path, height: int | None = None) -> None:
        """The page as shown, or its top `height` pixels."""
        clip = {} if height is None else {"clip": {"x": 0, "y": 0, "width": self.size[0], "height": height, "scale": 1}}
        data = await self.send("Page.captureScreenshot", format="png", **clip)
        out.write_bytes(base64.b64decode(data["data"]))


def shrink(png: Path, max_bytes: int = 300_000) -> None:
    """Palette PNG (the UI has few colours), scaled down only if still too large."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    while True:
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
        if png.stat().st_size <= max_bytes or img.width < 800:
            return
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.LANCZOS)


# What a first-time visitor would otherwise meet, set the way the UI itself remembers it: the
# assistant panel closed, the machine-learning view, and on the runs page the search's runs expanded
# with the dataset, source, git version, model and CV score columns.
def ui_settings(experiment_id: str, parent_run_id: str) -> dict[str, str]:
    columns = ["attributes.`Dataset`", "attributes.`Source`", "attributes.`Version`", "attributes.`Models`",
               "metrics.`cv_macro_auc`"]
    page = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "selectedColumns": columns, "columnOrder": [], "columnWidths": {}, "runsExpanded": {parent_run_id: True},
            "runsPinned": [], "runsHidden": [], "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS",
            "viewMaximized": False, "runListHidden": False, "isAccordionReordered": False,
            "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None, "groupsExpanded": {},
            "autoRefreshEnabled": False,
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}}
    return {"mlflow.assistant.panelOpen_v1": "false", "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            "mlflow.workflowType_v1": json.dumps("machine_learning"),
            f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState': json.dumps(page)}


async def photograph(port: int, experiment_id: str, parent: str, trial: str, out: Path, work: Path) -> list[Path]:
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}"
    plots = "document.querySelectorAll('.js-plotly-plot').length"
    written = []
    async with Browser(work) as b:
        await b.goto(f"http://127.0.0.1:{port}/#/")
        for key, value in ui_settings(experiment_id, parent).items():
            await b.js(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        await b.goto("about:blank")  # a fresh document reads the settings
        await b.goto(f"{base}/runs?workflowType=machine_learning", "document.body.innerText.includes('trial-')")
        await b.screenshot(out / "mlflow_runs.png", height=520)  # the table; the rest is empty space
        written.append(out / "mlflow_runs.png")

        await b.goto(f"{base}/runs/{trial}/model-metrics?workflowType=machine_learning", f"{plots} >= 3")
        await b.js("document.querySelector('input[placeholder=\"Search metric charts\"]').focus()")
        await b.send("Input.insertText", text="macro_auc|train_loss")  # regex over the chart names
        await asyncio.sleep(3)
        await b.screenshot(out / "mlflow_trial_charts.png")
        written.append(out / "mlflow_trial_charts.png")

        await b.goto(f"{base}/runs/{trial}/system-metrics?workflowType=machine_learning", f"{plots} >= 3")
        await b.screenshot(out / "mlflow_trial_system_metrics.png")
        written.append(out / "mlflow_trial_system_metrics.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="an existing tracking URI holding a men search (default: run a fresh one)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (search, logs)")
    args = p.parse_args(argv)
    chromium()  # fail early
    work = Path(tempfile.mkdtemp(prefix="cfcml-screens-"))
    server = None
    try:
        from mlflow.tracking import MlflowClient

        from tuning.tracking.store import tag_filter

        uri = args.store or small_search(work)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("cfcml-men")
        (parent,) = client.search_runs([exp.experiment_id], "tags.`cfcml.kind` = 'search'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        # the trial that ran longest (ASHA stops the weak ones early), then the best scoring
        trial = client.search_runs([exp.experiment_id],
                                   tag_filter(**{"mlflow.parentRunId": parent.info.run_id, "cfcml.kind": "trial"}),
                                   order_by=["metrics.epoch DESC", "metrics.cv_macro_auc DESC"], max_results=1)[0]
        port = free_port()
        server = start_ui(uri, port, work / "mlflow-ui.log")
        args.out.mkdir(parents=True, exist_ok=True)
        shots = asyncio.run(photograph(port, exp.experiment_id, parent.info.run_id, trial.info.run_id, args.out,
                                       work))
        for png in shots:
            shrink(png)
            print(f"{png}  ({png.stat().st_size // 1000} kB)")
    finally:
        if server is not None:
            stop(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
