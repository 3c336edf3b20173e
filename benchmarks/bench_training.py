"""Training throughput: end-to-end multi-task steps vs a bare step of the same model.

For each size, in one run and one process:
  end-to-end  training.train() for a few steps: batches gathered from the task datasets by
              TaskBatches, every task head + the strip objective, AdamW step, schedule, logging;
  bare        the same model, losses and optimizer step on batches built ONCE beforehand
              (no gathering), same batch shapes;
and their ratio (target >= 0.8: the data path and bookkeeping cost under 20%). Each is run
--repeats times, alternating, and the best rate of each is kept: on a shared machine other
processes only ever slow a run down, so the best of a few is the cleanest figure.

Sizes: "demo" (the demo corpus and model preset) and "full" (d_model 512, 6 layers, 8 heads,
16 panels, D 512, on a smaller corpus: only a few steps). On CUDA both run under bf16 autocast
and the table adds model FLOP utilisation: model FLOPs/s over a measured dense bf16 matmul rate.

A second table: training device memory at 1x and 10x the corpus (target: flat). training.train()
runs --memory-steps steps and its validation on --memory-comics demo comics (1x; default the demo
corpus, so every training and validation batch is full) and on ten times as many (10x), same
model and batch sizes. On CUDA: torch.cuda.max_memory_allocated over the run (peak reset before
it). On CPU there is no separate device memory, so the figure is an accounting of what train()
keeps on its device: parameters + gradients + AdamW state (the optimizer train() built) + the
larger of the largest training step's batches (every task's batch and the strip batch that
TaskBatches handed out between two optimizer steps, their tensors walked and each storage
counted once) and the largest validation batch; activations are not counted (they depend on
the batch, not the corpus). The host-side feature tables (where the corpus lives) are shown
beside it.

    .venv/bin/python benchmarks/bench_training.py [--sizes demo,full] [--steps N] [--repeats R]
        [--device auto] [--threads N] [--memory-comics 160] [--memory-steps 10] [--skip-memory]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comic_pipeline import corpus, tasks  # noqa: E402
from comic_pipeline import training as training_module  # noqa: E402
from comic_pipeline.batching import TaskBatches  # noqa: E402
from comic_pipeline.inference import autocast, configure_cpu_threads, resolve_device  # noqa: E402
from comic_pipeline.model import SequenceModel  # noqa: E402
from comic_pipeline.schema import TASK_NAMES  # noqa: E402
from comic_pipeline.splits import assign_splits  # noqa: E402
from comic_pipeline.train_config import TrainConfig  # noqa: E402
from comic_pipeline.training import make_optimizer, train  # noqa: E402

SIZES = {
    # corpus config, train config, steps (CPU default)
    "demo": (corpus.SIZES["demo"], TrainConfig(preset="demo", batch_size=64), 30),
    "full": (dataclasses.replace(corpus.SIZES["demo"], n_comics=24, dim=512, max_panels=16),
             TrainConfig(preset="full", batch_size=32), 4),
}


def problem(corpus_config, splits: tuple[str, ...] = ("train",)):
    features = corpus.corpus_features(corpus_config)
    split_of = assign_splits(list(dict.fromkeys(features.comic_ids)))
    datasets = {name: tasks.generate_task(name, features, split_of, tasks.TaskConfig())
                for name in TASK_NAMES}
    # train split only by default: the throughput figures time steps, not validation
    for dataset in datasets.values():
        dataset.splits = {split: dataset.splits[split] for split in splits if split in dataset.splits}
    return features, {n: d for n, d in datasets.items() if d.n_samples("train")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(config: TrainConfig, datasets, features, device: str, steps: int) -> tuple[float, object]:
    config = dataclasses.replace(config, epochs=1, max_steps=steps, log_every=10**9, patience=None,
                                 warmup_steps=1)
    result = train(config, datasets, features, device=device, log=lambda line: None)
    return result.samples_per_s, result


def bare(config: TrainConfig, datasets, features, device: str, steps: int) -> float:
    """Forward + backward + step of the same model on batches built once (no gathering)."""
    torch_device, amp_dtype = resolve_device(device)
    config = config.resolved()
    model_config = config.model_config(features)
    batches = TaskBatches(datasets, features, device=torch_device, modalities=model_config.modalities)
    torch.manual_seed(0)
    model = SequenceModel(model_config).to(torch_device)
    optimizer = make_optimizer(model, config)

    def first_samples(task: str) -> np.ndarray:
        return np.arange(config.batch_size) % batches.n_samples(task, "train")

    ready = {task: batches.batch(task, "train", first_samples(task))
             for task in batches.tasks}  # built once: no gathering in the timed loop
    pages = batches.page_rows("train")[: config.strip_batch_size or config.batch_size]
    page_batch = batches.pages(pages)
    samples_per_step = config.batch_size * len(ready) + len(pages)

    def step():
        with autocast(torch_device, amp_dtype):
            total = sum(model(batch)[0] for batch in ready.values())
            total = total + model(page_batch)[0]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    step()  # warm-up (allocator, kernels)
    sync(torch_device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(torch_device)
    return steps * samples_per_step / (time.perf_counter() - start)


def model_flops_per_sample(model_config, n_tasks: int, batch_size: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one step, per sample of the step.

    Per token through the Transformer: 6 * block params + 12 * layers * L * d (attention);
    per option: 6 * panel-encoder params (options do not go through the Transformer)."""
    d, layers, P = model_config.d_model, model_config.n_layers, model_config.max_panels
    block_params = layers * (12 * d * d + 13 * d)
    L = P + 1
    per_token = 6 * block_params + 12 * layers * L * d
    task_tokens = n_tasks * batch_size * L
    strip_tokens = 2 * batch_size * P  # two views of each page
    option_tokens = n_tasks * batch_size * 5 * 2  # K <= 5 options, up to 2 projections each
    flops = (task_tokens + strip_tokens) * per_token + option_tokens * 6 * model_config.dim * d
    return flops / (n_tasks * batch_size + batch_size)


def dense_bf16_rate(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


# --- device memory, 1x vs 10x corpus --------------------------------------------------------------
def tensor_bytes(value, seen: set[int] | None = None) -> int:
    """Bytes of the tensors in a batch (dataclass, dict, list or tensor), each storage once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(tensor_bytes(item, seen) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    return 0


class DeviceLedger:
    """What train() put on its device, recorded through two stand-ins it is given while it runs:
    a TaskBatches that counts the bytes of every batch it hands out, and the AdamW it builds,
    whose step hook closes a training step."""

    def __init__(self):
        self.step_bytes = 0  # batches handed out since the last optimizer step
        self.largest_step = 0  # the most bytes of batches one training step held
        self.largest_batch = 0  # the largest single batch (validation ones included)
        self.steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.host_tables = 0  # bytes of the feature tables TaskBatches keeps on the host
        ledger = self

        class CountingBatches(TaskBatches):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                ledger.host_tables = tensor_bytes(self.tables)

            def batch(self, *args, **kwargs):
                return ledger.count(super().batch(*args, **kwargs))

            def pages(self, *args, **kwargs):
                return ledger.count(super().pages(*args, **kwargs))

        def make_optimizer(model, config):
            ledger.optimizer = real_make_optimizer(model, config)
            ledger.optimizer.register_step_post_hook(lambda *_: ledger.end_step())
            return ledger.optimizer

        real_make_optimizer = training_module.make_optimizer
        self.batches_class, self.make_optimizer = CountingBatches, make_optimizer

    def count(self, batch):
        size = tensor_bytes(batch)
        self.step_bytes += size
        self.largest_batch = max(self.largest_batch, size)
        return batch

    def end_step(self) -> None:
        self.largest_step = max(self.largest_step, self.step_bytes)
        self.step_bytes = 0
        self.steps += 1

    def resident_bytes(self) -> dict[str, int]:
        """Parameters, gradients, optimizer state and batches on the device at the worst step."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return {
            "params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.numel() * p.element_size() for p in params),  # one per parameter
            "optimizer": tensor_bytes([dict(state) for state in self.optimizer.state.values()]),
            "step batches": self.largest_step,
            "largest batch": self.largest_batch,
        }


def train_device_memory(corpus_config, config: TrainConfig, device: str, steps: int) -> dict:
    """Train `steps` steps (and validate) on corpus_config; what stayed on the device."""
    features, datasets = problem(corpus_config, splits=("train", "val"))
    config = dataclasses.replace(config, epochs=1, max_steps=steps, log_every=10**9, patience=None,
                                 warmup_steps=1)
    torch_device, _ = resolve_device(device)
    ledger = DeviceLedger()
    saved = training_module.TaskBatches, training_module.make_optimizer
    training_module.TaskBatches, training_module.make_optimizer = ledger.batches_class, ledger.make_optimizer
    try:
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(torch_device)
        train(config, datasets, features, device=device, log=lambda line: None)
        peak = torch.cuda.max_memory_allocated(torch_device) if torch_device.type == "cuda" else None
    finally:
        training_module.TaskBatches, training_module.make_optimizer = saved
    return {"comics": len(set(features.comic_ids)), "pages": features.n_pages,
            "train samples": sum(d.n_samples("train") for d in datasets.values()),
            "host tables": ledger.host_tables, "cuda peak": peak, "steps": ledger.steps,
            **ledger.resident_bytes()}


def memory_table(device: str, base_comics: int, steps: int) -> list[dict]:
    corpus_config, config, _ = SIZES["demo"]
    rows, figures = [], {}
    mb = 2**20
    for scale in (1, 10):
        figures[scale] = train_device_memory(dataclasses.replace(corpus_config, n_comics=base_comics * scale),
                                             config, device, steps)
        f = figures[scale]
        if f["steps"] != steps:
            raise RuntimeError(f"train() took {f['steps']} optimizer steps, expected {steps}")
        accounted = f["params"] + f["grads"] + f["optimizer"] + max(f["step batches"], f["largest batch"])
        f["accounted"] = accounted
        row = {"corpus": f"{scale}x: {f['comics']} comics, {f['pages']} pages, {f['train samples']:,} train samples",
               "host tables MB": f"{f['host tables'] / mb:.1f}",
               "params+grads+AdamW MB": f"{(f['params'] + f['grads'] + f['optimizer']) / mb:.2f}",
               "largest train step's batches MB": f"{f['step batches'] / mb:.2f}",
               "largest single batch MB (val incl.)": f"{f['largest batch'] / mb:.2f}",
               "device total MB (accounted)": f"{accounted / mb:.2f}"}
        if f["cuda peak"] is not None:
            row["CUDA max_memory_allocated MB"] = f"{f['cuda peak'] / mb:.1f}"
        rows.append(row)
    ratio = {"corpus": "10x / 1x", "host tables MB": f"{figures[10]['host tables'] / figures[1]['host tables']:.2f}x",
             "device total MB (accounted)": f"{figures[10]['accounted'] / figures[1]['accounted']:.2f}x (target: flat)"}
    if figures[1]["cuda peak"] is not None:
        ratio["CUDA max_memory_allocated MB"] = f"{figures[10]['cuda peak'] / figures[1]['cuda peak']:.2f}x"
    rows.append(ratio)
    return rows


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,full")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default per size)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; the best is kept")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    parser.add_argument("--memory-comics", type=int, default=corpus.SIZES["demo"].n_comics,
                        help="demo comics of the 1x corpus of the device-memory table (10x: ten times as many)")
    parser.add_argument("--memory-steps", type=int, default=10, help="training steps per device-memory run")
    parser.add_argument("--skip-memory", action="store_true", help="no device-memory table")
    args = parser.parse_args()
    torch_device, amp_dtype = resolve_device(args.device)
    threads = configure_cpu_threads(args.threads)
    peak = dense_bf16_rate(torch_device) if torch_device.type == "cuda" else None

    rows = []
    for size in [size for size in args.sizes.split(",") if size]:
        corpus_config, config, default_steps = SIZES[size]
        steps = args.steps or (default_steps if torch_device.type == "cpu" else 10 * default_steps)
        features, datasets = problem(corpus_config)
        e2e, bare_rate = 0.0, 0.0
        for _ in range(args.repeats):
            rate, result = end_to_end(config, datasets, features, args.device, steps)
            e2e = max(e2e, rate)
            bare_rate = max(bare_rate, bare(config, datasets, features, args.device, steps))
        mc = result.model_config
        row = {
            "size": size, "device": f"{torch_device}" + (" bf16" if amp_dtype else " fp32"),
            "threads": threads if torch_device.type == "cpu" else "-",
            "model": f"d{mc.d_model} L{mc.n_layers} H{mc.n_heads} P{mc.max_panels} D{mc.dim}",
            "params": f"{result.model.n_params() / 1e6:.2f}M",
            "batch": f"{config.batch_size}x{len(result.tasks)} tasks + strip",
            "steps": f"{steps}x{args.repeats}",
            "e2e samples/s": f"{e2e:,.0f}", "bare samples/s": f"{bare_rate:,.0f}",
            "ratio": f"{e2e / bare_rate:.2f}",
        }
        if peak is not None:
            flops = model_flops_per_sample(mc, len(result.tasks), config.batch_size)
            row["MFU e2e"] = f"{e2e * flops / peak:.1%}"
            row["MFU bare"] = f"{bare_rate * flops / peak:.1%}"
            row["matmul TFLOP/s"] = f"{peak / 1e12:.0f}"
        rows.append(row)

    if rows:
        print_table(rows)
    if not args.skip_memory:
        what = ("CUDA max_memory_allocated, and the accounting" if torch_device.type == "cuda" else
                "CPU: no separate device memory; accounted: params + grads + AdamW state + the larger of "
                "the largest train step's batches and the largest validation batch; activations not counted")
        print(f"\ntraining device memory, demo preset, {args.memory_steps} steps + validation ({what})")
        print_table(memory_table(args.device, args.memory_comics, args.memory_steps))


if __name__ == "__main__":
    main()
