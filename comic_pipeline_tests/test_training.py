"""Multi-task training: it learns, it is deterministic, it resumes bit-for-bit, and the
evaluation / embedding helpers give what the downstream assets expect."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from comic_pipeline import inference, metrics, training
from comic_pipeline.batching import TaskBatches
from comic_pipeline.inference import embed_pages, strip_views
from comic_pipeline.inference import predict as evaluate
from comic_pipeline.schema import PAD, TASK_NAMES
from comic_pipeline.tasks import TASKS
from comic_pipeline.train_config import PRESETS, TrainConfig
from comic_pipeline.training import train

try:  # the helper lives beside this file; importable either way pytest sets up sys.path
    from comic_pipeline_tests.test_model import synthetic_problem
except ImportError:
    from test_model import synthetic_problem

FAST = dict(preset="tiny", lr=3e-3, warmup_steps=5, batch_size=16, log_every=1000, patience=None)


@pytest.fixture(scope="module")
def small():
    return synthetic_problem(n_comics=10, pages_per_comic=5)


@pytest.fixture(scope="module")
def learned():
    """One training run shared by the learning / evaluation tests."""
    features, datasets = synthetic_problem(n_comics=30, pages_per_comic=8)
    lines: list[str] = []
    config = TrainConfig(**{**FAST, "batch_size": 32, "epochs": 8})
    result = train(config, datasets, features, device="cpu", log=lines.append)
    return features, datasets, result, lines


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_training_learns_every_option_task_above_chance(learned):
    features, datasets, result, lines = learned
    best = result.best_record
    assert best and best["epoch"] == result.best_epoch
    for task in TASK_NAMES:
        if TASKS[task].family == "order":
            continue
        chance = TASKS[task].chance()
        assert best[f"val_accuracy_{task}"] > chance + 0.15, (task, best[f"val_accuracy_{task}"])
    # the strip objective learned too: a page's other view is found far above chance (1/n pages)
    n_val_pages = len(np.unique(datasets["reading_order"].splits["val"].page))
    assert best["val_strip_recall1"] > 10 / n_val_pages
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert result.steps == 8 * result.history[0]["steps"]
    assert result.samples_per_s > 0
    # progress lines: step/total, samples/s, loss, ETA
    assert any("step" in line and "samples/s" in line and "ETA" in line for line in lines)


def test_reading_order_objective_learns_on_its_own():
    # a planted per-panel trace of the order: checks that the listwise loss and the decoder agree
    features, datasets = synthetic_problem(n_comics=20, pages_per_comic=6, drift=1.0)
    config = TrainConfig(**{**FAST, "batch_size": 32, "epochs": 6})
    result = train(config, {"reading_order": datasets["reading_order"]}, features, device="cpu",
                   log=lambda line: None)
    outputs = evaluate(result.model, datasets["reading_order"], features, "val", device="cpu")
    assert np.nanmean(metrics.pairwise_accuracy(outputs["predicted_order"], outputs["order"])) > 0.8


def test_evaluate_outputs(learned):
    features, datasets, result, _ = learned
    out = evaluate(result.model, datasets["visual_closure"], features, "val", device="cpu")
    n = datasets["visual_closure"].n_samples("val")
    assert out["prediction"].shape == (n,) and out["label"].shape == (n,)
    assert out["scores"].shape == (n, 5)
    assert np.array_equal(out["prediction"], out["scores"].argmax(1))
    assert np.array_equal(out["label"], datasets["visual_closure"].splits["val"].label)
    out = evaluate(result.model, datasets["text_cloze"], features, "val", device="cpu")
    assert out["variant"].shape == out["label"].shape
    out = evaluate(result.model, datasets["reading_order"], features, "val", device="cpu")
    order = datasets["reading_order"].splits["val"].order
    assert np.array_equal(out["order"], order) and np.array_equal(out["true_order"], order)
    assert np.array_equal(out["predicted_order"] == PAD, order == PAD)
    # each prediction is a permutation of the page's slots
    assert np.array_equal(np.sort(np.where(order == PAD, 99, out["predicted_order"]), 1),
                          np.sort(np.where(order == PAD, 99, order), 1))


def test_embed_pages_and_strip_views(learned):
    features, _, result, _ = learned
    rows = np.array([3, 0, 7])
    panels, strips = embed_pages(result.model, features, rows, device="cpu", batch_size=2)
    d = result.model.config.d_model
    assert panels.shape == (3, features.max_panels, d) and strips.shape == (3, d)
    assert panels.dtype == np.float32 and strips.dtype == np.float32
    padded = ~features.panel_mask[rows]
    assert padded.any() and (panels[padded] == 0).all()
    assert (np.abs(panels[~padded]).sum(-1) > 0).all()
    # rows are independent of batching and of the other rows asked for
    alone, _ = embed_pages(result.model, features, rows[1:2], device="cpu")
    np.testing.assert_allclose(alone[0], panels[1], atol=1e-5)
    a, b = strip_views(result.model, features, np.arange(20), seed=3, device="cpu")
    a2, b2 = strip_views(result.model, features, np.arange(20), seed=3, device="cpu", batch_size=7)
    assert a.shape == b.shape == (20, d)
    np.testing.assert_allclose(a, a2, atol=1e-5)
    np.testing.assert_allclose(b, b2, atol=1e-5)
    assert not np.allclose(a, b)  # two different views


def test_training_is_deterministic(small):
    features, datasets = small
    config = TrainConfig(**{**FAST, "epochs": 2})
    first = train(config, datasets, features, device="cpu", log=lambda line: None)
    second = train(config, datasets, features, device="cpu", log=lambda line: None)
    _assert_same_weights(first.model, second.model)
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]
    other = train(dataclasses.replace(config, seed=1), datasets, features, device="cpu", log=lambda line: None)
    assert not torch.equal(other.model.blocks[0].attn.qkv.weight, first.model.blocks[0].attn.qkv.weight)


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(small, tmp_path):
    features, datasets = small
    # dropout on, so the restored RNG state matters
    config = TrainConfig(**{**FAST, "epochs": 3, "dropout": 0.2})
    uninterrupted = train(config, datasets, features, device="cpu", log=lambda line: None)

    def crash_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise Interrupt()

    checkpoints = str(tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        train(config, datasets, features, device="cpu", checkpoint_dir=checkpoints,
              log=lambda line: None, on_epoch=crash_after_first_epoch)
    assert os.listdir(checkpoints) == [training.CHECKPOINT_NAME]  # written atomically, no leftovers
    saved = torch.load(os.path.join(checkpoints, training.CHECKPOINT_NAME), weights_only=False)
    assert saved["epoch"] == 1 and saved["step"] == uninterrupted.steps // 3
    for key in ("model", "optimizer", "scheduler", "torch_rng", "data_order", "best_state", "history",
                "fingerprint"):
        assert saved[key] is not None, key
    lines: list[str] = []
    resumed = train(config, datasets, features, device="cpu", checkpoint_dir=checkpoints, log=lines.append)
    assert resumed.resumed_from_epoch == 1
    assert any("resumed" in line for line in lines)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.steps == uninterrupted.steps
    assert resumed.best_epoch == uninterrupted.best_epoch
    _assert_same_weights(resumed.model, uninterrupted.model)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in uninterrupted.history]

    # a finished run called again resumes at its end and trains no more
    again = train(config, datasets, features, device="cpu", checkpoint_dir=checkpoints, log=lambda line: None)
    assert again.resumed_from_epoch == 3 and again.steps == resumed.steps
    assert again.reused_checkpoint and not resumed.reused_checkpoint and again.history == resumed.history
    # other code does not resume this checkpoint: a code fix retrains
    recoded = train(config, datasets, features, device="cpu", checkpoint_dir=checkpoints,
                    log=lambda line: None, code_version="other")
    assert recoded.resumed_from_epoch is None and recoded.fingerprint != again.fingerprint
    # the fingerprint is known before training (a caller can look for a version trained so)
    assert training.run_fingerprint(config, datasets, features) == again.fingerprint
    assert training.run_fingerprint(config, datasets, features, "other") == recoded.fingerprint
    _assert_same_weights(again.model, uninterrupted.model)

    # another config does not resume from this checkpoint, and says why
    lines.clear()
    fresh = train(dataclasses.replace(config, epochs=1), datasets, features, device="cpu",
                  checkpoint_dir=checkpoints, log=lines.append)
    assert fresh.resumed_from_epoch is None
    assert any("different config" in line and "starting fresh" in line for line in lines)

    # an unreadable checkpoint is reported and training starts afresh
    with open(os.path.join(checkpoints, training.CHECKPOINT_NAME), "wb") as handle:
        handle.write(b"not a checkpoint")
    lines.clear()
    fresh = train(config, datasets, features, device="cpu", checkpoint_dir=checkpoints, log=lines.append)
    assert fresh.resumed_from_epoch is None and any("cannot be read" in line for line in lines)
    _assert_same_weights(fresh.model, uninterrupted.model)


def test_early_stopping_keeps_the_best_epoch(small):
    features, datasets = small
    # lr so small that val accuracy cannot improve after the first epochs
    config = TrainConfig(**{**FAST, "epochs": 30, "lr": 1e-9, "warmup_steps": 0, "patience": 2})
    result = train(config, datasets, features, device="cpu", log=lambda line: None)
    assert result.stopped_early and len(result.history) < 30
    scores = [h["val_mean_accuracy"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(scores))
    assert len(result.history) - result.best_epoch == 2


def test_task_batches_gather_by_indexing(small):
    features, datasets = small
    batches = TaskBatches(datasets, features, device="cpu", modalities=tuple(features.modalities))
    samples = datasets["sequence_filling"].splits["train"]
    batch = batches.batch("sequence_filling", "train", np.array([4, 1]))
    P = features.max_panels
    # option i of sample 4 is the fused embedding of its flat panel ref
    refs = samples.options[[4, 1]]
    expected = features.fused.reshape(-1, features.dim)[refs]
    np.testing.assert_array_equal(batch.options["fused"].numpy(), expected)
    # context panels are the page's slots
    page, slot = samples.page[4], samples.context[4, 0]
    if slot >= 0:
        np.testing.assert_array_equal(batch.context["fused"][0, 0].numpy(), features.fused[page, slot])
    assert batch.positions.shape == (2, P + 1)
    pages = batches.pages(np.array([2, 5]))
    np.testing.assert_array_equal(pages.panel_mask.numpy(), features.panel_mask[[2, 5]])
    np.testing.assert_array_equal(pages.inputs["text"].numpy(), features.text[[2, 5]])



def test_task_batches_keep_the_corpus_on_the_host_and_move_only_batches(small):
    """Device memory holds batches, never the corpus: tables and samples stay in host memory."""
    features, datasets = small
    batches = TaskBatches(datasets, features, device="meta", modalities=tuple(features.modalities))
    assert {t.device.type for t in batches.tables.values()} == {"cpu"}
    assert {s.page.device.type for by_split in batches.samples_of.values() for s in by_split.values()} == {"cpu"}
    batch = batches.batch("text_cloze", "train", np.array([0, 3]))
    moved = [batch.kind, batch.positions, batch.query_index, batch.label,
             *batch.context.values(), *batch.options.values()]
    assert {t.device.type for t in moved} == {"meta"}
    pages = batches.pages(np.array([1, 2]))
    assert {t.device.type for t in [pages.panel_mask, *pages.inputs.values()]} == {"meta"}
    assert {t.device.type for t in batches.tables.values()} == {"cpu"}

def test_bad_inputs_are_clear_errors(small):
    features, datasets = small
    config = TrainConfig(**{**FAST, "epochs": 1})
    other_table = dataclasses.replace(datasets["visual_closure"], page_numbers=datasets["visual_closure"].page_numbers + 1)
    with pytest.raises(ValueError, match="visual_closure.*page table"):
        train(config, {"visual_closure": other_table}, features, device="cpu")
    bad_labels = dataclasses.replace(datasets["caption_relevance"], splits={
        split: dataclasses.replace(samples, label=samples.label + 10)
        for split, samples in datasets["caption_relevance"].splits.items()})
    with pytest.raises(ValueError, match="caption_relevance.*labels"):
        train(config, {"caption_relevance": bad_labels}, features, device="cpu")
    with pytest.raises(ValueError, match="no task dataset has train samples"):
        train(config, {}, features, device="cpu")
    with pytest.raises(ValueError, match="loss_weights"):
        TrainConfig(loss_weights={"sequence_filing": 2.0})
    with pytest.raises(ValueError, match="unknown model preset"):
        train(dataclasses.replace(config, preset="huge"), datasets, features, device="cpu")
    with pytest.raises(ValueError, match="dim 16"):
        model = train(config, {"visual_closure": datasets["visual_closure"]}, features, device="cpu",
                      log=lambda line: None).model
        embed_pages(model, dataclasses.replace(features, fused=features.fused[..., :8],
                                               visual=None, text=None, text_mask=None, caption=None))


def test_resolve_device():
    device, amp = inference.resolve_device("cpu")
    assert device.type == "cpu" and amp is None
    device, amp = inference.resolve_device("auto")
    assert (device.type == "cuda") == torch.cuda.is_available()
    assert (amp is torch.bfloat16) == torch.cuda.is_available()
    with pytest.raises(ValueError, match="not a device"):
        inference.resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            inference.resolve_device("cuda:0")


def test_one_preset_table_decides_sizes_and_settings(small):
    features, _ = small
    # a preset name with None fields and the preset table with overrides are the same config
    assert TrainConfig(preset="tiny", epochs=2).resolved() == TrainConfig.from_preset("tiny", epochs=2)
    assert TrainConfig.from_preset("demo", lr=None).lr == PRESETS["demo"].lr  # None: the preset's
    model_config = TrainConfig.from_preset("tiny", n_layers=1).model_config(features)
    assert (model_config.d_model, model_config.n_layers) == (PRESETS["tiny"].d_model, 1)
    assert TrainConfig(preset="full").learning_rate() == PRESETS["full"].lr


def test_code_fingerprint_hashes_the_domain_modules_source(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    (package / "defs").mkdir(parents=True)
    (package / "model.py").write_text("WIDTH = 1\n")
    (package / "defs" / "assets.py").write_text("UI = 1\n")
    monkeypatch.setattr(training, "__file__", str(package / "training.py"))
    before = training.code_fingerprint()
    (package / "defs" / "assets.py").write_text("UI = 2\n")  # the Dagster layer decides no weights
    assert training.code_fingerprint() == before
    (package / "model.py").write_text("WIDTH = 2\n")  # an uncommitted edit: a new fingerprint
    assert training.code_fingerprint() != before
