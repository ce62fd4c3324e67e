"""Benchmarks, one per --what: each times its work over several repeats after a warm-up, reports the median.

    python bench.py --what loader --data-dir DIR [--segment-length 32000] [--batch-size 8] [--num-workers 0]
                    [--packed DIR_FOR_PACKED] [--batches 50] [--repeats 5] --json OUT.json

loader: training batches exactly as main.py draws them (random crops, EpochSampler, make_loader), decoded on
the fly or, with --packed, sliced from a packed 16 kHz corpus (prepared there on first use). Reports audio
seconds delivered per wall-clock second, in all and per worker process (max(1, num_workers)): how many
workers keep a given model fed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from data import (
    SAMPLE_RATE,
    CropDataset,
    EpochSampler,
    PackedCropDataset,
    build_manifest,
    make_loader,
    prepare_packed_corpus,
)
from model import UserError
from utils import run_cli, setup_logging

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("benchmark")
    what.add_argument("--what", choices=sorted(BENCHMARKS), default="loader", help="what to time")
    what.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    what.add_argument("--warmup", type=int, default=5, help="batches run before timing (workers start here)")
    what.add_argument("--json", type=Path, help="also write the results to this JSON file")
    what.add_argument("--seed", type=int, default=0, help="seed of the sampler and the crops")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, help="folder of audio, searched recursively")
    data.add_argument("--cache-dir", type=Path,
                      help="where the manifest goes (default: the data folder, else ~/.cache/wav2vec)")
    data.add_argument("--packed", type=Path,
                      help="read crops from a packed 16 kHz corpus in this folder (made on first use)")
    data.add_argument("--segment-length", type=int, default=32000, help="samples per crop at 16 kHz")
    data.add_argument("--pad-short", action="store_true", help="zero-pad files shorter than a crop, not skip")
    data.add_argument("--use-transforms", action="store_true", help="apply the training augmentations")
    loader = parser.add_argument_group("loader")
    loader.add_argument("--batch-size", type=int, default=8, help="crops per batch")
    loader.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    loader.add_argument("--batches", type=int, default=50, help="batches per timed repeat")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batches < 1 or args.warmup < 0:
        parser.error("--repeats and --batches must be at least 1, --warmup at least 0")
    return args


def endless_batches(loader: torch.utils.data.DataLoader, sampler: EpochSampler) -> Iterator[torch.Tensor]:
    """Batches epoch after epoch, so a small corpus can still fill every repeat."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_loader(args: argparse.Namespace) -> dict:
    """Audio seconds per second that make_loader delivers, on the fly or from a packed corpus."""
    if args.data_dir is None:
        raise UserError("--what loader needs --data-dir.")
    entries = build_manifest(args.data_dir, args.cache_dir)
    options = dict(segment_length=args.segment_length, train=True, transforms=args.use_transforms,
                   pad_short=args.pad_short, seed=args.seed)
    if args.packed is not None:
        dataset = PackedCropDataset(prepare_packed_corpus(args.data_dir, entries, args.packed), **options)
    else:
        dataset = CropDataset(args.data_dir, entries, **options)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=args.seed)
    loader = make_loader(dataset, sampler, args.batch_size, num_workers=args.num_workers, seed=args.seed)

    batches = endless_batches(loader, sampler)
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
        "source": "packed" if args.packed is not None else "on the fly",
        "data_dir": str(args.data_dir),
        "files": len(dataset),
        "segment_length": args.segment_length,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "transforms": args.use_transforms,
        "batches_per_repeat": args.batches,
        "repeat_seconds": [round(s, 4) for s in seconds],
        "audio_seconds_per_second": round(median, 1),
        "audio_seconds_per_second_min": round(speeds[0], 1),
        "audio_seconds_per_second_max": round(speeds[-1], 1),
        "audio_seconds_per_second_per_worker": round(median / max(1, args.num_workers), 1),
        "batches_per_second": round(median / (args.batch_size * args.segment_length / SAMPLE_RATE), 2),
        "read_errors": dataset.num_read_errors,
    }


BENCHMARKS: dict[str, Callable[[argparse.Namespace], dict]] = {"loader": bench_loader}


def print_table(result: dict) -> None:
    """One aligned `name  value` line per result."""
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    result = BENCHMARKS[args.what](args)
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    run_cli(main)
