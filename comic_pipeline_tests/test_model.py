"""The panel-sequence transformer: shapes, masking, gradients into the encoder, losses, errors.

`synthetic_problem` (also used by test_training) builds small PageFeatures with a planted
learnable rule (panel t+1 = A @ panel t + noise; visual, text boxes and caption are fixed linear
views of the panel) and TaskDatasets of all seven tasks following the schema contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comic_pipeline.batching import (
    KIND_MASK,
    KIND_QUERY,
    OrderBatch,
    TaskBatches,
    feature_tables,
    task_batch,
)
from comic_pipeline.model import (
    ModelConfig,
    SequenceModel,
    dropout_view,
    order_scores,
    pairwise_order_loss,
    scores_to_order,
)
from comic_pipeline.schema import MASK, PAD, SPLITS, TASK_NAMES, PageFeatures, TaskDataset
from comic_pipeline.tasks import TASKS
from comic_pipeline.train_config import TrainConfig


# --- a synthetic problem -----------------------------------------------------------------------
def _with_answer(answer: np.ndarray, distractors: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(M,), (M, K-1), (M,) -> (M, K) options with the answer at `label`."""
    M, K = distractors.shape[0], distractors.shape[1] + 1
    at_label = np.arange(K)[None, :] == label[:, None]
    options = np.empty((M, K), dtype=np.int64)
    options[at_label] = answer
    options[~at_label] = distractors.reshape(-1)
    return options


def _distractors(rng, pages: np.ndarray, k: int, candidates: np.ndarray, P: int) -> np.ndarray:
    """(M, k) distinct flat refs from `candidates`, none on the sample's own page."""
    picks = candidates[rng.integers(len(candidates), size=(len(pages), k))]
    while True:
        same_page = picks // P == pages[:, None]
        ordered = np.sort(picks, axis=1)
        repeated = np.zeros_like(same_page)
        repeated[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]).any(1, keepdims=True)
        bad = same_page | repeated
        if not bad.any():
            return picks
        picks[bad] = candidates[rng.integers(len(candidates), size=int(bad.sum()))]


def synthetic_problem(n_comics: int = 12, pages_per_comic: int = 8, max_panels: int = 6, dim: int = 16,
                      max_boxes: int = 3, seed: int = 0, drift: float = 0.0,
                      ) -> tuple[PageFeatures, dict[str, TaskDataset]]:
    """`drift` > 0 adds `drift * t` along one fixed direction to panel t: a per-panel trace of
    the reading order, which makes reading_order learnable by a tiny model in a few steps."""
    rng = np.random.default_rng(seed)
    N, P, D, X = n_comics * pages_per_comic, max_panels, dim, max_boxes
    n_panels = rng.integers(3, P + 1, size=N)
    panel_mask = np.arange(P)[None, :] < n_panels[:, None]  # (N, P)
    transition, _ = np.linalg.qr(rng.normal(size=(D, D)))  # the planted rule
    x = np.zeros((N, P, D))
    x[:, 0] = rng.normal(size=(N, D))
    for t in range(1, P):
        x[:, t] = x[:, t - 1] @ transition.T + 0.2 * rng.normal(size=(N, D))
    x += drift * np.arange(P)[None, :, None] * rng.normal(size=D) / np.sqrt(D)
    x *= panel_mask[..., None]
    view = lambda: rng.normal(size=(D, D)) / np.sqrt(D)  # noqa: E731
    visual = x @ view().T
    box_maps = np.stack([view() for _ in range(X)])  # box b of a panel = box_maps[b] @ panel
    n_boxes = rng.integers(0, X + 1, size=(N, P)) * panel_mask
    n_boxes[:, : 3] = np.maximum(n_boxes[:, : 3], 2)  # enough panels with >= 2 boxes
    text_mask = np.arange(X)[None, None, :] < n_boxes[..., None]  # (N, P, X)
    text = np.einsum("bed,npd->npbe", box_maps, x) * text_mask[..., None]
    caption = x @ view().T
    comic_ids = np.repeat([f"comic{c:02d}" for c in range(n_comics)], pages_per_comic)
    page_numbers = np.tile(np.arange(pages_per_comic, dtype=np.int32), n_comics)
    features = PageFeatures(
        comic_ids=comic_ids, page_numbers=page_numbers,
        page_ids=np.array([f"{c}/p{p}" for c, p in zip(comic_ids, page_numbers)]),
        panel_mask=panel_mask, fused=x.astype(np.float32), visual=visual.astype(np.float32),
        text=text.astype(np.float32), text_mask=text_mask, caption=caption.astype(np.float32),
    )

    split_of_page = np.array(SPLITS)[np.repeat(
        np.where(np.arange(n_comics) < n_comics * 0.6, 0, np.where(np.arange(n_comics) < n_comics * 0.8, 1, 2)),
        pages_per_comic)]
    slots = np.arange(P)[None, :]
    all_panels = np.flatnonzero(panel_mask.reshape(-1))
    with_text = np.flatnonzero((n_boxes > 0).reshape(-1))
    samples: dict[str, dict[str, np.ndarray]] = {}

    pages = np.arange(N)
    s = rng.integers(1, n_panels)  # answer slot s >= 1, context 0..s-1
    closure_context = np.where(slots < s[:, None], slots, PAD).astype(np.int16)
    answer = pages * P + s

    missing = rng.integers(0, n_panels)
    filling_context = np.where(slots < n_panels[:, None], slots, PAD)
    filling_context[pages, missing] = MASK
    label = rng.integers(0, 5, size=N)
    samples["sequence_filling"] = dict(
        page=pages, context=filling_context.astype(np.int16), label=label,
        options=_with_answer(pages * P + missing, _distractors(rng, pages, 4, all_panels, P), label))
    label = rng.integers(0, 5, size=N)
    samples["visual_closure"] = dict(
        page=pages, context=closure_context, label=label,
        options=_with_answer(answer, _distractors(rng, pages, 4, all_panels, P), label))
    keep = n_boxes[pages, s] > 0
    label = rng.integers(0, 4, size=keep.sum())
    samples["text_closure"] = dict(
        page=pages[keep], context=closure_context[keep], label=label, option_visual=answer[keep],
        options=_with_answer(answer[keep], _distractors(rng, pages[keep], 3, with_text, P), label))
    label = rng.integers(0, 4, size=N)
    samples["caption_relevance"] = dict(
        page=pages, context=np.full((N, P), PAD, np.int16), caption_of=answer - 1, label=label,
        options=_with_answer(answer, _distractors(rng, pages, 3, all_panels, P), label))
    keep = n_boxes[pages, s] >= 2
    label = rng.integers(0, 2, size=keep.sum())
    true_boxes = np.where(np.arange(X)[None, :] < n_boxes[pages, s][keep][:, None], np.arange(X), PAD)
    swapped = true_boxes.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    box_order = np.where((np.arange(2)[None, :] == label[:, None])[..., None], true_boxes[:, None], swapped[:, None])
    samples["character_coherence"] = dict(
        page=pages[keep], context=closure_context[keep], label=label, options=np.repeat(answer[keep, None], 2, 1),
        box_order=box_order.astype(np.int16))
    cloze_slot = rng.integers(3, np.maximum(n_panels, 4))
    keep = (n_panels >= 4) & (n_boxes[pages, np.minimum(cloze_slot, P - 1)] > 0)
    cloze_slot = cloze_slot[keep]
    cloze_answer = pages[keep] * P + cloze_slot
    label = rng.integers(0, 3, size=keep.sum())
    cloze_context = np.full((keep.sum(), P), PAD, np.int16)
    cloze_context[:, :3] = cloze_slot[:, None] - 3 + np.arange(3)
    samples["text_cloze"] = dict(
        page=pages[keep], context=cloze_context, label=label, option_visual=cloze_answer,
        variant=np.zeros(keep.sum(), np.int8),
        options=_with_answer(cloze_answer, _distractors(rng, pages[keep], 2, with_text, P), label))
    keys = np.where(panel_mask, rng.random((N, P)), np.inf)
    samples["reading_order"] = dict(
        page=pages, order=np.where(panel_mask, np.argsort(keys, axis=1), PAD).astype(np.int16))

    datasets = {}
    for task in TASK_NAMES:
        fields = samples[task]
        fields["page"] = fields["page"].astype(np.int32)
        if "label" in fields:
            fields["label"] = fields["label"].astype(np.int16)
        split_of_sample = split_of_page[fields["page"]]
        datasets[task] = TaskDataset(
            task=task, comic_ids=comic_ids, page_numbers=page_numbers, max_panels=P,
            splits={split: {k: v[split_of_sample == split] for k, v in fields.items()} for split in SPLITS},
            attrs={"seed": seed},
        )
    return features, datasets


def tiny_model(features: PageFeatures, **overrides) -> SequenceModel:
    config = TrainConfig.from_preset("tiny", **overrides).model_config(features)
    torch.manual_seed(0)
    return SequenceModel(config)


def batch_of(task: str, features: PageFeatures, dataset: TaskDataset, n: int = 8, split: str = "train"):
    samples = dataset.splits[split].take(np.arange(n)).map(torch.as_tensor)
    return task_batch(TASKS[task], samples, feature_tables(features, torch.device("cpu")),
                      tuple(sorted(features.modalities)), features.max_panels)


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem()


# --- tests -------------------------------------------------------------------------------------
def test_synthetic_problem_follows_the_contract(problem):
    features, datasets = problem
    assert set(datasets) == set(TASK_NAMES)
    for task, dataset in datasets.items():
        assert dataset.n_samples("train") > 10, task
        samples = dataset.splits["train"]
        if TASKS[task].n_options:
            assert samples.options.shape[1] == TASKS[task].n_options
            refs = samples.options
            assert features.panel_mask.reshape(-1)[refs].all(), task


def test_forward_shape_and_padding(problem):
    features, _ = problem
    model = tiny_model(features).eval()
    fused = torch.as_tensor(features.fused[:5])  # (5, P, D), padded slots zero
    out = model(fused)
    assert out.shape == (5, features.max_panels, model.config.d_model)
    pad = ~torch.as_tensor(features.panel_mask[:5])
    assert pad.any() and (out[pad] == 0).all()
    assert (out[~pad].abs().sum(-1) > 0).all()
    # pages do not see each other: a page alone gives the same output as inside a batch
    assert torch.allclose(model(fused[:1]), out[:1], atol=1e-5)


def test_wrong_input_dim_is_a_clear_error(problem):
    features, _ = problem
    model = tiny_model(features)
    with pytest.raises(ValueError, match=r"dim 7.*expect dim 16"):
        model(torch.ones(2, features.max_panels, 7))
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("huge")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_trains_the_encoder(problem, task):
    features, datasets = problem
    model = tiny_model(features)
    loss, logits = model(batch_of(task, features, datasets[task]))
    assert torch.isfinite(loss)
    loss.backward()
    for index, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{task}: block {index} {name} got no gradient"
    if TASKS[task].family == "order":
        assert logits.shape == (8, features.max_panels)  # Borda panel scores
    else:
        assert logits.shape == (8, TASKS[task].n_options)


def test_strip_loss_trains_the_pooling_query(problem):
    features, _ = problem
    model = tiny_model(features)
    tables = feature_tables(features, torch.device("cpu"))
    loss, _ = model.strip_loss(TaskBatches({}, features).pages(np.arange(16)),
                               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.strip_query.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert tables["fused"].shape == (features.n_pages * features.max_panels, features.dim)


def test_sequence_filling_hides_the_answer_and_text_queries_show_only_visual(problem):
    features, datasets = problem
    batch = batch_of("sequence_filling", features, datasets["sequence_filling"])
    at_mask = batch.kind == KIND_MASK
    assert (at_mask.sum(1) == 1).all()
    for modality in features.modalities:
        assert not batch.context[f"has_{modality}"][at_mask].any()  # no features at the mask
    assert (batch.query_index == at_mask.long().argmax(1)).all()
    for task in ("text_closure", "text_cloze"):
        batch = batch_of(task, features, datasets[task])
        at_query = batch.kind == KIND_QUERY
        assert (at_query.sum(1) == 1).all()
        assert batch.context["has_visual"][at_query].all()
        for modality in ("fused", "text", "caption"):
            assert not batch.context[f"has_{modality}"][at_query].any(), (task, modality)


def test_character_coherence_options_differ_only_by_box_order(problem):
    features, datasets = problem
    model = tiny_model(features).eval()
    batch = batch_of("character_coherence", features, datasets["character_coherence"])
    options = model.embed_panels(batch.options)  # (B, 2, d)
    assert not torch.allclose(options[:, 0], options[:, 1])
    # the same multiset of boxes: only the order (box-position embedding) separates the options
    text = batch.options["text"]
    assert torch.allclose(text[:, 0].sum(1), text[:, 1].sum(1), atol=1e-5)


def test_reading_order_input_carries_no_positional_signal(problem):
    features, datasets = problem
    model = tiny_model(features).eval()
    batch = batch_of("reading_order", features, datasets["reading_order"])
    assert isinstance(batch, OrderBatch)  # no slot positions at all
    scores = model.task_logits(batch)  # (B, P, P) pair logits
    # shuffle the input positions of every sample: the logits move with their panels
    perm = torch.randperm(features.max_panels, generator=torch.Generator().manual_seed(1))
    permuted = OrderBatch(batch.task, {k: v[:, perm] for k, v in batch.context.items()},
                          batch.kind[:, perm], batch.order[:, perm])
    assert torch.allclose(model.task_logits(permuted), scores[:, perm][:, :, perm], atol=1e-5)
    assert torch.allclose(scores, -scores.transpose(1, 2))  # antisymmetric: P(i<j) + P(j<i) = 1
    predicted = model.predict_order(batch)
    valid = batch.order >= 0
    assert ((predicted >= 0) == valid).all()
    # every page's prediction is a permutation of its slots
    assert torch.equal(torch.sort(predicted.masked_fill(~valid, 99), 1).values,
                       torch.sort(batch.order.masked_fill(~valid, 99), 1).values)


def test_pairwise_order_loss_and_decoder():
    order = torch.tensor([[2, 0, 1, PAD], [1, 0, PAD, PAD]])
    valid = order >= 0
    earliness = -order.float() * 5  # higher = earlier slot
    perfect = earliness[:, :, None] - earliness[:, None, :]  # (B, P, P) s_ij > 0: i before j
    assert torch.equal(scores_to_order(earliness, valid), order)
    assert torch.equal(scores_to_order(order_scores(perfect, valid), valid), order)
    assert pairwise_order_loss(perfect, order) < pairwise_order_loss(-perfect, order)
    # by hand for the second page (one pair, counted both ways): logit 0.7 for the wrong order
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 1], logits[0, 1, 0] = 0.7, -0.7  # says: position 0 before position 1
    expected = torch.nn.functional.softplus(torch.tensor(0.7))  # truth: position 1 comes first
    assert torch.allclose(pairwise_order_loss(logits, order[1:]), expected)
    # padded positions never count and score -1e9
    assert (order_scores(perfect, valid)[~valid] == -1e9).all()


def test_dropout_view_keeps_a_panel_per_page():
    panel_mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    uniform = torch.full((3, 4), 0.99)  # nothing passes keep_prob on its own
    view = dropout_view(panel_mask, uniform, keep_prob=0.5)
    assert view.sum(1).tolist() == [1, 1, 0]
    assert not (view & ~panel_mask).any()


def test_config_round_trip():
    config = ModelConfig(dim=8, max_panels=6, max_boxes=2, modalities=("text", "fused"), n_layers=1,
                         d_model=16, n_heads=2)
    assert config.modalities == ("fused", "text") and config.n_layers == 1
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="max_boxes"):
        ModelConfig(dim=8, max_panels=4, max_boxes=0, modalities=("text",))
