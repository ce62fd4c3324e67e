"""What finetune.py feeds a head: inputs computed once up to the last frozen stage, crops, padded batches,
length-bucketed batches for recognition, and the head's feature statistics.

A fine-tuned model (heads.FineTuned) runs in stages, wav (L,) --latent--> z or MFCCs (C, T) --frames--> the
frames its head reads. What is frozen is computed once per file and cached ("frames" with --freeze all,
"latent" with --freeze encoder); what trains, or what augmentation changes, is recomputed every batch ("wav").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from data import FRAME_HOP, SAMPLE_RATE, augment, change_speed, load_audio
from heads import FineTuned, pad_frames
from labels import first_few
from utils import UserError, progress_bar, temporary_beside

log = logging.getLogger(__name__)

STATS_FILES = 200  # training files, spread over the fold, whose frames set the head's standardisation


def cached_stage(args: argparse.Namespace) -> str:
    """What each training item starts from: "frames" (backbone frozen), "latent" (encoder frozen) or
    "wav". Waveform augmentation needs the waveform, so it turns the cache off."""
    if args.augment or args.speed or args.freeze == "none":
        return "wav"
    if args.freeze == "all" or args.checkpoint == "mfcc":
        return "frames"
    return "latent"


@torch.no_grad()
def prepare_inputs(model: FineTuned, paths: Sequence[Path], stage: str, device: torch.device) -> list:
    """Per file: the waveform (numpy, stage "wav"), or the output of the frozen stages, computed once (in
    float16 for every layer's frames, layer "all", which are nine times the frames of one layer)."""
    inputs = []
    for path in progress_bar(paths, desc=f"loading ({stage})", unit="file", leave=False):
        wav = load_audio(path, SAMPLE_RATE)
        shortest = model.shortest_input
        if len(wav) < shortest:
            raise UserError(f"{path} is shorter than one frame ({len(wav)} of {shortest} samples at 16 kHz): "
                            "remove it or pad it.")
        if stage == "wav":
            inputs.append(wav)
            continue
        x = model.latent(torch.from_numpy(wav).to(device))
        if stage == "frames":
            x = model.frames(x)
            x = x.half() if model.config.layer == "all" else x
        inputs.append(x.cpu())
    return inputs


def cached_inputs(cache_dir: Path | None, key: dict, compute: Callable[[], list]) -> list:
    """compute()'s inputs, or with a cache folder those a run with the same key (backbone, stage, layer,
    files) kept there: the frozen frames are computed once for every head and recipe tried on them."""
    if cache_dir is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"inputs_{key['stage']}_{digest}.pt"
    if path.is_file():
        log.info("inputs from the cache %s", path)
        return torch.load(path, weights_only=True)
    inputs = compute()
    tmp = temporary_beside(path)
    torch.save(inputs, tmp)
    os.replace(tmp, path)  # whole or absent: an interrupted save leaves no cache to trust
    return inputs


def frame_counts(model: FineTuned, inputs: Sequence) -> np.ndarray:
    """(items,) the number of frames the head sees for each input, whatever its stage."""
    def count(item) -> int:
        if isinstance(item, np.ndarray):  # a waveform
            return model.num_frames(len(item))
        return item.shape[-1]
    return np.array([count(item) for item in inputs])


def ctc_feasible(model: FineTuned, transcripts: Sequence[Sequence[str]], names: Sequence[str],
                 inputs: Sequence, speed: float = 0.0) -> np.ndarray:
    """(files,) whether each file has output frames enough for its transcript: CTC needs one per symbol and
    one more between equal neighbours, in the fewest frames speed perturbation can leave. The others are
    named and counted in a warning, for the caller to leave out."""
    frames = model.output_lengths(np.floor(frame_counts(model, inputs) / (1 + speed)).astype(int))
    needed = np.array([len(t) + sum(a == b for a, b in zip(t, t[1:], strict=False)) for t in transcripts])
    short = np.flatnonzero(frames < needed)
    if len(short):
        named = [f"{names[i]} ({int(frames[i])} frames, {needed[i]} needed)" for i in short]
        log.warning("%d files are too short for their transcripts (CTC needs an output frame per symbol, and "
                    "one more between repeats): %s: skipped", len(short), first_few(named))
    return frames >= needed


def crop(item: np.ndarray | torch.Tensor, length: int, rng: np.random.Generator) -> np.ndarray | torch.Tensor:
    """A random window of at most `length` along the last axis (samples or frames)."""
    total = item.shape[-1]
    if total <= length:
        return item
    start = int(rng.integers(0, total - length + 1))
    return item[..., start:start + length]


def batch_frames(model: FineTuned, items: Sequence, stage: str, device: torch.device,
                 train: bool = False, rng: np.random.Generator | None = None,
                 args: argparse.Namespace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded frames (B, [layers,] C, T) and mask (B, T) for items at `stage`; training crops (not for
    recognition: a transcript covers its whole file) and augments."""
    frames = []
    for item in items:
        if train:
            if model.config.task != "ctc":
                per_second = SAMPLE_RATE if stage == "wav" else SAMPLE_RATE // FRAME_HOP
                item = crop(item, int(args.crop_seconds * per_second), rng)
            if stage == "wav" and args.speed:
                item = change_speed(item, rng, args.speed, model.shortest_input)
            if stage == "wav" and args.augment:
                item = augment(item.copy(), rng)
        if stage == "wav":
            item = model.latent(torch.from_numpy(np.ascontiguousarray(item)).to(device))
        item = item.to(device).float()
        frames.append(model.frames(item) if stage != "frames" else item)
    return pad_frames(frames)


def bucketed_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """`rows` in batches of batch_size rows of similar length (little padding for a recurrent head to run
    over), the batches in random order; rows of equal length are shuffled among themselves."""
    shuffled = rng.permutation(rows)
    by_length = shuffled[np.argsort(lengths[shuffled], kind="stable")]
    batches = [by_length[begin:begin + batch_size] for begin in range(0, len(by_length), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def set_feature_statistics(model: FineTuned, inputs: Sequence, stage: str, device: torch.device) -> None:
    """Per-channel mean and std of the (mixed) frames of up to STATS_FILES training files spread over the
    fold (not its first files: sorted names put one class or speaker first)."""
    spread = [inputs[i] for i in np.linspace(0, len(inputs) - 1, min(STATS_FILES, len(inputs))).astype(int)]
    frames = [model.mix(batch_frames(model, [item], stage, device)[0])[0] for item in spread]
    every = torch.cat(frames, -1)  # (C, all frames)
    model.feature_mean.copy_(every.mean(-1))
    model.feature_std.copy_(every.std(-1).clamp(min=1e-5))
