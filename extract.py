"""Turn every audio file under a folder into wav2vec features: frame-level arrays or pooled vectors.

    python extract.py --checkpoint CKPT --data-dir DIR --output OUT [--layer z] [--pool mean+std]

OUT is a folder (one .npy per audio file, mirroring the tree under DIR: a.wav -> OUT/a.npy) or, when it
ends with .npz, one archive holding `files` (relative paths) and `features`: (N, D) pooled vectors, or
with --pool none every file's frames concatenated along time, (C, sum T), with their `lengths` (N,).
Frame-level arrays are channels-first (C, T), one frame per 10 ms; frame t covers samples
[160 t, 160 t + 465). Checkpoints of this repository and fairseq wav2vec 1.0 checkpoints both load;
--checkpoint also takes the baselines (random:CKPT, random, mfcc) and offline ONNX graphs, as probe.py does.
--pool defaults to none (the frames: extraction's job); probe.py and finetune.py pool with mean+std.

Long files (over --chunk-seconds) are processed in chunks with the receptive field of c as left context,
so memory stays bounded. For norm="layer" models this is exact. For norm="group" models (the default)
GroupNorm statistics span the whole input, so a chunked file is normalised chunk by chunk: an
approximation, which is why such files are processed whole whenever they fit under --chunk-seconds.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from data import SAMPLE_RATE, find_audio_files
from features import BACKBONE_HELP, LAYERS, POOLINGS, backbone_config, featurizer, file_frames, pool
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_progress_argument,
    add_threads_argument,
    check_writable_dir,
    ensure_writable_file,
    resolve_device,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", required=True, help=BACKBONE_HELP)
    io.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    io.add_argument("--output", type=Path, required=True,
                    help="a folder for one .npy per file, or a path ending in .npz for one archive")
    feats = parser.add_argument_group("features")
    feats.add_argument("--layer", choices=LAYERS, default="c",
                       help="c: context network output (default); z: encoder output")
    feats.add_argument("--pool", choices=POOLINGS, default="none",
                       help="none: frames (C, T); mean: (C,); mean+std: (2C,), over time")
    feats.add_argument("--seed", type=int, default=0, help="seed of a random:CKPT or random network")
    compute = parser.add_argument_group("compute")
    add_device_argument(compute)
    compute.add_argument("--batch-size", type=int, default=8,
                         help="files loaded at a time; those of equal length share one forward pass")
    compute.add_argument("--chunk-seconds", type=float, default=60.0,
                         help="most audio through the model at once; longer files are chunked "
                              "(exact for norm=layer models, approximate GroupNorm statistics otherwise)")
    add_threads_argument(compute)
    add_progress_argument(compute)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.chunk_seconds <= 0:
        raise UserError("--batch-size and --chunk-seconds must be positive.")
    if args.output.suffix == ".npy":
        raise UserError(f"--output {args.output} names one .npy file, but every audio file gets its own: "
                        f"give a folder (--output {args.output.with_suffix('')}) or one archive "
                        f"(--output {args.output.with_suffix('.npz')}).")
    return args


def npy_paths(files: list[Path], data_dir: Path, output: Path) -> list[Path]:
    """OUT/<relative path>.npy for every file, refusing two files that would share one output."""
    targets = [output / f.relative_to(data_dir).with_suffix(".npy") for f in files]
    if len(set(targets)) != len(targets):
        raise UserError(f"Two audio files under {data_dir} differ only in their extension; "
                        "write one .npz instead (--output features.npz) or rename one.")
    return targets


def save_npz(output: Path, names: list[str], arrays: list[np.ndarray], how: str) -> None:
    """One archive: pooled vectors stacked (N, D), or frames concatenated along time (C, sum T) + lengths."""
    if how == "none":
        np.savez(output, files=np.array(names), features=np.concatenate(arrays, axis=1),
                 lengths=np.array([a.shape[1] for a in arrays]))
    else:
        np.savez(output, files=np.array(names), features=np.stack(arrays))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(progress=args.progress)
    set_threads(args.threads)
    files = find_audio_files(args.data_dir)
    if not files:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    to_npz = args.output.suffix == ".npz"
    targets = {} if to_npz else dict(zip(files, npy_paths(files, args.data_dir, args.output), strict=True))
    if to_npz:
        ensure_writable_file(args.output, "--output")
    else:
        check_writable_dir(args.output, "--output")

    device = resolve_device(args.device)
    frames_of, window = featurizer(args.checkpoint, args.layer, args.seed, device,
                                   int(args.chunk_seconds * SAMPLE_RATE))
    config = backbone_config(args.checkpoint)
    if config is not None:
        exactness = "exact" if config.norm == "layer" else "approximate GroupNorm statistics"
        log.info("%s: norm=%s, on %s; %d files; files over %g s are chunked (%s)", args.checkpoint,
                 config.norm, device, len(files), args.chunk_seconds, exactness)

    start = time.perf_counter()
    names, arrays = [], []
    for path, frames in file_frames(files, frames_of, window, args.batch_size, desc="extract"):
        vector = pool(frames, args.pool)
        names.append(path.relative_to(args.data_dir).as_posix())
        if to_npz:
            arrays.append(vector)
        else:
            targets[path].parent.mkdir(parents=True, exist_ok=True)
            np.save(targets[path], vector)
    if to_npz:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        save_npz(args.output, names, arrays, args.pool)
    log.info("wrote %s features of %d files to %s in %.1f s", args.layer, len(names), args.output,
             time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
