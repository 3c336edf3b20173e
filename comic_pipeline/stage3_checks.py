"""Checks of the Stage 3 input contract (DESIGN §3) on one comic's arrays: names, shapes, dtypes,
prefix masks, finite values. Readers and the writer run the same checks; every failure is a
Stage3StoreError naming the comic, the array and the problem."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from comic_pipeline.comic_groups import prefix_gap

REQUIRED_ARRAYS = ("panel_embeddings", "panel_mask")
OPTIONAL_ARRAYS = ("visual", "text", "text_mask", "caption")
NATIVE_ARRAYS = REQUIRED_ARRAYS + OPTIONAL_ARRAYS
MASK_ARRAYS = ("panel_mask", "text_mask")
EMBEDDING_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


class Stage3StoreError(ValueError):
    """Bad Stage 3 input. The message names the store or comic, the array and the problem."""


def comic_error(comic: str | None, array: str | None, problem: str) -> Stage3StoreError:
    """Stage3StoreError "comic '<name>', array '<array>': <problem>" (comic: its name)."""
    where = f"comic {comic!r}" if comic is not None else "Stage 3 store"
    if array is not None:
        where += f", array {array!r}"
    return Stage3StoreError(f"{where}: {problem}")


def check_page_ids(comic: str, page_ids: object) -> list[str]:
    if not isinstance(page_ids, (list, tuple)) or not all(isinstance(p, str) for p in page_ids):
        raise comic_error(comic, None, "attribute 'page_ids' must be a list of strings "
                                       f"(got {type(page_ids).__name__})")
    page_ids = list(page_ids)
    if not page_ids:
        raise comic_error(comic, None, "empty comic: it has no pages ('page_ids' is empty)")
    if len(set(page_ids)) != len(page_ids):  # every comic is checked on open: the cheap test first
        unique, counts = np.unique(np.asarray(page_ids, dtype=str), return_counts=True)
        raise comic_error(comic, None, f"duplicate page ids {unique[counts > 1][:5].tolist()}")
    return page_ids


def check_layout(comic: str, n_page_ids: int, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                 *, dim: int, max_panels: int, strict_dtypes: bool = True) -> int:
    """Names, shapes and dtypes of a comic's arrays (metadata only). Returns B, the text boxes
    per panel read from the `text` array (0 without text): the root attrs need not say it."""
    unknown = sorted(set(specs) - set(NATIVE_ARRAYS))
    if unknown:
        raise comic_error(comic, unknown[0], f"unknown array; a comic holds only {list(NATIVE_ARRAYS)}")
    for name in REQUIRED_ARRAYS:
        if name not in specs:
            raise comic_error(comic, name, "required array is missing")
    if "text" in specs and "text_mask" not in specs:
        raise comic_error(comic, "text_mask", "missing: 'text' needs 'text_mask' (valid boxes per panel)")
    if "text_mask" in specs and "text" not in specs:
        raise comic_error(comic, "text", "missing: 'text_mask' is stored without 'text'")

    mask_shape = tuple(specs["panel_mask"][0])
    if len(mask_shape) != 2 or mask_shape[1] != max_panels:
        raise comic_error(comic, "panel_mask", f"mis-shaped: expected 2 axes (pages, P) with "
                                               f"P={max_panels}, got shape {mask_shape}")
    n_pages = mask_shape[0]
    if n_pages == 0:
        raise comic_error(comic, "panel_mask", "empty comic: it has no pages")
    if n_pages != n_page_ids:
        raise comic_error(comic, "panel_mask", f"mis-shaped: {n_pages} pages but 'page_ids' lists "
                                               f"{n_page_ids}")
    max_boxes = 0
    if "text" in specs:
        text_shape = tuple(specs["text"][0])
        if len(text_shape) != 4 or text_shape[2] < 1:
            raise comic_error(comic, "text", f"mis-shaped: expected (pages, P, B, D) with B >= 1, "
                                             f"got {text_shape}")
        max_boxes = int(text_shape[2])

    expected_shapes = {
        "panel_mask": ((n_pages, max_panels), "(pages, P)"),
        "text_mask": ((n_pages, max_panels, max_boxes), "(pages, P, B)"),
        "text": ((n_pages, max_panels, max_boxes, dim), "(pages, P, B, D)"),
    }
    for name, (shape, dtype) in specs.items():
        expected, axes = expected_shapes.get(name, ((n_pages, max_panels, dim), "(pages, P, D)"))
        shape = tuple(shape)
        stated = f"expected {axes} = {expected}, got {shape}"
        if name in MASK_ARRAYS:
            if shape != expected:
                from_text = f" (B={max_boxes} from 'text')" if name == "text_mask" else ""
                raise comic_error(comic, name, f"mis-shaped: {stated}{from_text}")
            if strict_dtypes and np.dtype(dtype) != np.bool_:
                raise comic_error(comic, name, f"dtype {np.dtype(dtype)}, expected bool")
            continue
        # Pages / P / B first, so that a wrong last axis alone reads as a dimension mismatch.
        if len(shape) != len(expected) or shape[:-1] != expected[:-1]:
            raise comic_error(comic, name, f"mis-shaped: {stated} (pages, P and B must agree "
                                           "across arrays and with the root attrs)")
        if shape[-1] != dim:
            raise comic_error(comic, name, f"dimension mismatch: last axis {shape[-1]}, the "
                                           f"store's root attrs say dim={dim}")
        dtype = np.dtype(dtype)
        if strict_dtypes and dtype not in EMBEDDING_DTYPES:
            raise comic_error(comic, name, f"dtype {dtype}, expected float16 or float32")
        if not strict_dtypes and dtype.kind != "f":
            raise comic_error(comic, name, f"dtype {dtype}, expected a floating point type")
    return max_boxes


def check_prefix(comic: str, name: str, page_ids: Sequence[str], mask: np.ndarray) -> None:
    """Valid entries must come first along the last axis: no True after a False."""
    # mask: (pages, P) or (pages, P, B)
    where = prefix_gap(mask)
    if where is not None:
        page = where[0]
        at = f", panel {where[1]}" if mask.ndim == 3 else ""
        raise comic_error(comic, name, f"not a prefix on page {page_ids[page]!r} (row {page}{at}): "
                                       "valid entries must come first, with padding only after them")


def check_masks(comic: str, page_ids: Sequence[str], panel_mask: np.ndarray) -> None:
    check_prefix(comic, "panel_mask", page_ids, panel_mask)
    n_panels = panel_mask.sum(axis=1)  # (pages,)
    if (n_panels == 0).any():
        page = int(np.flatnonzero(n_panels == 0)[0])
        raise comic_error(comic, "panel_mask", f"empty comic page {page_ids[page]!r} (row {page}) "
                                               "has no panels")


def check_finite(comic: str, name: str, page_ids: Sequence[str], values: np.ndarray,
                 valid: np.ndarray) -> None:
    """NaN/Inf in a valid slot is an error; padded slots may hold anything (they are zeroed)."""
    # values: (pages, P[, B], D)   valid: (pages, P[, B])
    bad = ~np.isfinite(values).all(axis=-1) & valid
    if bad.any():
        where = np.argwhere(bad)[0]
        page = int(where[0])
        raise comic_error(comic, name, f"{int(bad.sum())} valid slot(s) hold NaN or Inf, first on "
                                       f"page {page_ids[page]!r} (row {page}), panel {int(where[1])}")


def zero_padding(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """float32 copy of `values` with every slot outside `valid` set to 0."""
    out = np.array(values, dtype=np.float32)  # always a fresh array: callers may mutate it
    out[~valid] = 0.0
    return out


def validate_comic_arrays(comic: str, page_ids: Sequence[str], arrays: Mapping[str, np.ndarray],
                          *, dim: int, max_panels: int) -> None:
    """Every check a reader makes, on in-memory arrays (used before writing)."""
    page_ids = check_page_ids(comic, list(page_ids))
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    check_layout(comic, len(page_ids), {n: (a.shape, a.dtype) for n, a in arrays.items()},
                 dim=dim, max_panels=max_panels)
    panel_mask = arrays["panel_mask"]
    check_masks(comic, page_ids, panel_mask)
    text_mask = None
    if "text_mask" in arrays:
        check_prefix(comic, "text_mask", page_ids, arrays["text_mask"])
        text_mask = arrays["text_mask"] & panel_mask[:, :, None]
    for name, values in arrays.items():
        if name not in MASK_ARRAYS:
            check_finite(comic, name, page_ids, values, text_mask if name == "text" else panel_mask)


class Stage3Changed(Stage3StoreError):
    """Comics whose Stage 3 content differs from the content hash pinned downstream."""


def check_pins(pinned: Mapping[str, str], current: Mapping[str, str],
               names: Mapping[str, str] | None = None) -> None:
    """Raise Stage3Changed naming every comic of `current` whose hash is not its pin (a comic
    without a pin counts as changed: nothing downstream was made from it)."""
    names = names or {}
    changed = [key for key, digest in current.items() if pinned.get(key) != digest]
    if changed:
        described = "; ".join(
            f"comic {str(names.get(key, key))!r} (key {str(key)!r}): pinned "
            f"{(pinned.get(key) or 'nothing')[:12]}, now {current[key][:12]}" for key in changed[:20])
        more = f" and {len(changed) - 20} more" if len(changed) > 20 else ""
        raise Stage3Changed(
            f"Stage 3 content of {len(changed)} comic(s) changed since it was pinned: {described}{more}. "
            "Re-validate them (stage3_panel_embeddings) and regenerate the task datasets "
            "(comic_splits and the tasks group) before training, evaluating or embedding them."
        )
