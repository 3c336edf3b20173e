"""Nearest-page search over a contextualized-embedding store (Stage 5's first use of it).

PageSearch stacks every committed comic's strip embeddings once into a matrix it keeps (refresh()
drops it to see new comics) and ranks pages by cosine similarity. Results carry the comic's key
and its original name.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from comic_pipeline.embedding_store import ContextualizedStore
from comic_pipeline.metrics import top_k_cosine

RESULT_COLUMNS = ("comic_id", "comic_name", "page_number", "page_id")


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({"comic_id": pd.Series(dtype=str), "comic_name": pd.Series(dtype=str),
                         "page_number": pd.Series(dtype=np.int32), "page_id": pd.Series(dtype=str)})


class PageSearch:
    """Cosine nearest-page search over the strip embeddings of `store`."""

    def __init__(self, store: ContextualizedStore):
        self.store = store
        self._index: tuple[np.ndarray, pd.DataFrame] | None = None

    @classmethod
    def open(cls, url: str) -> "PageSearch":
        return cls(ContextualizedStore.open(url))

    def refresh(self) -> None:
        self._index = None

    def strip_matrix(self, comic_ids: Iterable[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
        """Strip embeddings stacked, (N, D) float32, and a table of what each row is: comic_id
        (key), comic_name, page_number (reading order in its comic), page_id.
        comic_ids=None: every committed comic (kept for search)."""
        if comic_ids is None and self._index is not None:
            return self._index
        wanted = self.store.comic_ids() if comic_ids is None else list(comic_ids)
        blocks, tables, dims = [], [], set()
        for comic_id in wanted:
            strips, attrs = self.store.read_strips(comic_id)  # (pages, D)
            blocks.append(strips)
            dims.add(strips.shape[1])
            tables.append(pd.DataFrame({
                "comic_id": comic_id,
                "comic_name": attrs.get("comic_name", comic_id),
                "page_number": np.arange(strips.shape[0], dtype=np.int32),
                "page_id": list(attrs["page_ids"]),
            }))
        if len(dims) > 1:
            raise ValueError(f"store {self.store.url}: comics have different embedding dimensions "
                             f"{sorted(dims)}; they were written by different models — re-embed "
                             "the stale comics")
        if blocks:
            matrix, table = np.concatenate(blocks, axis=0), pd.concat(tables, ignore_index=True)
        else:
            matrix, table = np.zeros((0, 0), dtype=np.float32), _empty_table()
        if comic_ids is None:
            self._index = (matrix, table)
        return matrix, table

    def nearest_pages(self, query, k: int = 10, exclude_self: bool = True) -> pd.DataFrame:
        """The k pages whose strip embeddings are most cosine-similar to `query`.

        query: a (D,) vector, or (comic, page_number) of a stored page, where comic is its key or
        its name. exclude_self drops that page itself from its own results. Returns a table
        comic_id, comic_name, page_number, page_id, score, best first.
        """
        matrix, table = self.strip_matrix()
        if matrix.shape[0] == 0:
            raise ValueError(f"store {self.store.url} holds no committed comics to search")
        self_row = None
        if isinstance(query, tuple):
            comic, page_number = query
            of_comic = (table["comic_id"].to_numpy() == comic) | (table["comic_name"].to_numpy() == comic)
            rows = np.flatnonzero(of_comic & (table["page_number"].to_numpy() == int(page_number)))
            if rows.size == 0:
                raise KeyError(f"page {page_number} of comic {comic!r} is not in {self.store.url}")
            self_row = int(rows[0])
            vector = matrix[self_row]
        else:
            vector = np.asarray(query, dtype=np.float32)
            if vector.shape != (matrix.shape[1],):
                raise ValueError(f"query vector must have shape ({matrix.shape[1]},), got {vector.shape}")
        candidates = matrix.shape[0] - (1 if exclude_self and self_row is not None else 0)
        k = min(int(k), candidates)
        if k < 1:
            return table.iloc[:0].assign(score=np.zeros(0, np.float32))
        if exclude_self and self_row is not None:
            # rank k + 1, then drop the page itself (ties may put it anywhere in the top)
            _, top, scores = next(top_k_cosine(vector[None], matrix, min(k + 1, matrix.shape[0])))
            keep = top[0] != self_row
            top, scores = top[0][keep][:k], scores[0][keep][:k]
        else:
            _, top, scores = next(top_k_cosine(vector[None], matrix, k))
            top, scores = top[0], scores[0]
        result = table.iloc[top].reset_index(drop=True)
        result["score"] = scores.astype(np.float32)
        return result
