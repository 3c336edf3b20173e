import gc
import json
import uuid
import weakref

import numpy as np
import pytest

from comic_pipeline import embedding_pipeline as ep
from comic_pipeline import embedding_store as es
from comic_pipeline import store
from comic_pipeline_tests.embedding_fakes import D_IN, P, comic_inputs, fake_encode, features_of


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ctx.zarr")
    return f"memory://ctx-{uuid.uuid4().hex}.zarr"


def test_streaming_across_comic_boundaries_equals_one_comic_at_a_time(store_url, tmp_path):
    sizes = {"c0": 5, "c1": 2, "c2": 1, "c3": 7, "c4": 3}
    batch_sizes, batch_comics = [], []

    def recording_encode(batch):
        batch_sizes.append(batch.n_pages)
        batch_comics.append(set(batch.comic_ids.tolist()))
        return fake_encode(batch)

    callbacks = []
    written = ep.embed_and_write(
        store_url, comic_inputs(sizes), recording_encode, batch_pages=4, model_name="seq",
        model_version="7", mlflow_run_id="r", on_comic_written=lambda *args: callbacks.append(args),
    )
    assert batch_sizes == [4, 4, 4, 4, 2]  # 18 pages in full batches of 4
    assert any(len(comics) > 1 for comics in batch_comics)  # batches span comic boundaries
    assert [w.comic_id for w in written] == list(sizes)
    assert [(c[0], c[1]) for c in callbacks] == list(sizes.items())
    assert all(w.seconds >= 0 and w.url.endswith(f"/comics/{w.comic_id}") for w in written)

    reference_url = str(tmp_path / "reference.zarr")
    for comic in comic_inputs(sizes):
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
    ep.embed_and_write(
        str(tmp_path / "s.zarr"), comic_inputs(sizes, loads), fake_encode, batch_pages=2,
        model_name="m", model_version="1", mlflow_run_id=None, background_write=False, prefetch=False,
        on_comic_written=lambda comic_id, *_: loaded_when_written.__setitem__(comic_id, len(loads)),
    )
    # batches of 2 over 3-page comics: [c0 c0] [c0 c1] [c1 c1] [c2 c2] [c2 c3] [c3 c3] ...
    # c0 is written once c1 is loaded, c1 before c2 is loaded, and so on
    assert loaded_when_written == {"c0": 2, "c1": 2, "c2": 4, "c3": 4, "c4": 6, "c5": 6}


@pytest.mark.parametrize("background_write,prefetch", [(True, True), (False, False)])
def test_each_comic_is_yielded_once_committed_and_closing_early_stops_the_reads(tmp_path, background_write,
                                                                               prefetch):
    """iter_embed_and_write hands each comic over as soon as its commit is on the store (what the
    asset records as a materialization right away), long before the last comic is read; closing
    it early keeps what was committed and reads nothing more."""
    url = str(tmp_path / "s.zarr")
    sizes = {f"c{i}": 3 for i in range(12)}
    loads: list[str] = []
    iterator = ep.iter_embed_and_write(url, comic_inputs(sizes, loads), fake_encode, batch_pages=2,
                                       model_name="m", model_version="1", mlflow_run_id=None,
                                       background_write=background_write, prefetch=prefetch,
                                       readers=2, writers=1)
    first = next(iterator)
    assert first.comic_id == "c0" and es.ContextualizedStore.open(url).comic_ids()[:1] == ["c0"]
    assert len(loads) <= 4  # c0, c1 and at most the two comics the readers load ahead
    second = next(iterator)
    iterator.close()
    loaded = len(loads)
    assert second.comic_id == "c1" and loaded < len(sizes)
    assert list(ep.iter_embed_and_write(url, [], fake_encode, batch_pages=2, model_name="m",
                                        model_version="1", mlflow_run_id=None)) == []
    assert len(loads) == loaded  # nothing was read after closing
    committed = es.ContextualizedStore.open(url).comic_ids()
    assert committed[:2] == ["c0", "c1"] and set(committed) <= set(sizes)
    for comic_id in committed:  # whatever was committed before closing is whole
        assert es.ContextualizedStore.open(url).read(comic_id).panel_embeddings.shape == (3, P, 5)


@pytest.mark.parametrize("background_write", [True, False])
def test_an_encoder_that_dies_midway_still_hands_over_every_comic_it_committed(tmp_path, background_write):
    url = str(tmp_path / "s.zarr")
    sizes = {f"c{i}": 2 for i in range(8)}
    batches = []

    def dying_encode(batch):
        batches.append(batch.n_pages)
        if len(batches) == 4:
            raise RuntimeError("the device fell off the bus")
        return fake_encode(batch)

    handed_over = []
    with pytest.raises(RuntimeError, match="fell off the bus"):
        for comic in ep.iter_embed_and_write(url, comic_inputs(sizes), dying_encode, batch_pages=2,
                                             model_name="m", model_version="1", mlflow_run_id=None,
                                             background_write=background_write, writers=4):
            handed_over.append(comic.comic_id)
    # one comic per batch: c0..c2 were encoded and committed before the fourth batch died, and
    # all three are handed over (those still in flight when it died, after the error)
    assert handed_over == ["c0", "c1", "c2"]
    assert es.ContextualizedStore.open(url).comic_ids() == ["c0", "c1", "c2"]


@pytest.mark.parametrize("background_write,prefetch", [(True, True), (False, False), (True, False)])
def test_streaming_memory_does_not_grow_with_comics(tmp_path, background_write, prefetch):
    """When a comic is loaded, at most one earlier comic's arrays are still alive (plus the
    comics the reader pool loads ahead), however many comics went through."""
    alive_at_load = []
    probes: list[weakref.ref] = []
    inputs = comic_inputs({f"c{i}": 5 for i in range(8)})
    for comic in inputs:
        def load(inner=comic.load):
            gc.collect()
            alive_at_load.append(sum(probe() is not None for probe in probes))
            features = inner()
            probes.append(weakref.ref(features.fused))  # batch pieces are views of this array
            return features
        comic.load = load
    written = ep.embed_and_write(str(tmp_path / "s.zarr"), inputs, fake_encode, batch_pages=3,
                                 model_name="m", model_version="1", mlflow_run_id=None,
                                 background_write=background_write, prefetch=prefetch, readers=2)
    assert [w.comic_id for w in written] == [f"c{i}" for i in range(8)]
    assert max(alive_at_load) <= (3 if prefetch else 1)  # + up to `readers` loading ahead
    assert len(alive_at_load) == 8


def test_streaming_reports_bad_comics_and_bad_encoders(tmp_path):
    url = str(tmp_path / "s.zarr")
    comics = comic_inputs({"a": 2})
    comics[0].page_ids = ["x", "y"]
    with pytest.raises(ValueError, match="comic 'a': load\\(\\) gave pages in a different order"):
        ep.embed_and_write(url, comics, fake_encode, batch_pages=4, model_name="m", model_version="1",
                           mlflow_run_id=None)
    with pytest.raises(ValueError, match="listed twice"):
        ep.embed_and_write(url, comic_inputs({"a": 2}) * 2, fake_encode, batch_pages=4, model_name="m",
                           model_version="1", mlflow_run_id=None)
    with pytest.raises(ValueError, match="encode returned panels"):
        ep.embed_and_write(url, comic_inputs({"a": 2}), lambda b: (np.zeros((1, P, 3)), np.zeros((1, 3))),
                           batch_pages=4, model_name="m", model_version="1", mlflow_run_id=None)
    failing_url = str(tmp_path / "failing.zarr")
    with pytest.raises(TypeError):  # a failed background write surfaces in the caller
        ep.embed_and_write(failing_url, comic_inputs({"a": 2, "b": 3}), fake_encode, batch_pages=2,
                           model_name="m", model_version="1", mlflow_run_id=None,
                           extra_attrs={"unserializable": object()})
    assert es.ContextualizedStore.open(failing_url).comic_ids() == []
    def failing_load():
        raise OSError("stage 3 read failed")

    broken = comic_inputs({"ok": 2, "broken": 2})
    broken[1].load = failing_load
    broken_url = str(tmp_path / "broken.zarr")
    with pytest.raises(OSError, match="stage 3 read failed"):  # a prefetched load's error surfaces
        ep.embed_and_write(broken_url, broken, fake_encode, batch_pages=2, model_name="m",
                           model_version="1", mlflow_run_id=None)
    assert es.ContextualizedStore.open(broken_url).comic_ids() == ["ok"]
    with pytest.raises(ValueError, match="batch_pages"):
        ep.embed_and_write(url, [], fake_encode, batch_pages=0, model_name="m", model_version="1",
                           mlflow_run_id=None)




@pytest.mark.parametrize("prefetch", [True, False])
def test_with_on_comic_failed_a_bad_comic_is_left_out_and_the_others_written(tmp_path, prefetch):
    def failing_load():
        raise OSError("stage 3 read failed")

    comics = comic_inputs({"a": 2, "broken": 3, "c": 4, "d": 1})
    comics[1].load = failing_load
    comics[3].page_ids = ["wrong"]  # its load() gives other page ids than listed
    failed = []
    url = str(tmp_path / f"out-{prefetch}.zarr")
    written = ep.embed_and_write(url, comics, fake_encode, batch_pages=3, model_name="m", model_version="1",
                                 mlflow_run_id=None, prefetch=prefetch,
                                 on_comic_failed=lambda comic, error: failed.append((comic.comic_id, str(error))))
    assert [w.comic_id for w in written] == ["a", "c"]
    assert [f[0] for f in failed] == ["broken", "d"]
    assert "stage 3 read failed" in failed[0][1] and "different order or with other ids" in failed[1][1]
    assert es.ContextualizedStore.open(url).comic_ids() == ["a", "c"]


# --- Stage 3 input ----------------------------------------------------------------------------
def native_stage3(tmp_path, sizes: dict[str, int]) -> store.Stage3Store:
    """A native Stage 3 store at tmp_path/stage3.zarr holding fused features_of(comic, pages, i)
    of the i-th comic of `sizes` ({comic: pages})."""
    stage3_url = str(tmp_path / "stage3.zarr")
    store.create_native_store(stage3_url, dim=D_IN, max_panels=P)
    for seed, (comic_id, n_pages) in enumerate(sizes.items()):
        features = features_of(comic_id, n_pages, seed)
        store.write_native_comic(stage3_url, comic_id, page_ids=list(features.page_ids), title=comic_id,
                                 arrays={"panel_embeddings": features.fused, "panel_mask": features.panel_mask})
    return store.Stage3Store.open(stage3_url)


def test_comic_input_from_stage3_reader(tmp_path):
    stage3 = native_stage3(tmp_path, {"k1": 3, "k2": 4})
    inputs = [ep.ComicInput.from_reader(stage3.comic(comic_id)) for comic_id in stage3.comic_ids()]
    assert [c.content_hash for c in inputs] == [None, None]  # nothing read yet
    out_url = str(tmp_path / "ctx.zarr")
    ep.embed_and_write(out_url, inputs, fake_encode, batch_pages=5, model_name="m", model_version="1",
                       mlflow_run_id=None)
    ctx = es.ContextualizedStore.open(out_url)
    for seed, comic_id in enumerate(["k1", "k2"]):
        assert ctx.attrs(comic_id)["stage3_content_hash"] == stage3.comic(comic_id).validate().content_hash
        expected_panels, _ = fake_encode(features_of(comic_id, 3 + seed, seed))
        np.testing.assert_allclose(ctx.read(comic_id).panel_embeddings, expected_panels, rtol=1e-6)
    # a hash known upstream is stamped as given, without validating the comic again
    known = ep.ComicInput.from_reader(stage3.comic("k1"), content_hash="from-upstream")
    ep.embed_and_write(out_url, [known], fake_encode, batch_pages=5, model_name="m", model_version="2",
                       mlflow_run_id=None)
    assert ctx.attrs("k1")["stage3_content_hash"] == "from-upstream"




def test_inputs_from_a_store_open_their_comics_in_the_reader_threads(tmp_path, monkeypatch):
    """A run of many comics does not open them one by one before the first is read: each is
    opened by its load(), in a reader thread; one whose group broke after the listing fails
    alone."""
    import threading

    sizes = {"k1": 3, "k2": 4, "k3": 2, "k4": 5}
    stage3 = native_stage3(tmp_path, sizes)
    opened_by: dict[str, str] = {}
    real_comic = store.Stage3Store.comic

    def recording_comic(self, comic_id):
        opened_by[comic_id] = threading.current_thread().name
        return real_comic(self, comic_id)

    monkeypatch.setattr(store.Stage3Store, "comic", recording_comic)
    inputs = [ep.ComicInput.from_store(stage3, key) for key in stage3.comic_ids()]
    assert opened_by == {} and [c.page_ids for c in inputs] == [None] * 4  # nothing opened yet
    assert [c.name for c in inputs] == list(sizes)
    # k3's group loses its page ids after the listing (Stage 3 broke it mid-run)
    document_path = tmp_path / "stage3.zarr" / "comics" / "k3" / "zarr.json"
    document = json.loads(document_path.read_text())
    del document["attributes"]["page_ids"]
    document_path.write_text(json.dumps(document))
    failed = []
    out_url = str(tmp_path / "ctx.zarr")
    written = ep.embed_and_write(out_url, inputs, fake_encode, batch_pages=5, model_name="m",
                                 model_version="1", mlflow_run_id=None,
                                 on_comic_failed=lambda comic, error: failed.append((comic.comic_id, str(error))))
    assert [w.comic_id for w in written] == ["k1", "k2", "k4"]
    assert [key for key, _ in failed] == ["k3"] and "page_ids" in failed[0][1]
    assert set(opened_by) == set(sizes) and all(name.startswith("comic-reader") for name in opened_by.values())
    ctx = es.ContextualizedStore.open(out_url)
    for seed, comic_id in ((0, "k1"), (1, "k2"), (3, "k4")):
        reader = real_comic(store.Stage3Store.open(stage3.url), comic_id)
        assert ctx.attrs(comic_id)["page_ids"] == reader.page_ids  # set by load()
        assert ctx.attrs(comic_id)["stage3_content_hash"] == reader.validate().content_hash
        expected_panels, _ = fake_encode(features_of(comic_id, sizes[comic_id], seed))
        np.testing.assert_allclose(ctx.read(comic_id).panel_embeddings, expected_panels, rtol=1e-6)



def test_reader_processes_read_check_and_hash_as_the_threads_do(tmp_path):
    """The same run with a reader process writes the same comics, stamps the same content hashes
    and page ids, and a comic that fails there (changed since its pin, broken group) fails alone
    with its own error."""
    sizes = {"k1": 3, "k2": 4, "k3": 2, "k4": 5}
    stage3 = native_stage3(tmp_path, sizes)
    pins = {key: stage3.comic(key).validate().content_hash for key in sizes}
    pins["k2"] = "0" * 64  # as if Stage 3 rewrote k2 after its validation
    document_path = tmp_path / "stage3.zarr" / "comics" / "k3" / "zarr.json"
    document = json.loads(document_path.read_text())
    document["attributes"]["page_ids"] = ["same", "same"]
    document_path.write_text(json.dumps(document))

    def run(processes) -> tuple[list, list, es.ContextualizedStore]:
        out_url = str(tmp_path / f"ctx-{'processes' if processes else 'threads'}.zarr")
        inputs = [ep.ComicInput.from_store(stage3, key, pinned_hash=pins[key], processes=processes)
                  for key in sizes]
        failed = []
        written = ep.embed_and_write(out_url, inputs, fake_encode, batch_pages=5, model_name="m",
                                     model_version="1", mlflow_run_id=None,
                                     on_comic_failed=lambda comic, error: failed.append((comic.comic_id, error)))
        return [w.comic_id for w in written], failed, es.ContextualizedStore.open(out_url)

    with ep.reader_processes(1) as processes:
        written, failed, by_processes = run(processes)
    assert written == ["k1", "k4"]
    assert [key for key, _ in failed] == ["k2", "k3"]
    assert isinstance(failed[0][1], store.Stage3Changed) and "(key 'k2'): pinned 000000000000" in str(failed[0][1])
    assert isinstance(failed[1][1], store.Stage3StoreError) and "duplicate page ids ['same']" in str(failed[1][1])
    threads_written, threads_failed, by_threads = run(None)
    assert threads_written == written and [str(e) for _, e in threads_failed] == [str(e) for _, e in failed]
    for key in written:
        ours, theirs = by_processes.read(key), by_threads.read(key)
        np.testing.assert_array_equal(ours.panel_embeddings, theirs.panel_embeddings)
        for attr in ("page_ids", "stage3_content_hash", "comic_name", "n_pages"):
            assert ours.attrs[attr] == theirs.attrs[attr]
        assert ours.attrs["stage3_content_hash"] == pins[key]


def test_reader_processes_must_be_at_least_one():
    with pytest.raises(ValueError, match="reader processes must be at least 1, got 0"):
        ep.reader_processes(0)


def test_a_comic_changed_since_its_pinned_hash_is_not_embedded(tmp_path):
    stage3_url = str(tmp_path / "stage3.zarr")
    store.create_native_store(stage3_url, dim=D_IN, max_panels=P)
    features = features_of("k1", 3, 0)
    arrays = {"panel_embeddings": features.fused, "panel_mask": features.panel_mask}
    store.write_native_comic(stage3_url, "k1", page_ids=list(features.page_ids), title="Tintin", arrays=arrays)
    stage3 = store.Stage3Store.open(stage3_url)
    pinned = stage3.comic("k1").validate().content_hash
    out_url = str(tmp_path / "ctx.zarr")
    same = ep.ComicInput.from_reader(stage3.comic("k1"), pinned_hash=pinned)
    assert [w.comic_id for w in ep.embed_and_write(out_url, [same], fake_encode, batch_pages=4, model_name="m",
                                                    model_version="1", mlflow_run_id=None)] == ["k1"]
    arrays["panel_embeddings"] = arrays["panel_embeddings"] + 1.0  # Stage 3 rewrote the comic
    store.write_native_comic(stage3_url, "k1", page_ids=list(features.page_ids), title="Tintin", arrays=arrays)
    changed = ep.ComicInput.from_reader(store.Stage3Store.open(stage3_url).comic("k1"), pinned_hash=pinned)
    with pytest.raises(store.Stage3Changed, match=rf"comic 'k1' \(key 'k1'\): pinned {pinned[:12]}, now "):
        ep.embed_and_write(out_url, [changed], fake_encode, batch_pages=4, model_name="m", model_version="2",
                           mlflow_run_id=None)
    assert es.ContextualizedStore.open(out_url).attrs("k1")["model_version"] == "1"  # the old one stays
