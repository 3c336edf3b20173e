"""Fakes shared by the output-store, embedding-pipeline and search tests: small page features,
a deterministic encoder, lazy comic inputs."""

import numpy as np

from comic_pipeline import embedding_pipeline as ep
from comic_pipeline import embedding_store as es
from comic_pipeline.schema import PageFeatures

P, D_IN, D_OUT = 4, 6, 5


def features_of(comic_id: str, n_pages: int, seed: int) -> PageFeatures:
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


def comic_inputs(sizes: dict[str, int], load_log: list | None = None) -> list[ep.ComicInput]:
    inputs = []
    for seed, (comic_id, n_pages) in enumerate(sizes.items()):
        def load(comic_id=comic_id, n_pages=n_pages, seed=seed):
            if load_log is not None:
                load_log.append(comic_id)
            return features_of(comic_id, n_pages, seed)
        inputs.append(ep.ComicInput(comic_id, [f"{comic_id}-p{i:03d}" for i in range(n_pages)],
                                    f"hash-{comic_id}", load))
    return inputs


def write(url, comic_id, n_pages=3, seed=0, version="1", **extra):
    features = features_of(comic_id, n_pages, seed)
    panels, strips = fake_encode(features)
    return es.write_comic(
        url, comic_id, panel_embeddings=panels, strip_embeddings=strips, panel_mask=features.panel_mask,
        page_ids=list(features.page_ids), model_name="seq", model_version=version, mlflow_run_id="run1",
        stage3_content_hash=f"hash-{comic_id}", **extra,
    )
