"""The names the asset files share: every asset key of the graph and the `comics` partitions.

Asset files name their upstream by these keys (never by importing another asset file), so each
file can be read, tested and changed on its own.
"""

import dagster as dg

from comic_pipeline import schema

comics_partitions = dg.DynamicPartitionsDefinition(name="comics")

STAGE3_STORE = dg.AssetKey("stage3_store")
STAGE3_PANEL_EMBEDDINGS = dg.AssetKey("stage3_panel_embeddings")
COMIC_SPLITS = dg.AssetKey("comic_splits")
TASK_KEYS = {name: dg.AssetKey(["tasks", name]) for name in schema.TASK_NAMES}
SEQUENCE_MODEL = dg.AssetKey("sequence_model")
EVALUATION_KEYS = {name: dg.AssetKey(["evaluation", name]) for name in schema.TASK_NAMES}
EVALUATION_SUMMARY = dg.AssetKey(["evaluation", "summary"])
CHAMPION_MODEL = dg.AssetKey("champion_model")
CONTEXTUALIZED_EMBEDDINGS = dg.AssetKey("contextualized_embeddings")
COMICS_EVALUATION = dg.AssetKey("comics_evaluation")  # real COMICS rows (DESIGN §9)

# The quality gates: the asset checks of every evaluation/<task>.
BLOCKING_GATES = ("beats_chance", "beats_shortcuts")
REGRESSION_GATE = "no_regression_vs_champion"
# Largest drop of a task's test accuracy below the champion's: the WARN gate of every evaluation and
# the default of champion_model's blocking comparison.
REGRESSION_TOLERANCE = 0.02
STALE_EMBEDDINGS_CHECK = "embeddings_made_by_champion"
UNSEEN_TEST_BOOKS_CHECK = "test_books_unseen_in_training"
