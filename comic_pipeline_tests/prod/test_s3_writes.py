"""Writes to the S3-compatible server killed midway leave the previous complete version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from comic_pipeline import embedding_store, fileio

pytestmark = pytest.mark.prod

CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _comic(seed: int, pages: int) -> dict:
    rng = np.random.default_rng(seed)
    return dict(panel_embeddings=rng.normal(size=(pages, 4, 8)).astype(np.float32),
                strip_embeddings=rng.normal(size=(pages, 8)).astype(np.float32),
                panel_mask=np.ones((pages, 4), dtype=bool), page_ids=[f"p{i}" for i in range(pages)],
                model_name="m", model_version=str(seed), mlflow_run_id=None, stage3_content_hash="h")


def test_a_comic_rewrite_killed_midway_on_s3_leaves_the_old_comic(prod_services):
    url = f"s3://{prod_services.new_bucket('killed')}/contextualized.zarr"
    embedding_store.write_comic(url, "Action Comics #1 (1938)", **_comic(1, 3))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        import numpy as np
        from comic_pipeline import embedding_store
        real = embedding_store.put_files
        def write_then_stall(version_url, files, **options):
            real(version_url, files, **options)  # the whole new version is on S3 ...
            print("WRITTEN-NOT-COMMITTED", flush=True)
            time.sleep(600)  # ... and the process dies before the commit (the pointer)
        embedding_store.put_files = write_then_stall
        rng = np.random.default_rng(2)
        embedding_store.write_comic({url!r}, "Action Comics #1 (1938)",
            panel_embeddings=np.zeros((5, 4, 8), np.float32), strip_embeddings=np.zeros((5, 8), np.float32),
            panel_mask=np.ones((5, 4), bool), page_ids=[f"q{{i}}" for i in range(5)], model_name="m",
            model_version="2", mlflow_run_id=None, stage3_content_hash="h")
    """)], stdout=subprocess.PIPE, text=True, cwd=CHECKOUT, env={**os.environ, "PYTHONPATH": CHECKOUT},
        start_new_session=True)
    try:
        for line in child.stdout:
            if "WRITTEN-NOT-COMMITTED" in line:
                break
        else:
            raise AssertionError(f"writer exited early ({child.wait()})")
    finally:
        if child.poll() is None:  # a writer that exited early is reported above, not masked here
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    store = embedding_store.ContextualizedStore.open(url)
    key = store.key_of("Action Comics #1 (1938)")
    comic = store.read(key)
    expected = _comic(1, 3)
    assert comic.attrs["model_version"] == "1" and comic.page_ids == expected["page_ids"]
    np.testing.assert_allclose(comic.strip_embeddings, expected["strip_embeddings"])
    # the dead writer's version is on S3 but never committed; the collector removes it
    comic_url = fileio.join(url, "comics", key)
    assert embedding_store.collect_garbage(comic_url, grace_seconds=0)
    assert store.read(key).attrs["model_version"] == "1"
