"""Benchmarks, one per --what: each times its work over several repeats after a warm-up, reports the median.

    python bench.py --what train|extract [--model wav2vec] [--channels 512] [--batch-size 4]
                    [--segment-length 32000] [--precision fp32|bf16|fp16] [--device auto|cpu|cuda]
                    [--train-path fast|plain|both] [--compile] [--data-dir DIR] [--repeats 5] [--warmup 2]
                    [--threads N] --json OUT.json
    python bench.py --what loader --data-dir DIR [--segment-length 32000] [--batch-size 8] [--num-workers 0]
                    [--packed-dir DIR_FOR_PACKED] [--batches 50] [--repeats 5] --json OUT.json
    python bench.py --what stream [--hops 1000] [--warmup 2] [--chunk-ms 10,40,160,640]
                    [--presets wav2vec_tiny,wav2vec] [--data-dir CALIBRATION_AUDIO] --json OUT.json

train: one full training step as main.py takes it (forward with freshly sampled distractors, loss, backward,
gradient clipping, AdamW; autocast, and a GradScaler for fp16), on the time-major CPU path of fastpath.py
where it applies, as main.py trains; --train-path plain times model.py's own path, and both times the two
interleaved step by step in one run, each on its own copy of the model, with their ratio. extract:
model.extract_features under autocast. Both set the backend flags as main.py does (utils.configure_backends:
cuDNN autotuning, TF32 convolutions and fp32 matmuls on CUDA) and run on random waveforms, or on real
training batches with --data-dir; they report seconds per step, audio seconds per wall-clock second, and
the model FLOP utilisation (MFU): analytic FLOPs per second over the peak of a square matmul measured on the
same device in the precision the convolutions use (TF32 for fp32 on CUDA, where nearly all FLOPs are
convolutions). train with --data-dir also runs the loader benchmark and says whether the loader keeps up
with the step.

stream: audio pushed in chunks of --chunk-ms (whole 10 ms hops; the state carried from call to call) on one
CPU thread, for the tiny and base layouts with per-frame LayerNorm: PyTorch (model.streamer() and the traced
TorchScript step, fp32) and ONNX Runtime (the step graph of export.py --streaming --hops-per-call N, fp32 and
int8); latency per call (median, p99), real-time factor (audio per call over the median), the same from
the thread's CPU time (what an idle core would take), parameters, MACs per second, state and activation
bytes.

loader: training batches exactly as main.py draws them (random crops, EpochSampler, make_loader), decoded on
the fly or, with --packed-dir, sliced from a packed 16 kHz corpus (prepared there on first use). Reports audio
seconds delivered per wall-clock second, in all and per worker process (max(1, num_workers)): how many
workers keep a given model fed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

import ondevice
from data import (
    DEFAULT_CACHE_DIR,
    SAMPLE_RATE,
    EpochSampler,
    build_manifest,
    crop_dataset,
    epoch_loader,
    prepare_packed_corpus,
)
from fastpath import FastTraining, fast_or_plain
from model import PRESETS, StreamingStep, Wav2Vec, Wav2VecConfig
from training import build_optimizer, make_grad_scaler, optimizer_step
from utils import (
    PRECISIONS,
    HelpFormatter,
    UserError,
    add_device_argument,
    add_precision_argument,
    add_progress_argument,
    add_renamed,
    add_threads_argument,
    autocast_context,
    configure_backends,
    resolve_device,
    resolve_precision,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)

CLIP_NORM = 5.0  # main.py's default gradient clipping, so the step costs what a real update costs
TRAIN_FLOPS_FACTOR = 3  # backward ~ 2x forward (gradients of inputs and of weights)
# A 1-minute load average above this before a benchmark starts means other jobs share the CPU (an idle
# 2-core machine sits below 0.2).
BUSY_LOAD = 0.5


def chunk_sizes(text: str) -> tuple[int, ...]:
    """--chunk-ms: a comma-separated list of positive multiples of 10 (whole 10 ms hops)."""
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 10 or size % 10 for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of multiples of 10 ms "
                                         "(e.g. 10,40,160)")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=HelpFormatter)
    what = parser.add_argument_group("benchmark")
    what.add_argument("--what", choices=sorted(BENCHMARKS), default="loader", help="what to time")
    what.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    what.add_argument("--warmup", type=int, default=2,
                      help="steps (or loader batches) run before timing: allocator, kernels, workers warm up")
    what.add_argument("--json", type=Path, help="also write the results to this JSON file")
    what.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs, sampler and crops")
    add_progress_argument(what)
    model = parser.add_argument_group("model (train, extract)")
    model.add_argument("--model", choices=sorted(PRESETS), default="wav2vec",
                       help="model configuration (main.py's --model)")
    model.add_argument("--channels", type=int, default=None,
                       help="width of every convolution (default: the preset's, as in main.py)")
    add_precision_argument(model, default="fp32")
    add_device_argument(model)
    add_threads_argument(model)
    model.add_argument("--compile", action="store_true",
                       help="torch.compile the model (the warm-up compiles; train: model.py's path, as in "
                            "main.py)")
    model.add_argument("--train-path", choices=("fast", "plain", "both"), default="fast",
                       help="train: fastpath.py's step where it applies (as main.py trains), model.py's "
                            "plain step, or both interleaved in one run with their ratio (fast / plain)")
    model.add_argument("--matmul-size", type=int,
                       help="side of the square matmul that measures the peak (default 2048 CPU, 8192 GPU)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path,
                      help="folder of audio, searched recursively (train/extract: real batches, not randn)")
    data.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                      help="where the manifest of --data-dir goes (main.py's --cache-dir)")
    data.add_argument("--packed-dir", type=Path,
                      help="read crops from a packed 16 kHz corpus in this folder (made on first use)")
    data.add_argument("--segment-length", type=int, default=32000, help="samples per crop at 16 kHz")
    data.add_argument("--pad-short", action="store_true", help="zero-pad files shorter than a crop, not skip")
    data.add_argument("--augment", action="store_true", help="apply the training augmentations")
    add_renamed(data, "--use-transforms", "--augment", switch=True)
    loader = parser.add_argument_group("loader")
    loader.add_argument("--batch-size", type=int, default=8, help="crops per batch")
    loader.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    loader.add_argument("--batches", type=int, default=50, help="batches per timed repeat (loader)")
    stream = parser.add_argument_group("stream")
    stream.add_argument("--hops", type=int, default=1000,
                        help="10 ms hops of audio timed per chunk size, after --warmup untimed calls "
                             "(--data-dir: int8 calibration audio, else noise)")
    stream.add_argument("--chunk-ms", type=chunk_sizes, default=(10,),
                        help="comma-separated chunk sizes in ms, multiples of 10: audio per call")
    stream.add_argument("--presets", type=lambda text: tuple(text.split(",")), default=STREAM_PRESETS,
                        help="comma-separated layouts, each with per-frame LayerNorm")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batches < 1 or args.warmup < 0:
        parser.error("--repeats and --batches must be at least 1, --warmup at least 0")
    if (args.channels is not None and args.channels < 1) or args.batch_size < 1:
        parser.error("--channels and --batch-size must be at least 1")
    args.channels = args.channels or Wav2VecConfig.preset(args.model).context_layers[-1][0]
    args.precision = resolve_precision(args.precision, resolve_device(args.device))
    return args


# ----- loader ---------------------------------------------------------------------------------------

def endless_batches(loader: torch.utils.data.DataLoader, sampler: EpochSampler) -> Iterator[torch.Tensor]:
    """Batches epoch after epoch, so a small corpus can still fill every repeat."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def training_batches(args: argparse.Namespace) -> tuple[Iterator[torch.Tensor], torch.utils.data.Dataset]:
    """Endless wav (B, L) batches from --data-dir, exactly as main.py draws them; and their dataset."""
    entries = build_manifest(args.data_dir, args.cache_dir)
    if args.packed_dir is not None:
        prepare_packed_corpus(args.data_dir, entries, args.packed_dir)
    dataset = crop_dataset(args.data_dir, entries, args.packed_dir, segment_length=args.segment_length,
                           train=True, transforms=args.augment, pad_short=args.pad_short, seed=args.seed)
    loader = epoch_loader(dataset, args.batch_size, args.num_workers, args.seed)
    return endless_batches(loader, loader.sampler), dataset


def bench_loader(args: argparse.Namespace) -> dict:
    """Audio seconds per second that make_loader delivers, on the fly or from a packed corpus."""
    batches, dataset = training_batches(args)
    for _ in range(args.warmup):
        next(batches)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds.append(time.perf_counter() - start)

    audio_seconds = args.batches * args.batch_size * args.segment_length / SAMPLE_RATE
    speeds = sorted(audio_seconds / s for s in seconds)
    median = statistics.median(speeds)
    return {
        "what": "loader",
        "source": "packed" if args.packed_dir is not None else "on the fly",
        "data_dir": str(args.data_dir),
        "files": len(dataset),
        "segment_length": args.segment_length,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "transforms": args.augment,
        "batches_per_repeat": args.batches,
        "repeat_seconds": [round(s, 4) for s in seconds],
        "audio_seconds_per_second": round(median, 1),
        "audio_seconds_per_second_min": round(speeds[0], 1),
        "audio_seconds_per_second_max": round(speeds[-1], 1),
        "audio_seconds_per_second_per_worker": round(median / max(1, args.num_workers), 1),
        "batches_per_second": round(median / (args.batch_size * args.segment_length / SAMPLE_RATE), 2),
        "read_errors": dataset.num_read_errors,
    }


# ----- model steps ----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[torch.Tensor], object]], batches: list[torch.Tensor], warmup: int,
               device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step function on each batch after the first `warmup`, synchronised only around each
    step. Several functions take turns on every batch, in reversed order every other batch, so that a load
    that comes and goes weighs on them alike."""
    for wav in batches[:warmup]:
        for step in steps.values():
            step(wav)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for i, wav in enumerate(batches[warmup:]):
        for name in list(steps)[::-1 if i % 2 else 1]:
            synchronize(device)
            start = time.perf_counter()
            steps[name](wav)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               amp: contextlib.AbstractContextManager, wav: torch.Tensor,
               negatives: torch.Tensor | None = None) -> torch.Tensor:
    """One update as main.py makes it, on wav (B, L): the loss (nats, detached; read it only after timing).
    `negatives` (B, N, T) pins the distractors; by default the model samples them, as in training."""
    with amp:
        loss, _ = model(wav, negatives)
    scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scaler, CLIP_NORM, loss.detach())
    return loss.detach()


def model_inputs(args: argparse.Namespace, device: torch.device) -> tuple[list[torch.Tensor], str]:
    """warmup + repeats wav (B, L) batches on `device`, from --data-dir or torch.randn; and their source."""
    count = args.warmup + args.repeats
    if args.data_dir is not None:
        batches, _ = training_batches(args)
        return [next(batches).to(device) for _ in range(count)], str(args.data_dir)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.batch_size, args.segment_length)
    return [torch.randn(shape, generator=generator).to(device) for _ in range(count)], "torch.randn"


def build_model(args: argparse.Namespace, device: torch.device) -> Wav2Vec:
    """A freshly initialised model of --model and --channels on `device`, with main.py's backend flags."""
    configure_backends(device)
    torch.manual_seed(args.seed)
    model = Wav2Vec(Wav2VecConfig.preset(args.model, channels=args.channels)).to(device)
    if model.num_frames(args.segment_length) < 2:
        raise UserError(f"--segment-length {args.segment_length} gives fewer than 2 frames; "
                        f"use at least {model.receptive_field + model.config.stride} samples.")
    return model


def peak_precision(device: torch.device, precision: str) -> str:
    """The arithmetic the step's convolutions (nearly all its FLOPs) run in: the precision to take the peak
    in. fp32 on CUDA means TF32 convolutions (configure_backends), whose peak is several times fp32's."""
    if precision == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return precision


def matmul_peak_flops(device: torch.device, precision: str, size: int, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` square (size x size) matmuls in peak_precision, after a warm-up:
    the practical peak an MFU is measured against."""
    dtype = PRECISIONS[precision] or torch.float32
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    matmul = torch.backends.cuda.matmul
    saved, best = matmul.allow_tf32, math.inf
    if peak_precision(device, precision) == "tf32":
        matmul.allow_tf32 = True  # only for this measurement: the objective's matmuls stay fp32
    try:
        for i in range(repeats + 2):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
    finally:
        matmul.allow_tf32 = saved
    return 2 * size**3 / best


def step_report(args: argparse.Namespace, device: torch.device, seconds: list[float], flops_per_step: int,
                flops_method: str, source: str) -> dict:
    """The fields common to train and extract: timings, throughput, FLOPs, MFU and the environment."""
    median = statistics.median(seconds)
    audio_per_second = args.batch_size * args.segment_length / SAMPLE_RATE / median
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_peak_flops(device, args.precision, size)
    achieved = flops_per_step / median
    return {
        "what": args.what,
        "model": args.model,
        "channels": args.channels,
        "batch_size": args.batch_size,
        "segment_length": args.segment_length,
        "precision": args.precision,
        "device": str(device),
        "compile": args.compile,
        "input": source,
        "repeats": len(seconds),
        "warmup": args.warmup,
        "step_seconds": [round(s, 4) for s in seconds],
        "seconds_per_step_median": round(median, 4),
        "seconds_per_step_min": round(min(seconds), 4),
        "seconds_per_step_max": round(max(seconds), 4),
        "audio_seconds_per_second": round(audio_per_second, 2),
        "real_time_factor": round(audio_per_second, 2),  # audio seconds per wall second
        "flops_per_step": flops_per_step,
        "flops_method": flops_method,
        "achieved_flops_per_second": round(achieved),
        "matmul_size": size,
        "peak_precision": peak_precision(device, args.precision),
        "matmul_peak_flops_per_second": round(peak),
        "mfu": round(achieved / peak, 3),
        "mfu_at_fastest_step": round(flops_per_step / min(seconds) / peak, 3),  # the CPU may be shared
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def training_step(args: argparse.Namespace, model: Wav2Vec, path: str,
                  losses: list[torch.Tensor]) -> tuple[Callable[[torch.Tensor], None], str]:
    """A function making one update of `model` on wav (B, L) along `path` ("fast" or "plain"), appending its
    loss to `losses`; and the path it takes (the fast one applies only where fastpath.py says)."""
    device = next(model.parameters()).device
    optimizer, scaler = build_optimizer(model, lr=1e-3), make_grad_scaler(device, args.precision)
    forward = torch.compile(model) if args.compile else fast_or_plain(model) if path == "fast" else model
    amp = autocast_context(device, args.precision)
    taken = "fast" if isinstance(forward, FastTraining) else "plain"
    return lambda wav: losses.append(train_step(forward, optimizer, scaler, amp, wav)), taken


def bench_train(args: argparse.Namespace) -> dict:
    """Seconds per training step; with --train-path both, the plain step's too and the ratio; with --data-dir,
    also whether the loader delivers audio fast enough."""
    device = resolve_device(args.device)
    model = build_model(args, device).train()
    paths = ("fast", "plain") if args.train_path == "both" else (args.train_path,)
    losses: dict[str, list[torch.Tensor]] = {path: [] for path in paths}
    steps, taken = {}, {}
    for path in paths:  # each path on its own copy of the same initial weights
        copy_of_model = copy.deepcopy(model) if len(paths) > 1 else model
        steps[path], taken[path] = training_step(args, copy_of_model, path, losses[path])
    batches, source = model_inputs(args, device)
    seconds = time_steps(steps, batches, args.warmup, device)
    flops = TRAIN_FLOPS_FACTOR * sum(model.forward_flops(args.segment_length).values()) * args.batch_size
    result = step_report(args, device, seconds[paths[0]], flops,
                         "3 x analytic forward_flops (objective included)", source)
    result["training_path"] = taken[paths[0]]
    result["last_loss"] = round(losses[paths[0]][-1].item(), 4)
    if args.train_path == "both":
        result.update(path_comparison(seconds, taken["plain"], result))
    result.update(cuda_report(device, steps[paths[0]], batches[-1]))
    if args.data_dir is not None:
        result.update(loader_comparison(args, result["audio_seconds_per_second"]))
    return result


def cuda_report(device: torch.device, step: Callable[[torch.Tensor], object], wav: torch.Tensor) -> dict:
    """On CUDA, the peak memory of the steps so far and the host-device syncs inside one more step, as
    torch.cuda.set_sync_debug_mode("warn") reports them (each one stalls the queue of GPU work); nothing on
    the CPU."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(wav)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return {"cuda_peak_memory_gb": round(peak, 2), "host_syncs_per_step": len(syncs),
            "host_syncs": sorted(set(syncs))}


def path_comparison(seconds: dict[str, list[float]], plain_taken: str, result: dict) -> dict:
    """The plain step's timings next to the fast one's (`result`): medians, MFU and the ratios fast / plain,
    of the medians and the median of each batch's pair (the steps took turns on every batch)."""
    fast, plain = seconds["fast"], seconds["plain"]
    median = statistics.median(plain)
    return {
        "plain_training_path": plain_taken,
        "plain_step_seconds": [round(s, 4) for s in plain],
        "plain_seconds_per_step_median": round(median, 4),
        "plain_seconds_per_step_min": round(min(plain), 4),
        "plain_mfu": round(result["flops_per_step"] / median / result["matmul_peak_flops_per_second"], 3),
        "fast_over_plain_median": round(statistics.median(fast) / median, 3),
        "fast_over_plain_paired": round(statistics.median(f / p for f, p in zip(fast, plain, strict=True)),
                                        3),
    }


def loader_comparison(args: argparse.Namespace, consumed: float) -> dict:
    """Loader throughput next to the step's consumption (audio s/s), and the workers that would keep up."""
    loader = bench_loader(args)
    per_worker = loader["audio_seconds_per_second_per_worker"]
    return {
        "loader_num_workers": args.num_workers,
        "loader_audio_seconds_per_second": loader["audio_seconds_per_second"],
        "loader_keeps_up": loader["audio_seconds_per_second"] >= consumed,
        "loader_workers_needed": math.ceil(consumed / per_worker) if per_worker > 0 else None,
    }


def bench_extract(args: argparse.Namespace) -> dict:
    """Seconds per model.extract_features call (z and c, no gradients) under autocast."""
    device = resolve_device(args.device)
    model = build_model(args, device).eval()
    extract = torch.compile(model.extract_features) if args.compile else model.extract_features
    amp = autocast_context(device, args.precision)

    def step(wav: torch.Tensor) -> None:
        with amp:
            extract(wav)

    batches, source = model_inputs(args, device)
    seconds = time_steps({"extract": step}, batches, args.warmup, device)["extract"]
    flops = sum(model.forward_flops(args.segment_length, objective=False).values()) * args.batch_size
    return step_report(args, device, seconds, flops, "analytic forward_flops (encoder and context only)",
                       source)


# ----- streaming ------------------------------------------------------------------------------------

STREAM_PRESETS = ("wav2vec_tiny", "wav2vec")  # both with per-frame LayerNorm: group norm cannot stream


def hop_activation_bytes(step: StreamingStep) -> int:
    """Peak float32 activation memory of one hop: the largest layer input window (its buffer and the new
    frames) plus that layer's output, plus the residual it carries; the state is counted separately."""
    cfg, peak = step.model.config, 0
    frames, c_in = cfg.stride, 1  # new input per hop: samples, then frames of each layer
    for (c_out, _, s), buffer in zip(cfg.encoder_layers, step.buffer_lengths, strict=True):
        peak = max(peak, c_in * (buffer + frames) + c_out * (frames // s))
        frames, c_in = frames // s, c_out
    for c_out, k, _ in cfg.context_layers:
        peak = max(peak, c_in * k + c_out + (c_in if cfg.skip_connections else 0))
        c_in = c_out
    return 4 * peak


def call_latencies(step: Callable[[np.ndarray], object], wav: np.ndarray, samples: int,
                   warmup: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of this thread for each call on consecutive `samples`-long chunks of wav,
    after `warmup` untimed calls. On a shared CPU the wall clock counts the time other jobs held the core;
    the thread's CPU time does not (one thread: PyTorch and ONNX Runtime compute on the calling thread)."""
    wall, cpu = [], []
    for i, start in enumerate(range(0, len(wav) - samples + 1, samples)):
        chunk = wav[start:start + samples]
        begin, begin_cpu = time.perf_counter(), time.thread_time()
        step(chunk)
        if i >= warmup:
            wall.append(time.perf_counter() - begin)
            cpu.append(time.thread_time() - begin_cpu)
    return wall, cpu


def traced_stepper(path: Path, state: list[torch.Tensor]) -> Callable[[np.ndarray], None]:
    """A chunk function around a traced TorchScript step that feeds each call's state to the next."""
    traced = torch.jit.load(str(path))

    @torch.no_grad()
    def step(chunk: np.ndarray) -> None:
        state[:] = traced(torch.from_numpy(chunk)[None], *state)[2:]
    return step


def stream_row(preset: str, runtime: str, chunk_ms: int, seconds: tuple[list[float], list[float]],
               **fields) -> dict:
    ordered, cpu = sorted(seconds[0]), statistics.median(seconds[1])
    median = statistics.median(ordered)
    return {"preset": preset, "runtime": runtime, "chunk_ms": chunk_ms, **fields,
            "latency_ms_median": round(1e3 * median, 4),
            "latency_ms_p99": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
            "real_time_factor": round(chunk_ms / 1e3 / median, 1),
            "cpu_ms_median": round(1e3 * cpu, 4), "real_time_factor_cpu": round(chunk_ms / 1e3 / cpu, 1)}


def stream_rows(model: Wav2Vec, preset: str, hops: int, wav: np.ndarray, calibration: list[np.ndarray],
                warmup: int, shape: dict) -> list[dict]:
    """One layout's rows at chunks of `hops` hops: PyTorch, TorchScript, ONNX Runtime fp32 and int8."""
    samples, chunk_ms = hops * SAMPLE_RATE // 100, hops * 10
    streamer = model.streamer()
    seconds = call_latencies(lambda chunk: streamer.push(torch.from_numpy(chunk)), wav, samples, warmup)
    rows = [stream_row(preset, "pytorch", chunk_ms, seconds, precision="fp32", **shape)]
    with tempfile.TemporaryDirectory() as tmp:
        ondevice.export_torchscript(model, Path(tmp) / "step.pt", streaming=True, hops=hops)
        step = traced_stepper(Path(tmp) / "step.pt", StreamingStep(model, hops).initial_state())
        seconds = call_latencies(step, wav, samples, warmup)
        rows.append(stream_row(preset, "torchscript", chunk_ms, seconds, precision="fp32", **shape))
        files = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8.onnx"}
        ondevice.export_onnx(model, files["fp32"], streaming=True, hops=hops)
        ondevice.quantize_int8(files["fp32"], files["int8"], calibration)
        for precision, path in files.items():
            onnx_streamer = ondevice.OnnxStreamer(ondevice.onnx_session(path, threads=1))
            seconds = call_latencies(onnx_streamer.step, wav, samples, warmup)
            rows.append(stream_row(preset, "onnxruntime", chunk_ms, seconds, precision=precision, **shape,
                                   file_bytes=path.stat().st_size))
    return rows


def bench_stream(args: argparse.Namespace) -> dict:
    """Latency per call on one CPU thread, audio pushed in chunks of each --chunk-ms, streamed by PyTorch
    (Streamer.push, and the traced step of export.py --format torchscript --streaming; fp32) and by ONNX
    Runtime (the exported step graph, fp32 and int8), for each --presets layout with per-frame LayerNorm."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    calibration = (ondevice.calibration_audio(args.data_dir) if args.data_dir is not None
                   else [(0.1 * rng.standard_normal(3 * SAMPLE_RATE)).astype(np.float32)])
    rows = []
    for preset in args.presets:
        torch.manual_seed(args.seed)
        model = Wav2Vec(Wav2VecConfig.preset(preset, norm="layer")).eval()
        step = StreamingStep(model)
        shape = {"parameters": ondevice.extractor_parameters(model),
                 "macs_per_second": sum(model.forward_flops(SAMPLE_RATE, objective=False).values()) // 2,
                 "state_bytes": sum(t.numel() * t.element_size() for t in step.initial_state()),
                 "peak_activation_bytes": hop_activation_bytes(step)}
        for chunk_ms in args.chunk_ms:
            hops = chunk_ms // 10
            calls = math.ceil(args.hops / hops) + args.warmup
            wav = (0.1 * rng.standard_normal(calls * hops * SAMPLE_RATE // 100)).astype(np.float32)
            rows += stream_rows(model, preset, hops, wav, calibration, args.warmup, shape)
    return {"what": "stream", "hops": args.hops, "warmup": args.warmup, "threads": torch.get_num_threads(),
            "calibration": str(args.data_dir) if args.data_dir is not None else "noise",
            "torch_version": torch.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
            "rows": rows}


BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "loader": bench_loader,
    "train": bench_train,
    "extract": bench_extract,
    "stream": bench_stream,
}


def print_table(result: dict) -> None:
    """One aligned `name  value` line per result; a list of rows (stream) as a table after them."""
    width = max(map(len, result))
    for name, value in result.items():
        if name != "rows":
            print(f"{name:<{width}}  {value}")
    rows = result.get("rows", [])
    if rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
        for line in [dict(zip(columns, columns, strict=True)), *rows]:
            print("  ".join(f"{str(line.get(c, '')):>{widths[c]}}" for c in columns))


def busy_warning(load: float) -> str | None:
    """The warning for a machine that other jobs keep busy (1-minute load average `load` before we start)."""
    if load < BUSY_LOAD:
        return None
    return (f"The load average is {load:.2f} before the benchmark starts: other jobs share the CPU, so these "
            "timings are not an idle machine's. Compare variants as ratios measured in one run, or wait for "
            "an idle machine.")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark the arguments name, print it as a table, write the JSON; return the result."""
    args = parse_args(argv)
    setup_logging(progress=args.progress)
    if args.what == "loader" and args.data_dir is None:  # a refusal comes before the busy-machine warning
        raise UserError("--what loader needs --data-dir.")
    set_threads(args.threads)
    load = os.getloadavg()[0]
    warning = busy_warning(load)
    if warning:
        log.warning(warning)
    result = {**BENCHMARKS[args.what](args), "load_average_before": round(load, 2)}
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    run_cli(main)
