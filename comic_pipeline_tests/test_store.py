"""comic_pipeline.store: native round trip, atomic writes, validation, legacy adapter, laziness."""

from __future__ import annotations

import json
import os
import tracemalloc
import uuid

import fsspec
import numpy as np
import pytest
import zarr

from comic_pipeline import stage3_native, store, zarr_chunks
from comic_pipeline.comic_names import comic_key
from comic_pipeline.store import Stage3Store, Stage3StoreError

DIM, P, B = 8, 4, 3


def zeroed(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    out = values.astype(np.float32)
    out[~valid] = 0.0
    return out


def write_raw_comic(url: str, comic_id: str, page_ids, arrays, title="raw") -> None:
    """Write a comic group WITHOUT validation, as a faulty Stage 3 writer would."""
    group = zarr.open_group(f"{url}/comics/{comic_id}", mode="w", zarr_format=3,
                            attributes={"page_ids": list(page_ids), "title": title})
    for name, array in arrays.items():
        group.create_array(name, data=np.asarray(array))


@pytest.fixture
def empty_store(tmp_path) -> str:
    url = str(tmp_path / "s.zarr")
    store.create_native_store(url, dim=DIM, max_panels=P, max_boxes=B)
    return url


@pytest.fixture
def good_comic(make_comic_arrays):
    arrays = make_comic_arrays(np.random.default_rng(1), n_pages=3, max_panels=P, dim=DIM,
                               max_boxes=B)
    return ["p0", "p1", "p2"], arrays


# --- native round trip -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_native_round_trip_all_modalities(tmp_path, make_comic_arrays, dtype):
    url = str(tmp_path / "rt.zarr")
    store.create_native_store(url, dim=DIM, max_panels=P, max_boxes=B)
    rng = np.random.default_rng(7)
    written = {}
    for comic_id, n_pages in (("b-comic", 2), ("a.comic_1", 5)):
        arrays = make_comic_arrays(rng, n_pages=n_pages, max_panels=P, dim=DIM, max_boxes=B,
                                   dtype=dtype)
        page_ids = [f"{comic_id}/page{n}" for n in range(n_pages)]
        store.write_native_comic(url, comic_id, page_ids=page_ids, title=f"T {comic_id}",
                                 arrays=arrays)
        written[comic_id] = (page_ids, arrays)

    opened = Stage3Store.open(url)
    assert opened.layout == "native"
    assert (opened.dim, opened.max_panels, opened.max_boxes) == (DIM, P, B)
    assert opened.comic_ids() == ["a.comic_1", "b-comic"]
    assert opened.modalities() == {"fused", "visual", "text", "caption"}

    for comic_id, (page_ids, arrays) in written.items():
        comic = opened.comic(comic_id)
        assert comic.title == f"T {comic_id}" and comic.page_ids == page_ids
        assert comic.n_pages == len(page_ids)
        mask = arrays["panel_mask"]
        np.testing.assert_array_equal(comic.panel_mask(), mask)
        np.testing.assert_array_equal(comic.text_mask(), arrays["text_mask"])
        for modality, name in (("fused", "panel_embeddings"), ("visual", "visual"),
                               ("caption", "caption")):
            got = comic.read(modality)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, zeroed(arrays[name], mask))
        text = comic.read("text")
        np.testing.assert_array_equal(text, zeroed(arrays["text"], arrays["text_mask"]))
        assert np.abs(text).max() < store_junk_bound()  # padded junk (1e3) is gone

    # Rows follow the order asked for, not the sorted order.
    features = opened.load_features(["b-comic", "a.comic_1"])
    assert features.comic_ids.tolist() == ["b-comic"] * 2 + ["a.comic_1"] * 5
    assert features.page_numbers.tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert features.page_ids.tolist() == written["b-comic"][0] + written["a.comic_1"][0]
    assert features.modalities == {"fused", "visual", "text", "caption"}
    assert features.fused.dtype == np.float32 and features.max_boxes == B
    expected_fused = np.concatenate([zeroed(written[c][1]["panel_embeddings"],
                                            written[c][1]["panel_mask"])
                                     for c in ("b-comic", "a.comic_1")])
    np.testing.assert_array_equal(features.fused, expected_fused)

    only_fused = opened.load_features(["a.comic_1"], modalities=["fused"])
    assert only_fused.modalities == {"fused"} and only_fused.text_mask is None

    summary = opened.comic("a.comic_1").validate()
    assert summary.n_pages == 5 and summary.dim == DIM and summary.dtype == dtype
    n_panels = written["a.comic_1"][1]["panel_mask"].sum(axis=1)
    assert summary.n_panels == n_panels.sum()
    assert (summary.panels_per_page_min, summary.panels_per_page_max) == (n_panels.min(), n_panels.max())
    assert summary.modalities == ("caption", "fused", "text", "visual")


def store_junk_bound() -> float:
    return 100.0  # random normals stay far below this; the fixtures' padding junk is 1e3


def test_content_hash_ignores_padding_but_sees_content(empty_store, good_comic):
    page_ids, arrays = good_comic
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=arrays)
    first = Stage3Store.open(empty_store).comic("c").validate().content_hash

    other_junk = {name: array.copy() for name, array in arrays.items()}
    other_junk["panel_embeddings"][~arrays["panel_mask"]] = -7.0
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=other_junk)
    assert Stage3Store.open(empty_store).comic("c").validate().content_hash == first

    changed = {name: array.copy() for name, array in arrays.items()}
    changed["caption"][0, 0, 0] += 1.0
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=changed)
    assert Stage3Store.open(empty_store).comic("c").validate().content_hash != first

    store.write_native_comic(empty_store, "c", page_ids=["x0", "x1", "x2"], title="c", arrays=arrays)
    assert Stage3Store.open(empty_store).comic("c").validate().content_hash != first


def test_optional_modalities_and_store_modalities_are_common_ones(tiny_native_store,
                                                                   make_comic_arrays):
    url, written = tiny_native_store
    arrays = make_comic_arrays(np.random.default_rng(3), n_pages=2, max_panels=P, dim=DIM,
                               modalities=("fused",))
    store.write_native_comic(url, "fused-only", page_ids=["a", "b"], title="F", arrays=arrays)
    opened = Stage3Store.open(url)
    assert opened.comic("fused-only").modalities == {"fused"}
    assert opened.modalities() == {"fused"}
    with pytest.raises(Stage3StoreError, match=r"fused-only.*'text'.*not stored"):
        opened.load_features(["alpha", "fused-only"], modalities=["fused", "text"])
    with pytest.raises(Stage3StoreError, match="fused-only.*not stored"):
        opened.comic("fused-only").read("caption")
    # Without modalities, the ones the asked-for comics share are loaded.
    assert opened.load_features(["alpha", "fused-only"]).modalities == {"fused"}
    assert opened.load_features(["alpha", "beta"]).modalities == {"fused", "visual", "text", "caption"}


def test_fsspec_url_round_trip(make_comic_arrays):
    url = f"memory://stage3-{uuid.uuid4().hex}/s.zarr"
    try:
        store.create_native_store(url, dim=DIM, max_panels=P)
        arrays = make_comic_arrays(np.random.default_rng(5), n_pages=2, max_panels=P, dim=DIM,
                                   modalities=("fused",))
        store.write_native_comic(url, "m1", page_ids=["a", "b"], title="M", arrays=arrays)
        opened = Stage3Store.open(url)
        assert opened.comic_ids() == ["m1"] and opened.max_boxes == 0
        np.testing.assert_array_equal(opened.comic("m1").read("fused"),
                                      zeroed(arrays["panel_embeddings"], arrays["panel_mask"]))
    finally:
        fs = fsspec.filesystem("memory")
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


# --- creating the store --------------------------------------------------------------------------
def test_create_refuses_existing_store_unless_overwrite(tiny_native_store):
    url, _ = tiny_native_store
    with pytest.raises(Stage3StoreError, match="already exists"):
        store.create_native_store(url, dim=DIM, max_panels=P)
    store.create_native_store(url, dim=16, max_panels=P, overwrite=True)
    opened = Stage3Store.open(url)
    assert opened.comic_ids() == [] and opened.dim == 16 and opened.max_boxes == 0
    assert "max_boxes" not in zarr.open_group(url, mode="r").attrs
    assert opened.modalities() == frozenset()


def test_root_attrs(empty_store):
    attrs = dict(zarr.open_group(empty_store, mode="r").attrs)
    assert attrs == {"format": "comic-stage3", "version": 1, "dim": DIM, "max_panels": P,
                     "max_boxes": B}


# --- atomic writes -------------------------------------------------------------------------------
def test_comic_written_aside_is_invisible_until_moved(empty_store, good_comic):
    page_ids, arrays = good_comic
    aside = f"{empty_store}/comics/.tmp-half-written-0123"
    write_raw_comic(empty_store, ".tmp-half-written-0123", page_ids, arrays)
    opened = Stage3Store.open(empty_store)
    assert opened.comic_ids() == []
    os.rename(aside, f"{empty_store}/comics/moved")
    assert opened.comic_ids() == ["moved"]
    assert opened.comic("moved").validate().n_pages == 3


def test_exception_mid_write_leaves_no_group(empty_store, good_comic, monkeypatch):
    page_ids, arrays = good_comic
    real_create_array = zarr.Group.create_array
    calls = []

    def failing_create_array(self, name, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_create_array(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", failing_create_array)
    with pytest.raises(OSError, match="simulated"):
        store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=arrays)
    assert len(calls) == 3
    assert sorted(os.listdir(f"{empty_store}/comics")) == ["zarr.json"]  # no group, no temp
    assert Stage3Store.open(empty_store).comic_ids() == []


def test_rewrite_replaces_a_comic_cleanly(empty_store, good_comic, make_comic_arrays):
    page_ids, arrays = good_comic
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="old", arrays=arrays)
    smaller = make_comic_arrays(np.random.default_rng(9), n_pages=2, max_panels=P, dim=DIM,
                                modalities=("fused",))
    store.write_native_comic(empty_store, "c", page_ids=["n0", "n1"], title="new", arrays=smaller)
    assert sorted(os.listdir(f"{empty_store}/comics")) == ["c", "zarr.json"]
    assert sorted(os.listdir(f"{empty_store}/comics/c")) == ["panel_embeddings", "panel_mask",
                                                             "zarr.json"]
    comic = Stage3Store.open(empty_store).comic("c")
    assert (comic.title, comic.page_ids, comic.modalities) == ("new", ["n0", "n1"], {"fused"})


# --- validation: every bad input, on the write path AND the read path ----------------------------
def _drop(name):
    return lambda page_ids, arrays: (page_ids, {k: v for k, v in arrays.items() if k != name})


def _set(name, make):
    def mutate(page_ids, arrays):
        arrays = dict(arrays)
        arrays[name] = make(arrays)
        return page_ids, arrays
    return mutate


def _with_nan(name, value):
    def make(arrays):
        values = arrays[name].copy()
        values[1, 0, 2] = value  # slot 0 is always a valid panel
        return values
    return make


def _not_prefix(arrays):
    mask = arrays["panel_mask"].copy()
    mask[1] = [True, False, True, False]
    return mask


def _empty_page(arrays):
    mask = arrays["panel_mask"].copy()
    mask[2] = False
    return mask


def _text_not_prefix(arrays):
    mask = arrays["text_mask"].copy()
    mask[0, 0] = [False, True, False]
    return mask


BAD_COMICS = {
    "missing panel_embeddings": (_drop("panel_embeddings"), r"'panel_embeddings': required array is missing"),
    "missing panel_mask": (_drop("panel_mask"), r"'panel_mask': required array is missing"),
    "pages disagree": (_set("visual", lambda a: a["visual"][:2]), r"'visual': mis-shaped.*\(2, 4, 8\)"),
    "P disagrees with root": (_set("caption", lambda a: a["caption"][:, :3]), r"'caption': mis-shaped"),
    "mask P disagrees": (_set("panel_mask", lambda a: a["panel_mask"][:, :3]), r"'panel_mask': mis-shaped"),
    "B disagrees": (_set("text", lambda a: a["text"][:, :, :2]), r"'text_mask': mis-shaped.*B=2 from 'text'"),
    "missing axis": (_set("visual", lambda a: a["visual"][:, 0]), r"'visual': mis-shaped"),
    "dimension mismatch": (_set("panel_embeddings", lambda a: a["panel_embeddings"][..., :6]),
                           r"'panel_embeddings': dimension mismatch.*6.*dim=8"),
    "text dimension mismatch": (_set("text", lambda a: a["text"][..., :5]), r"'text': dimension mismatch"),
    "NaN in valid slot": (_set("panel_embeddings", _with_nan("panel_embeddings", np.nan)),
                          r"'panel_embeddings': 1 valid slot\(s\) hold NaN or Inf.*'p1'"),
    "Inf in valid slot": (_set("visual", _with_nan("visual", np.inf)), r"'visual':.*NaN or Inf"),
    "mask not a prefix": (_set("panel_mask", _not_prefix), r"'panel_mask': not a prefix on page 'p1'"),
    "page with zero panels": (_set("panel_mask", _empty_page), r"'panel_mask': empty comic page 'p2'"),
    "no pages": (lambda ids, arrays: ([], {k: v[:0] for k, v in arrays.items()}),
                 r"empty comic: it has no pages"),
    "duplicate page ids": (lambda ids, arrays: (["p0", "p1", "p0"], arrays),
                           r"duplicate page ids \['p0'\]"),
    "page_ids count": (lambda ids, arrays: (["p0", "p1"], arrays), r"3 pages but 'page_ids' lists 2"),
    "text without text_mask": (_drop("text_mask"), r"'text_mask': missing: 'text' needs 'text_mask'"),
    "text_mask without text": (_drop("text"), r"'text': missing: 'text_mask' is stored without"),
    "text_mask not a prefix": (_set("text_mask", _text_not_prefix),
                               r"'text_mask': not a prefix on page 'p0'.*panel 0"),
    "float64": (_set("caption", lambda a: a["caption"].astype(np.float64)), r"'caption': dtype float64"),
    "int mask": (_set("panel_mask", lambda a: a["panel_mask"].astype(np.uint8)),
                 r"'panel_mask': dtype uint8"),
    "unknown array": (_set("extra", lambda a: a["caption"]), r"'extra': unknown array"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMICS))
def test_bad_comic_is_refused_on_write(empty_store, good_comic, case):
    mutate, message = BAD_COMICS[case]
    page_ids, arrays = mutate(*good_comic)
    with pytest.raises(Stage3StoreError, match=r"comic 'bad'.*" + message):
        store.write_native_comic(empty_store, "bad", page_ids=page_ids, title="bad", arrays=arrays)
    assert sorted(os.listdir(f"{empty_store}/comics")) == ["zarr.json"]  # nothing was written


@pytest.mark.parametrize("case", sorted(BAD_COMICS))
def test_bad_comic_is_refused_on_read(empty_store, good_comic, case):
    mutate, message = BAD_COMICS[case]
    page_ids, arrays = mutate(*good_comic)
    write_raw_comic(empty_store, "bad", page_ids, arrays)
    opened = Stage3Store.open(empty_store)
    assert opened.comic_ids() == ["bad"]  # listing stays cheap: it does not validate
    with pytest.raises(Stage3StoreError, match=r"comic 'bad'.*" + message):
        opened.comic("bad").validate()
    with pytest.raises(Stage3StoreError, match=r"comic 'bad'.*" + message):
        opened.load_features(["bad"])


def test_nan_in_padded_slots_is_fine_and_zeroed(empty_store, good_comic):
    page_ids, arrays = good_comic
    arrays = dict(arrays)
    arrays["panel_embeddings"] = arrays["panel_embeddings"].copy()
    arrays["panel_embeddings"][~arrays["panel_mask"]] = np.nan
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=arrays)
    fused = Stage3Store.open(empty_store).comic("c").read("fused")
    assert np.isfinite(fused).all() and (fused[~arrays["panel_mask"]] == 0).all()


def test_text_needs_no_max_boxes_root_attr(tmp_path, good_comic):
    """Only the four root attrs of DESIGN §3 are required: B is read from the `text` array."""
    url = str(tmp_path / "no-max-boxes.zarr")
    store.create_native_store(url, dim=DIM, max_panels=P)  # no max_boxes attr
    page_ids, arrays = good_comic
    store.write_native_comic(url, "c", page_ids=page_ids, title="c", arrays=arrays)
    assert "max_boxes" not in zarr.open_group(url, mode="r").attrs
    comic = Stage3Store.open(url).comic("c")
    assert comic.max_boxes == B and "text" in comic.modalities
    assert comic.read("text").shape == (3, P, B, DIM)


def test_comics_with_different_box_counts_load_together(tmp_path, make_comic_arrays):
    url = str(tmp_path / "boxes.zarr")
    store.create_native_store(url, dim=DIM, max_panels=P)
    rng = np.random.default_rng(3)
    for name, boxes in (("two", 2), ("five", 5)):
        store.write_native_comic(url, name, page_ids=["a", "b"], title=name,
                                 arrays=make_comic_arrays(rng, n_pages=2, max_panels=P, dim=DIM,
                                                          max_boxes=boxes))
    features = Stage3Store.open(url).load_features(["two", "five"])
    assert features.max_boxes == 5 and not features.text_mask[:2, :, 2:].any()


NAMES = [
    "Amazing Spider-Man (1963) #001", "Tintin - L'Île noire", "Action Comics 0001, 1938",
    "Calvin & Hobbes", "Astérix le Gaulois", "東京喰種 第1巻", "a b", "A B", "a-b", "a_b", "_x", "-x",
    "..", "x" * 230, "é" * 150, ".hidden", "a/b", "a\\b", "__meta",
]


def test_any_comic_name_is_written_listed_and_read(empty_store, good_comic):
    page_ids, arrays = good_comic
    keys = {}
    for name in NAMES:
        keys[name] = store.write_native_comic(empty_store, name, page_ids=page_ids, title="t",
                                              arrays=arrays)
        assert keys[name] == comic_key(name)
    assert len(set(keys.values())) == len(NAMES)  # names differing in case/punctuation stay apart
    opened = Stage3Store.open(empty_store)
    assert opened.comic_ids() == sorted(keys.values())
    assert opened.names() == {key: name for name, key in keys.items()}
    assert opened.quarantined() == {}
    for name, key in keys.items():
        comic = opened.comic(key)
        assert (comic.name, comic.comic_id) == (name, key)
        summary = comic.validate()
        assert (summary.name, summary.comic_id, summary.n_pages) == (name, key, 3)
    folders = set(os.listdir(f"{empty_store}/comics")) - {"zarr.json"}
    assert "Amazing Spider-Man (1963) #001" in folders  # the name itself, where it can be a folder
    assert comic_key("a/b") in folders and comic_key(".hidden") in folders  # else its key


@pytest.mark.parametrize("name", ["", "   ", None, 7])
def test_blank_or_non_string_names_are_refused(empty_store, good_comic, name):
    page_ids, arrays = good_comic
    with pytest.raises(Stage3StoreError, match="cannot write comic: a comic name must"):
        store.write_native_comic(empty_store, name, page_ids=page_ids, title="x", arrays=arrays)
    assert sorted(os.listdir(f"{empty_store}/comics")) == ["zarr.json"]


def test_a_broken_group_is_that_comics_problem_only(empty_store, good_comic):
    page_ids, arrays = good_comic
    store.write_native_comic(empty_store, "good one", page_ids=page_ids, title="g", arrays=arrays)
    write_raw_comic(empty_store, "no page ids", page_ids, {"panel_mask": arrays["panel_mask"]})
    zarr.open_group(f"{empty_store}/comics/no page ids", mode="r+").attrs.pop("page_ids")
    write_raw_comic(empty_store, "Bad Shape #2", page_ids, {**arrays, "panel_mask": arrays["panel_mask"][:2]})
    zarr.open_group(f"{empty_store}/comics", mode="r+").create_array("an array", shape=(2,), dtype="f4")
    opened = Stage3Store.open(empty_store)  # never fails because of one comic
    assert set(opened.names().values()) == {"good one", "no page ids", "Bad Shape #2", "an array"}
    bad = opened.quarantined()
    assert {q.name: q.error for q in bad.values()} == {
        "no page ids": "comic 'no page ids': attribute 'page_ids' must be a list of strings (got NoneType)",
        "Bad Shape #2": "comic 'Bad Shape #2', array 'panel_mask': mis-shaped: 2 pages but 'page_ids' lists 3",
        "an array": "comic 'an array': is an array, expected a comic group",
    }
    assert opened.modalities() == {"fused", "visual", "text", "caption"}
    assert opened.comic(comic_key("good one")).validate().n_pages == 3


def test_unknown_comic(tiny_native_store):
    url, _ = tiny_native_store
    with pytest.raises(Stage3StoreError, match=r"comic 'delta': unknown comic"):
        Stage3Store.open(url).comic("delta")


def test_load_features_arguments(tiny_native_store):
    opened = Stage3Store.open(tiny_native_store[0])
    with pytest.raises(Stage3StoreError, match="at least one comic"):
        opened.load_features([])
    with pytest.raises(Stage3StoreError, match=r"asked for twice: \['alpha'\]"):
        opened.load_features(["alpha", "beta", "alpha"])
    with pytest.raises(Stage3StoreError, match=r"unknown modalities \['audio'\]"):
        opened.load_features(["alpha"], modalities=["audio"])



def test_load_pinned_gives_content_hashes_and_names_changed_comics(tiny_native_store):
    url, written = tiny_native_store
    opened = Stage3Store.open(url)
    features, hashes = opened.load_pinned(["alpha", "gamma"])
    assert list(dict.fromkeys(features.comic_ids)) == ["alpha", "gamma"]
    assert hashes == {c: opened.comic(c).validate().content_hash for c in ("alpha", "gamma")}
    opened.load_pinned(["alpha", "gamma"], pinned=hashes)  # unchanged: fine
    arrays = dict(written["gamma"])
    arrays["visual"] = arrays["visual"] * 2.0  # Stage 3 rewrote one modality of gamma
    store.write_native_comic(url, "gamma", title="Gamma", arrays=arrays,
                             page_ids=[f"gamma-p{page}" for page in range(5)])
    with pytest.raises(store.Stage3Changed) as raised:
        Stage3Store.open(url).load_pinned(["alpha", "gamma"], pinned=hashes)
    message = str(raised.value)
    assert "1 comic(s) changed" in message
    assert f"comic 'gamma' (key 'gamma'): pinned {hashes['gamma'][:12]}, now" in message
    assert "alpha" not in message and "regenerate the task datasets" in message
    with pytest.raises(store.Stage3Changed, match="pinned nothing"):  # a comic nothing was made from
        Stage3Store.open(url).load_pinned(["beta"], pinned=hashes)


# --- store format and layout detection -----------------------------------------------------------
def test_wrong_format_stores(tmp_path):
    no_attrs = str(tmp_path / "plain.zarr")
    zarr.open_group(no_attrs, mode="w", zarr_format=3).create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(Stage3StoreError, match="unknown format.*no legacy arrays"):
        Stage3Store.open(no_attrs)

    for attrs, message in (
        ({"format": "comic-stage2", "version": 1, "dim": 8, "max_panels": 4}, "format='comic-stage2'"),
        ({"format": "comic-stage3", "version": 2, "dim": 8, "max_panels": 4}, "unsupported version 2"),
        ({"format": "comic-stage3", "version": 1, "max_panels": 4}, "root attr 'dim'=None"),
        ({"format": "comic-stage3", "version": 1, "dim": 8, "max_panels": 0}, "'max_panels'=0"),
    ):
        url = str(tmp_path / f"{uuid.uuid4().hex}.zarr")
        zarr.open_group(url, mode="w", zarr_format=3, attributes=attrs).create_group("comics")
        with pytest.raises(Stage3StoreError, match=message):
            Stage3Store.open(url)

    no_comics = str(tmp_path / "nocomics.zarr")
    zarr.open_group(no_comics, mode="w", zarr_format=3,
                    attributes={"format": "comic-stage3", "version": 1, "dim": 8, "max_panels": 4})
    with pytest.raises(Stage3StoreError, match="'comics' group is missing"):
        Stage3Store.open(no_comics)

    v2 = str(tmp_path / "v2.zarr")
    zarr.open_group(v2, mode="w", zarr_format=2, attributes={
        "format": "comic-stage3", "version": 1, "dim": 8, "max_panels": 4}).create_group("comics")
    with pytest.raises(Stage3StoreError, match="native layout is Zarr v3"):
        Stage3Store.open(v2)

    with pytest.raises(Stage3StoreError, match="no Zarr group there"):
        Stage3Store.open(str(tmp_path / "missing.zarr"))


def test_layout_detection(tiny_native_store, tmp_path):
    assert Stage3Store.open(tiny_native_store[0]).layout == "native"
    url, metadata_url, _ = build_legacy_store(tmp_path, {"s/v": 3})
    legacy = Stage3Store.open(url, metadata_url)
    assert legacy.layout == "legacy" and legacy.max_boxes == 0
    with pytest.raises(Stage3StoreError, match="COMIC_STAGE3_METADATA"):
        Stage3Store.open(url)
    with pytest.raises(Stage3StoreError, match="read-only legacy store"):
        store.write_native_comic(url, "x", page_ids=["a"], title="x",
                                 arrays={"panel_embeddings": np.zeros((1, 16, 512), np.float32),
                                         "panel_mask": np.ones((1, 16), bool)})


# --- legacy layout -------------------------------------------------------------------------------
def build_legacy_store(tmp_path, comics: dict[str, int], *, n_slots=16, dim=32, seed=0,
                       extra_rows=0, chunk_rows=8, write_embeddings=True):
    """A flat Zarr v2 store as the original Stage 3 scripts write it: rows shuffled across comics,
    junk in padded slots, metadata as a JSON list. Returns (url, metadata_url, truth) where truth
    maps comic_id -> (canonical ids in reading order, rows in reading order, n_panels)."""
    rng = np.random.default_rng(seed)
    pages = [(folder, page) for folder, n_pages in comics.items() for page in range(1, n_pages + 1)]
    n_rows = len(pages) + extra_rows
    rows = rng.permutation(n_rows)[: len(pages)]  # shuffled: reading order != row order
    n_panels = rng.integers(1, n_slots + 1, size=len(pages))
    masks = rng.random((n_rows, n_slots)) < 0.5  # junk masks on unreferenced rows
    masks[rows] = np.arange(n_slots)[None, :] < n_panels[:, None]

    url = str(tmp_path / f"legacy-{seed}.zarr")
    root = zarr.open_group(url, mode="w", zarr_format=2)
    embeddings = root.create_array("panel_embeddings", shape=(n_rows, n_slots, dim), dtype="f4",
                                   chunks=(chunk_rows, n_slots, dim), fill_value=0.0)
    if write_embeddings:
        values = rng.normal(size=(n_rows, n_slots, dim)).astype(np.float32)
        values[~masks] = 55.0 + rng.random(int((~masks).sum()))[:, None]  # non-zero junk
        embeddings[...] = values
    root.create_array("panel_masks", data=masks.astype(np.uint8), chunks=(chunk_rows, n_slots))

    records, truth = [], {}
    for (folder, page), row, panels in zip(pages, rows, n_panels):
        canonical = f"{folder}/page_{page}.jpg"
        records.append({"sequence_index": int(row), "canonical_id": canonical,
                        "num_panels": int(panels), "source": "scan"})
        truth.setdefault(comic_key(folder), ([], [], []))
        for part, value in zip(truth[comic_key(folder)], (canonical, int(row), int(panels))):
            part.append(value)
    order = rng.permutation(len(records))
    metadata_url = str(tmp_path / f"legacy-{seed}.json")
    with open(metadata_url, "w") as handle:
        json.dump([records[i] for i in order], handle)
    return url, metadata_url, truth


def test_legacy_grouping_natural_order_and_zeroed_padding(tmp_path):
    url, metadata_url, truth = build_legacy_store(tmp_path, {"series/vol1": 12, "other": 3,
                                                             "series/vol2": 1})
    opened = Stage3Store.open(url, metadata_url)
    assert (opened.dim, opened.max_panels) == (32, 16)
    vol1, vol2 = comic_key("series/vol1"), comic_key("series/vol2")
    assert opened.comic_ids() == sorted(["other", vol1, vol2])
    assert opened.names() == {"other": "other", vol1: "series/vol1", vol2: "series/vol2"}
    assert opened.modalities() == {"fused"}

    comic = opened.comic(vol1)
    assert comic.title == comic.name == "series/vol1"
    # natural order: page_2 before page_10
    assert comic.page_ids == [f"series/vol1/page_{n}.jpg" for n in range(1, 13)]
    assert comic.page_ids == truth[vol1][0]

    raw = zarr.open_group(url, mode="r")
    rows = np.asarray(truth[vol1][1])
    mask = np.arange(16)[None, :] < np.asarray(truth[vol1][2])[:, None]
    np.testing.assert_array_equal(comic.panel_mask(), mask)
    fused = comic.read("fused")
    np.testing.assert_array_equal(fused, zeroed(raw["panel_embeddings"][...][rows], mask))
    assert (fused[~mask] == 0).all() and np.abs(fused).max() < 50  # the junk (55+) is gone

    features = opened.load_features([vol2, vol1])
    assert features.comic_ids.tolist() == [vol2] + [vol1] * 12
    assert features.page_numbers.tolist() == [0] + list(range(12))
    assert features.modalities == {"fused"} and features.max_boxes == 0
    summary = comic.validate()
    assert summary.n_pages == 12 and summary.dtype == "float32" and summary.modalities == ("fused",)


def _rewrite_metadata(metadata_url, change):
    with open(metadata_url) as handle:
        records = json.load(handle)
    change(records)
    with open(metadata_url, "w") as handle:
        json.dump(records, handle)
    return records


def test_legacy_mask_disagreeing_with_num_panels(tmp_path):
    url, metadata_url, truth = build_legacy_store(tmp_path, {"a/b": 4, "c": 2})
    records = _rewrite_metadata(metadata_url, lambda records: [
        r.update(num_panels=r["num_panels"] % 16 + 1)
        for r in records if r["canonical_id"] == "a/b/page_3.jpg"])
    opened = Stage3Store.open(url, metadata_url)  # metadata-only: opening still works
    opened.comic("c").validate()  # the other comic is fine
    with pytest.raises(Stage3StoreError, match=r"comic 'a/b', array 'panel_masks': mask disagrees "
                                               r"with num_panels.*'a/b/page_3.jpg'"):
        opened.comic(comic_key("a/b")).validate()
    assert records  # the metadata was rewritten


def test_legacy_num_panels_beyond_slots(tmp_path):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 2})
    _rewrite_metadata(metadata_url, lambda records: records[0].update(num_panels=17))
    with pytest.raises(Stage3StoreError, match="num_panels=17 but only 16 slots"):
        Stage3Store.open(url, metadata_url).comic("a").panel_mask()


@pytest.mark.parametrize("field, message", [
    ("sequence_index", r"comic 'a': duplicate sequence_index \d+: rows claimed by pages of \['a'\]"),
    ("canonical_id", r"comic 'a': duplicate canonical_id \['a/page_\d.jpg'\]")])
def test_legacy_duplicate_ids_are_the_comics_problem(tmp_path, field, message):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 3, "b c": 2})
    _rewrite_metadata(metadata_url, lambda records: [
        r.update({field: [q for q in records if q["canonical_id"].startswith("a/")][0][field]})
        for r in [q for q in records if q["canonical_id"].startswith("a/")][1:2]])
    opened = Stage3Store.open(url, metadata_url)  # the store opens; comic a is quarantined
    with pytest.raises(Stage3StoreError, match=message):
        opened.comic("a")
    assert list(opened.quarantined()) == ["a"]
    assert opened.comic(comic_key("b c")).validate().n_pages == 2


def test_legacy_row_claimed_by_two_comics_blames_both(tmp_path):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 2, "b": 2, "c": 1})
    records = _rewrite_metadata(metadata_url, lambda records: None)
    row_of_a = next(r["sequence_index"] for r in records if r["canonical_id"].startswith("a/"))
    _rewrite_metadata(metadata_url, lambda records: next(
        r for r in records if r["canonical_id"].startswith("b/")).update(sequence_index=row_of_a))
    opened = Stage3Store.open(url, metadata_url)
    assert sorted(opened.quarantined()) == ["a", "b"]
    assert "rows claimed by pages of ['a', 'b']" in opened.quarantined()["b"].error
    opened.comic("c").validate()


@pytest.mark.parametrize("change, message", [
    (lambda records: next(r for r in records if r["canonical_id"] == "a/page_2.jpg").update(
        sequence_index=10_000),
     r"comic 'a': page 'a/page_2.jpg' \(record \d+\): sequence_index 10000 is outside the \d+ rows"),
    (lambda records: next(r for r in records if r["canonical_id"] == "a/page_1.jpg").pop("num_panels"),
     r"comic 'a': page 'a/page_1.jpg' \(record \d+\): sequence_index=\d+ and num_panels=None must be"),
])
def test_legacy_bad_record_is_its_comics_problem(tmp_path, change, message):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 3, "Other (1990) #2": 2})
    _rewrite_metadata(metadata_url, change)
    opened = Stage3Store.open(url, metadata_url)
    with pytest.raises(Stage3StoreError, match=message):
        opened.comic("a")
    assert opened.comic(comic_key("Other (1990) #2")).validate().n_pages == 2


def test_legacy_record_without_a_folder_is_a_warning(tmp_path):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 3})
    _rewrite_metadata(metadata_url, lambda records: records[0].update(canonical_id="loose_page.jpg"))
    opened = Stage3Store.open(url, metadata_url)
    assert opened.comic_ids() == ["a"] and opened.comic("a").n_pages == 2
    assert opened.warnings == ["record 0: canonical_id 'loose_page.jpg' has no parent folder, so it "
                               "belongs to no comic"]


@pytest.mark.parametrize("change, message", [
    (lambda records: records.clear(), "non-empty JSON list"),
])
def test_legacy_bad_metadata(tmp_path, change, message):
    url, metadata_url, _ = build_legacy_store(tmp_path, {"a": 3})
    _rewrite_metadata(metadata_url, change)
    with pytest.raises(Stage3StoreError, match=message):
        Stage3Store.open(url, metadata_url)


def test_legacy_empty_page_and_nan(tmp_path):
    url, metadata_url, truth = build_legacy_store(tmp_path, {"a": 3})
    root = zarr.open_group(url, mode="r+")
    first_row = truth["a"][1][0]
    root["panel_embeddings"][first_row, 0, 0] = np.nan
    with pytest.raises(Stage3StoreError, match=r"comic 'a', array 'panel_embeddings':.*NaN.*page_1"):
        Stage3Store.open(url, metadata_url).comic("a").read("fused")
    masks = root["panel_masks"]
    masks[first_row] = 0
    _rewrite_metadata(metadata_url, lambda records: [r.update(num_panels=0) for r in records
                                                     if r["sequence_index"] == first_row])
    with pytest.raises(Stage3StoreError, match=r"empty comic page 'a/page_1.jpg'"):
        Stage3Store.open(url, metadata_url).comic("a").validate()


# --- laziness ------------------------------------------------------------------------------------
class ChunkReads:
    """Counts the store keys read (relative to the store): zarr's fetches (LocalStore.get) and,
    under `root`, the files the direct reader opens (stage3_native, zarr_chunks)."""

    def __init__(self, monkeypatch, root: str | None = None):
        self.keys: list[str] = []
        real_get = zarr.storage.LocalStore.get

        async def counting_get(store_self, key, *args, **kwargs):
            self.keys.append(key)
            return await real_get(store_self, key, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
        if root is not None:
            for module, function in ((zarr_chunks, "read_chunk_file"), (stage3_native, "_json_document")):
                real = getattr(module, function)

                def counting(path, real=real):
                    self.keys.append(os.path.relpath(path, root).replace(os.sep, "/"))
                    return real(path)

                monkeypatch.setattr(module, function, counting)

    def chunks(self, array_prefix: str) -> set[str]:
        return {key for key in self.keys if key.startswith(array_prefix + "/") and not is_metadata(key)}


def is_metadata(key: str) -> bool:
    """Zarr v3 and v2 metadata documents (zarr probes both), as opposed to chunks."""
    return key.rpartition("/")[2] in {"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"}


def test_legacy_reads_are_lazy_and_only_a_comics_rows(tmp_path, monkeypatch):
    # 200 comics x 100 pages; the embeddings are 20_000 x 16 x 512 float32 (655 MB) but never
    # written: zarr serves the fill value and no chunk exists on disk.
    comics = {f"series/c{i:03d}": 100 for i in range(200)}
    url, metadata_url, truth = build_legacy_store(tmp_path, comics, dim=512, chunk_rows=64,
                                                  write_embeddings=False)
    reads = ChunkReads(monkeypatch)
    tracemalloc.start()
    try:
        opened = Stage3Store.open(url, metadata_url)
        assert len(opened.comic_ids()) == 200
        assert reads.chunks("panel_embeddings") == set() and reads.chunks("panel_masks") == set()
        features = opened.load_features([comic_key("series/c123")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert features.fused.shape == (100, 16, 512) and (features.fused == 0).all()
    rows = np.asarray(truth[comic_key("series/c123")][1])
    row_chunks = {f"panel_embeddings/{row // 64}.0.0" for row in rows}
    assert reads.chunks("panel_embeddings") == row_chunks  # its own rows' chunks, nothing else
    assert len(row_chunks) < 20_000 // 64
    print(f"peak traced memory {peak / 2**20:.1f} MiB")
    assert peak < 64 * 2**20  # one comic is 3.3 MB; a full read would take 655 MB


def test_native_open_and_listing_read_no_chunks(tiny_native_store, monkeypatch):
    url, _ = tiny_native_store
    reads = ChunkReads(monkeypatch, root=url)
    opened = Stage3Store.open(url)
    assert opened.comic_ids() == ["alpha", "beta", "gamma"]
    assert opened.modalities() == {"fused", "visual", "text", "caption"}
    assert reads.keys and all(is_metadata(key) for key in reads.keys)  # metadata only
    opened.comic("beta").read("fused")
    chunk_keys = [key for key in reads.keys if not is_metadata(key)]
    assert chunk_keys and all(key.startswith(("comics/beta/panel_embeddings/",
                                              "comics/beta/panel_mask/")) for key in chunk_keys)


def test_text_boxes_of_padded_panels_count_as_padding(empty_store, good_comic):
    page_ids, arrays = good_comic
    arrays = dict(arrays)
    padded_panel = np.argwhere(~arrays["panel_mask"])[0]  # (page, slot) of a padded panel
    text_mask = arrays["text_mask"].copy()
    text_mask[padded_panel[0], padded_panel[1], 0] = True  # a writer left a box there
    arrays["text_mask"] = text_mask
    store.write_native_comic(empty_store, "c", page_ids=page_ids, title="c", arrays=arrays)
    comic = Stage3Store.open(empty_store).comic("c")
    assert not comic.text_mask()[padded_panel[0], padded_panel[1]].any()
    assert (comic.read("text")[padded_panel[0], padded_panel[1]] == 0).all()


@pytest.fixture(params=["direct", "zarr"])
def native_reader(request, monkeypatch) -> str:
    """Which reader a native comic gets: "direct" (a local disk, every encoding zarr_chunks reads)
    or "zarr" (what an object store gets: zarr-python, its arrays fetched in one trip)."""
    if request.param == "zarr":
        monkeypatch.setattr(stage3_native, "local_path", lambda url: None)
    return request.param


def zarr_trips(monkeypatch) -> list:
    """One entry per trip to zarr's event loop by the zarr reader."""
    trips = []
    real_sync = stage3_native.zarr_sync
    monkeypatch.setattr(stage3_native, "zarr_sync", lambda coroutine: trips.append(1) or real_sync(coroutine))
    return trips


def chunks_read_once_each(reads: ChunkReads, comic: str, arrays: set[str]) -> bool:
    chunk_keys = [key for key in reads.keys if not is_metadata(key)]
    return (len(chunk_keys) == len(set(chunk_keys))
            and {key.split("/")[2] for key in chunk_keys} == arrays
            and all(key.startswith(f"comics/{comic}/") for key in chunk_keys))


def test_a_comics_arrays_are_read_once_and_not_kept(tiny_native_store, monkeypatch, native_reader):
    url, written = tiny_native_store
    trips = zarr_trips(monkeypatch)
    reader = Stage3Store.open(url).comic("beta")
    assert isinstance(reader._source, {"direct": stage3_native.DirectComicArrays,
                                       "zarr": stage3_native.ZarrComicArrays}[native_reader])
    reads = ChunkReads(monkeypatch, root=url)
    features, summary = reader.validated_features()
    assert chunks_read_once_each(reads, "beta", set(written["beta"]))  # every array, each once
    if native_reader == "zarr":
        assert len(trips) == 1  # the masks and all four modalities together
        assert reader._source._fetched == {}  # the reader lives through a run: it holds no arrays
    else:
        assert trips == []  # no zarr-python at all
    mask = written["beta"]["panel_mask"]
    for modality, array in (("fused", "panel_embeddings"), ("visual", "visual"), ("caption", "caption")):
        np.testing.assert_array_equal(getattr(features, modality), zeroed(written["beta"][array], mask))
    text_valid = written["beta"]["text_mask"] & mask[:, :, None]
    np.testing.assert_array_equal(features.text, zeroed(written["beta"]["text"], text_valid))
    np.testing.assert_array_equal(features.text_mask, text_valid)
    # the same content hash as zarr-python's array-by-array reads (no fetch, no direct reader)
    monkeypatch.setattr(stage3_native, "local_path", lambda url: None)
    monkeypatch.setattr(stage3_native.ZarrComicArrays, "fetch", property(lambda self: None))
    assert Stage3Store.open(url).comic("beta").validate().content_hash == summary.content_hash


def test_an_embedding_input_of_some_modalities_reads_the_comic_once(tiny_native_store, monkeypatch,
                                                                     native_reader):
    from comic_pipeline.embedding_pipeline import ComicInput

    url, written = tiny_native_store
    trips = zarr_trips(monkeypatch)
    comic = ComicInput.from_reader(Stage3Store.open(url).comic("beta"), ["fused", "text"])
    reads = ChunkReads(monkeypatch, root=url)
    features = comic.load()
    # validated and read once, not validated and then read again
    assert chunks_read_once_each(reads, "beta", set(written["beta"]))
    assert len(trips) == (1 if native_reader == "zarr" else 0)
    assert features.modalities == {"fused", "text"} and features.text_mask is not None
    # the hash is the whole comic's (every modality), as validation records it
    assert comic.content_hash == Stage3Store.open(url).comic("beta").validate().content_hash
    fused_only = ComicInput.from_reader(Stage3Store.open(url).comic("beta"), ["fused"]).load()
    assert fused_only.modalities == {"fused"} and fused_only.text_mask is None


def test_a_broken_array_fails_its_own_read_and_leaves_nothing_held(tiny_native_store, native_reader):
    url, written = tiny_native_store
    chunk = os.path.join(url, "comics", "beta", "caption", "c", "0", "0", "0")  # read first
    assert os.path.exists(chunk)
    with open(chunk, "wb") as handle:
        handle.write(b"not a zstd frame")
    reader = Stage3Store.open(url).comic("beta")
    # either reader names the comic and the array (validation quarantines it); the direct one
    # also names the file, zarr-python does not say which chunk it was
    expected = {"direct": r"comic 'beta', array 'caption': chunk file .*caption.c.0.0.0 cannot be decoded as zstd",
                "zarr": r"comic 'beta', array 'caption': a chunk cannot be decoded \(RuntimeError: .*[Zz]std"}[native_reader]
    with pytest.raises(Stage3StoreError, match=expected):
        reader.features()
    with pytest.raises(Stage3StoreError, match=expected):  # validation meets the same error
        reader.validate()
    if native_reader == "zarr":
        assert reader._source._fetched == {}
    fused = reader.features(["fused", "text"]).fused  # the other arrays still read
    mask = written["beta"]["panel_mask"]
    np.testing.assert_array_equal(fused, zeroed(written["beta"]["panel_embeddings"], mask))


def test_an_object_store_that_does_not_answer_is_not_the_comics_problem(tiny_native_store, monkeypatch):
    """Through zarr-python (object stores) only a chunk that does not decode is the comic's
    problem; a store that fails to answer (OSError) is raised as it is, so validation does not
    blame the comic for the network."""
    url, _ = tiny_native_store
    monkeypatch.setattr(stage3_native, "local_path", lambda url: None)
    reader = Stage3Store.open(url).comic("beta")
    assert isinstance(reader._source, stage3_native.ZarrComicArrays)

    async def unreachable(self, *args, **kwargs):
        raise ConnectionResetError("the object store went away")

    for method in ("getitem", "_get_selection"):  # the fetch's read, and a single array's
        monkeypatch.setattr(zarr.AsyncArray, method, unreachable)
    with pytest.raises(ConnectionResetError, match="went away"):
        reader.features()
    with pytest.raises(ConnectionResetError, match="went away"):
        reader.read("fused")  # one array at a time: the same


def test_comics_with_the_same_array_metadata_each_read_their_own_chunks(empty_store, make_comic_arrays):
    """The direct reader parses each distinct array document once; comics sharing one still read
    their own chunk files."""
    rng = np.random.default_rng(3)
    written = {}
    for name in ("first", "second", "third"):  # same pages, panels, dims: identical zarr.json files
        written[name] = make_comic_arrays(rng, n_pages=3, max_panels=P, dim=DIM, max_boxes=B)
        store.write_native_comic(empty_store, name, page_ids=["p0", "p1", "p2"], title=name, arrays=written[name])
    documents = {open(os.path.join(empty_store, "comics", name, "visual", "zarr.json"), "rb").read()
                 for name in written}
    assert len(documents) == 1
    opened = Stage3Store.open(empty_store)
    for name, arrays in written.items():
        reader = opened.comic(name)
        assert isinstance(reader._source, stage3_native.DirectComicArrays)
        mask = arrays["panel_mask"]
        np.testing.assert_array_equal(reader.read("visual"), zeroed(arrays["visual"], mask))
        np.testing.assert_array_equal(reader.read("fused"), zeroed(arrays["panel_embeddings"], mask))
