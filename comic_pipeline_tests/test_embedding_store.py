import importlib.util
import json
import multiprocessing
import os
import threading
import time
import uuid
from datetime import datetime

import numpy as np
import pytest
import zarr

from comic_pipeline import embedding_store as es
from comic_pipeline.comic_names import comic_key
from comic_pipeline_tests.embedding_fakes import D_OUT, fake_encode, features_of, write


@pytest.fixture(params=["local", "memory"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ctx.zarr")
    return f"memory://ctx-{uuid.uuid4().hex}.zarr"


def _versions(url: str, key: str) -> list[str]:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(f"{url}/comics/{key}")
    return sorted(p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False)
                  if p.rstrip("/").rpartition("/")[2].startswith("v"))


# --- round trip -------------------------------------------------------------------------------
def test_write_read_round_trip_with_attrs(store_url):
    features = features_of("alpha", 5, seed=1)
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
    assert attrs["n_panels"] == int(features.panel_mask.sum()) and attrs["comic_name"] == "alpha"
    assert datetime.fromisoformat(attrs["created_at"]).utcoffset().total_seconds() == 0


def test_any_comic_name_is_stored_under_its_key_with_the_name_kept(store_url):
    names = ["Amazing Spider-Man (1963) #001", "Tintin - L'Île noire", "series/Book 000 - Issue #1",
             "amazing spider-man (1963) #001", "x" * 230]
    for seed, name in enumerate(names):
        features = features_of(comic_key(name), 2, seed)
        panels, strips = fake_encode(features)
        url = es.write_comic(store_url, comic_key(name), name=name, panel_embeddings=panels,
                             strip_embeddings=strips, panel_mask=features.panel_mask,
                             page_ids=list(features.page_ids), model_name="m", model_version="1",
                             mlflow_run_id=None, stage3_content_hash="h")
        assert url.endswith("/comics/" + comic_key(name))
    store = es.ContextualizedStore.open(store_url)
    assert store.comic_names() == {comic_key(name): name for name in names}
    assert store.read(comic_key(names[1])).comic_name == "Tintin - L'Île noire"
    with pytest.raises(ValueError, match="its key is"):
        es.write_comic(store_url, "wrong-key", name=names[0], panel_embeddings=panels,
                       strip_embeddings=strips, panel_mask=features.panel_mask,
                       page_ids=list(features.page_ids), model_name="m", model_version="1",
                       mlflow_run_id=None, stage3_content_hash="h")


def test_plain_zarr_reader_follows_the_pointer(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "c", n_pages=3, version="1")
    root = zarr.open_group(url, mode="r")
    comic = root["comics"]["c"]
    data = comic[comic.attrs["current"]]
    expected, _ = fake_encode(features_of("c", 3, 0))
    np.testing.assert_allclose(data["panel_embeddings"][...], expected, rtol=1e-6)
    assert comic.attrs["comic_name"] == "c" and data.attrs["model_version"] == "1"
    opened = es.ContextualizedStore.open(url).open_group("c")
    assert opened["strip_embeddings"].shape == (3, D_OUT)


def test_float16_storage_reads_back_as_float32(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "c", dtype="float16")
    comic = es.ContextualizedStore.open(url).read("c")
    assert comic.attrs["dtype"] == "float16" and comic.strip_embeddings.dtype == np.float32


def test_root_format_and_open_errors(tmp_path):
    url = str(tmp_path / "s.zarr")
    with pytest.raises(FileNotFoundError, match="no contextualized-embedding store"):
        es.ContextualizedStore.open(url)
    write(url, "c")
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert root["attributes"] == {"format": "comic-stage4-contextualized", "version": 2}
    wrong = tmp_path / "wrong.zarr"
    wrong.mkdir()
    (wrong / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"format": "comic-stage3", "version": 1}}))
    with pytest.raises(ValueError, match="not a contextualized-embedding store.*comic-stage3"):
        es.ContextualizedStore.open(str(wrong))
    with pytest.raises(ValueError, match="not a contextualized-embedding store"):
        write(str(wrong), "c")
    old = tmp_path / "old.zarr"
    old.mkdir()
    (old / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
        "format": "comic-stage4-contextualized", "version": 1}}))
    with pytest.raises(ValueError, match="unsupported version 1.*re-embed"):
        es.ContextualizedStore.open(str(old))


def test_write_rejects_bad_input(tmp_path):
    url = str(tmp_path / "s.zarr")
    features = features_of("c", 3, 0)
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
        (dict(panel_mask=np.array([[False, True, True, True]] * 3)), "not a prefix on page 'c-p000'"),
        (dict(panel_embeddings=panels[:0], strip_embeddings=strips[:0], panel_mask=features.panel_mask[:0],
              page_ids=[]), "no pages"),
        (dict(extra_attrs={"model_version": "9"}), "may not set"),
        (dict(extra_attrs={"comic_name": "9"}), "may not set"),
        (dict(dtype="int8"), "storage dtype"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            es.write_comic(url, "c", **{**good, **change})
    with pytest.raises(ValueError, match="must not be empty or blank"):
        es.write_comic(url, " ", **good)
    assert not os.path.exists(os.path.join(url, "comics", "c"))


# --- commits ----------------------------------------------------------------------------------
def test_crash_before_commit_leaves_the_old_comic_and_nothing_visible(store_url, monkeypatch):
    def crash(url, data, **options):
        raise RuntimeError("disk full")

    monkeypatch.setattr(es.fileio, "atomic_write_bytes", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write(store_url, "beta")  # never created: the root's own zarr.json write crashes too
    monkeypatch.undo()
    write(store_url, "beta", n_pages=6, seed=1, version="1")
    real_write = es.fileio.atomic_write_bytes

    def crash_on_pointer(url, data, **options):
        if url.endswith(("/comics/beta/zarr.json", "/comics/gamma/zarr.json")):
            raise RuntimeError("disk full")  # every array of the new version is stored ...
        real_write(url, data, **options)

    monkeypatch.setattr(es.fileio, "atomic_write_bytes", crash_on_pointer)
    with pytest.raises(RuntimeError, match="disk full"):
        write(store_url, "beta", n_pages=2, seed=2, version="2")  # ... but never committed
    with pytest.raises(RuntimeError, match="disk full"):
        write(store_url, "gamma")
    monkeypatch.undo()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write(store_url, "beta", extra_attrs={"unserializable": object()})
    store = es.ContextualizedStore.open(store_url)
    assert store.comic_ids() == ["beta"]  # gamma was never committed
    comic = store.read("beta")
    assert comic.attrs["model_version"] == "1" and comic.strip_embeddings.shape == (6, D_OUT)


def test_a_local_commit_is_on_the_disk_before_the_pointer_names_it(tmp_path, monkeypatch):
    """Power loss: the pointer must never name files or folders the disk has not got. Every file
    and folder of the new version (and the folders that gained it) is fsynced before the pointer
    is replaced, and the pointer's folder after."""
    url = str(tmp_path / "ctx.zarr")
    write(url, "beta")  # the root and the comic exist: this test is about a rewrite
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def recording_replace(source, target):
        replaced.append((target, len(synced)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write(url, "beta", version="2")
    monkeypatch.undo()
    comic_dir = os.path.realpath(os.path.join(url, "comics", "beta"))
    pointer = os.path.join(comic_dir, "zarr.json")
    [(target, synced_before)] = [(t, n) for t, n in replaced if os.path.realpath(t) == pointer]
    version = zarr.open_group(url, mode="r")["comics/beta"].attrs["current"]
    version_dir = os.path.join(comic_dir, version)
    on_disk = {os.path.join(folder, name) for folder, _, names in os.walk(version_dir) for name in names}
    on_disk |= {folder for folder, _, _ in os.walk(version_dir)} | {comic_dir}
    before = set(synced[:synced_before])
    assert on_disk <= before, sorted(on_disk - before)  # all of the version, before the commit
    assert synced[-1] == comic_dir  # then the pointer's new name itself


def test_a_scratch_commit_skips_every_fsync_and_is_still_whole(tmp_path, monkeypatch):
    """durable=False (scratch stores, the benchmark's price of durability): no fsync at all, and
    the comic reads back the same as a durable one."""
    url = str(tmp_path / "ctx.zarr")
    write(url, "beta")  # root and comic exist
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(descriptor) or real_fsync(descriptor))
    write(url, "beta", version="2", durable=False)
    write(url, "gamma", durable=False)
    assert synced == []
    monkeypatch.undo()
    store = es.ContextualizedStore.open(url)
    assert store.comic_ids() == ["beta", "gamma"]
    expected_panels, _ = fake_encode(features_of("beta", 3, 0))
    np.testing.assert_allclose(store.read("beta").panel_embeddings, expected_panels, rtol=1e-6)
    assert store.read("beta").attrs["model_version"] == "2"


def test_rewrite_commits_a_new_version_and_collects_old_ones(store_url):
    write(store_url, "beta", n_pages=6, seed=1, version="1")
    write(store_url, "beta", n_pages=2, seed=2, version="2")
    store = es.ContextualizedStore.open(store_url)
    comic = store.read("beta")
    assert comic.strip_embeddings.shape == (2, D_OUT) and comic.attrs["model_version"] == "2"
    expected_panels, _ = fake_encode(features_of("beta", 2, 2))
    np.testing.assert_allclose(comic.panel_embeddings, expected_panels, rtol=1e-6)
    assert len(_versions(store_url, "beta")) == 2  # the old one is kept for readers a while ...
    write(store_url, "beta", n_pages=3, seed=3, version="3", gc_grace_seconds=0)
    assert _versions(store_url, "beta") == [store.attrs("beta")["current"]]  # ... then collected


def test_a_superseded_version_is_kept_until_its_successor_has_been_current_a_while(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "c", version="1")
    time.sleep(0.6)  # version 1 is now older than the grace period ...
    write(url, "c", version="2", gc_grace_seconds=0.5)
    assert len(_versions(url, "c")) == 2  # ... but was current a moment ago: a reader may hold it
    time.sleep(0.6)
    assert len(es.collect_garbage(f"{url}/comics/c", grace_seconds=0.5)) == 1
    assert _versions(url, "c") == [es.ContextualizedStore.open(url).attrs("c")["current"]]


def test_readers_skip_uncommitted_groups(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "done")
    comics = tmp_path / "s.zarr" / "comics"
    (comics / ".tmp-crashed-0123").mkdir()
    (comics / "never-committed" / "v0000000000001-abc").mkdir(parents=True)
    (comics / "unfinished").mkdir()
    (comics / "unfinished" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"model_version": "1"}}))
    store = es.ContextualizedStore.open(url)
    assert store.comic_ids() == ["done"]
    assert store.model_versions() == {"done": "1"}
    with pytest.raises(KeyError, match="unfinished"):
        store.read("unfinished")


def _concurrent_writer(url, comic_ids, barrier, rounds):
    barrier.wait()  # every process creates the new store and writes at the same moment
    for seed in range(rounds):
        for comic_id in comic_ids:
            write(url, comic_id, n_pages=2 + seed % 3, seed=seed, version=str(seed))


def test_concurrent_writers_of_the_same_and_different_comics(tmp_path):
    url = str(tmp_path / "shared.zarr")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    jobs = [["same", "x0", "x1"], ["same", "y0"], ["same", "y1"]]
    workers = [context.Process(target=_concurrent_writer, args=(url, ids, barrier, 6)) for ids in jobs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    store = es.ContextualizedStore.open(url)
    assert store.comic_ids() == ["same", "x0", "x1", "y0", "y1"]
    for comic_id in store.comic_ids():
        comic = store.read(comic_id)  # whole: its arrays are the ones its attrs describe
        seed = int(comic.attrs["model_version"])
        expected, _ = fake_encode(features_of(comic_id, 2 + seed % 3, seed))
        np.testing.assert_allclose(comic.panel_embeddings, expected, rtol=1e-6)
    assert not [p for p in (tmp_path / "shared.zarr" / "comics").iterdir() if p.name.startswith(".")]


def _rewriter(url, stop_at, rounds):
    seed = 0
    while time.time() < stop_at:
        for comic_id in ("a", "b", "c"):
            write(url, comic_id, n_pages=1 + seed % 4, seed=seed, version=str(seed), gc_grace_seconds=0)
        seed += 1
    rounds.value = seed


def test_reader_hammering_listings_during_rewrites_sees_no_missing_or_partial_comic(tmp_path):
    """Rewrites with immediate garbage collection (the harshest setting): every listing shows all
    three comics and every read is one whole version (arrays match the attrs beside them)."""
    url = str(tmp_path / "s.zarr")
    for comic_id in ("a", "b", "c"):
        write(url, comic_id, n_pages=1, seed=0, version="0")
    context = multiprocessing.get_context("fork")
    rounds = context.Value("i", 0)
    writer = context.Process(target=_rewriter, args=(url, time.time() + 3.0, rounds))
    writer.start()
    store = es.ContextualizedStore.open(url)
    listings = reads = 0
    while writer.is_alive():
        assert store.comic_ids() == ["a", "b", "c"]
        listings += 1
        comic = store.read("abc"[reads % 3])
        seed = int(comic.attrs["model_version"])
        expected, _ = fake_encode(features_of(comic.comic_id, 1 + seed % 4, seed))
        np.testing.assert_allclose(comic.panel_embeddings, expected, rtol=1e-6)
        assert comic.page_ids == [f"{comic.comic_id}-p{i:03d}" for i in range(1 + seed % 4)]
        reads += 1
    writer.join()
    assert writer.exitcode == 0 and rounds.value > 5 and listings > 20


# --- listing and staleness --------------------------------------------------------------------
def test_model_versions_and_stale_comics(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "a", version="1")
    write(url, "b", version="2")
    write(url, "c", version="2")
    store = es.ContextualizedStore.open(url)
    assert store.model_versions() == {"a": "1", "b": "2", "c": "2"}
    assert store.stale_comics("2") == ["a"]
    assert store.stale_comics("3") == ["a", "b", "c"]
    write(url, "a", version="2")
    assert store.stale_comics("2") == []


def test_to_xarray(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "c", n_pages=3)
    store = es.ContextualizedStore.open(url)
    if importlib.util.find_spec("xarray") is None:
        with pytest.raises(ImportError, match="pip install xarray"):
            store.to_xarray("c")
        return
    dataset = store.to_xarray("c")
    assert dataset["panel_embeddings"].dims == ("page", "panel", "dim")
    assert dataset["strip_embeddings"].shape == (3, D_OUT)
    assert list(dataset["page_id"].values) == store.read("c").page_ids
    assert dataset.attrs["model_version"] == "1" and dataset.attrs["comic_name"] == "c"


# --- S3 ---------------------------------------------------------------------------------------
@pytest.fixture
def s3_url(monkeypatch):
    """A bucket on a moto S3 server on 127.0.0.1 (fresh server per test)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "FSSPEC_S3_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True).mkdir("bucket")
    s3fs.S3FileSystem.clear_instance_cache()
    yield "s3://bucket/ctx.zarr"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_commit_round_trip_and_reader_during_rewrites(s3_url):
    key = comic_key("Tintin - L'Île noire")
    write(s3_url, key, name="Tintin - L'Île noire", version="0")
    store = es.ContextualizedStore.open(s3_url)
    assert store.comic_names() == {key: "Tintin - L'Île noire"}
    stop = threading.Event()
    failures: list[BaseException] = []

    def rewrite():
        try:
            for seed in range(1, 6):
                write(s3_url, key, name="Tintin - L'Île noire", n_pages=1 + seed % 3, seed=seed,
                      version=str(seed), gc_grace_seconds=5.0)
        except BaseException as exc:  # surfaced below
            failures.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=rewrite)
    thread.start()
    reads = 0
    while not stop.is_set() or reads == 0:
        comic = store.read(key)
        seed = int(comic.attrs["model_version"])
        expected, _ = fake_encode(features_of(key, 1 + seed % 3 if seed else 3, seed))
        np.testing.assert_allclose(comic.panel_embeddings, expected, rtol=1e-6)
        reads += 1
    thread.join()
    assert not failures
    assert store.attrs(key)["model_version"] == "5"
    es.collect_garbage(f"{s3_url}/comics/{key}", grace_seconds=0)
    assert _versions(s3_url, key) == [store.attrs(key)["current"]]
