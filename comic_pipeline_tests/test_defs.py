"""The real definitions load, validate, and hold what the design promises."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

from comic_pipeline import schema
from comic_pipeline.definitions import defs

CHECKOUT = Path(__file__).resolve().parent.parent


def test_definitions_load_with_every_asset_group_and_automation():
    definitions = defs()
    repository = definitions.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    expected = {"stage3_store", "stage3_panel_embeddings", "comic_splits", "sequence_model",
                "champion_model", "contextualized_embeddings", "evaluation/summary"}
    expected |= {f"tasks/{t}" for t in schema.TASK_NAMES} | {f"evaluation/{t}" for t in schema.TASK_NAMES}
    assert expected <= keys
    assert definitions.get_sensor_def("new_comics_sensor")
    assert definitions.get_schedule_def("weekly_retraining")
    assert set(definitions.resources) == {"storage", "stage3", "torch_device", "mlflow_tracking"}


def test_every_definition_has_a_description_and_a_group():
    repository = defs().get_repository_def()
    graph = repository.asset_graph
    groups = {"stage3", "tasks", "training", "evaluation", "embeddings"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 30, key
        assert node.group_name in groups, key
    for check_key in graph.asset_check_keys:
        assert graph.get_check_spec(check_key).description, check_key
    for sensor in repository.sensor_defs:
        assert sensor.description, sensor.name
    for schedule in repository.schedule_defs:
        assert schedule.description, schedule.name


def test_gpu_assets_share_the_gpu_pool():
    graph = defs().get_repository_def().asset_graph
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    assert pools["sequence_model"] == {"gpu"}
    assert pools["contextualized_embeddings"] == {"gpu"}


def test_dagster_definitions_validate_passes():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
