"""The README's first hour, clicked in a real browser from an empty home (only dagster.yaml):

1. the stage3_store page says to start there; Materialize it;
2. new_comics_sensor adds the comics partitions and validates all of them in one run;
3. Materialize all -> All partitions: one backfill up to the champion (the time from the ready UI
   to the champion is printed) and the embeddings;
4. the evaluation summary's table, checked against the recorded metadata;
5. retrain: unchanged data, code and config registers no new version; another seed (typed into the
   retraining_job launchpad) is blocked by champion_model as a regression, and promoted with
   `allow_regression: true` from champion_model's launchpad;
6. the stale-embedding check warns, listing every comic; champion_model's metadata says so too;
7. one backfill of contextualized_embeddings refreshes them and the check passes.

The clicks happen in headless Chromium; the waiting polls Dagster's GraphQL API. Each step saves
screenshots under test-output/e2e/ (printed with -s); a failing step names its screenshot and the
`dagster dev` log. Run: `.venv/bin/python -m pytest comic_pipeline_tests/e2e -m e2e -x -s`.
"""

from __future__ import annotations

import re
import time
import warnings
from typing import TYPE_CHECKING

import pytest
import yaml

from comic_pipeline import corpus, schema
from comic_pipeline import home as home_paths
from comic_pipeline.embedding_store import ContextualizedStore

from .conftest import DagsterUI, Screens

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

expect = pytest.importorskip("playwright.sync_api").expect
expect.set_options(timeout=30_000)  # a busy machine: the UI may wait seconds on the webserver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

TINY_COMICS = corpus.SIZES["tiny"].n_comics  # what stage3_store writes on the tiny profile
RUN_TIMEOUT_S = 300  # one short run: queued, started, a step or two (each a process)
SENSOR_TIMEOUT_S = 300  # a sensor tick (30 s) after the store run, then one validation run
MATERIALIZE_ALL_TIMEOUT_S = 900  # store, validation, tasks, training, evaluation, champion, embeddings
RETRAIN_TIMEOUT_S = 900  # splits, tasks, training, evaluation, champion
CHECK_TIMEOUT_S = 240  # the automation sensor ticks every 30 s, then one check run
BACKFILL_TIMEOUT_S = 300  # one embedding run (the backfill daemon ticks every 30 s)

STALE_CHECK = "embeddings_made_by_champion"
# Training is seeded: on the tiny corpus seed 1 trains a version that passes every blocking gate but
# is more than 0.02 below the seed-0 champion on some task (measured with the slot-matched,
# jointly rank-balanced distractors: text_closure 0.833 vs 0.903), so champion_model refuses it
# until allow_regression is set.
RETRAIN_YAML = "ops:\n  sequence_model:\n    config:\n      seed: 1\n"
PROMOTE_YAML = "ops:\n  champion_model:\n    config:\n      allow_regression: true\n"


def _launch_backfill(dialog: Locator, ui: DagsterUI) -> str:
    """Click "Launch backfill" in a launch dialog and return the id of the backfill it created."""
    known = ui.backfill_ids()
    dialog.get_by_role("button", name="Launch backfill").click()
    backfill_id = ui.new_backfill_id(known)
    expect(dialog).to_be_hidden()
    return backfill_id


def _choose_all_partitions(dialog: Locator, n_comics: int) -> None:
    dialog.get_by_role("button", name="All", exact=True).click()
    expect(dialog).to_contain_text(f"{n_comics} partitions selected")


def _show_backfill(page: Page, ui: DagsterUI, backfill_id: str) -> None:
    page.goto(f"{ui.url}/runs/b/{backfill_id}")
    expect(page.get_by_text(backfill_id).first).to_be_visible()


def _open_asset(page: Page, ui: DagsterUI, name: str) -> None:
    """Catalog -> the asset's link -> its page."""
    page.goto(f"{ui.url}/assets")
    page.get_by_role("link", name=re.compile(rf"^{re.escape(name)}( |$)")).click()
    expect(page.get_by_role("tab", name="Overview")).to_be_visible()


def _materialize_button(page: Page) -> Locator:
    """The asset page's "Materialize" (unpartitioned) button; shift-click opens the launchpad."""
    return page.get_by_role("button", name=re.compile(r"\bMaterialize$"))


def _fill_launchpad(dialog: Locator, page: Page, config_yaml: str) -> None:
    """Replace the launchpad editor's text with `config_yaml`, typed into the editor itself.

    insert_text puts the text in as one input event, so CodeMirror's smart indentation (bound to
    the Enter key) leaves the YAML as written; the editor's content is read back to be sure."""
    editor = dialog.locator(".CodeMirror").first
    expect(editor).to_be_visible()
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.press("Backspace")
    page.keyboard.insert_text(config_yaml)
    typed = editor.evaluate("element => element.CodeMirror.getValue()")
    assert yaml.safe_load(typed) == yaml.safe_load(config_yaml), f"the launchpad holds {typed!r}"
    expect(dialog.get_by_text("No errors")).to_be_visible()  # the launchpad accepted the config


def _launch_from_launchpad(dialog: Locator, ui: DagsterUI, config_yaml: str) -> dict:
    """Click the launchpad's "Materialize"; the run it launched, with the config it was given."""
    known = ui.run_ids()
    dialog.get_by_role("button", name=re.compile(r"\bMaterialize$")).click()
    run = ui.new_run(known)
    expect(dialog).to_be_hidden()
    given = yaml.safe_load(run["runConfigYaml"]) or {}
    wanted = yaml.safe_load(config_yaml)
    for op, op_config in wanted["ops"].items():
        got = given.get("ops", {}).get(op, {}).get("config", {})
        assert got.items() >= op_config["config"].items(), f"run {run['runId']} got {op}: {got}"
    return run


def _expand_asset_graph(page: Page, ui: DagsterUI) -> None:
    """The global asset graph with every group expanded (Alt+E), fitted to the window."""
    page.goto(f"{ui.url}/asset-groups")
    expect(page.get_by_role("button", name=re.compile(r"Materialize all"))).to_be_visible()
    page.keyboard.press("Alt+e")
    expect(page.get_by_text("comic_splits", exact=True).first).to_be_visible()
    page.reload()  # the expansion is remembered; a fresh load fits the expanded graph to the view
    expect(page.get_by_text("sequence_model", exact=True).first).to_be_visible()
    page.wait_for_timeout(1500)  # the graph animates into its fitted position


def _summary_rows(dialog: Locator) -> dict[str, dict[str, str]]:
    """task -> {column: cell text} from the first table of the summary's markdown."""
    table = dialog.locator("table").first
    expect(table).to_be_visible()
    cells = table.evaluate("t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))")
    header, *rows = cells
    assert header[:3] == ["task", "n", "accuracy"], f"unexpected summary table header {header}"
    return {row[0]: dict(zip(header, row)) for row in rows}


def _latest_check(ui: DagsterUI) -> dict | None:
    executions = ui.check_executions(["contextualized_embeddings"], STALE_CHECK, limit=1)
    return executions[0] if executions and executions[0]["evaluation"] else None


def _check_of_champion(ui: DagsterUI, champion: str, passed: bool):
    """A condition: the stale check's latest evaluation judged `champion` and passed (or not)."""
    def condition():
        latest = _latest_check(ui)
        if latest and latest["evaluation"]["metadata"].get("champion") == champion \
                and latest["evaluation"]["success"] == passed:
            return latest
        return None
    return condition


def _show_checks(page: Page, ui: DagsterUI) -> None:
    page.goto(f"{ui.url}/assets/contextualized_embeddings?view=checks")
    # the check's name also sits in hidden elements (the UI measures it to truncate the list)
    expect(page.get_by_text(STALE_CHECK, exact=True).filter(visible=True).first).to_be_visible()


def test_first_hour_from_an_empty_home(dagster_ui: DagsterUI, page: Page, screens: Screens):
    ui = dagster_ui
    started = time.monotonic()

    with screens.step("1-stage3-store"):
        assert ui.partition_stats(["stage3_panel_embeddings"])["numPartitions"] == 0, "the home is not empty"
        _open_asset(page, ui, "stage3_store")
        expect(page.get_by_text("On a fresh home, start here")).to_be_visible()
        screens.shot("1a-empty-home-stage3-store")
        known = ui.run_ids()
        _materialize_button(page).click()
        run = ui.new_run(known)
        ui.assert_run_succeeded(ui.wait_for_run(run["runId"], RUN_TIMEOUT_S))
        store = ui.latest_metadata(["stage3_store"])
        n_comics = store["comics"]
        assert (store["demo"], n_comics, store["quarantined"]) == (True, TINY_COMICS, 0), store
        page.reload()
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        screens.shot("1b-stage3-store-materialized")

    with screens.step("2-sensor-validates-comics"):
        ui.wait_until(
            f"new_comics_sensor adding and validating {n_comics} comics",
            lambda: ui.partition_stats(["stage3_panel_embeddings"])["numMaterialized"] == n_comics,
            SENSOR_TIMEOUT_S)
        sensor_runs = ui.runs(tags={"dagster/sensor_name": "new_comics_sensor"})
        assert len(sensor_runs) == 1, f"one validation run per tick, got {len(sensor_runs)}"
        tags = {t["key"]: t["value"] for t in sensor_runs[0]["tags"]}
        keys = sorted(ui.materialized_partitions(["stage3_panel_embeddings"], {sensor_runs[0]["runId"]}))
        assert len(keys) == n_comics and tags.get("dagster/asset_partition_range_start") == keys[0] \
            and tags.get("dagster/asset_partition_range_end") == keys[-1], tags
        ui.assert_run_succeeded(ui.wait_for_run(sensor_runs[0]["runId"], RUN_TIMEOUT_S))
        page.goto(f"{ui.url}/assets/stage3_panel_embeddings?view=partitions")
        expect(page.get_by_text(f"Materialized ({n_comics})")).to_be_visible()
        screens.shot("2a-comics-validated")
        page.goto(f"{ui.url}/locations/comic_pipeline/sensors/new_comics_sensor")
        expect(page.get_by_text(f"({n_comics} partitions created)")).to_be_visible()
        screens.shot("2b-new-comics-sensor-tick")

    with screens.step("3-materialize-all"):
        n_assets = len(ui.asset_nodes())
        page.goto(f"{ui.url}/asset-groups")
        page.get_by_role("button", name=re.compile(r"Materialize all")).click()
        # Partitioned and unpartitioned assets together: the launch dialog asks for partitions.
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
        expect(dialog).to_contain_text(f"materialize {n_assets} assets")
        _choose_all_partitions(dialog, n_comics)
        screens.shot("3a-materialize-all-dialog")
        backfill_id = _launch_backfill(dialog, ui)
        print(f"[e2e] Materialize all -> backfill {backfill_id}", flush=True)
        _show_backfill(page, ui, backfill_id)
        backfill = ui.wait_for_backfill(backfill_id, MATERIALIZE_ALL_TIMEOUT_S)
        run_ids = {run["runId"] for run in backfill["runs"]}
        for node in ui.asset_nodes():
            name = "/".join(node["assetKey"]["path"])
            if node["isPartitioned"]:
                stats = node["partitionStats"]
                assert stats["numPartitions"] == n_comics, (name, stats)  # no comic retired meanwhile
                assert stats["numMaterialized"] == n_comics and stats["numFailed"] == 0, (name, stats)
            else:
                latest = node["assetMaterializations"]
                assert latest and latest[0]["runId"] in run_ids, f"{name} not materialized by the backfill"
        champion = ui.latest_metadata(["champion_model"])["model_version"]
        to_champion_s = ui.latest_materialization(["champion_model"])["timestamp"] - ui.ready_at
        print(f"[e2e] empty home (UI ready) -> champion {champion}: {to_champion_s:.0f} s", flush=True)
        page.reload()
        expect(page.get_by_text("Succeeded").first).to_be_visible()
        screens.shot("3b-materialize-all-backfill", full_page=True)
        _expand_asset_graph(page, ui)
        screens.shot("3c-asset-graph")

    with screens.step("4-evaluation-summary"):
        page.goto(f"{ui.url}/assets/evaluation/summary")
        summary_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="summary", exact=True))
        summary_row.get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog").filter(has_text="Test split")
        rows = _summary_rows(dialog)
        screens.shot("4-evaluation-summary")
        missing = [task for task in schema.TASK_NAMES if task not in rows]
        assert not missing, f"tasks missing from the summary table: {missing} (rows: {sorted(rows)})"
        for task in schema.TASK_NAMES:
            row = rows[task]
            accuracy, chance = float(row["accuracy"]), float(row["chance"])
            ci_low, ci_high = (float(x) for x in re.findall(r"[0-9.]+", row["95% CI"]))
            assert 0.0 <= ci_low <= accuracy <= ci_high <= 1.0, (task, row)
            recorded = ui.latest_metadata(["evaluation", task])
            shown = {"accuracy": accuracy, "accuracy_ci_low": ci_low, "chance": chance}
            for field, value in shown.items():  # the table rounds to 3 decimals
                assert abs(value - recorded[field]) <= 5e-4 + 1e-6, (task, field, value, recorded[field])
            # The champion moved, so every blocking gate passed: the interval clears chance.
            assert recorded["accuracy_ci_low"] > recorded["chance"], (task, recorded)
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()

    with screens.step("5a-retrain-unchanged"):
        # Materialize sequence_model again with nothing changed: no training, the same version.
        _open_asset(page, ui, "sequence_model")
        known = ui.run_ids()
        _materialize_button(page).click()
        run = ui.new_run(known)
        ui.assert_run_succeeded(ui.wait_for_run(run["runId"], RUN_TIMEOUT_S))
        again = ui.latest_metadata(["sequence_model"])
        assert again["unchanged"] is True and again["model_version"] == champion, again
        assert f"model version {champion}" in again["note"], again["note"]
        assert ui.latest_metadata(["champion_model"])["model_version"] == champion
        page.reload()
        expect(page.get_by_text("Nothing to train").first).to_be_visible()
        screens.shot("5a-retrain-unchanged")

    with screens.step("5b-retrain-blocked-as-regression"):
        page.goto(f"{ui.url}/jobs")
        page.get_by_text("retraining_job", exact=True).click()
        page.get_by_role("button", name=re.compile(r"Materialize all$")).click(modifiers=["Shift"])
        dialog = page.get_by_role("dialog").filter(has_text="Launchpad")
        _fill_launchpad(dialog, page, RETRAIN_YAML)
        screens.shot("5b-retrain-launchpad")
        run = _launch_from_launchpad(dialog, ui, RETRAIN_YAML)
        print(f"[e2e] retraining_job with seed 1 -> run {run['runId']}", flush=True)
        retrain = ui.wait_for_run(run["runId"], RETRAIN_TIMEOUT_S)
        candidate = ui.latest_metadata(["sequence_model"])
        assert candidate["unchanged"] is False and candidate["model_version"] != champion, candidate
        new_version = candidate["model_version"]
        failures = ui.step_failures(run["runId"])
        if retrain["status"] == "SUCCESS":
            # Not what this config does where it was measured; say what happened and go on.
            moved_to = ui.latest_metadata(["champion_model"])["model_version"]
            message = (f"retraining with seed 1 was not a regression on this machine: champion "
                       f"{champion} -> {moved_to} without allow_regression; the blocked view is not shown")
            warnings.warn(message)
            print(f"[e2e] NOTE: {message}", flush=True)
            assert moved_to == new_version
            promoted_by_hand = False
        else:
            refusal = failures.get("champion_model", "")
            assert set(failures) == {"champion_model"} and "worse than champion" in refusal \
                and "allow_regression: true" in refusal, \
                f"retraining_job failed otherwise than by a refused regression:\n{ui.run_failures(run['runId'])}"
            print(f"[e2e] champion_model refused version {new_version}: {refusal}", flush=True)
            assert ui.latest_metadata(["champion_model"])["model_version"] == champion  # it stays
            page.goto(f"{ui.url}/runs/{run['runId']}?logs=step%3Achampion_model")
            expect(page.get_by_text("is worse than champion").first).to_be_visible()
            screens.shot("5b-retrain-regression-blocked")
            page.get_by_text("[Show Markdown]").first.click()  # the failure's `comparisons`
            comparisons = page.get_by_role("dialog").filter(has_text="champion before")
            table = comparisons.locator("table").first
            expect(table).to_be_visible()
            cells = table.evaluate("t => [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))")
            regressed = sorted(row[0] for row in cells[1:] if row[-1] == "REGRESSION")
            named = sorted(re.findall(r"(\w+) -[0-9.]+", refusal.split("task(s)", 1)[1]))
            assert regressed and regressed == named, (regressed, refusal)
            screens.shot("5b-regression-comparisons")
            page.keyboard.press("Escape")
            expect(comparisons).to_be_hidden()
            promoted_by_hand = True

    if promoted_by_hand:
        with screens.step("5c-promote-with-allow-regression"):
            _open_asset(page, ui, "champion_model")
            _materialize_button(page).click(modifiers=["Shift"])
            dialog = page.get_by_role("dialog").filter(has_text="Launchpad")
            _fill_launchpad(dialog, page, PROMOTE_YAML)
            screens.shot("5c-promote-with-allow-regression")
            run = _launch_from_launchpad(dialog, ui, PROMOTE_YAML)
            ui.assert_run_succeeded(ui.wait_for_run(run["runId"], RUN_TIMEOUT_S))

    with screens.step("6-stale-embeddings"):
        promoted = ui.latest_metadata(["champion_model"])
        assert promoted["model_version"] == new_version and promoted["previous_champion"] == champion, promoted
        assert (promoted["regressions_allowed"] > 0) == promoted_by_hand, promoted
        assert promoted["stale_comics"] == n_comics, promoted
        assert "contextualized_embeddings" in promoted["refresh"], promoted["refresh"]
        _open_asset(page, ui, "champion_model")
        expect(page.get_by_text("stale_comics").first).to_be_visible()
        screens.shot("6a-champion-stale-comics", full_page=True)
        # the automation runs the check once champion_model has moved; it warns with every comic
        stale = ui.wait_until(f"{STALE_CHECK} warning about champion {new_version}",
                              _check_of_champion(ui, new_version, passed=False), CHECK_TIMEOUT_S)
        evaluation = stale["evaluation"]
        assert evaluation["severity"] == "WARN" and evaluation["metadata"]["stale_comics"] == n_comics, evaluation
        listed = set(evaluation["metadata"]["backfill_partitions"].split(", "))
        assert len(listed) == n_comics, evaluation["metadata"]["backfill_partitions"]
        _show_checks(page, ui)
        expect(page.get_by_text(f"{n_comics} comics have embeddings of an older model").first).to_be_visible()
        screens.shot("6b-stale-embeddings-check")

    with screens.step("7-refresh-embeddings"):
        _open_asset(page, ui, "contextualized_embeddings")
        page.get_by_role("button", name=re.compile(r"\bMaterialize…$")).click()
        dialog = page.get_by_role("dialog").filter(
            has_text="Launch runs to materialize contextualized_embeddings")
        _choose_all_partitions(dialog, n_comics)
        screens.shot("7a-refresh-backfill-dialog")
        backfill_id = _launch_backfill(dialog, ui)
        print(f"[e2e] contextualized_embeddings -> backfill {backfill_id}", flush=True)
        backfill = ui.wait_for_backfill(backfill_id, BACKFILL_TIMEOUT_S)
        run_ids = {run["runId"] for run in backfill["runs"]}
        embedded = ui.materialized_partitions(["contextualized_embeddings"], run_ids)
        assert len(embedded) == n_comics, f"re-embedded {len(embedded)} of {n_comics} comics"
        store = ContextualizedStore.open(home_paths.contextualized_store_url(str(ui.home)))
        assert set(store.model_versions().values()) == {new_version}, store.model_versions()
        ui.wait_until(f"{STALE_CHECK} passing for champion {new_version}",
                      _check_of_champion(ui, new_version, passed=True), CHECK_TIMEOUT_S)
        _show_checks(page, ui)
        expect(page.get_by_text(f"made by champion {new_version}").first).to_be_visible()
        screens.shot("7b-embeddings-check-passed")

    print(f"[e2e] all steps passed in {time.monotonic() - started:.0f} s; empty home (UI ready) -> "
          f"champion {to_champion_s:.0f} s; screenshots:", flush=True)
    for path in screens.paths:
        print(f"[e2e]   {path}", flush=True)
