"""Stage 3 stores whose comics have names as real collections have them (issue 11): both layouts,
~20 comics, shuffled legacy rows, natural page order, junk in every padded slot."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from comic_pipeline import store
from comic_pipeline.comic_names import comic_key
from comic_pipeline.stage3_legacy import LEGACY_JUNK, write_legacy_store

# Spaces, #, parentheses, apostrophes, commas, &, non-ASCII, "/" (legacy folders), 200+ chars, and
# names that differ only in case or punctuation.
COMIC_NAMES = [
    "Amazing Spider-Man (1963) #001",
    "amazing spider-man (1963) #001",
    "Amazing Spider-Man (1963) 001",
    "Amazing Spider-Man (1963) #002",
    "Tintin - L'Île noire",
    "Tintin - L'Ile noire",
    "Action Comics 0001, 1938",
    "Calvin & Hobbes",
    "Astérix le Gaulois",
    "東京喰種 第1巻",
    "Golden Age/Book 000 - Issue #1",
    "Golden Age/Book 000 - Issue #10",
    "Batman: Year One",
    "Spider-Man's Day Off",
    "Les Aventures de Spirou & Fantasio, tome 1 (Dupuis)",
    "Captain Marvel Adventures #" + "very long subtitle " * 11,  # 200+ characters
    "Dragon Ball – 第1巻 «Son Goku»",
    "x-men-001",
    "X-Men 001",
    "Y̆ & Z",
]
# Further names shaped like a collection's, for stores of more than 20 comics.
_SERIES = ("Detective Comics", "Le Journal de Spirou", "Whiz Comics", "Mickey Mouse Weekly",
           "Sandman Vol. 2", "Les Schtroumpfs")


def collection_names(n: int) -> list[str]:
    """`n` names as a collection has them: COMIC_NAMES, then "<series> (<year>) #<issue>"."""
    more = [f"{_SERIES[i % len(_SERIES)]} ({1938 + i}) #{i:03d}" for i in range(max(n - len(COMIC_NAMES), 0))]
    return (COMIC_NAMES + more)[:n]


PADDING_JUNK = LEGACY_JUNK  # the native store's padded slots get the same junk


@dataclass
class NamedStore:
    url: str
    metadata_url: str | None  # legacy only
    pages: dict[str, list[str]] = field(default_factory=dict)  # name -> page ids, reading order
    panels: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (pages,) valid panels
    fused: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (pages, P, D), padding 0

    @property
    def names(self) -> list[str]:
        return list(self.pages)

    def keys(self) -> dict[str, str]:
        return {comic_key(name): name for name in self.pages}


def _comic(rng, name: str, max_panels: int, dim: int):
    n_pages = int(rng.integers(2, 12))
    # page file names whose natural order differs from their string order (page_2 < page_10)
    page_ids = [f"{name}/page_{n}.jpg" for n in range(1, n_pages + 1)]
    panels = rng.integers(1, max_panels + 1, size=n_pages)
    mask = np.arange(max_panels)[None, :] < panels[:, None]  # (pages, P)
    fused = rng.normal(size=(n_pages, max_panels, dim)).astype(np.float32)
    fused[~mask] = 0.0
    return page_ids, panels, mask, fused


def legacy_named_store(tmp_path, *, names=COMIC_NAMES, max_panels=6, dim=16, seed=0) -> NamedStore:
    """The layout of the original Stage 3 scripts (stage3_legacy.write_legacy_store): flat arrays,
    rows shuffled across comics, junk in padded slots and in a few rows no record names."""
    rng = np.random.default_rng(seed)
    named = NamedStore(str(tmp_path / f"legacy-named-{seed}.zarr"), str(tmp_path / f"legacy-named-{seed}.json"))
    comics = []
    for name in names:
        page_ids, panels, mask, fused = _comic(rng, name, max_panels, dim)
        named.pages[name], named.panels[name], named.fused[name] = page_ids, panels, fused
        comics.append((page_ids, fused, mask))
    write_legacy_store(named.url, named.metadata_url, comics, seed=seed, extra_rows=5)
    return named


def native_named_store(tmp_path, *, names=COMIC_NAMES, max_panels=6, dim=16, seed=0,
                       modalities_of=None) -> NamedStore:
    """The native layout written with the store writer; modalities_of(name) -> extra arrays."""
    rng = np.random.default_rng(seed)
    named = NamedStore(str(tmp_path / f"native-named-{seed}.zarr"), None)
    store.create_native_store(named.url, dim=dim, max_panels=max_panels)
    for name in names:
        page_ids, panels, mask, fused = _comic(rng, name, max_panels, dim)
        named.pages[name], named.panels[name], named.fused[name] = page_ids, panels, fused
        stored = fused.copy()
        stored[~mask] = PADDING_JUNK
        arrays = {"panel_embeddings": stored, "panel_mask": mask}
        if modalities_of is not None:
            arrays.update(modalities_of(name, mask, rng))
        store.write_native_comic(named.url, name, page_ids=page_ids, title=name.upper(), arrays=arrays)
    return named
