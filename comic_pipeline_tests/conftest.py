"""Shared pytest fixtures. Each section belongs to the module it serves; append, don't rewrite."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

try:  # Dagster loads its component plugins (dagster-aws) on the first load_from_defs_folder. In a
    # deep test stack, CPython 3.11.7 raised "AST constructor recursion depth mismatch" importing
    # them (test_named_comics in the xdist lane); importing them here, at the top, sidesteps it.
    import dagster_aws.components  # noqa: F401
except ImportError:  # without the prod extra
    pass


# --- Stage 3 store fixtures (comic_pipeline.store) --------------------------------------------
PADDING_JUNK = 1e3  # what padded slots hold in these fixtures: readers must zero it


def random_comic_arrays(
    rng: np.random.Generator,
    *,
    n_pages: int,
    max_panels: int,
    dim: int,
    max_boxes: int = 0,
    dtype: str = "float32",
    modalities: tuple[str, ...] = ("fused", "visual", "text", "caption"),
) -> dict[str, np.ndarray]:
    """Native-layout arrays of one comic: random prefix masks, junk in every padded slot."""
    n_panels = rng.integers(1, max_panels + 1, size=n_pages)  # (pages,) >= 1 each
    panel_mask = np.arange(max_panels)[None, :] < n_panels[:, None]  # (pages, P)

    def embeddings(shape: tuple[int, ...], valid: np.ndarray) -> np.ndarray:
        values = rng.normal(size=shape).astype(dtype)
        values[~valid] = PADDING_JUNK
        return values

    arrays = {"panel_mask": panel_mask}
    names = {"fused": "panel_embeddings", "visual": "visual", "caption": "caption"}
    for modality, name in names.items():
        if modality in modalities:
            arrays[name] = embeddings((n_pages, max_panels, dim), panel_mask)
    if "text" in modalities:
        if max_boxes < 1:
            raise ValueError("random_comic_arrays: text needs max_boxes >= 1")
        n_boxes = rng.integers(0, max_boxes + 1, size=(n_pages, max_panels))  # (pages, P)
        text_mask = (np.arange(max_boxes)[None, None, :] < n_boxes[:, :, None]) & panel_mask[:, :, None]
        arrays["text_mask"] = text_mask
        arrays["text"] = embeddings((n_pages, max_panels, max_boxes, dim), text_mask)
    return arrays


@pytest.fixture
def make_comic_arrays() -> Callable[..., dict[str, np.ndarray]]:
    """random_comic_arrays(rng, n_pages=, max_panels=, dim=, max_boxes=, dtype=, modalities=)."""
    return random_comic_arrays


@pytest.fixture
def tiny_native_store(tmp_path) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
    """A native Stage 3 store with 3 comics and all modalities (dim 8, P 4, B 3).

    Returns (url, {comic_id: arrays as written}).
    """
    from comic_pipeline import store

    url = str(tmp_path / "stage3.zarr")
    store.create_native_store(url, dim=8, max_panels=4, max_boxes=3)
    rng = np.random.default_rng(0)
    written = {}
    for index, comic_id in enumerate(["alpha", "beta", "gamma"]):
        arrays = random_comic_arrays(rng, n_pages=3 + index, max_panels=4, dim=8, max_boxes=3)
        store.write_native_comic(url, comic_id, title=comic_id.title(), arrays=arrays,
                                 page_ids=[f"{comic_id}-p{page}" for page in range(3 + index)])
        written[comic_id] = arrays
    return url, written


# --- lanes for `make test` (pytest -n 2) ----------------------------------------------------------
E2E_FOLDER = "comic_pipeline_tests/e2e/"


def pytest_xdist_make_scheduler(config, log):
    """Two lanes: the browser tests in one, everything else in the other. The browser test spends
    most of its time waiting for Dagster's daemons (ticks every 30 s), so the rest runs meanwhile;
    one lane for the rest builds the session's trained home once, not once per worker. (A scheduler
    of our own: xdist 3.8's `xdist_group` marks do not take effect under pytest 9.2.)"""
    from xdist.scheduler import LoadScopeScheduling

    class TwoLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "browser" if nodeid.startswith(E2E_FOLDER) else "rest"

    return TwoLanes(config, log)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and torch's spin-waiting CPU pool on a busy
    2-core machine (the e2e test's Dagster, a second run) makes them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- a trained home (comic_pipeline_tests.pipelines), for the defs and prod tests ---------------
@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory):
    from comic_pipeline_tests.pipelines import migrate_mlflow_db

    return migrate_mlflow_db(tmp_path_factory.mktemp("mlflow-template"))


@pytest.fixture(scope="session")
def prebuilt_home(tmp_path_factory, migrated_mlflow_db):
    """Store -> validation -> splits -> tasks -> training -> evaluation -> champion -> embeddings,
    once a session. Read-only: tests get copies (defs: `trained_pipeline`)."""
    from comic_pipeline_tests.pipelines import build_trained_home

    return build_trained_home(tmp_path_factory.mktemp("prebuilt") / "home", migrated_mlflow_db)
