"""The demo corpus generator: seeding, the store contract, and the structure it must carry."""

import dataclasses
import json

import numpy as np
import pytest

from comic_pipeline import corpus
from comic_pipeline.schema import MODALITY_ARRAYS

TINY = corpus.SIZES["tiny"]


def test_sizes_exist_and_tiny_is_small():
    assert {"tiny", "demo"} <= set(corpus.SIZES)
    assert TINY.n_comics <= 64 and TINY.dim <= 32
    demo = corpus.SIZES["demo"]
    assert demo.n_comics > TINY.n_comics and demo.max_boxes >= 2


def test_comic_is_seeded_by_seed_and_index_only():
    one = corpus.generate_comic(TINY, 3)
    again = corpus.generate_comic(dataclasses.replace(TINY, n_comics=40), 3)  # corpus size irrelevant
    assert one.comic_id == again.comic_id == "demo-0003"
    assert one.title == again.title and one.page_ids == again.page_ids
    for name, array in one.arrays.items():
        np.testing.assert_array_equal(array, again.arrays[name], err_msg=name)
    other_index = corpus.generate_comic(TINY, 4)
    other_seed = corpus.generate_comic(dataclasses.replace(TINY, seed=1), 3)
    for different in (other_index, other_seed):
        assert different.arrays["panel_embeddings"].shape != one.arrays["panel_embeddings"].shape or not \
            np.array_equal(different.arrays["panel_embeddings"], one.arrays["panel_embeddings"])


def test_arrays_follow_the_native_store_contract():
    for comic in corpus.iter_comics(TINY):
        arrays = comic.arrays
        assert set(arrays) == {"panel_embeddings", "panel_mask", "visual", "text", "text_mask", "caption"}
        pages = len(comic.page_ids)
        assert TINY.pages_min <= pages <= TINY.pages_max
        assert len(set(comic.page_ids)) == pages and "/" not in comic.comic_id
        P, D, B = TINY.max_panels, TINY.dim, TINY.max_boxes
        mask = arrays["panel_mask"]
        assert mask.dtype == bool and mask.shape == (pages, P)
        n_panels = mask.sum(axis=1)
        assert ((n_panels >= TINY.panels_min) & (n_panels <= P)).all()
        np.testing.assert_array_equal(mask, np.arange(P)[None] < n_panels[:, None])  # a prefix
        for name in ("panel_embeddings", "visual", "caption"):
            assert arrays[name].shape == (pages, P, D) and arrays[name].dtype == np.float32
            assert not arrays[name][~mask].any(), f"{name}: padded slots must be zero"
            assert np.isfinite(arrays[name]).all()
        text_mask = arrays["text_mask"]
        assert arrays["text"].shape == (pages, P, B, D) and text_mask.shape == (pages, P, B)
        n_boxes = text_mask.sum(axis=2)
        np.testing.assert_array_equal(text_mask, np.arange(B)[None, None] < n_boxes[..., None])
        assert not text_mask[~mask].any()
        assert not arrays["text"][~text_mask].any()


def test_a_subset_of_modalities_keeps_the_same_fused_vectors():
    full = corpus.generate_comic(TINY, 2)
    fused_only = corpus.generate_comic(corpus.with_modalities(TINY, ["fused"]), 2)
    assert set(fused_only.arrays) == {"panel_embeddings", "panel_mask"}
    np.testing.assert_array_equal(full.arrays["panel_embeddings"], fused_only.arrays["panel_embeddings"])


@pytest.mark.parametrize("change, field", [
    ({"pages_min": 5, "pages_max": 4}, "pages_min"),
    ({"panels_min": 1}, "panels_min"),
    ({"dim": 8}, "dim"),
    ({"n_characters": 1}, "n_characters"),
    ({"modalities": ("visual",)}, "fused"),
    ({"modalities": ("fused", "smell")}, "smell"),
    ({"silent_prob": 1.5}, "silent_prob"),
    ({"action_noise": -1.0}, "action_noise"),
])
def test_bad_config_is_refused_with_the_field_named(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **change)


def test_features_of_stacks_comics_in_order():
    comics = [corpus.generate_comic(TINY, i) for i in (0, 1, 2)]
    features = corpus.features_of(comics)
    pages = [len(c.page_ids) for c in comics]
    assert features.n_pages == sum(pages)
    assert list(features.comic_ids) == [c.comic_id for c, n in zip(comics, pages) for _ in range(n)]
    assert list(features.page_numbers) == [p for n in pages for p in range(n)]
    assert features.modalities == frozenset(MODALITY_ARRAYS)
    np.testing.assert_array_equal(features.fused[pages[0]:pages[0] + pages[1]],
                                  comics[1].arrays["panel_embeddings"])
    with pytest.raises(ValueError, match="at least one comic"):
        corpus.features_of([])


@pytest.fixture(scope="module")
def mid_features():
    """The demo corpus's structure (its noise levels) at a size that generates in a second."""
    return corpus.corpus_features(
        dataclasses.replace(corpus.SIZES["demo"], n_comics=40, pages_min=6, pages_max=10)
    )


def test_no_positional_trace_in_panel_vectors(mid_features):
    """Reading order must be recovered from relations, not from what slot 0 looks like."""
    f = mid_features
    norms = np.linalg.norm(f.fused, axis=-1)
    per_slot_norm = [norms[:, s][f.panel_mask[:, s]].mean() for s in range(4)]
    assert max(per_slot_norm) - min(per_slot_norm) < 0.01
    overall = f.fused[f.panel_mask].mean(axis=0)
    for slot in range(4):
        vectors = f.fused[:, slot][f.panel_mask[:, slot]]
        # the slot mean differs from the overall mean no more than sampling noise allows
        spread = np.linalg.norm(vectors.std(axis=0)) / np.sqrt(len(vectors))
        assert np.linalg.norm(vectors.mean(axis=0) - overall) < 4 * spread


def test_progression_raises_no_cosine_similarity_but_is_linear(mid_features):
    """Consecutive panels are no more alike than panels two apart, yet a linear map predicts
    the next panel far better than the one two steps ahead."""
    f = mid_features
    unit = f.fused / np.linalg.norm(f.fused, axis=-1, keepdims=True).clip(1e-9)
    lag1 = (unit[:, :-1] * unit[:, 1:]).sum(-1)[f.panel_mask[:, 1:]].mean()
    lag2 = (unit[:, :-2] * unit[:, 2:]).sum(-1)[f.panel_mask[:, 2:]].mean()
    assert abs(lag1 - lag2) < 0.03

    def fit_r2(lag):
        valid = f.panel_mask[:, lag:]
        x, y = unit[:, :-lag][valid], unit[:, lag:][valid]
        w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ y)
        return 1 - ((y - x @ w) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()

    assert fit_r2(1) > 1.2 * fit_r2(2)  # the action part is predictable one step ahead


def test_speakers_are_visible_and_the_first_speaks_most_prominently():
    """The text of box 0 is closer to the visual's speaker than a random character's text is:
    checked through a linear map from visual to first-box text learnt on other comics."""
    f = corpus.corpus_features(dataclasses.replace(TINY, n_comics=40))
    has_two = f.text_mask[:, :, 1] & f.panel_mask
    visual, first, second = f.visual[has_two], f.text[:, :, 0][has_two], f.text[:, :, 1][has_two]
    half = len(visual) // 2
    w = np.linalg.solve(visual[:half].T @ visual[:half] + np.eye(f.dim), visual[:half].T @ first[:half])
    predicted = visual[half:] @ w
    right = (predicted * first[half:]).sum(-1) > (predicted * second[half:]).sum(-1)
    assert right.mean() > 0.7  # box order is recoverable from the visual


def test_write_demo_store_round_trips(tmp_path):
    store = pytest.importorskip("comic_pipeline.store")
    config = dataclasses.replace(TINY, n_comics=3)
    url = str(tmp_path / "demo.zarr")
    ids = corpus.write_demo_store(url, config)
    assert ids == ["demo-0000", "demo-0001", "demo-0002"]
    opened = store.Stage3Store.open(url)
    assert opened.comic_ids() == ids and opened.dim == config.dim
    assert opened.modalities() == frozenset(MODALITY_ARRAYS)
    loaded = opened.load_features(ids)
    expected = corpus.corpus_features(config)
    for name in ("fused", "visual", "text", "caption", "text_mask", "panel_mask"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(expected, name), err_msg=name)
    # writing again replaces the store rather than failing or appending
    assert corpus.write_demo_store(url, dataclasses.replace(config, n_comics=2)) == ids[:2]
    assert store.Stage3Store.open(url).comic_ids() == ids[:2]


@pytest.mark.parametrize("layout", ["native", "legacy"])
def test_a_named_demo_store_holds_the_same_comics_in_either_layout(tmp_path, layout):
    store = pytest.importorskip("comic_pipeline.store")
    import zarr

    from comic_pipeline.comic_names import comic_key
    from comic_pipeline.stage3_legacy import LEGACY_JUNK
    from comic_pipeline_tests.named_stores import COMIC_NAMES

    names = COMIC_NAMES[:6]  # comic 5 has 10 pages: page_2 must come before page_10
    config = dataclasses.replace(TINY, n_comics=len(names))
    url, rows = str(tmp_path / f"{layout}.zarr"), str(tmp_path / "rows.json")
    metadata_url = rows if layout == "legacy" else None
    keys = corpus.write_demo_store(url, config, names=names, layout=layout, metadata_url=metadata_url)
    assert keys == [comic_key(name) for name in names]
    opened = store.Stage3Store.open(url, metadata_url)
    assert opened.layout == layout and opened.quarantined() == {}
    assert opened.names() == dict(zip(keys, names))
    assert opened.modalities() == ({"fused"} if layout == "legacy" else frozenset(MODALITY_ARRAYS))
    for index, (key, name) in enumerate(zip(keys, names)):
        unnamed = corpus.generate_comic(config, index)  # a name changes no content
        comic = opened.comic(key)
        assert comic.page_ids == [f"{name}/page_{n}.jpg" for n in range(1, len(unnamed.page_ids) + 1)]
        np.testing.assert_array_equal(comic.read("fused"), unnamed.arrays["panel_embeddings"])
        np.testing.assert_array_equal(comic.panel_mask(), unnamed.arrays["panel_mask"])
    assert len(opened.comic(keys[5]).page_ids) == 10
    if layout == "legacy":  # what the original scripts leave: junk in padded slots, shuffled rows
        raw = zarr.open_group(url, mode="r")
        masks, values = raw["panel_masks"][...] != 0, raw["panel_embeddings"][...]
        assert (values[~masks] > LEGACY_JUNK - 10).all()
        with open(rows) as handle:
            row_of = {r["canonical_id"]: r["sequence_index"] for r in json.load(handle)}
        reading = [row_of[page_id] for page_id in opened.comic(keys[0]).page_ids]
        assert reading != sorted(reading)


def test_named_and_legacy_demo_stores_refuse_what_they_cannot_write(tmp_path):
    config = dataclasses.replace(TINY, n_comics=2)
    url = str(tmp_path / "x.zarr")
    with pytest.raises(ValueError, match=r"^1 names for a corpus of 2 comics: give one per comic$"):
        corpus.write_demo_store(url, config, names=["only one"])
    with pytest.raises(ValueError, match=r"^layout='legacy' needs metadata_url: where the JSON row list goes$"):
        corpus.write_demo_store(url, config, layout="legacy")
    with pytest.raises(ValueError, match=r"^layout='flat': expected 'native' or 'legacy'$"):
        corpus.write_demo_store(url, config, layout="flat")


def test_an_opt_in_slot_signature_plants_a_positional_trace():
    config = dataclasses.replace(corpus.SIZES["tiny"], n_comics=6)
    plain = corpus.corpus_features(config)
    assert np.array_equal(corpus.corpus_features(dataclasses.replace(config, slot_signature=0.0)).fused,
                          plain.fused)  # off by default, and off means the same corpus
    signed = corpus.corpus_features(dataclasses.replace(config, slot_signature=0.5))
    mask = plain.panel_mask
    # the per-slot mean of the visual difference is the slot's signature: the same on every page
    difference = (signed.visual - plain.visual)[mask]  # (panels, D)
    slots = np.nonzero(mask)[1]
    for slot in (0, 1):
        rows = difference[slots == slot]
        assert np.allclose(rows, rows[0], atol=1e-5) and np.isclose(np.linalg.norm(rows[0]), 0.5, atol=1e-4)
    assert not np.allclose(difference[slots == 0][0], difference[slots == 1][0])
    with pytest.raises(ValueError, match="slot_signature"):
        dataclasses.replace(config, slot_signature=-1.0)
