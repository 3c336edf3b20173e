"""Real collection names through both Stage 3 layouts, the embedder, the output store and search."""

import numpy as np
import pytest

from comic_pipeline import embedding_pipeline as ep
from comic_pipeline.comic_names import comic_key
from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.page_search import PageSearch
from comic_pipeline.store import Stage3Store
from comic_pipeline_tests.embedding_fakes import fake_encode
from comic_pipeline_tests.named_stores import COMIC_NAMES, legacy_named_store, native_named_store


def _open(named):
    return Stage3Store.open(named.url, named.metadata_url)


@pytest.mark.parametrize("layout", ["legacy", "native"])
def test_every_name_is_a_comic_with_its_pages_in_natural_order(tmp_path, layout):
    named = (legacy_named_store if layout == "legacy" else native_named_store)(tmp_path)
    opened = _open(named)
    assert opened.layout == layout and opened.quarantined() == {}
    assert opened.names() == named.keys() and len(opened.comic_ids()) == len(COMIC_NAMES) == 20
    for key, name in named.keys().items():
        comic = opened.comic(key)
        assert comic.name == name and comic.page_ids == named.pages[name]  # page_2 before page_10
        features = comic.features()
        np.testing.assert_array_equal(features.fused, named.fused[name])  # junk padding zeroed
        np.testing.assert_array_equal(features.panel_mask.sum(1), named.panels[name])
        assert set(features.comic_ids) == {key} and comic.validate().name == name


def test_names_reach_the_output_store_and_search(tmp_path):
    named = legacy_named_store(tmp_path)
    opened = _open(named)
    inputs = [ep.ComicInput.from_reader(opened.comic(key)) for key in opened.comic_ids()]
    out_url = str(tmp_path / "ctx.zarr")
    encode = lambda batch: fake_encode(_six_to_dim(batch))  # noqa: E731
    written = ep.embed_and_write(out_url, inputs, encode, batch_pages=7, model_name="m",
                                 model_version="1", mlflow_run_id=None)
    assert {w.name for w in written} == set(COMIC_NAMES)
    output = ContextualizedStore.open(out_url)
    assert output.comic_names() == named.keys()
    tintin = comic_key("Tintin - L'Île noire")
    assert output.read(tintin).page_ids == named.pages["Tintin - L'Île noire"]
    hits = PageSearch(output).nearest_pages(("Tintin - L'Île noire", 0), k=5)
    assert set(hits["comic_name"]) <= set(COMIC_NAMES) and len(hits) == 5
    assert all(named.keys()[key] == name for key, name in zip(hits["comic_id"], hits["comic_name"]))


def _six_to_dim(batch):
    """embedding_fakes.fake_encode projects 6 input dims; these stores have 16."""
    import dataclasses

    return dataclasses.replace(batch, fused=batch.fused[..., :6])


def test_comics_with_different_modalities_share_embedding_batches(tmp_path):
    def modalities_of(name, mask, rng):
        index = COMIC_NAMES.index(name)
        extra = {}
        if index % 2:
            extra["visual"] = rng.normal(size=mask.shape + (16,)).astype(np.float32)
        if index % 3 == 0:
            boxes = 1 + index % 4
            text_mask = np.zeros(mask.shape + (boxes,), bool)
            text_mask[..., 0] = mask
            extra["text"] = rng.normal(size=mask.shape + (boxes, 16)).astype(np.float32)
            extra["text_mask"] = text_mask
        return extra

    named = native_named_store(tmp_path, modalities_of=modalities_of)
    opened = _open(named)
    assert len({opened.comic(key).modalities for key in opened.comic_ids()}) > 2
    seen = []

    def encode(batch):
        seen.append(batch.modalities)
        return fake_encode(_six_to_dim(batch))

    inputs = [ep.ComicInput.from_reader(opened.comic(key)) for key in opened.comic_ids()]
    written = ep.embed_and_write(str(tmp_path / "ctx.zarr"), inputs, encode, batch_pages=16,
                                 model_name="m", model_version="1", mlflow_run_id=None)
    assert len(written) == 20 and all(modalities == {"fused"} or "fused" in modalities for modalities in seen)
    assert ContextualizedStore.open(str(tmp_path / "ctx.zarr")).comic_names() == named.keys()
