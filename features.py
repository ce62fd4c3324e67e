"""Frame features for downstream use: a wav2vec model's z or c (chunked for long audio), MFCCs, pooling.

Waveforms are float32 numpy arrays at 16 kHz; frame features are channels-first (C, T), one frame per
10 ms; pooled features are vectors.

Long audio and chunking. At most `chunk_samples` of audio go through the model at once. A longer file
is cut into chunks of whole output frames; each chunk is fed the receptive field of c as left context
(encoder receptive field + (context frames - 1) * stride = 465 + 18 * 160 = 3345 samples for the base
model), starting on the 160-sample stride, and the frames computed from that context are dropped.
The convolutions therefore see exactly the samples they see in the whole file:
- norm="layer" models (per-frame statistics): chunked features equal whole-file features (up to float
  rounding), whatever the chunk size.
- norm="group" models (the default; statistics over the whole input): a file that fits is processed
  whole, so its features are exact. A longer file is split into equal chunks of between half and all of
  `chunk_samples`, and each chunk is normalised with its own statistics: an approximation, close when
  chunks are long (tens of seconds) because the statistics of long stretches of speech change little.
  (Measured on 60 s of read speech with a randomly initialised base model and 20 s chunks: every frame
  of c has cosine similarity >= 0.997 to its whole-file value; the mean-pooled vector is within 1.4%.)
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import scipy.fft
import torch
from tqdm import tqdm

from data import load_audio
from model import UserError, Wav2Vec

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
POOLINGS = ("none", "mean", "mean+std")
LAYERS = ("c", "z")

# MFCC framing: a 25 ms window every 10 ms, the model's own frame rate.
MFCC_WINDOW = 400
MFCC_HOP = 160
MFCC_FILTERS = 40
MFCC_COEFFICIENTS = 13
PRE_EMPHASIS = 0.97


# ----- wav2vec features ---------------------------------------------------------------------------

def context_frames(model: Wav2Vec) -> int:
    """Frames of z that one frame of c depends on (19 for the base model: 9 layers of kernel 3)."""
    return 1 + sum(k - 1 for _, k, _ in model.config.context_layers)


def chunk_windows(model: Wav2Vec, length: int, chunk_samples: int) -> list[tuple[int, int, int]]:
    """(input start, input end, frames to drop) per chunk, so that the kept frames tile the file's frames.

    Each chunk's input, context included, spans at most `chunk_samples` samples, or one output frame and
    its context when `chunk_samples` is smaller than that."""
    stride, field = model.config.stride, model.receptive_field
    left = context_frames(model) - 1  # frames of z before the first output frame that c(t) looks at
    total = model.num_frames(length)
    per_chunk = max(1, (chunk_samples - field) // stride + 1 - left)
    # Equal chunks rather than full ones plus a short remainder: no chunk has tiny GroupNorm statistics.
    bounds = np.linspace(0, total, math.ceil(total / per_chunk) + 1).round().astype(int)
    windows = []
    for first, end in zip(bounds[:-1], bounds[1:], strict=True):
        start = max(0, first - left)  # in frames; frame t starts at sample t * stride
        windows.append((int(start * stride), int((end - 1) * stride + field), int(first - start)))
    return windows


Layers = dict[str, np.ndarray]  # "z" and "c" -> frames of that layer


def _run(model: Wav2Vec, wavs: np.ndarray) -> Layers:
    """wavs (B, L) -> features (B, C, T) of both layers as float32 numpy (c needs z anyway)."""
    feats = model.extract_features(torch.from_numpy(np.ascontiguousarray(wavs, dtype=np.float32)))
    return {layer: feats[layer].float().cpu().numpy() for layer in LAYERS}


def chunked_layers(model: Wav2Vec, wav: np.ndarray, chunk_samples: int = 60 * SAMPLE_RATE) -> Layers:
    """wav (L,) -> frames (C, T) of z and c with T = model.num_frames(L), never feeding more than one chunk
    at once."""
    if model.num_frames(len(wav)) < 1:
        raise UserError(f"Audio of {len(wav)} samples is shorter than one frame "
                        f"({model.receptive_field} samples at 16 kHz).")
    if len(wav) <= chunk_samples:
        return {layer: frames[0] for layer, frames in _run(model, wav[None]).items()}
    parts = [(_run(model, wav[None, start:end]), drop)
             for start, end, drop in chunk_windows(model, len(wav), chunk_samples)]
    return {layer: np.concatenate([part[layer][0, :, drop:] for part, drop in parts], axis=1)
            for layer in LAYERS}


def chunked_features(model: Wav2Vec, wav: np.ndarray, layer: str = "c",
                     chunk_samples: int = 60 * SAMPLE_RATE) -> np.ndarray:
    """wav (L,) -> frames (C, T) of one layer; see chunked_layers."""
    return chunked_layers(model, wav, chunk_samples)[layer]


def equal_length_batches(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices grouped into batches of equal length and at most max_samples of audio (one file at least):
    only equal lengths share a forward pass, as padding would change GroupNorm statistics."""
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    batches = []
    for length, indices in by_length.items():
        per_batch = max(1, max_samples // max(length, 1))
        batches += [indices[begin:begin + per_batch] for begin in range(0, len(indices), per_batch)]
    return batches


def model_layers(model: Wav2Vec, wavs: Sequence[np.ndarray],
                 chunk_samples: int = 60 * SAMPLE_RATE) -> list[Layers]:
    """Frames (C, T) of z and c for each waveform (L,), from one forward pass; equal-length waveforms share a
    batch of at most chunk_samples."""
    out: list[Layers | None] = [None] * len(wavs)
    for batch in equal_length_batches([len(wav) for wav in wavs], chunk_samples):
        if len(batch) == 1:  # whole when it fits, in chunks when it is longer
            out[batch[0]] = chunked_layers(model, wavs[batch[0]], chunk_samples)
            continue
        feats = _run(model, np.stack([wavs[i] for i in batch]))
        for position, i in enumerate(batch):
            out[i] = {layer: frames[position] for layer, frames in feats.items()}
    return out


def model_features(model: Wav2Vec, wavs: Sequence[np.ndarray], layer: str = "c",
                   chunk_samples: int = 60 * SAMPLE_RATE) -> list[np.ndarray]:
    """Frames (C, T) of one layer for each waveform (L,); see model_layers."""
    if layer not in LAYERS:
        raise UserError(f"--layer must be one of {LAYERS}, not {layer!r}.")
    return [frames[layer] for frames in model_layers(model, wavs, chunk_samples)]


# ----- MFCC baseline ------------------------------------------------------------------------------

def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank(n_filters: int, n_fft: int, sample_rate: int) -> np.ndarray:
    """(n_filters, n_fft // 2 + 1) triangular filters, equally spaced on the mel scale from 0 to Nyquist."""
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_filters + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def deltas(feats: np.ndarray, width: int = 2) -> np.ndarray:
    """feats (D, T) -> regression deltas (D, T): sum_n n (x[t+n] - x[t-n]) / (2 sum_n n^2), edges repeated."""
    padded = np.pad(feats, ((0, 0), (width, width)), mode="edge")
    frames = feats.shape[1]
    numerator = sum(n * (padded[:, width + n:width + n + frames] - padded[:, width - n:width - n + frames])
                    for n in range(1, width + 1))
    return numerator / (2 * sum(n * n for n in range(1, width + 1)))


def mfcc(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """wav (L,) -> 13 MFCCs and their deltas (26, T), frame t covering samples [160 t, 160 t + 400)."""
    if sample_rate != SAMPLE_RATE:
        raise UserError(f"MFCCs are defined here on 16 kHz audio, got {sample_rate} Hz; resample first.")
    if len(wav) < MFCC_WINDOW:
        raise UserError(f"Audio of {len(wav)} samples is shorter than one 25 ms MFCC frame.")
    wav = np.asarray(wav, dtype=np.float64)
    emphasised = np.append(wav[:1], wav[1:] - PRE_EMPHASIS * wav[:-1])
    frames = np.lib.stride_tricks.sliding_window_view(emphasised, MFCC_WINDOW)[::MFCC_HOP]  # (T, 400)
    n_fft = 512
    power = np.abs(np.fft.rfft(frames * np.hamming(MFCC_WINDOW), n_fft)) ** 2 / n_fft  # (T, 257)
    energies = power @ mel_filterbank(MFCC_FILTERS, n_fft, sample_rate).T  # (T, 40)
    log_energies = np.log(np.maximum(energies, 1e-10))  # floor: digital silence would give -inf
    cepstra = scipy.fft.dct(log_energies, type=2, norm="ortho", axis=1)[:, :MFCC_COEFFICIENTS].T  # (13, T)
    return np.concatenate([cepstra, deltas(cepstra)]).astype(np.float32)


# ----- files and pooling -------------------------------------------------------------------------

FramesOf = Callable[[list[np.ndarray]], list[np.ndarray]]  # waveforms (L,) -> frames (C, T), in order


def file_frames(files: Sequence[Path], frames_of: FramesOf, min_samples: int, batch_size: int = 8,
                desc: str = "features") -> Iterator[tuple[Path, np.ndarray]]:
    """(file, frames (C, T)) for every usable file in order, loaded at 16 kHz `batch_size` files at a time.

    Unreadable files and files shorter than `min_samples` (one frame) are logged and skipped."""
    used = 0
    with tqdm(total=len(files), desc=desc, unit="file") as progress:
        for begin in range(0, len(files), batch_size):
            group, wavs = [], []
            for path in files[begin:begin + batch_size]:
                try:
                    wav = load_audio(path, SAMPLE_RATE)
                except UserError as error:
                    log.warning("skipping: %s", error)
                    continue
                if len(wav) < min_samples:
                    log.warning("skipping %s: %d samples are shorter than one frame (%d)", path, len(wav),
                                min_samples)
                    continue
                group.append(path)
                wavs.append(wav)
            yield from zip(group, frames_of(wavs), strict=True)
            used += len(group)
            progress.update(len(files[begin:begin + batch_size]))
    if not used:
        raise UserError(f"None of the {len(files)} audio files is readable and at least one frame long.")


# ----- per-frame labels --------------------------------------------------------------------------
# A corpus may label every 10 ms: <name>.frames.npy beside <name>.wav holds one label id per frame, label t
# covering samples [160 t, 160 t + 160) (data.make_demo_corpus writes them), and frame_labels.json in the
# data folder may name the ids.

FRAME_HOP = 160  # samples per 10 ms: the hop of wav2vec and MFCC frames and the span of one frame label


def frame_label_path(audio: Path) -> Path:
    """Where the per-frame labels of an audio file live: a.wav -> a.frames.npy."""
    return audio.with_suffix(".frames.npy")


def labels_at_centres(frame_labels: np.ndarray, num_frames: int, window: int) -> np.ndarray:
    """(T,) label of feature frame t, which covers samples [160 t, 160 t + window): the one at its centre."""
    centres = FRAME_HOP * np.arange(num_frames) + window // 2
    return frame_labels[np.minimum(centres // FRAME_HOP, len(frame_labels) - 1)]


def frame_label_names(data_dir: Path) -> list[str] | None:
    """The name of each frame label id from data_dir/frame_labels.json ({"names": [...]}), if there is one."""
    try:
        return [str(name) for name in json.loads((data_dir / "frame_labels.json").read_text())["names"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pool(frames: np.ndarray, how: str) -> np.ndarray:
    """frames (C, T) -> (C, T) for "none", (C,) for "mean", (2C,) for "mean+std" over time."""
    if how == "none":
        return frames
    if how == "mean":
        return frames.mean(axis=1)
    if how == "mean+std":
        return np.concatenate([frames.mean(axis=1), frames.std(axis=1)])
    raise UserError(f"--pool must be one of {POOLINGS}, not {how!r}.")
