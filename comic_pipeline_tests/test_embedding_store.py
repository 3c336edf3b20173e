import gc
import importlib.util
import json
import multiprocessing
import os
import uuid
import weakref
from datetime import datetime

import numpy as np
import pytest

from comic_pipeline import embedding_store as es
from comic_pipeline.schema import PageFeatures

P, D_IN, D_OUT = 4, 6, 5


# --- helpers ----------------------------------------------------------------------------------
def _features(comic_id: str, n_pages: int, seed: int) -> PageFeatures:
    rng = np.random.default_rng(seed)
    n_panels = rng.integers(1, P + 1, size=n_pages)
    mask = np.arange(P)[None, :] < n_panels[:, None]  # (pages, P) prefix
    fused = rng.normal(size=(n_pages, P, D_IN)).astype(np.float32) * mask[:, :, None]
    return PageFeatures(
        comic_ids=np.full(n_pages, comic_id),
        page_numbers=np.arange(n_pages, dtype=np.int32),
        page_ids=np.array([f"{comic_id}-p{i:03d}" for i in range(n_pages)]),
        panel_mask=mask,
        fused=fused,
    )


PROJECTION = np.random.default_rng(123).normal(size=(D_IN, D_OUT)).astype(np.float32)


def fake_encode(batch: PageFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, per-page: panels = tanh(fused @ W), strip = masked mean of panels."""
    panels = np.tanh(batch.fused @ PROJECTION)  # (n, P, D_OUT)
    mask = batch.panel_mask[:, :, None]
    strips = (panels * mask).sum(1) / np.maximum(mask.sum(1), 1)  # (n, D_OUT)
    return panels, strips.astype(np.float32)


def _comic_inputs(sizes: dict[str, int], load_log: list | None = None) -> list[es.ComicInput]:
    inputs = []
    for seed, (comic_id, n_pages) in enumerate(sizes.items()):
        def load(comic_id=comic_id, n_pages=n_pages, seed=seed):
            if load_log is not None:
                load_log.append(comic_id)
            return _features(comic_id, n_pages, seed)
        inputs.append(es.ComicInput(comic_id, [f"{comic_id}-p{i:03d}" for i in range(n_pages)],
                                    f"hash-{comic_id}", load))
    return inputs


def _write(url, comic_id, n_pages=3, seed=0, version="1", **extra):
    features = _features(comic_id, n_pages, seed)
    panels, strips = fake_encode(features)
    return es.write_comic(
        url, comic_id, panel_embeddings=panels, strip_embeddings=strips, panel_mask=features.panel_mask,
        page_ids=list(features.page_ids), model_name="seq", model_version=version, mlflow_run_id="run1",
        stage3_content_hash=f"hash-{comic_id}", **extra,
    )


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ctx.zarr")
    return f"memory://ctx-{uuid.uuid4().hex}.zarr"


# --- round trip -------------------------------------------------------------------------------
def test_write_read_round_trip_with_attrs(store_url):
    features = _features("alpha", 5, seed=1)
    panels, strips = fake_encode(features)
    panels_with_junk = panels + 7.0  # padded slots must be stored as zeros
    group_url = es.write_comic(
        store_url, "alpha", panel_embeddings=panels_with_junk, strip_embeddings=strips,
        panel_mask=features.panel_mask, page_ids=list(features.page_ids), model_name="seq",
        model_version="3", mlflow_run_id="abc", stage3_content_hash="h1", extra_attrs={"note": "x"},
    )
    assert group_url.endswith("/comics/alpha")
    store = es.ContextualizedStore.open(store_url)
    assert store.comic_ids() == ["alpha"]
    comic = store.read("alpha")
    expected = np.where(features.panel_mask[:, :, None], panels_with_junk, 0)
    np.testing.assert_array_equal(comic.panel_embeddings, expected)
    np.testing.assert_array_equal(comic.strip_embeddings, strips)
    np.testing.assert_array_equal(comic.panel_mask, features.panel_mask)
    assert comic.panel_embeddings.dtype == np.float32
    assert comic.page_ids == list(features.page_ids)
    attrs = store.attrs("alpha")
    assert attrs["model_name"] == "seq" and attrs["model_version"] == "3"
    assert attrs["mlflow_run_id"] == "abc" and attrs["stage3_content_hash"] == "h1"
    assert attrs["note"] == "x" and attrs["dtype"] == "float32" and attrs["n_pages"] == 5
    assert attrs["n_panels"] == int(features.panel_mask.sum())
    assert datetime.fromisoformat(attrs["created_at"]).utcoffset().total_seconds() == 0


def test_float16_storage_reads_back_as_float32(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write(url, "c", dtype="float16")
    comic = es.ContextualizedStore.open(url).read("c")
    assert comic.attrs["dtype"] == "float16" and comic.strip_embeddings.dtype == np.float32


def test_root_format_and_open_errors(tmp_path):
    url = str(tmp_path / "s.zarr")
    with pytest.raises(FileNotFoundError, match="no contextualized-embedding store"):
        es.ContextualizedStore.open(url)
    _write(url, "c")
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert root["attributes"] == {"format": "comic-stage4-contextualized", "version": 1}
    wrong = tmp_path / "wrong.zarr"
    wrong.mkdir()
    (wrong / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"format": "comic-stage3", "version": 1}}))
    with pytest.raises(ValueError, match="not a contextualized-embedding store.*comic-stage3"):
        es.ContextualizedStore.open(str(wrong))
    with pytest.raises(ValueError, match="not a contextualized-embedding store"):
        _write(str(wrong), "c")


def test_write_rejects_bad_input(tmp_path):
    url = str(tmp_path / "s.zarr")
    features = _features("c", 3, 0)
    panels, strips = fake_encode(features)
    good = dict(panel_embeddings=panels, strip_embeddings=strips, panel_mask=features.panel_mask,
                page_ids=list(features.page_ids), model_name="m", model_version="1", mlflow_run_id=None,
                stage3_content_hash="h")
    cases = [
        (dict(strip_embeddings=strips[:2]), r"comic 'c': strip_embeddings must be \(pages, D\)"),
        (dict(panel_mask=features.panel_mask[:, :2]), "panel_mask must be"),
        (dict(page_ids=["a", "b"]), "2 page_ids for 3 pages"),
        (dict(page_ids=["a", "a", "b"]), "duplicate page_ids"),
        (dict(panel_embeddings=np.where(True, np.nan, panels)), "panel_embeddings holds NaN"),
        (dict(panel_mask=np.array([[False, True, True, True]] * 3)), "not a prefix"),
        (dict(panel_embeddings=panels[:0], strip_embeddings=strips[:0], panel_mask=features.panel_mask[:0],
              page_ids=[]), "no pages"),
        (dict(extra_attrs={"model_version": "9"}), "may not set"),
        (dict(dtype="int8"), "storage dtype"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            es.write_comic(url, "c", **{**good, **change})
    with pytest.raises(ValueError, match="not usable as a group name"):
        es.write_comic(url, ".hidden", **good)
    assert not os.path.exists(os.path.join(url, "comics", "c"))


# --- atomicity --------------------------------------------------------------------------------
def test_failed_write_leaves_nothing_and_rewrite_replaces_cleanly(store_url, monkeypatch):
    from fsspec.core import url_to_fs

    fs, comics_path = url_to_fs(store_url + "/comics")
    real_write_group = es._write_group

    async def write_then_crash(location, arrays, attrs):
        await real_write_group(location, arrays, attrs)  # every array and `complete` written ...
        raise RuntimeError("disk full")  # ... but the group was never moved into place

    monkeypatch.setattr(es, "_write_group", write_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(store_url, "beta")
    monkeypatch.undo()
    with pytest.raises(TypeError, match="not JSON serializable"):
        _write(store_url, "beta", extra_attrs={"unserializable": object()})
    store = es.ContextualizedStore.open(store_url)
    assert store.comic_ids() == []
    assert [p for p in fs.ls(comics_path, detail=False) if not p.endswith("zarr.json")] == []

    _write(store_url, "beta", n_pages=6, seed=1, version="1")
    _write(store_url, "beta", n_pages=2, seed=2, version="2")
    assert store.comic_ids() == ["beta"]
    comic = store.read("beta")
    assert comic.strip_embeddings.shape == (2, D_OUT) and comic.attrs["model_version"] == "2"
    expected_panels, _ = fake_encode(_features("beta", 2, 2))
    np.testing.assert_allclose(comic.panel_embeddings, expected_panels, rtol=1e-6)
    leftovers = [p for p in fs.ls(comics_path, detail=False) if p.rstrip("/").rpartition("/")[2].startswith(".")]
    assert leftovers == []
    # the rewritten group holds only its own chunks (no chunk of the 6-page version survives)
    panel_chunks = fs.find(url_to_fs(store._group_url("beta"))[1] + "/panel_embeddings")  # committed version
    assert len([c for c in panel_chunks if not c.endswith("zarr.json")]) == 1


def test_readers_skip_temporary_and_unfinished_groups(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write(url, "done")
    comics = tmp_path / "s.zarr" / "comics"
    # a crash mid-write: a temporary sibling with some arrays, and a group without `complete`
    (comics / ".tmp-crashed-0123").mkdir()
    (comics / ".tmp-crashed-0123" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"complete": True}}))
    (comics / "unfinished").mkdir()
    (comics / "unfinished" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"model_version": "1"}}))
    (comics / "empty_dir").mkdir()
    store = es.ContextualizedStore.open(url)
    assert store.comic_ids() == ["done"]
    assert store.model_versions() == {"done": "1"}
    with pytest.raises(KeyError, match="unfinished"):
        store.read("unfinished")


def _concurrent_writer(url, comic_id, barrier):
    barrier.wait()  # both processes create the new store at the same moment
    for seed in range(3):
        _write(url, f"{comic_id}{seed}", n_pages=4, seed=seed)


def test_two_processes_write_into_the_same_new_store(tmp_path):
    url = str(tmp_path / "shared.zarr")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_concurrent_writer, args=(url, name, barrier)) for name in ("x", "y")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    store = es.ContextualizedStore.open(url)
    assert store.comic_ids() == ["x0", "x1", "x2", "y0", "y1", "y2"]
    for comic_id in store.comic_ids():
        assert store.read(comic_id).strip_embeddings.shape == (4, D_OUT)


# --- listing and staleness --------------------------------------------------------------------
def test_model_versions_and_stale_comics(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write(url, "a", version="1")
    _write(url, "b", version="2")
    _write(url, "c", version="2")
    store = es.ContextualizedStore.open(url)
    assert store.model_versions() == {"a": "1", "b": "2", "c": "2"}
    assert store.stale_comics("2") == ["a"]
    assert store.stale_comics("3") == ["a", "b", "c"]
    _write(url, "a", version="2")
    assert store.stale_comics("2") == []


# --- streaming embedder -----------------------------------------------------------------------
def test_streaming_across_comic_boundaries_equals_one_comic_at_a_time(store_url, tmp_path):
    sizes = {"c0": 5, "c1": 2, "c2": 1, "c3": 7, "c4": 3}
    batch_sizes, batch_comics = [], []

    def recording_encode(batch):
        batch_sizes.append(batch.n_pages)
        batch_comics.append(set(batch.comic_ids.tolist()))
        return fake_encode(batch)

    callbacks = []
    written = es.embed_and_write(
        store_url, _comic_inputs(sizes), recording_encode, batch_pages=4, model_name="seq",
        model_version="7", mlflow_run_id="r", on_comic_written=lambda *args: callbacks.append(args),
    )
    assert batch_sizes == [4, 4, 4, 4, 2]  # 18 pages in full batches of 4
    assert any(len(comics) > 1 for comics in batch_comics)  # batches span comic boundaries
    assert [w.comic_id for w in written] == list(sizes)
    assert [(c[0], c[1]) for c in callbacks] == list(sizes.items())
    assert all(w.seconds >= 0 and w.url.endswith(f"/comics/{w.comic_id}") for w in written)

    reference_url = str(tmp_path / "reference.zarr")
    for comic in _comic_inputs(sizes):
        features = comic.load()
        panels, strips = fake_encode(features)
        es.write_comic(reference_url, comic.comic_id, panel_embeddings=panels, strip_embeddings=strips,
                       panel_mask=features.panel_mask, page_ids=comic.page_ids, model_name="seq",
                       model_version="7", mlflow_run_id="r", stage3_content_hash=comic.content_hash)
    streamed, reference = es.ContextualizedStore.open(store_url), es.ContextualizedStore.open(reference_url)
    assert streamed.comic_ids() == reference.comic_ids() == sorted(sizes)
    for comic_id in sizes:
        a, b = streamed.read(comic_id), reference.read(comic_id)
        np.testing.assert_array_equal(a.panel_embeddings, b.panel_embeddings)
        np.testing.assert_array_equal(a.strip_embeddings, b.strip_embeddings)
        np.testing.assert_array_equal(a.panel_mask, b.panel_mask)
        assert a.attrs["stage3_content_hash"] == f"hash-{comic_id}"
        assert written[list(sizes).index(comic_id)].n_panels == int(b.panel_mask.sum())


def test_streaming_loads_lazily_and_writes_early(tmp_path):
    """Each comic is written before comics beyond the next batch are loaded (flat memory)."""
    sizes = {f"c{i}": 3 for i in range(6)}
    loads: list[str] = []
    loaded_when_written = {}
    es.embed_and_write(
        str(tmp_path / "s.zarr"), _comic_inputs(sizes, loads), fake_encode, batch_pages=2,
        model_name="m", model_version="1", mlflow_run_id=None, background_write=False, prefetch=False,
        on_comic_written=lambda comic_id, *_: loaded_when_written.__setitem__(comic_id, len(loads)),
    )
    # batches of 2 over 3-page comics: [c0 c0] [c0 c1] [c1 c1] [c2 c2] [c2 c3] [c3 c3] ...
    # c0 is written once c1 is loaded, c1 before c2 is loaded, and so on
    assert loaded_when_written == {"c0": 2, "c1": 2, "c2": 4, "c3": 4, "c4": 6, "c5": 6}


@pytest.mark.parametrize("background_write,prefetch", [(True, True), (False, False), (True, False)])
def test_streaming_memory_does_not_grow_with_comics(tmp_path, background_write, prefetch):
    """When a comic is loaded, at most one earlier comic's arrays are still alive (two while
    the next comic is prefetched), however many comics went through."""
    alive_at_load = []
    probes: list[weakref.ref] = []
    inputs = _comic_inputs({f"c{i}": 5 for i in range(8)})
    for comic in inputs:
        def load(inner=comic.load):
            gc.collect()
            alive_at_load.append(sum(probe() is not None for probe in probes))
            features = inner()
            probes.append(weakref.ref(features.fused))  # batch pieces are views of this array
            return features
        comic.load = load
    written = es.embed_and_write(str(tmp_path / "s.zarr"), inputs, fake_encode, batch_pages=3,
                                 model_name="m", model_version="1", mlflow_run_id=None,
                                 background_write=background_write, prefetch=prefetch)
    assert [w.comic_id for w in written] == [f"c{i}" for i in range(8)]
    assert max(alive_at_load) <= (2 if prefetch else 1)
    assert len(alive_at_load) == 8


def test_streaming_reports_bad_comics_and_bad_encoders(tmp_path):
    url = str(tmp_path / "s.zarr")
    comics = _comic_inputs({"a": 2})
    comics[0].page_ids = ["x", "y"]
    with pytest.raises(ValueError, match="comic 'a': load\\(\\) gave pages in a different order"):
        es.embed_and_write(url, comics, fake_encode, batch_pages=4, model_name="m", model_version="1",
                           mlflow_run_id=None)
    with pytest.raises(ValueError, match="listed twice"):
        es.embed_and_write(url, _comic_inputs({"a": 2}) * 2, fake_encode, batch_pages=4, model_name="m",
                           model_version="1", mlflow_run_id=None)
    with pytest.raises(ValueError, match="encode returned panels"):
        es.embed_and_write(url, _comic_inputs({"a": 2}), lambda b: (np.zeros((1, P, 3)), np.zeros((1, 3))),
                           batch_pages=4, model_name="m", model_version="1", mlflow_run_id=None)
    failing_url = str(tmp_path / "failing.zarr")
    with pytest.raises(TypeError):  # a failed background write surfaces in the caller
        es.embed_and_write(failing_url, _comic_inputs({"a": 2, "b": 3}), fake_encode, batch_pages=2,
                           model_name="m", model_version="1", mlflow_run_id=None,
                           extra_attrs={"unserializable": object()})
    assert es.ContextualizedStore.open(failing_url).comic_ids() == []
    def failing_load():
        raise OSError("stage 3 read failed")

    broken = _comic_inputs({"ok": 2, "broken": 2})
    broken[1].load = failing_load
    broken_url = str(tmp_path / "broken.zarr")
    with pytest.raises(OSError, match="stage 3 read failed"):  # a prefetched load's error surfaces
        es.embed_and_write(broken_url, broken, fake_encode, batch_pages=2, model_name="m",
                           model_version="1", mlflow_run_id=None)
    assert es.ContextualizedStore.open(broken_url).comic_ids() == ["ok"]
    with pytest.raises(ValueError, match="batch_pages"):
        es.embed_and_write(url, [], fake_encode, batch_pages=0, model_name="m", model_version="1",
                           mlflow_run_id=None)


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
    store = es.ContextualizedStore.open(store_url)
    matrix, table = store.strip_matrix()
    assert matrix.shape == (9, 16)
    assert list(table.columns) == ["comic_id", "page_number", "page_id"]
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
    store = es.ContextualizedStore.open(url)
    assert store.strip_matrix()[0].shape[0] == 9
    es.write_comic(url, "new", panel_embeddings=np.zeros((1, 2, 16), np.float32),
                   strip_embeddings=np.ones((1, 16), np.float32), panel_mask=np.ones((1, 2), bool),
                   page_ids=["n"], model_name="m", model_version="1", mlflow_run_id=None,
                   stage3_content_hash="h")
    assert store.strip_matrix()[0].shape[0] == 9  # search sees a snapshot ...
    store.refresh()
    assert store.strip_matrix()[0].shape[0] == 10  # ... until refreshed


# --- xarray -----------------------------------------------------------------------------------
def test_to_xarray(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write(url, "c", n_pages=3)
    store = es.ContextualizedStore.open(url)
    if importlib.util.find_spec("xarray") is None:
        with pytest.raises(ImportError, match="pip install xarray"):
            store.to_xarray("c")
        return
    dataset = store.to_xarray("c")
    assert dataset["panel_embeddings"].dims == ("page", "panel", "dim")
    assert dataset["strip_embeddings"].shape == (3, D_OUT)
    assert list(dataset["page_id"].values) == store.read("c").page_ids
    assert dataset.attrs["model_version"] == "1"


# --- Stage 3 input ----------------------------------------------------------------------------
def test_comic_input_from_stage3_reader(tmp_path):
    from comic_pipeline import store

    stage3_url = str(tmp_path / "stage3.zarr")
    store.create_native_store(stage3_url, dim=D_IN, max_panels=P)
    for seed, (comic_id, n_pages) in enumerate({"k1": 3, "k2": 4}.items()):
        features = _features(comic_id, n_pages, seed)
        store.write_native_comic(stage3_url, comic_id, page_ids=list(features.page_ids), title=comic_id,
                                 arrays={"panel_embeddings": features.fused, "panel_mask": features.panel_mask})
    stage3 = store.Stage3Store.open(stage3_url)
    inputs = [es.ComicInput.from_reader(stage3.comic(comic_id)) for comic_id in stage3.comic_ids()]
    assert [c.content_hash for c in inputs] == [None, None]  # nothing read yet
    out_url = str(tmp_path / "ctx.zarr")
    es.embed_and_write(out_url, inputs, fake_encode, batch_pages=5, model_name="m", model_version="1",
                       mlflow_run_id=None)
    ctx = es.ContextualizedStore.open(out_url)
    for seed, comic_id in enumerate(["k1", "k2"]):
        assert ctx.attrs(comic_id)["stage3_content_hash"] == stage3.comic(comic_id).validate().content_hash
        expected_panels, _ = fake_encode(_features(comic_id, 3 + seed, seed))
        np.testing.assert_allclose(ctx.read(comic_id).panel_embeddings, expected_panels, rtol=1e-6)
    # a hash known upstream is stamped as given, without validating the comic again
    known = es.ComicInput.from_reader(stage3.comic("k1"), content_hash="from-upstream")
    es.embed_and_write(out_url, [known], fake_encode, batch_pages=5, model_name="m", model_version="2",
                       mlflow_run_id=None)
    assert ctx.attrs("k1")["stage3_content_hash"] == "from-upstream"
