"""Throughput and memory of the contextualized-embedding writer (Stage 4 -> Stage 5 store).

Figures (one table):
  (a) pages/s end to end (read a Stage 3 store -> encode -> write Zarr) vs bare encode of the
      same batches on features already in memory, and their ratio, in one run;
  (b) peak RSS while embed_and_write runs over 1x and 10x the number of comics, each in a
      fresh subprocess, and the growth ratio (target < 1.2x: memory must not grow with the
      corpus); resident set sampled every 5 ms during the run;
  (io) the I/O path alone: the same read -> (identity encoder) -> commit pipeline in pages/s,
      beside the raw limit: the same bytes read and written as plain numpy files on the same disk,
      and their ratio (target >= 0.5);
  (d) output-store candidates writing the same contextualized arrays, one comic after another
      (benchmarks/store_candidates.py): this store's commit layout with and without fsync, the
      previous zarr-python groups renamed into place, Icechunk when installed, beside plain numpy
      files (not fsynced);
  (c) hook for the Dagster overhead of a 200-comic backfill vs pure compute: this script measures
      the pure-compute half (backfill_pure_compute_seconds); the Dagster half is registered in
      DAGSTER_BACKFILL_HOOK by the Dagster layer's benchmark.

Encoder: the real SequenceModel (random init, eval mode) through inference.embed_pages when
comic_pipeline.model/training exist — the "demo" preset on the whole corpus and the "full" preset
(512/6/8) on a few comics for (a), "demo" for (b) and (c) — else a fixed random projection; the
table says which. (a) is best-of-3 interleaved rounds, since a shared machine slows both alike.
(a) and (io) read Stage 3 as the asset reads a run of that many comics: reader threads, or with
--reader-processes N that many reader processes behind them (embedding_pipeline.reader_process_count);
the processes are started before the timed rounds, and the table says how long that took.
--device (default auto: CUDA when there is one) is where the model runs; on CUDA it runs under
bf16 autocast as the asset does, and (a) adds model FLOP utilisation (MFU): the model's forward
FLOPs per page times pages/s, over a measured dense bf16 matmul rate (bench_training's).

    .venv/bin/python benchmarks/bench_embeddings.py [--base-comics N] [--batch-pages B]
        [--presets demo,full] [--full-comics 24] [--backfill-comics 200] [--projection] [--skip-rss]
        [--skip-io] [--candidate-comics 200] [--device auto] [--reader-processes N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from figures import print_figures  # noqa: E402  (beside this script)
from store_candidates import measure_store_candidates  # noqa: E402  (figure (d))

from comic_pipeline import embedding_pipeline  # noqa: E402
from comic_pipeline.schema import PageFeatures  # noqa: E402


# --- Stage 3 input --------------------------------------------------------------------------
def write_stage3_store(url: str, n_comics: int | None) -> tuple[list[str], str]:
    """The demo corpus (scaled to n_comics) as a Stage 3 store; returns (comic ids, what it is).

    Without comic_pipeline.corpus, a random fused-only store of the demo's rough shape."""
    try:
        from comic_pipeline import corpus
    except ImportError:
        return _write_random_stage3_store(url, n_comics or 100)
    config = corpus.SIZES["demo"]
    if n_comics is not None:
        config = dataclasses.replace(config, n_comics=n_comics)
    comic_ids = corpus.write_demo_store(url, config)
    return list(comic_ids), f"demo corpus, {len(comic_ids)} comics"


def _write_random_stage3_store(url: str, n_comics: int, dim: int = 64, max_panels: int = 16) -> tuple[list[str], str]:
    from comic_pipeline import store

    store.create_native_store(url, dim=dim, max_panels=max_panels, overwrite=True)
    comic_ids = []
    for index in range(n_comics):
        rng = np.random.default_rng(index)  # comic i is the same whatever n_comics is
        n_pages = int(rng.integers(10, 21))
        n_panels = rng.integers(3, max_panels + 1, size=n_pages)
        mask = np.arange(max_panels)[None, :] < n_panels[:, None]  # (pages, P)
        fused = rng.normal(size=(n_pages, max_panels, dim)).astype(np.float32) * mask[:, :, None]
        comic_id = f"rand-{index:04d}"
        store.write_native_comic(url, comic_id, page_ids=[f"p{i:03d}" for i in range(n_pages)], title=comic_id,
                                 arrays={"panel_embeddings": fused, "panel_mask": mask})
        comic_ids.append(comic_id)
    return comic_ids, f"random store (corpus.py absent), {n_comics} comics"


def comic_inputs(stage3_url: str, modalities: frozenset[str] | None,
                 limit: int | None = None, processes=None) -> list[embedding_pipeline.ComicInput]:
    """Lazy inputs over a Stage 3 store, as the contextualized_embeddings asset builds them: each
    load() opens its comic (in a reader thread, or in one of `processes`), validates it (content
    hash) and reads its features. The end-to-end timings include this call, as the asset's run
    does."""
    from comic_pipeline.store import Stage3Store

    store = Stage3Store.open(stage3_url)
    return [embedding_pipeline.ComicInput.from_store(store, comic_id, modalities, processes=processes)
            for comic_id in store.comic_ids()[:limit]]


READER_PROCESSES = 0  # --reader-processes (the asset's EmbeddingConfig.reader_processes)


@contextlib.contextmanager
def asset_readers(n_comics: int):
    """(reader process pool or None, its description) as the asset would read a run of
    `n_comics`; the processes are started (and timed) here, outside the timed runs: a run of
    the asset pays that start once."""
    count = embedding_pipeline.reader_process_count(READER_PROCESSES, n_comics)
    if not count:
        yield None, "reader threads"
        return
    t0 = time.perf_counter()
    with embedding_pipeline.reader_processes(count) as pool:
        list(pool.map(abs, range(count * 4)))  # every process up
        yield pool, f"{count} reader process(es), started in {time.perf_counter() - t0:.1f} s (once per run, not timed)"


# --- encoders ---------------------------------------------------------------------------------
# Torch CPU threads: the cores this process may use (not the host's), at most 16; --threads
# overrides it (1 on a machine other processes share: torch's pool spin-waits).
TORCH_THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                           (os.cpu_count() or 1), 16))
DEVICE = "auto"  # --device: where the model runs (inference.resolve_device)


def forward_flops_per_page(config) -> float:
    """Forward FLOPs of encode_pages for one page of max_panels slots (padded slots count: the
    GPU computes them): the panel projections (2 * dim * d per modality and panel), the blocks
    (2 * block params per token) and attention (4 * layers * P * d per token), the strip pooling."""
    d, layers, P = config.d_model, config.n_layers, config.max_panels
    block_params = layers * (12 * d * d + 13 * d)
    per_token = 2 * block_params + 4 * layers * P * d
    projections = 2 * config.dim * d * len(config.modalities)
    return P * (per_token + projections) + 2 * (P * d + d * d)


def build_encoder(stage3_url: str, force_projection: bool = False, preset: str = "demo"
                  ) -> tuple[Callable[[PageFeatures], tuple[np.ndarray, np.ndarray]], frozenset[str] | None, str]:
    """(encode, modalities to load, description). preset: the ModelConfig size. The encoder's
    `flops_per_page` attribute is its forward FLOPs per page (None for the projection)."""
    import torch

    from comic_pipeline.store import Stage3Store

    torch.set_num_threads(TORCH_THREADS)
    stage3 = Stage3Store.open(stage3_url)
    if not force_projection:
        try:
            from comic_pipeline import model as model_module
            from comic_pipeline import inference

            from comic_pipeline.train_config import PRESETS

            modalities = tuple(sorted(stage3.modalities()))
            config = PRESETS[preset].sized_for(dim=stage3.dim, max_panels=stage3.max_panels,
                                               max_boxes=stage3.max_boxes, modalities=modalities)
            torch.manual_seed(0)
            sequence_model = model_module.SequenceModel(config).eval()

            torch_device, amp_dtype = inference.resolve_device(DEVICE)

            def encode(features: PageFeatures):
                return inference.embed_pages(sequence_model, features, device=str(torch_device))

            encode.flops_per_page = forward_flops_per_page(config)
            precision = "bf16 autocast" if amp_dtype is not None else "float32"
            return encode, frozenset(modalities), (f"SequenceModel {preset} (d_model {config.d_model}, "
                                                  f"{config.n_layers} layers), random init, {torch_device} "
                                                  f"({precision})")
        except ImportError as error:  # torch missing; a broken call must fail, not fall back
            reason = f"model unavailable: {type(error).__name__}: {error}"[:80]
    else:
        reason = "forced"
    projection = np.random.default_rng(0).normal(size=(stage3.dim, 256)).astype(np.float32)
    projection /= np.sqrt(stage3.dim)

    def encode(features: PageFeatures):
        panels = np.tanh(features.fused @ projection) * features.panel_mask[:, :, None]  # (n, P, 256)
        counts = np.maximum(features.panel_mask.sum(1, keepdims=True), 1)  # (n, 1)
        return panels, (panels.sum(1) / counts).astype(np.float32)  # (n, 256)

    return encode, frozenset({"fused"}), f"fixed random projection {stage3.dim}->256 ({reason})"


# --- (a) throughput ---------------------------------------------------------------------------
RATIO_TARGETS = {"demo": 0.8, "full": 0.95}  # end to end / bare (issue 15)


def measure_throughput(stage3_url: str, out_url: str, batch_pages: int, force_projection: bool,
                       preset: str = "demo", limit: int | None = None, rounds: int = 3) -> dict:
    encode, modalities, encoder_name = build_encoder(stage3_url, force_projection, preset)
    # bare encode: the same batches (pages of consecutive comics, batch_pages each) from memory
    all_inputs = comic_inputs(stage3_url, modalities, limit)
    everything = PageFeatures.concatenate([comic.load() for comic in all_inputs])
    n_pages = everything.n_pages
    batches = [everything.select(slice(start, start + batch_pages)) for start in range(0, n_pages, batch_pages)]
    encode(batches[0])  # warm-up (allocator, thread pool)
    # interleaved rounds, best of each: other processes on a shared machine hit both alike
    bare_seconds, end_to_end_seconds = [], []
    with asset_readers(len(all_inputs)) as (processes, readers):
        for _ in range(rounds):
            t0 = time.perf_counter()
            for batch in batches:
                encode(batch)
            bare_seconds.append(time.perf_counter() - t0)
            # fresh inputs each round, timed: each comic is opened and its content hash computed on
            # its load, as the asset's are (an input that knows its hash skips that work)
            t0 = time.perf_counter()
            inputs = comic_inputs(stage3_url, modalities, limit, processes)
            embedding_pipeline.embed_and_write(out_url, inputs, encode, batch_pages=batch_pages,
                                               model_name="bench", model_version="0", mlflow_run_id=None)
            end_to_end_seconds.append(time.perf_counter() - t0)
    bare, end_to_end = min(bare_seconds), min(end_to_end_seconds)
    return {
        "encoder": encoder_name, "comics": len(inputs), "pages": n_pages, "readers": readers,
        "bare_pages_per_s": n_pages / bare, "end_to_end_pages_per_s": n_pages / end_to_end,
        "ratio": bare / end_to_end, "flops_per_page": getattr(encode, "flops_per_page", None),
    }


def dense_bf16_rate() -> float | None:
    """The measured dense bf16 matmul FLOP/s of the CUDA device (bench_training's); None on CPU."""
    from bench_training import dense_bf16_rate as measure

    from comic_pipeline import inference

    torch_device, _ = inference.resolve_device(DEVICE)
    return measure(torch_device) if torch_device.type == "cuda" else None


# --- (io) the I/O path alone -----------------------------------------------------------------
def identity_encode(features: PageFeatures) -> tuple[np.ndarray, np.ndarray]:
    """No model: panels are the fused inputs, a strip is their masked mean (what a model would
    write, at the input width)."""
    panels = features.fused  # (n, P, D)
    counts = np.maximum(features.panel_mask.sum(1, keepdims=True), 1)  # (n, 1)
    return panels, (panels.sum(1) / counts).astype(np.float32)  # (n, D)


def _stored_arrays(stage3_url: str) -> dict[str, dict[str, np.ndarray]]:
    """{comic: {array: values as stored}} of a native Stage 3 store (setup, not timed)."""
    import zarr

    from comic_pipeline.store import Stage3Store

    store = Stage3Store.open(stage3_url)
    root = zarr.open_group(stage3_url, mode="r")
    return {key: {name: array[...] for name, array in root[f"comics/{store.name_of(key)}"].arrays()}
            for key in store.comic_ids()}


def measure_io_path(stage3_url: str, out_url: str, raw_folder: str, batch_pages: int, rounds: int = 3) -> dict:
    """Best-of-rounds pages/s of the pipeline with the identity encoder (read + validate + hash +
    batch + commit) and of plain numpy files moving the same bytes, interleaved."""
    stored = _stored_arrays(stage3_url)
    n_pages = sum(arrays["panel_mask"].shape[0] for arrays in stored.values())
    source = os.path.join(raw_folder, "in")
    for key, arrays in stored.items():  # the input bytes as numpy files (setup)
        os.makedirs(os.path.join(source, key), exist_ok=True)
        for name, values in arrays.items():
            np.save(os.path.join(source, key, f"{name}.npy"), values)
    pipeline_seconds, raw_seconds = [], []
    with asset_readers(len(stored)) as (processes, readers):
        for round_index in range(rounds):
            t0 = time.perf_counter()
            inputs = comic_inputs(stage3_url, None, None, processes)  # the listing and inputs: the run's too
            embedding_pipeline.embed_and_write(out_url, inputs, identity_encode, batch_pages=batch_pages,
                                               model_name="bench", model_version=str(round_index),
                                               mlflow_run_id=None)
            pipeline_seconds.append(time.perf_counter() - t0)
            raw_seconds.append(_raw_numpy_round(stored, source, os.path.join(raw_folder, f"out{round_index}")))
    pipeline, raw = min(pipeline_seconds), min(raw_seconds)
    return {"comics": len(stored), "pages": n_pages, "io_pages_per_s": n_pages / pipeline,
            "raw_pages_per_s": n_pages / raw, "ratio": raw / pipeline, "readers": readers}


def _raw_numpy_round(stored: dict, source: str, target: str) -> float:
    """Seconds to move the comics' bytes as plain numpy files: read, cast, write (the raw limit)."""
    t0 = time.perf_counter()
    for key in stored:
        arrays = {name[:-4]: np.load(os.path.join(source, key, name))
                  for name in os.listdir(os.path.join(source, key))}
        mask = arrays["panel_mask"]
        panels = arrays["panel_embeddings"].astype(np.float32)  # what the pipeline writes
        os.makedirs(os.path.join(target, key))
        np.save(os.path.join(target, key, "panel_embeddings.npy"), panels)
        np.save(os.path.join(target, key, "strip_embeddings.npy"), panels.mean(1))
        np.save(os.path.join(target, key, "panel_mask.npy"), mask)
    return time.perf_counter() - t0


# --- (b) peak memory --------------------------------------------------------------------------
def rss_worker(stage3_url: str, out_url: str, batch_pages: int, force_projection: bool) -> None:
    """Run in a fresh subprocess: embed a whole store, print memory figures as JSON.

    peak_run_mb: the highest resident set size sampled every 5 ms while embed_and_write runs
    (what grows with the corpus, if anything does); baseline_mb: resident set just before.
    (Not ru_maxrss: on Linux it survives execve, so a child starts with its parent's peak.)"""
    import threading

    import psutil

    process = psutil.Process()
    encode, modalities, encoder_name = build_encoder(stage3_url, force_projection)
    inputs = comic_inputs(stage3_url, modalities)
    encode(inputs[0].load())  # warm-up, so the baseline includes the model's working set
    baseline = process.memory_info().rss
    peak = [baseline]
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    written = embedding_pipeline.embed_and_write(out_url, inputs, encode, batch_pages=batch_pages,
                                              model_name="bench", model_version="0", mlflow_run_id=None)
    running.clear()
    sampler.join()
    mb = 1024 * 1024
    print(json.dumps({"encoder": encoder_name, "comics": len(written),
                      "pages": sum(w.n_pages for w in written),
                      "baseline_mb": baseline / mb, "peak_run_mb": max(peak[0], process.memory_info().rss) / mb}))


def measure_peak_rss(stage3_url: str, out_url: str, batch_pages: int, force_projection: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--rss-worker", stage3_url, out_url,
               "--batch-pages", str(batch_pages), "--threads", str(TORCH_THREADS), "--device", DEVICE] + (
                   ["--projection"] if force_projection else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"RSS worker failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- (c) Dagster overhead hook ----------------------------------------------------------------
# The Dagster layer's benchmark sets this to a function (stage3_url, out_url, comic_ids) ->
# seconds that backfills the contextualized_embeddings partitions of comic_ids through Dagster.
DAGSTER_BACKFILL_HOOK: Callable[[str, str, list[str]], float] | None = None
try:  # the Dagster layer's half (benchmarks/dagster_backfill.py), when dagster is installed
    from dagster_backfill import dagster_backfill_seconds as DAGSTER_BACKFILL_HOOK  # noqa: E402
except ImportError:
    pass


def backfill_pure_compute_seconds(stage3_url: str, out_url: str, comic_ids: list[str],
                                  batch_pages: int, force_projection: bool = False) -> float:
    """Pure-compute twin of a per-comic backfill: what each partition run does, minus Dagster
    (open the Stage 3 store, embed that one comic, write it), comic after comic."""
    encode, modalities, _ = build_encoder(stage3_url, force_projection)
    by_id = {comic.comic_id: comic for comic in comic_inputs(stage3_url, modalities)}
    t0 = time.perf_counter()
    for comic_id in comic_ids:
        embedding_pipeline.embed_and_write(out_url, [by_id[comic_id]], encode, batch_pages=batch_pages,
                                        model_name="bench", model_version="0", mlflow_run_id=None)
    return time.perf_counter() - t0


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-comics", type=int, default=None,
                        help="comics of the 1x corpus (default: the demo preset's)")
    parser.add_argument("--batch-pages", type=int, default=64)
    parser.add_argument("--backfill-comics", type=int, default=200)
    parser.add_argument("--projection", action="store_true", help="use the random projection encoder")
    parser.add_argument("--presets", default="demo,full",
                        help="model presets for figure (a), comma-separated (b and c use demo)")
    parser.add_argument("--full-comics", type=int, default=24,
                        help="comics measured with the full-size model (it is slow on CPU)")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-io", action="store_true", help="skip figures (io) and (d)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: usable cores)")
    parser.add_argument("--reader-processes", type=int, default=0,
                        help="Stage 3 reader processes of (a) and (io), as the asset's reader_processes "
                        "(default 0: reader threads only)")
    parser.add_argument("--candidate-comics", type=int, default=200,
                        help="comics written by each output-store candidate in (d)")
    parser.add_argument("--device", default="auto", help="where the model runs: auto (CUDA when there "
                        "is one), cpu, cuda[:N]")
    parser.add_argument("--rss-worker", nargs=2, metavar=("STAGE3_URL", "OUT_URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global TORCH_THREADS, DEVICE, READER_PROCESSES
    READER_PROCESSES = args.reader_processes
    if args.threads is not None:
        TORCH_THREADS = max(1, args.threads)
    DEVICE = args.device
    if args.rss_worker:
        rss_worker(*args.rss_worker, args.batch_pages, args.projection)
        return

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench_embeddings_") as tmp:
        base_url = os.path.join(tmp, "stage3_1x.zarr")
        t0 = time.perf_counter()
        base_ids, base_what = write_stage3_store(base_url, args.base_comics)
        print(f"wrote {base_what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        rows.append(("corpus (1x)", f"{base_what}; batches of {args.batch_pages} pages; "
                                    f"{TORCH_THREADS} torch thread(s)"))
        presets = ["projection"] if args.projection else args.presets.split(",")
        peak = dense_bf16_rate()
        for preset in presets:
            limit = args.full_comics if preset == "full" else None
            throughput = measure_throughput(base_url, os.path.join(tmp, f"ctx_a_{preset}.zarr"), args.batch_pages,
                                            args.projection, preset, limit)
            rows += [
                (f"(a) [{preset}] encoder", throughput["encoder"]),
                (f"(a) [{preset}] Stage 3 read by", throughput["readers"]),
                (f"(a) [{preset}] pages", f"{throughput['pages']} pages of {throughput['comics']} comics"),
                (f"(a) [{preset}] bare encode", f"{throughput['bare_pages_per_s']:,.0f} pages/s"),
                (f"(a) [{preset}] end to end read->encode->write",
                 f"{throughput['end_to_end_pages_per_s']:,.0f} pages/s"),
                (f"(a) [{preset}] end-to-end / bare",
                 f"{throughput['ratio']:.2f}" + (f" (target >= {RATIO_TARGETS[preset]})" if preset in RATIO_TARGETS else "")),
            ]
            if peak is not None and throughput["flops_per_page"]:
                mfu = {kind: throughput[f"{kind}_pages_per_s"] * throughput["flops_per_page"] / peak
                       for kind in ("bare", "end_to_end")}
                rows.append((f"(a) [{preset}] MFU bare / end to end",
                             f"{mfu['bare']:.1%} / {mfu['end_to_end']:.1%} (of {peak / 1e12:,.0f} TFLOP/s "
                             f"dense bf16 measured)"))

        if not args.skip_io:
            io = measure_io_path(base_url, os.path.join(tmp, "ctx_io.zarr"), os.path.join(tmp, "raw"),
                                 args.batch_pages)
            rows += [
                ("(io) I/O path, identity encoder", f"{io['io_pages_per_s']:,.0f} pages/s "
                                                    f"({io['pages']} pages of {io['comics']} comics)"),
                ("(io) Stage 3 read by", io["readers"]),
                ("(io) raw limit, numpy files", f"{io['raw_pages_per_s']:,.0f} pages/s"),
                ("(io) I/O path / raw limit", f"{io['ratio']:.2f} (target >= 0.5)"),
            ]
            candidate_url = base_url
            if len(base_ids) < args.candidate_comics:
                candidate_url = os.path.join(tmp, "stage3_candidates.zarr")
                write_stage3_store(candidate_url, args.candidate_comics)
            candidates = measure_store_candidates(candidate_url, os.path.join(tmp, "candidates"), identity_encode,
                                                  args.candidate_comics)
            limit = candidates[0][1]
            for label, comics_per_s, mb_per_s in candidates:
                rows.append((f"(d) {label}", f"{comics_per_s:,.0f} comics/s, {mb_per_s:,.0f} MB/s, "
                                             f"{comics_per_s / limit:.2f} of the limit"))

        if not args.skip_rss:
            ten_url = os.path.join(tmp, "stage3_10x.zarr")
            t0 = time.perf_counter()
            _, ten_what = write_stage3_store(ten_url, 10 * len(base_ids))
            print(f"wrote {ten_what} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            one = measure_peak_rss(base_url, os.path.join(tmp, "ctx_b1.zarr"), args.batch_pages, args.projection)
            ten = measure_peak_rss(ten_url, os.path.join(tmp, "ctx_b10.zarr"), args.batch_pages, args.projection)
            growth = ten["peak_run_mb"] / one["peak_run_mb"]
            for label, figures in (("1x", one), ("10x", ten)):
                rows.append((f"(b) peak RSS during the run {label}",
                             f"{figures['peak_run_mb']:.0f} MB ({figures['comics']} comics, {figures['pages']} pages; "
                             f"{figures['baseline_mb']:.0f} MB before it)"))
            rows.append(("(b) growth 10x / 1x", f"{growth:.2f}x (target < 1.2x); above the pre-run RSS: "
                                                f"+{one['peak_run_mb'] - one['baseline_mb']:.0f} MB at 1x, "
                                                f"+{ten['peak_run_mb'] - ten['baseline_mb']:.0f} MB at 10x"))

        if args.backfill_comics <= 0:
            rows.append(("(c) Dagster backfill", "skipped (--backfill-comics 0)"))
        else:
            # comic i is the same at any corpus size, so the first N comics of the larger store
            backfill_url = base_url
            if len(base_ids) < args.backfill_comics:
                backfill_url = os.path.join(tmp, "stage3_backfill.zarr")
                if not args.skip_rss:
                    backfill_url = ten_url
                else:
                    write_stage3_store(backfill_url, args.backfill_comics)
            from comic_pipeline.store import Stage3Store

            backfill_ids = Stage3Store.open(backfill_url).comic_ids()[: args.backfill_comics]
            pure = backfill_pure_compute_seconds(backfill_url, os.path.join(tmp, "ctx_c.zarr"), backfill_ids,
                                                 args.batch_pages, args.projection)
            rows.append((f"(c) backfill {len(backfill_ids)} comics, pure compute", f"{pure:.2f} s"))
            if DAGSTER_BACKFILL_HOOK is not None:
                dagster_seconds = DAGSTER_BACKFILL_HOOK(backfill_url, os.path.join(tmp, "ctx_d.zarr"), backfill_ids)
                rows += [
                    (f"(c) backfill {len(backfill_ids)} comics, Dagster", f"{dagster_seconds:.2f} s"),
                    ("(c) Dagster overhead", f"{dagster_seconds / pure:.2f}x pure compute"),
                ]
            else:
                rows.append(("(c) Dagster backfill", "not measured here (DAGSTER_BACKFILL_HOOK unset)"))

    print_figures(rows)


if __name__ == "__main__":
    main()
