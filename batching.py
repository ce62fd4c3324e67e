"""What finetune.py feeds a head: inputs computed once up to the last frozen stage, crops, padded batches,
length-bucketed batches for recognition, and the head's feature statistics.

A fine-tuned model (heads.FineTuned) runs in stages, wav (L,) --latent--> z or MFCCs (C, T) --frames--> the
frames its head reads. What is frozen is computed once per file and cached ("frames" with --freeze all,
"latent" with --freeze encoder); what trains, or what augmentation changes, is recomputed every batch ("wav").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import FRAME_HOP, SAMPLE_RATE, augment, change_speed, load_audio
from heads import FineTuned, pad_frames
from utils import UserError

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
    for path in tqdm(paths, desc=f"loading ({stage})", unit="file", leave=False):
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


def frame_counts(model: FineTuned, inputs: Sequence) -> np.ndarray:
    """(items,) the number of frames the head sees for each input, whatever its stage."""
    def count(item) -> int:
        if isinstance(item, np.ndarray):  # a waveform
            return model.num_frames(len(item))
        return item.shape[-1]
    return np.array([count(item) for item in inputs])


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
