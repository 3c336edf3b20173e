"""Materialize from the Dagster UI in a real browser: "Materialize all", read the evaluation
summary, backfill the contextualized embeddings of every comic.

The clicks happen in headless Chromium; the waiting polls Dagster's GraphQL API. Each step saves
screenshots under test-output/e2e/ (printed with -s); a failing step names its screenshot and the
`dagster dev` log. Run: `.venv/bin/python -m pytest comic_pipeline_tests/e2e -m e2e -x -s`.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import pytest

from comic_pipeline import home as home_paths
from comic_pipeline import schema
from comic_pipeline.embedding_store import ContextualizedStore

from .conftest import DagsterUI, Screens

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

expect = pytest.importorskip("playwright.sync_api").expect

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

MATERIALIZE_ALL_TIMEOUT_S = 900  # store, validation, tasks, training, evaluation, champion, embeddings
BACKFILL_TIMEOUT_S = 300  # one embedding run (the backfill daemon ticks every 30 s)


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


def test_materialize_all_read_the_summary_and_backfill_embeddings(
    dagster_ui: DagsterUI, page: Page, screens: Screens
):
    ui, n_comics = dagster_ui, len(dagster_ui.comic_ids)
    started = time.monotonic()

    with screens.step("1-materialize-all"):
        n_assets = len(ui.asset_nodes())
        page.goto(f"{ui.url}/asset-groups")
        page.get_by_role("button", name=re.compile(r"Materialize all")).click()
        # Partitioned and unpartitioned assets together: the launch dialog asks for partitions.
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
        expect(dialog).to_contain_text(f"materialize {n_assets} assets")
        _choose_all_partitions(dialog, n_comics)
        screens.shot("1a-materialize-all-dialog")
        backfill_id = _launch_backfill(dialog, ui)
        print(f"[e2e] Materialize all -> backfill {backfill_id}", flush=True)
        _show_backfill(page, ui, backfill_id)
        backfill = ui.wait_for_backfill(backfill_id, MATERIALIZE_ALL_TIMEOUT_S)
        run_ids = {run["runId"] for run in backfill["runs"]}
        for node in ui.asset_nodes():
            name = "/".join(node["assetKey"]["path"])
            if node["isPartitioned"]:
                stats = node["partitionStats"]
                assert stats["numMaterialized"] == n_comics and stats["numFailed"] == 0, (name, stats)
            else:
                latest = node["assetMaterializations"]
                assert latest and latest[0]["runId"] in run_ids, f"{name} not materialized by the backfill"
        page.reload()
        expect(page.get_by_text("Succeeded").first).to_be_visible()
        screens.shot("1b-materialize-all-backfill", full_page=True)
        _expand_asset_graph(page, ui)
        screens.shot("1c-asset-graph")

    with screens.step("2-evaluation-summary"):
        page.goto(f"{ui.url}/assets/evaluation/summary")
        summary_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="summary", exact=True))
        summary_row.get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog").filter(has_text="Test split")
        rows = _summary_rows(dialog)
        screens.shot("2-evaluation-summary")
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

    with screens.step("3-backfill-embeddings"):
        page.goto(f"{ui.url}/assets/contextualized_embeddings")
        page.get_by_role("button", name=re.compile(r"\bMaterialize…$")).click()
        dialog = page.get_by_role("dialog").filter(
            has_text="Launch runs to materialize contextualized_embeddings")
        _choose_all_partitions(dialog, n_comics)
        screens.shot("3a-backfill-dialog")
        backfill_id = _launch_backfill(dialog, ui)
        print(f"[e2e] contextualized_embeddings -> backfill {backfill_id}", flush=True)
        _show_backfill(page, ui, backfill_id)
        backfill = ui.wait_for_backfill(backfill_id, BACKFILL_TIMEOUT_S)
        run_ids = {run["runId"] for run in backfill["runs"]}
        embedded = ui.materialized_partitions(["contextualized_embeddings"], run_ids)
        assert embedded == set(ui.comic_ids), f"not re-embedded: {sorted(set(ui.comic_ids) - embedded)}"
        champion = ui.latest_metadata(["champion_model"])["model_version"]
        store = ContextualizedStore.open(home_paths.contextualized_store_url(str(ui.home)))
        assert set(store.model_versions().values()) == {champion}, store.model_versions()
        page.reload()
        expect(page.get_by_text("Succeeded").first).to_be_visible()
        screens.shot("3b-backfill", full_page=True)
        page.goto(f"{ui.url}/assets/contextualized_embeddings?view=partitions")
        expect(page.get_by_text(f"Materialized ({n_comics})")).to_be_visible()
        screens.shot("3c-embedding-partitions")

    print(f"[e2e] all steps passed in {time.monotonic() - started:.0f} s; screenshots:", flush=True)
    for path in screens.paths:
        print(f"[e2e]   {path}", flush=True)
