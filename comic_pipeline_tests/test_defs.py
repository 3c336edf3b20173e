"""The real definitions load, validate, and hold what the design promises (DESIGN §1, §2)."""

import ast
import os
import subprocess
import sys
from pathlib import Path


from comic_pipeline import schema
from comic_pipeline.definitions import defs
from comic_pipeline.defs.keys import (
    CHAMPION_MODEL, COMIC_SPLITS, COMICS_EVALUATION, CONTEXTUALIZED_EMBEDDINGS, EVALUATION_KEYS,
    EVALUATION_SUMMARY, SEQUENCE_MODEL, TASK_KEYS,
)

CHECKOUT = Path(__file__).resolve().parent.parent
DEFS = CHECKOUT / "comic_pipeline" / "defs"
# Modules of defs/ that define assets: siblings that never import each other.
ASSET_FILES = {"stage3", "tasks", "training", "evaluation", "champion", "embeddings", "comics"}


def test_definitions_load_with_every_asset_group_and_automation():
    definitions = defs()
    repository = definitions.get_repository_def()
    keys = {key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()}
    expected = {"stage3_store", "stage3_panel_embeddings", "comic_splits", "sequence_model",
                "champion_model", "contextualized_embeddings", "evaluation/summary", "comics_evaluation"}
    expected |= {f"tasks/{t}" for t in schema.TASK_NAMES} | {f"evaluation/{t}" for t in schema.TASK_NAMES}
    assert expected <= keys
    assert definitions.get_sensor_def("new_comics_sensor")
    assert definitions.get_schedule_def("weekly_retraining")
    assert set(definitions.resources) == {"io_manager", "storage", "stage3", "torch_device", "mlflow_tracking"}


def test_each_definition_is_defined_once():
    definitions = defs()
    assets = [*(definitions.assets or []), *(definitions.asset_checks or [])]
    assert len({id(a) for a in assets}) == len(assets)


def test_downstream_assets_receive_their_upstream_as_typed_inputs():
    graph = defs().get_repository_def().asset_graph
    node_of = {key: graph.get(key).assets_def for key in graph.get_all_asset_keys()}

    def input_keys(key):
        return set(node_of[key].keys_by_input_name.values())

    assert set(TASK_KEYS.values()) <= input_keys(SEQUENCE_MODEL)
    for key in EVALUATION_KEYS.values():
        assert SEQUENCE_MODEL in input_keys(key), key
    assert {SEQUENCE_MODEL, EVALUATION_SUMMARY} <= input_keys(CHAMPION_MODEL)
    assert CHAMPION_MODEL in input_keys(CONTEXTUALIZED_EMBEDDINGS)
    assert {SEQUENCE_MODEL, COMIC_SPLITS} <= input_keys(COMICS_EVALUATION)


def _project_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comic_pipeline"):
            yield node, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("comic_pipeline"):
                    yield node, alias.name, []


# The domain modules that import torch: imported inside the steps that use them (the definitions
# load in every run process; see test_loading_the_definitions_imports_no_torch_mlflow_or_pandas).
# comics_eval scores COMICS rows through the model (torch) in the comics_evaluation step.
TORCH_MODULES = {"training", "evaluation", "inference", "comics_eval"}


def test_no_asset_file_imports_another_and_no_function_local_project_imports():
    for path in sorted(DEFS.glob("*.py")):
        tree = ast.parse(path.read_text())
        # module level, including `if TYPE_CHECKING:` blocks
        top_level = {id(node) for node in tree.body} | {
            id(inner) for node in tree.body if isinstance(node, ast.If) for inner in node.body}
        for node, module, names in _project_imports(tree):
            torch_bound = (module.removeprefix("comic_pipeline.") in TORCH_MODULES
                           or (module == "comic_pipeline" and set(names) <= TORCH_MODULES))
            assert id(node) in top_level or torch_bound, \
                f"{path.name}:{node.lineno}: function-local import of {module} {names}"
            if path.stem in ASSET_FILES:
                imported = {module.rsplit(".", 1)[-1], *names} if module.startswith("comic_pipeline.defs") else set()
                assert not imported & (ASSET_FILES - {path.stem}), f"{path.name} imports asset file {module}"


def test_every_definition_has_a_description_and_a_group():
    repository = defs().get_repository_def()
    graph = repository.asset_graph
    groups = {"stage3", "tasks", "training", "evaluation", "embeddings", "comics"}
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


def test_an_embedding_backfill_puts_the_configured_number_of_comics_in_a_run():
    """The backfill policy is read from the code location's environment when the definitions
    load (COMIC_PIPELINE_EMBEDDING_RUN_COMICS; defs/embeddings.py)."""
    probe = ("from comic_pipeline.definitions import defs\n"
             "from comic_pipeline.defs.keys import CONTEXTUALIZED_EMBEDDINGS\n"
             "graph = defs().get_repository_def().asset_graph\n"
             "print(graph.get(CONTEXTUALIZED_EMBEDDINGS).backfill_policy.max_partitions_per_run)")
    for environ, expected in (({}, "1000"), ({"COMIC_PIPELINE_EMBEDDING_RUN_COMICS": "2500"}, "2500")):
        env = {k: v for k, v in os.environ.items() if k != "COMIC_PIPELINE_EMBEDDING_RUN_COMICS"}
        out = subprocess.run([sys.executable, "-c", probe], cwd=CHECKOUT, capture_output=True, text=True,
                             check=True, env={**env, **environ}).stdout.split()
        assert out == [expected]


def test_dagster_definitions_validate_passes(tmp_path):
    # its own empty instance: the test never depends on a home that another test or `make` made
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=CHECKOUT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_loading_the_definitions_imports_no_torch_mlflow_or_pandas():
    """Every run process and the code server load the definitions before any step runs; torch,
    MLflow and pandas (seconds of imports) wait for the steps that use them."""
    probe = ("import sys\nfrom comic_pipeline.definitions import defs\ndefs()\n"
             "print(' '.join(m for m in ('torch', 'mlflow', 'pandas') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=CHECKOUT, capture_output=True, text=True,
                            check=True).stdout.split()
    assert loaded == [], f"loading the definitions imported {loaded}"
