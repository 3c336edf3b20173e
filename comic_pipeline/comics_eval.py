"""COMICS's own candidate rows, scored verbatim on the test books (DESIGN §9).

Split: by book, with the pipeline's own rule (`splits.assign_splits` on the store's comic names,
the fractions of the `comic_splits` asset), so the test books here are the test comics of the
graph. No text of a test book reaches training: the store holds each book's panels under that
book only, and COMICS rows of train books whose candidates quote a test book's text (easy
distractors are drawn from other books) are dropped before anything learns from them.

A row is scored as it stands: context = its three context panels (their boxes), options = its
candidates (text cloze: three single-box texts; character coherence: the answer panel's two boxes
in each order). Scored by the trained model through its inference API (`model_option_scores`),
beside label-free baselines on the same rows and a learned option-only baseline (sees candidates,
never the context), each with a 95% interval from a bootstrap over books.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from comic_pipeline.comics_folds import BOXES_PER_PANEL, CHARACTER_COHERENCE, TEXT_CLOZE, Fold, FoldRow
from comic_pipeline.comics_import import comic_name_of_book
from comic_pipeline.batching import KIND_PAD, KIND_PANEL, KIND_QUERY, OptionBatch
from comic_pipeline.model import SequenceModel
from comic_pipeline.splits import assign_splits
from comic_pipeline.text_encoder import TextEncoder

# Iyyer et al. 2017 (CVPR), accuracy %, as in the data README. None: not reported.
PUBLISHED: dict[str, dict[str, float | None]] = {
    "random": {"text_cloze_easy": 33.3, "text_cloze_hard": 33.3, "character_coherence": 50.0},
    "text-only": {"text_cloze_easy": 63.4, "text_cloze_hard": 52.9, "character_coherence": 68.2},
    "image-only": {"text_cloze_easy": 51.7, "text_cloze_hard": 49.4, "character_coherence": 70.9},
    "image+text": {"text_cloze_easy": 68.6, "text_cloze_hard": 61.0, "character_coherence": 69.3},
    "human": {"text_cloze_easy": None, "text_cloze_hard": 84.0, "character_coherence": 87.0},
}
CAVEATS = (
    "Published rows: models trained on 2,929 COMICS train books, scored on the test fold, with "
    "image features for image-only / image+text.",
    "Ours: a few hundred DEV books split by book (train / val / test by the pipeline's hash rule); "
    "scored on the test books' own candidate rows. Comparable in task and candidates, not in data.",
    "Ours is text only: a frozen pretrained sentence encoder (all-MiniLM-L6-v2) per text box, no "
    "image features; the folds hold the easy text-cloze variant only.",
    "Intervals: 95% bootstrap over books (rows of one book are not independent).",
)
# fold kind -> the published column it compares with, and the task head that scores it
COLUMN = {TEXT_CLOZE: "text_cloze_easy", CHARACTER_COHERENCE: "character_coherence"}
MODEL_TASK = {TEXT_CLOZE: "text_cloze", CHARACTER_COHERENCE: "character_coherence"}
WORD = re.compile(r"[a-z0-9']+")
STOPWORDS = frozenset("the a an and or of to i you it is in on at me my we he she they be this that "
                      "what for with your unk".split())


# --- split ---------------------------------------------------------------------------------------
def book_splits(book_ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
    """book id -> split, exactly as the graph's comic_splits assigns the book's comic."""
    names = {book: comic_name_of_book(book) for book in book_ids}
    of_name = assign_splits(sorted(set(names.values())), fractions=fractions)
    return {book: of_name[name] for book, name in names.items()}


def kfold_splits(comic_ids: Sequence[str], k: int, part: int, salt: str = "comics-kfold-v1") -> dict[str, str]:
    """comic -> split for part `part` of k-fold by book: test = the comics whose stable hash falls
    in bucket `part`; of the others, ~1/9 are val (stable hash) and the rest train. Over the k
    parts every comic is a test comic exactly once."""
    if k < 2 or not 0 <= part < k:
        raise ValueError(f"k-fold needs k >= 2 and 0 <= part < k, got k={k}, part={part}")
    inner = assign_splits(comic_ids, fractions=(8, 1, 0), salt=salt + "/val")
    splits = {}
    for comic_id in comic_ids:
        digest = hashlib.sha256(f"{salt}\x00{comic_id}".encode()).digest()
        bucket = int.from_bytes(digest[:8], "big") % k
        splits[comic_id] = "test" if bucket == part else inner[comic_id]
    return splits


def book_texts(rows: Sequence[FoldRow]) -> dict[str, set[str]]:
    """book -> every string the rows show as that book's own panels (context boxes, answers)."""
    texts: dict[str, set[str]] = {}
    for row in rows:
        own = texts.setdefault(row.book_id, set())
        for boxes in row.context_boxes:
            own.update(boxes)
        own.update(row.answer_boxes)
    return texts


def training_rows(rows: Sequence[FoldRow], split_of: Mapping[str, str],
                  test_texts: set[str]) -> tuple[list[FoldRow], int]:
    """Rows of train books that quote no test-book text in any cell; (rows, dropped)."""
    kept, dropped = [], 0
    for row in rows:
        if split_of.get(row.book_id) != "train":
            continue
        cells = {s for boxes in (*row.context_boxes, *row.candidates) for s in boxes}
        if cells & test_texts:
            dropped += 1
            continue
        kept.append(row)
    return kept, dropped


# --- rows as arrays ------------------------------------------------------------------------------
@dataclass
class RowArrays:
    kind: str
    context_text: np.ndarray  # (n, 3, X, D) unit box vectors, zero where no box
    context_mask: np.ndarray  # (n, 3, X) bool
    option_text: np.ndarray  # (n, K, X, D)
    option_mask: np.ndarray  # (n, K, X) bool
    labels: np.ndarray  # (n,) index of the true option
    books: np.ndarray  # (n,) str
    rows: list[FoldRow]

    @property
    def n(self) -> int:
        return len(self.rows)


def row_arrays(rows: Sequence[FoldRow], encoder: TextEncoder) -> RowArrays:
    """Encode (cached) every box of `rows` (all of one kind) into padded arrays."""
    kinds = {row.kind for row in rows}
    if len(kinds) != 1:
        raise ValueError(f"row_arrays: rows of one fold kind expected, got {sorted(kinds)}")
    rows = list(rows)
    X, K = BOXES_PER_PANEL, len(rows[0].candidates)
    strings = sorted({s for r in rows for boxes in (*r.context_boxes, *r.candidates) for s in boxes})
    index = {s: i for i, s in enumerate(strings)}
    vectors = encoder.encode(strings)  # (S, D)
    n, D = len(rows), encoder.dim

    def fill(groups: Callable[[FoldRow], Sequence[tuple[str, ...]]], width: int):
        text = np.zeros((n, width, X, D), dtype=np.float32)
        mask = np.zeros((n, width, X), dtype=bool)
        for i, row in enumerate(rows):
            for j, boxes in enumerate(groups(row)):
                for b, string in enumerate(boxes[:X]):
                    text[i, j, b] = vectors[index[string]]
                    mask[i, j, b] = True
        return text, mask

    context_text, context_mask = fill(lambda r: r.context_boxes, 3)
    option_text, option_mask = fill(lambda r: r.candidates, K)
    return RowArrays(kind=rows[0].kind, context_text=context_text, context_mask=context_mask,
                     option_text=option_text, option_mask=option_mask,
                     labels=np.asarray([r.label for r in rows], dtype=np.int64),
                     books=np.asarray([r.book_id for r in rows]), rows=rows)


# --- the model -----------------------------------------------------------------------------------
@torch.no_grad()
def model_option_scores(model: SequenceModel, arrays: RowArrays, *, batch_size: int = 512) -> np.ndarray:
    """(n, K) option scores of the trained model on verbatim rows.

    The rows become the model's own OptionBatch (batching.py): context = 3 panels at positions 0..2 (every text modality the model has:
    fused = mean of the boxes, and the boxes), a query token at position 3 that shows nothing else
    (text only: no visual of the answer panel exists), options = text only (boxes in the order of
    each candidate)."""
    config = model.config
    task = MODEL_TASK[arrays.kind]
    if "text" not in config.modalities:
        raise ValueError(f"the model has no text modality ({config.modalities}); it cannot score "
                         "COMICS rows")
    if config.max_panels + 1 < 4 or config.dim != arrays.context_text.shape[-1]:
        raise ValueError(f"model (max_panels {config.max_panels}, dim {config.dim}) does not fit "
                         f"COMICS rows (3 context panels + query, dim {arrays.context_text.shape[-1]})")
    X = config.max_boxes
    L = config.max_panels + 1
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, arrays.n, batch_size):
        part = slice(start, start + batch_size)
        B = len(arrays.labels[part])
        text = torch.zeros((B, L, X, config.dim))
        mask = torch.zeros((B, L, X), dtype=torch.bool)
        width = min(X, arrays.context_text.shape[2])
        text[:, :3, :width] = torch.as_tensor(arrays.context_text[part, :, :width])
        mask[:, :3, :width] = torch.as_tensor(arrays.context_mask[part, :, :width])
        kind = torch.full((B, L), KIND_PAD, dtype=torch.long)
        kind[:, :3] = KIND_PANEL
        kind[:, 3] = KIND_QUERY
        is_panel = kind == KIND_PANEL
        context = {"text": text, "text_mask": mask & is_panel[..., None], "has_text": is_panel}
        if "fused" in config.modalities:
            n_boxes = mask.sum(-1, keepdim=True).clamp_min(1)
            context["fused"] = (text * mask[..., None]).sum(-2) / n_boxes
            context["has_fused"] = is_panel
        option_text = torch.zeros((B, arrays.option_text.shape[1], X, config.dim))
        option_mask = torch.zeros((B, arrays.option_text.shape[1], X), dtype=torch.bool)
        option_text[:, :, :width] = torch.as_tensor(arrays.option_text[part, :, :width])
        option_mask[:, :, :width] = torch.as_tensor(arrays.option_mask[part, :, :width])
        options = {"text": option_text, "text_mask": option_mask, "has_text": option_mask.any(-1)}
        batch = OptionBatch(task, context, kind, torch.arange(L).expand(B, L),
                            torch.full((B,), 3, dtype=torch.long), options,
                            torch.as_tensor(arrays.labels[part], dtype=torch.long))
        out.append(model.task_logits(batch).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, arrays.option_text.shape[1]), np.float32)


# --- label-free baselines ------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _words(text: str) -> set[str]:
    return {w for w in WORD.findall(text.lower()) if w not in STOPWORDS}


def _argmax_ties(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row-wise argmax, ties broken uniformly at random (seeded)."""
    jitter = rng.random(scores.shape) * 1e-9
    best = scores.max(axis=1, keepdims=True)
    return np.argmax(np.where(np.isclose(scores, best, rtol=0, atol=1e-12), 1.0 + jitter, jitter), axis=1)


def baseline_predictions(arrays: RowArrays, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> (n,) predicted option of each label-free heuristic on the rows."""
    rng = np.random.default_rng(seed)
    rows = arrays.rows
    box_sum = (arrays.context_text * arrays.context_mask[..., None]).sum(2)  # (n, 3, D)
    context_mean = _unit(box_sum.sum(1))  # (n, D)
    has_text = arrays.context_mask.any(-1)  # (n, 3)
    last = np.where(has_text.any(1), 2 - np.argmax(has_text[:, ::-1], axis=1), 0)
    last_panel = _unit(box_sum[np.arange(arrays.n), last])  # (n, D)
    context_words = [set().union(*(_words(s) for boxes in r.context_boxes for s in boxes)) for r in rows]
    predictions: dict[str, np.ndarray] = {}
    if arrays.kind == TEXT_CLOZE:
        option = _unit(arrays.option_text[:, :, 0])  # (n, K, D) one box per candidate
        cosine = np.einsum("nkd,nd->nk", option, context_mean)
        cosine_last = np.einsum("nkd,nd->nk", option, last_panel)
        overlap = np.asarray([[len(_words(c[0]) & cw) / max(1, len(_words(c[0]))) for c in r.candidates]
                              for r, cw in zip(rows, context_words)])
        length = np.asarray([[len(c[0].split()) for c in r.candidates] for r in rows], dtype=float)
        predictions.update({
            "most like the context (encoder cosine)": _argmax_ties(cosine, rng),
            "least like the context (encoder cosine)": _argmax_ties(-cosine, rng),
            "most like the last context panel (cosine)": _argmax_ties(cosine_last, rng),
            "most word overlap with the context": _argmax_ties(overlap, rng),
            "longest candidate": _argmax_ties(length, rng),
        })
    else:  # character coherence: which box goes first
        first = np.asarray([[c[0] for c in r.candidates] for r in rows])  # (n, 2) first box shown
        first_len = np.vectorize(lambda s: len(s.split()))(first).astype(float)
        first_vec = _unit(arrays.option_text[:, :, 0])
        cosine_first = np.einsum("nkd,nd->nk", first_vec, last_panel)
        overlap_first = np.asarray([[len(_words(s) & cw) / max(1, len(_words(s))) for s in f]
                                    for f, cw in zip(first, context_words)])
        question_first = np.vectorize(lambda s: float("?" in s))(first)
        predictions.update({
            "longer box first": _argmax_ties(first_len, rng),
            "shorter box first": _argmax_ties(-first_len, rng),
            "box closer to the last context panel first (cosine)": _argmax_ties(cosine_first, rng),
            "box sharing more words with the context first": _argmax_ties(overlap_first, rng),
            "question box first": _argmax_ties(question_first, rng),
        })
    return predictions


# --- the learned option-only baseline --------------------------------------------------------------
def _option_features(arrays: RowArrays) -> np.ndarray:
    """(n, K, F) what an option-only model sees: each candidate's boxes in its order + lengths."""
    lengths = np.asarray([[[len(b.split()) / 30.0 for b in c] + [0.0] * (2 - len(c)) for c in r.candidates]
                          for r in arrays.rows], dtype=np.float32)  # (n, K, 2)
    boxes = arrays.option_text[:, :, :2].reshape(arrays.n, arrays.option_text.shape[1], -1)
    return np.concatenate([boxes, lengths], axis=2)


def option_only_predictions(train: RowArrays, test: RowArrays, *, seed: int = 0,
                            steps: int = 300) -> np.ndarray:
    """A small MLP scorer trained on train rows that sees ONLY the candidates (never the
    context): the "hypothesis-only" control. (n_test,) predictions."""
    torch.manual_seed(seed)
    x_train = torch.as_tensor(_option_features(train))
    y_train = torch.as_tensor(train.labels)
    scorer = torch.nn.Sequential(torch.nn.Linear(x_train.shape[-1], 64), torch.nn.GELU(),
                                 torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(scorer(x_train).squeeze(-1), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return scorer(torch.as_tensor(_option_features(test))).squeeze(-1).argmax(1).numpy()


# --- figures ---------------------------------------------------------------------------------------
def book_bootstrap_interval(correct: np.ndarray, books: np.ndarray, *, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of accuracy, resampling books (clusters) with replacement."""
    if correct.size == 0:
        return math.nan, math.nan
    names, code = np.unique(books, return_inverse=True)
    hits = np.bincount(code, weights=correct.astype(float), minlength=len(names))
    counts = np.bincount(code, minlength=len(names)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(names), size=(n_boot, len(names)))
    accuracy = hits[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    low, high = np.percentile(accuracy, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Scored:
    """Per-row outcomes of one method on one fold file (one split, or one of k folds)."""

    fold: str  # fold file
    kind: str
    method: str
    group: str  # "model" | "label-free" | "option-only"
    correct: np.ndarray  # (n,) bool
    books: np.ndarray  # (n,) str


def scored(fold: str, arrays: RowArrays, method: str, predictions: np.ndarray, group: str) -> Scored:
    return Scored(fold, arrays.kind, method, group, np.asarray(predictions) == arrays.labels, arrays.books)


@dataclass
class ScoreRow:
    fold: str  # fold file
    kind: str
    method: str
    n_rows: int
    n_books: int
    accuracy: float
    low: float
    high: float
    group: str  # "model" | "label-free" | "option-only"


def summarize(outcomes: Sequence[Scored]) -> list[ScoreRow]:
    """One table row per (fold file, method): outcomes of several k-fold parts are pooled, so
    every row of every book counts once."""
    pooled: dict[tuple[str, str, str], list[Scored]] = {}
    for outcome in outcomes:
        pooled.setdefault((outcome.fold, outcome.group, outcome.method), []).append(outcome)
    rows = []
    for (fold, group, method), parts in pooled.items():
        correct = np.concatenate([p.correct for p in parts])
        books = np.concatenate([p.books for p in parts])
        low, high = book_bootstrap_interval(correct, books)
        rows.append(ScoreRow(fold, parts[0].kind, method, int(correct.size), len(set(books.tolist())),
                             float(correct.mean()) if correct.size else math.nan, low, high, group))
    return rows


def comics_table(rows: Sequence[ScoreRow], extra_notes: Sequence[str] = ()) -> str:
    """The COMICS table: ours per fold beside the published numbers, then the caveats."""
    lines = []
    for fold in dict.fromkeys(r.fold for r in rows):
        ours = [r for r in rows if r.fold == fold]
        column = COLUMN[ours[0].kind]
        lines.append(f"\n{fold} ({ours[0].kind}; published column {column!r})")
        lines.append(f"  {'method':<66} {'acc %':>6} {'95% CI (books)':>16} {'rows':>6} {'books':>6}")
        for r in ours:
            interval = f"[{100 * r.low:5.1f}, {100 * r.high:5.1f}]" if not math.isnan(r.low) else "-"
            lines.append(f"  {r.group + ': ' + r.method:<66} {100 * r.accuracy:6.1f} {interval:>16} "
                         f"{r.n_rows:6d} {r.n_books:6d}")
        for model, columns in PUBLISHED.items():
            value = columns[column]
            if value is not None:
                lines.append(f"  {'published (Iyyer et al. 2017): ' + model:<66} {value:6.1f} "
                             f"{'':>16} {'test fold':>13}")
    lines.append("\nCaveats:")
    lines.extend(f"  - {note}" for note in (*CAVEATS, *extra_notes))
    return "\n".join(lines)


# --- the evaluation of one trained model ---------------------------------------------------------
def comics_outcomes(folds: Sequence[Fold], split_of_comic: Mapping[str, str], encoder: TextEncoder,
                    model: SequenceModel, trained_tasks: Sequence[str], skipped: Mapping[str, str],
                    *, seed: int = 0) -> tuple[list[Scored], list[str]]:
    """Per-row outcomes on the test books of every fold file: the model (when its head was
    trained), the label-free heuristics, the learned option-only baseline; and the notes.
    `split_of_comic`: comic name -> split (the graph's comic_splits)."""
    all_rows = [row for fold in folds for row in fold.rows]
    books = sorted({row.book_id for row in all_rows})
    split_of = {b: split_of_comic.get(comic_name_of_book(b), "left out") for b in books}
    texts = book_texts(all_rows)
    test_texts = set().union(*(texts[b] for b in books if split_of[b] == "test"))
    train_texts = set().union(*(texts[b] for b in books if split_of[b] == "train"))
    outcomes, notes = [], []
    for fold in folds:
        test = [r for r in fold.rows if split_of[r.book_id] == "test"]
        if not test:
            notes.append(f"{fold.name}: no row of a test book; nothing scored")
            continue
        arrays = row_arrays(test, encoder)
        task = MODEL_TASK[fold.kind]
        if task in trained_tasks:
            scores = model_option_scores(model, arrays)
            outcomes.append(scored(fold.name, arrays, f"ours ({task} head, text only)",
                                   scores.argmax(1), "model"))
            notes.extend(error_examples(arrays, scores.argmax(1)))
        else:
            why = skipped.get(task, "no train samples")
            notes.append(f"{fold.name}: the model has no trained {task} head ({why}), so no model row")
        for name, predictions in baseline_predictions(arrays, seed=seed).items():
            outcomes.append(scored(fold.name, arrays, name, predictions, "label-free"))
        train_rows, dropped = training_rows(fold.rows, split_of, test_texts)
        if train_rows:
            train_arrays = row_arrays(train_rows, encoder)
            predictions = option_only_predictions(train_arrays, arrays, seed=seed)
            outcomes.append(scored(fold.name, arrays, "learned option-only (MLP, no context)",
                                   predictions, "option-only"))
        answers_seen = np.mean([any(s in train_texts for s in r.answer_boxes) for r in test])
        notes.append(f"{fold.name}: {len(test)} test rows of {len(set(r.book_id for r in test))} test books; "
                     f"option-only trained on {len(train_rows)} train-book rows ({dropped} dropped for "
                     f"quoting test-book text); {100 * answers_seen:.1f}% of test answers also occur "
                     "verbatim in train books (common phrases: 'UNK !' ...)")
    return outcomes, notes


def _short(boxes, width: int = 48) -> str:
    text = " / ".join(boxes) or "(no text)"
    return text if len(text) <= width else text[:width - 1] + "…"


def error_examples(arrays: RowArrays, predictions, n: int = 3) -> list[str]:
    """A few rows the model gets wrong, as notes: where, the context, what it picked, the truth."""
    wrong = np.flatnonzero(np.asarray(predictions) != arrays.labels)[:n]
    return [f"model error {row.source}:{row.line} (book {row.book_id}): context "
            f"[{' | '.join(_short(b, 32) for b in row.context_boxes)}] picked "
            f"'{_short(row.candidates[predictions[i]])}', true '{_short(row.answer_boxes)}'"
            for i, row in ((i, arrays.rows[i]) for i in wrong)]
