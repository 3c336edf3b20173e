"""Fixtures for the browser end-to-end test: an empty home, `dagster dev` in its own process group,
headless Chromium through Playwright, and step screenshots under test-output/e2e/.

The home holds nothing but the Dagster instance config (dagster.yaml, copied as `make home` does):
no Stage 3 store, no partitions, no MLflow database. Everything after that is done in the browser
(clicks) or by the automation `dagster dev` runs by default (new_comics_sensor, the stale-embedding
automation); the test only waits for it through Dagster's GraphQL API.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "e2e"  # git-ignored
CHROMIUM = os.environ.get("COMIC_E2E_CHROMIUM", "/usr/bin/chromium")
# Headless, no sandbox (containers), no GPU, and no network traffic of Chromium's own; Playwright's
# headless=True adds --headless as well.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
VIEWPORT = {"width": 1600, "height": 1100}  # the whole expanded asset graph fits
UI_START_TIMEOUT_S = 240  # webserver + daemon + code location import, on two busy cores
STOP_TIMEOUT_S = 30  # SIGTERM grace for the whole process group before SIGKILL
NEEDED_DAEMONS = {"BACKFILL", "QUEUED_RUN_COORDINATOR", "SENSOR"}
BACKFILL_DONE = {"COMPLETED_SUCCESS", "COMPLETED_FAILED", "COMPLETED", "FAILED", "CANCELED"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, n_chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n_chars:]


@dataclass
class DagsterUI:
    """A running `dagster dev`: its URL, home, log, and the GraphQL calls the test waits with."""

    url: str
    home: Path
    log_path: Path
    process: subprocess.Popen
    ready_at: float = 0.0  # wall clock (time.time()) when the UI and its daemons were ready

    # --- GraphQL -----------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict | None = None, timeout_s: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"GraphQL HTTP {error.code}: {error.read().decode()[:2000]}") from error
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def unhealthy_daemons(self) -> list[str]:
        data = self.graphql("""{ instance { daemonHealth { allDaemonStatuses {
            daemonType required healthy } } } }""")
        statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
        return [d["daemonType"] for d in statuses if d["daemonType"] in NEEDED_DAEMONS and not d["healthy"]]

    def asset_nodes(self) -> list[dict]:
        return self.graphql("""{ assetNodes { assetKey { path } isPartitioned
            partitionStats { numMaterialized numPartitions numFailed }
            assetMaterializations(limit: 1) { runId } } }""")["assetNodes"]

    def backfill_ids(self) -> set[str]:
        data = self.graphql("""{ partitionBackfillsOrError(limit: 50) {
            ... on PartitionBackfills { results { id } } ... on PythonError { message } } }""")
        result = data["partitionBackfillsOrError"]
        assert "results" in result, f"listing backfills failed: {result}"
        return {b["id"] for b in result["results"]}

    def new_backfill_id(self, known: set[str], timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = self.backfill_ids() - known
            if new:
                assert len(new) == 1, f"expected one new backfill, found {sorted(new)}"
                return new.pop()
            time.sleep(1)
        raise AssertionError(f"no backfill was created within {timeout_s:.0f} s of the click")

    def backfill(self, backfill_id: str) -> dict:
        data = self.graphql("""query ($id: String!) { partitionBackfillOrError(backfillId: $id) {
            __typename ... on PartitionBackfill { id status error { message }
              runs { runId status } }
            ... on PythonError { message } ... on BackfillNotFoundError { message } } }""",
                            {"id": backfill_id})
        result = data["partitionBackfillOrError"]
        assert result["__typename"] == "PartitionBackfill", f"backfill {backfill_id}: {result}"
        return result

    def wait_for_backfill(self, backfill_id: str, timeout_s: float) -> dict:
        """Poll until the backfill is finished; fail with every failed step's error otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            backfill = self.backfill(backfill_id)
            if backfill["status"] in BACKFILL_DONE:
                break
            if self.process.poll() is not None:
                raise AssertionError(f"dagster dev exited ({self.process.returncode}) while waiting "
                                     f"for backfill {backfill_id}; log tail:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                runs = [(r["runId"][:8], r["status"]) for r in backfill["runs"]]
                raise AssertionError(f"backfill {backfill_id} still {backfill['status']} after "
                                     f"{timeout_s:.0f} s; runs: {runs}")
            time.sleep(5)
        failed = [r for r in backfill["runs"] if r["status"] != "SUCCESS"]
        if backfill["status"] != "COMPLETED_SUCCESS" or failed or not backfill["runs"]:
            details = "\n".join(self.run_failures(r["runId"]) for r in failed)
            raise AssertionError(
                f"backfill {backfill_id} ended {backfill['status']} "
                f"({len(failed)} of {len(backfill['runs'])} runs not successful)"
                f"{': ' + backfill['error']['message'] if backfill.get('error') else ''}\n{details}")
        return backfill

    def run_failures(self, run_id: str) -> str:
        """The step and run failure messages of one run, for a failure report."""
        data = self.graphql("""query ($id: ID!) { logsForRun(runId: $id, limit: 5000) {
            ... on EventConnection { events { __typename
              ... on ExecutionStepFailureEvent { stepKey error { message
                    cause { message cause { message cause { message } } } } }
              ... on RunFailureEvent { message } } } ... on PythonError { message } } }""",
                            {"id": run_id})
        events = data["logsForRun"].get("events", [])
        lines = [f"  step {e['stepKey']}: {_root_message(e.get('error'))}"
                 for e in events if e["__typename"] == "ExecutionStepFailureEvent"]
        lines += [f"  run: {e['message']}" for e in events if e["__typename"] == "RunFailureEvent"]
        return f"run {run_id}:\n" + ("\n".join(lines) or "  (no failure event recorded)")

    def latest_metadata(self, path: list[str]) -> dict[str, object]:
        """label -> value of the latest materialization of one asset."""
        data = self.graphql("""query ($key: AssetKeyInput!) { assetNodes(assetKeys: [$key]) {
            assetMaterializations(limit: 1) { metadataEntries { label __typename
              ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue }
              ... on TextMetadataEntry { text } ... on PathMetadataEntry { path }
              ... on BoolMetadataEntry { boolValue } } } } }""", {"key": {"path": path}})
        (node,) = data["assetNodes"]
        assert node["assetMaterializations"], f"{'/'.join(path)} has no materialization"
        entries = node["assetMaterializations"][0]["metadataEntries"]
        value_fields = ("floatValue", "intValue", "text", "path", "boolValue")
        return {e["label"]: next((e[f] for f in value_fields if f in e), None) for e in entries}

    def wait_until(self, what: str, condition, timeout_s: float, every_s: float = 3):
        """Poll `condition()` until it returns something truthy (returned); fail naming `what`."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(f"dagster dev exited ({self.process.returncode}) while waiting "
                                     f"for {what}; log tail:\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
            time.sleep(every_s)

    def runs(self, tags: dict[str, str] | None = None, limit: int = 100) -> list[dict]:
        """The newest runs first, optionally only those with all of `tags`."""
        data = self.graphql("""query ($filter: RunsFilter, $limit: Int) {
            runsOrError(filter: $filter, limit: $limit) { __typename
              ... on Runs { results { runId status jobName runConfigYaml
                  tags { key value } assetSelection { path } } }
              ... on PythonError { message } } }""",
                            {"filter": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
                             "limit": limit})
        result = data["runsOrError"]
        assert result["__typename"] == "Runs", f"listing runs failed: {result}"
        return result["results"]

    def run_ids(self) -> set[str]:
        return {run["runId"] for run in self.runs()}

    def new_run(self, known: set[str], timeout_s: float = 60) -> dict:
        """The one run launched from the UI since `known` was listed (what the click launched;
        runs of sensors, automation and backfills that started meanwhile are not it)."""
        def launched():
            new = [run for run in self.runs() if run["runId"] not in known and _from_a_click(run)]
            assert len(new) <= 1, f"expected one new run, found {[(r['runId'][:8], r['jobName']) for r in new]}"
            return new[0] if new else None
        return self.wait_until("a run launched by the click", launched, timeout_s, every_s=1)

    def run(self, run_id: str) -> dict:
        data = self.graphql("""query ($id: ID!) { runOrError(runId: $id) { __typename
            ... on Run { runId status jobName runConfigYaml tags { key value } assetSelection { path } }
            ... on RunNotFoundError { message } ... on PythonError { message } } }""", {"id": run_id})
        run = data["runOrError"]
        assert run["__typename"] == "Run", f"run {run_id}: {run}"
        return run

    def wait_for_run(self, run_id: str, timeout_s: float) -> dict:
        """Poll until the run has finished; the finished run (status SUCCESS, FAILURE, CANCELED)."""
        def finished():
            run = self.run(run_id)
            return run if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") else None
        return self.wait_until(f"run {run_id} to finish", finished, timeout_s)

    def assert_run_succeeded(self, run: dict) -> None:
        assert run["status"] == "SUCCESS", (
            f"run {run['runId']} ({run['jobName']}) ended {run['status']}\n{self.run_failures(run['runId'])}")

    def step_failures(self, run_id: str) -> dict[str, str]:
        """step key -> its failure message (the asset's own, innermost error)."""
        data = self.graphql("""query ($id: ID!) { logsForRun(runId: $id, limit: 5000) {
            ... on EventConnection { events { __typename
              ... on ExecutionStepFailureEvent { stepKey error { message
                    cause { message cause { message cause { message } } } } } } } } }""",
                            {"id": run_id})
        events = data["logsForRun"].get("events", [])
        return {e["stepKey"]: _root_message(e.get("error")) for e in events
                if e["__typename"] == "ExecutionStepFailureEvent"}

    def latest_materialization(self, path: list[str]) -> dict | None:
        """{runId, timestamp (s since the epoch), partition} of an asset's latest materialization."""
        data = self.graphql("""query ($key: AssetKeyInput!) { assetNodes(assetKeys: [$key]) {
            assetMaterializations(limit: 1) { runId timestamp partition } } }""", {"key": {"path": path}})
        (node,) = data["assetNodes"]
        if not node["assetMaterializations"]:
            return None
        latest = node["assetMaterializations"][0]
        return {**latest, "timestamp": float(latest["timestamp"]) / 1000}

    def partition_stats(self, path: list[str]) -> dict:
        data = self.graphql("""query ($key: AssetKeyInput!) { assetNodes(assetKeys: [$key]) {
            partitionStats { numMaterialized numPartitions numFailed } } }""", {"key": {"path": path}})
        (node,) = data["assetNodes"]
        return node["partitionStats"]

    def check_executions(self, path: list[str], check: str, limit: int = 5) -> list[dict]:
        """The newest executions of an asset check: runId, status, and the evaluation's passed
        flag, severity, description and metadata (label -> value)."""
        data = self.graphql("""query ($key: AssetKeyInput!, $check: String!, $limit: Int!) {
            assetCheckExecutions(assetKey: $key, checkName: $check, limit: $limit) {
              runId status timestamp evaluation { success severity description
                metadataEntries { label __typename ... on TextMetadataEntry { text }
                  ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue } } } } }""",
                            {"key": {"path": path}, "check": check, "limit": limit})
        executions = []
        for execution in data["assetCheckExecutions"]:
            evaluation = execution["evaluation"] or {}
            metadata = {e["label"]: next((e[f] for f in ("text", "intValue", "floatValue") if f in e), None)
                        for e in evaluation.get("metadataEntries", [])}
            executions.append({**execution, "evaluation": evaluation and {**evaluation, "metadata": metadata}})
        return executions

    def materialized_partitions(self, path: list[str], run_ids: set[str]) -> set[str]:
        data = self.graphql("""query ($key: AssetKeyInput!) { assetNodes(assetKeys: [$key]) {
            assetMaterializations(limit: 1000) { partition runId } } }""", {"key": {"path": path}})
        (node,) = data["assetNodes"]
        return {m["partition"] for m in node["assetMaterializations"] if m["runId"] in run_ids}


def _from_a_click(run: dict) -> bool:
    tags = {t["key"]: t["value"] for t in run["tags"]}
    return tags.get("dagster/from_ui") == "true" and "dagster/backfill" not in tags


def _root_message(error: dict | None) -> str:
    """The innermost cause's message: the asset's own error, not Dagster's wrapper around it."""
    while error and error.get("cause"):
        error = error["cause"]
    return (error or {}).get("message", "").strip()


def _empty_home(home: Path) -> None:
    """What `make home` makes: the home folder with the Dagster instance config, nothing else."""
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", dagster_home / "dagster.yaml")


def _default_sigint() -> None:
    # dagster dev maps SIGTERM to its SIGINT handler; a shell that started pytest in the background
    # leaves SIGINT ignored, which would make dagster dev ignore SIGTERM too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the whole group (webserver, daemon, code server, runs), SIGKILL what outlives it."""
    pgid = process.pid  # start_new_session=True: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    while time.monotonic() < deadline:  # the leader may be gone while its children still stop
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _wait_until_ready(ui: DagsterUI) -> None:
    """The webserver answers, the code location is loaded (or its load error is reported) and the
    daemons that launch backfills, queued runs and sensors have sent a heartbeat."""
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while True:
        if ui.process.poll() is not None:
            raise AssertionError(f"dagster dev exited with {ui.process.returncode} during start-up; "
                                 f"log {ui.log_path}:\n{_tail(ui.log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"dagster dev did not become ready within {UI_START_TIMEOUT_S} s "
                                 f"(webserver, code location, daemons {sorted(NEEDED_DAEMONS)}); "
                                 f"log {ui.log_path}:\n{_tail(ui.log_path)}")
        try:
            with urllib.request.urlopen(f"{ui.url}/server_info", timeout=5):
                pass
            data = ui.graphql("""{ workspaceOrError { ... on Workspace { locationEntries {
                name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
            entries = data["workspaceOrError"]["locationEntries"]
            loaded = [e for e in entries if e["loadStatus"] == "LOADED"]
            errors = [e["locationOrLoadError"] for e in loaded
                      if e["locationOrLoadError"]["__typename"] == "PythonError"]
            assert not errors, f"the code location failed to load: {errors[0]['message']}"
            if entries and len(loaded) == len(entries) and not ui.unhealthy_daemons():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory) -> Iterator[DagsterUI]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set COMIC_E2E_CHROMIUM)")
    pytest.importorskip("playwright.sync_api")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT.glob("*.png"):
        old.unlink()
    home = tmp_path_factory.mktemp("e2e") / "home"
    _empty_home(home)
    env = {k: v for k, v in os.environ.items() if k not in ("COMIC_STAGE3_STORE", "COMIC_STAGE3_METADATA")}
    env.update(COMIC_PIPELINE_HOME=str(home), DAGSTER_HOME=str(home / "dagster"),
               COMIC_PIPELINE_PROFILE="tiny", PYTHONUNBUFFERED="1")
    port = _free_port()
    dagster = Path(sys.executable).with_name("dagster")
    log_path = OUTPUT / "dagster-dev.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-p", str(port), "-h", "127.0.0.1"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_default_sigint,
        )
    try:
        ui = DagsterUI(f"http://127.0.0.1:{port}", home, log_path, process)
        _wait_until_ready(ui)
        ui.ready_at = time.time()
        print(f"\n[e2e] dagster dev at {ui.url}, home {home}, log {log_path}", flush=True)
        yield ui
    finally:
        _stop_process_group(process)


def _skip_community_prompt(page, ui: DagsterUI) -> None:
    """A fresh browser profile first gets Dagster's newsletter prompt over the UI; skip it once
    (the choice is remembered in the profile)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    page.goto(f"{ui.url}/asset-groups")
    prompt = page.get_by_role("dialog").filter(has_text="Join the Dagster community")
    try:
        prompt.get_by_role("button", name="Skip").click(timeout=15_000)
    except PlaywrightTimeout:
        return  # not shown (this Dagster version or profile does not ask)
    expect(prompt).to_be_hidden()


@pytest.fixture(scope="module")
def page(dagster_ui, tmp_path_factory):
    """One Chromium page with a fresh profile, past Dagster's newsletter prompt."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,
        )
        try:
            browser_page = context.pages[0] if context.pages else context.new_page()
            browser_page.set_default_timeout(60_000)
            _skip_community_prompt(browser_page, dagster_ui)
            yield browser_page
        finally:
            context.close()


class Screens:
    """Numbered screenshots of each step, and steps that fail with their screenshot's path."""

    def __init__(self, page, ui: DagsterUI):
        self.page, self.ui, self.paths = page, ui, []

    def shot(self, name: str, full_page: bool = False) -> Path:
        path = OUTPUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        self.paths.append(path)
        print(f"[e2e] screenshot {path}", flush=True)
        return path

    @contextlib.contextmanager
    def step(self, name: str):
        started = time.monotonic()
        print(f"[e2e] step {name} ...", flush=True)
        try:
            yield
        except Exception as error:
            try:
                where = self.shot(f"{name}-FAILED", full_page=True)
            except Exception as screenshot_error:  # the browser itself may be what broke
                where = f"(no screenshot: {screenshot_error})"
            raise AssertionError(
                f"e2e step {name!r} failed after {time.monotonic() - started:.0f} s: {error}\n"
                f"screenshot: {where}\ndagster dev log: {self.ui.log_path}"
            ) from error
        print(f"[e2e] step {name} done in {time.monotonic() - started:.0f} s", flush=True)


@pytest.fixture
def screens(page, dagster_ui) -> Screens:
    return Screens(page, dagster_ui)
