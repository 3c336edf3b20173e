import uuid

import numpy as np
import pytest

from comic_pipeline import embedding_store as es
from comic_pipeline.page_search import PageSearch


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ctx.zarr")
    return f"memory://ctx-{uuid.uuid4().hex}.zarr"

# --- search -----------------------------------------------------------------------------------
def _planted_store(url):
    """Three comics; page 1 of 'near' is planted next to page 0 of 'query'."""
    rng = np.random.default_rng(9)
    base = rng.normal(size=(3, 16)).astype(np.float32)
    strips = {
        "query": np.stack([base[0], rng.normal(size=16)]),
        "near": np.stack([rng.normal(size=16), base[0] + 0.01, rng.normal(size=16)]),
        "far": rng.normal(size=(4, 16)),
    }
    strips["far"][2] = base[0] + 0.05  # second nearest
    for comic_id, strip in strips.items():
        n = strip.shape[0]
        es.write_comic(url, comic_id, panel_embeddings=np.zeros((n, 2, 16), np.float32),
                       strip_embeddings=strip.astype(np.float32), panel_mask=np.ones((n, 2), bool),
                       page_ids=[f"{comic_id}/{i}" for i in range(n)], model_name="m", model_version="1",
                       mlflow_run_id=None, stage3_content_hash="h")
    return base[0]


def test_strip_matrix_and_nearest_pages_find_planted_neighbours(store_url):
    planted = _planted_store(store_url)
    store = PageSearch.open(store_url)
    matrix, table = store.strip_matrix()
    assert matrix.shape == (9, 16)
    assert list(table.columns) == ["comic_id", "comic_name", "page_number", "page_id"]
    assert table["comic_id"].tolist() == ["far"] * 4 + ["near"] * 3 + ["query"] * 2
    subset_matrix, subset_table = store.strip_matrix(["query"])
    assert subset_matrix.shape == (2, 16) and subset_table["page_id"].tolist() == ["query/0", "query/1"]

    by_page = store.nearest_pages(("query", 0), k=2)
    assert list(zip(by_page["comic_id"], by_page["page_number"])) == [("near", 1), ("far", 2)]
    assert by_page["page_id"].tolist() == ["near/1", "far/2"]
    assert by_page["score"].iloc[0] > by_page["score"].iloc[1] > 0.9

    by_vector = store.nearest_pages(planted, k=3)
    assert by_vector["page_id"].tolist() == ["query/0", "near/1", "far/2"]
    with_self = store.nearest_pages(("query", 0), k=1, exclude_self=False)
    assert with_self["page_id"].tolist() == ["query/0"]
    assert with_self["score"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert len(store.nearest_pages(("query", 0), k=100)) == 8

    with pytest.raises(KeyError, match="page 5 of comic 'query'"):
        store.nearest_pages(("query", 5))
    with pytest.raises(ValueError, match=r"query vector must have shape \(16,\)"):
        store.nearest_pages(np.zeros(3))


def test_search_cache_refresh(tmp_path):
    url = str(tmp_path / "s.zarr")
    _planted_store(url)
    store = PageSearch.open(url)
    assert store.strip_matrix()[0].shape[0] == 9
    es.write_comic(url, "new", panel_embeddings=np.zeros((1, 2, 16), np.float32),
                   strip_embeddings=np.ones((1, 16), np.float32), panel_mask=np.ones((1, 2), bool),
                   page_ids=["n"], model_name="m", model_version="1", mlflow_run_id=None,
                   stage3_content_hash="h")
    assert store.strip_matrix()[0].shape[0] == 9  # search sees a snapshot ...
    store.refresh()
    assert store.strip_matrix()[0].shape[0] == 10  # ... until refreshed




def test_results_carry_original_names_and_a_name_finds_its_comic(tmp_path):
    from comic_pipeline.comic_names import comic_key

    url = str(tmp_path / "s.zarr")
    names = ["Amazing Spider-Man (1963) #001", "Tintin - L'Île noire"]
    strips = np.eye(2, 8, dtype=np.float32)
    for index, name in enumerate(names):
        es.write_comic(url, comic_key(name), name=name, panel_embeddings=np.zeros((1, 2, 8), np.float32),
                       strip_embeddings=strips[index:index + 1] + 0.1, panel_mask=np.ones((1, 2), bool),
                       page_ids=[f"{name}/1.jpg"], model_name="m", model_version="1",
                       mlflow_run_id=None, stage3_content_hash="h")
    search = PageSearch.open(url)
    result = search.nearest_pages(("Tintin - L'Île noire", 0), k=1)
    assert result["comic_name"].tolist() == ["Amazing Spider-Man (1963) #001"]
    assert result["comic_id"].tolist() == [comic_key(names[0])]
    assert result["page_id"].tolist() == ["Amazing Spider-Man (1963) #001/1.jpg"]
