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

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import scipy.fft
import torch

from data import FRAME_HOP, SAMPLE_RATE, load_audio, resample
from model import Wav2Vec, Wav2VecConfig, load_checkpoint_weights
from ondevice import onnx_offline, onnx_session
from utils import UserError, progress_bar

log = logging.getLogger(__name__)

POOLINGS = ("none", "mean", "mean+std")
LAYERS = ("c", "z")

# MFCC framing: a 25 ms window every 10 ms (FRAME_HOP), the model's own frame rate.
MFCC_WINDOW = 400
MFCC_FILTERS = 40
MFCC_COEFFICIENTS = 13
PRE_EMPHASIS = 0.97


# ----- waveforms ----------------------------------------------------------------------------------

def load_waveform(wav: str | Path | np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """What every model here takes, float32 mono (L,) at 16 kHz: a file decoded and resampled (any format
    data.py reads; its header gives the rate), or an array or tensor (L,) at `sample_rate`, resampled."""
    if isinstance(wav, (str, Path)):
        return load_audio(wav, SAMPLE_RATE)
    array = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    if array.ndim != 1:
        raise UserError(f"Expected one mono waveform of shape (L,), not {array.shape}: average the channels "
                        "first.")
    return resample(array.astype(np.float32, copy=False), sample_rate).astype(np.float32, copy=False)


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
    frames = np.lib.stride_tricks.sliding_window_view(emphasised, MFCC_WINDOW)[::FRAME_HOP]  # (T, 400)
    n_fft = 512
    power = np.abs(np.fft.rfft(frames * np.hamming(MFCC_WINDOW), n_fft)) ** 2 / n_fft  # (T, 257)
    energies = power @ mel_filterbank(MFCC_FILTERS, n_fft, sample_rate).T  # (T, 40)
    log_energies = np.log(np.maximum(energies, 1e-10))  # floor: digital silence would give -inf
    cepstra = scipy.fft.dct(log_energies, type=2, norm="ortho", axis=1)[:, :MFCC_COEFFICIENTS].T  # (13, T)
    return np.concatenate([cepstra, deltas(cepstra)]).astype(np.float32)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (N, C), b (M, C) -> cosine similarities (N, M); an all-zero row gives zeros rather than NaN."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


# ----- log-mel spectrogram (for pictures) ---------------------------------------------------------

SPECTROGRAM_WINDOW = 400  # 25 ms
SPECTROGRAM_FFT = 1024  # zero-padded so that even the narrowest (lowest) mel filters cover several bins
MEL_BANDS = 80
DYNAMIC_RANGE_DB = 80.0


def log_mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """wav (L,) at 16 kHz -> power in dB (MEL_BANDS, T), frame t covering samples [160 t, 160 t + 400)."""
    wav = np.pad(wav.astype(np.float64), (0, max(0, SPECTROGRAM_WINDOW - len(wav))))
    frames = np.lib.stride_tricks.sliding_window_view(wav, SPECTROGRAM_WINDOW)[::FRAME_HOP]
    power = np.abs(np.fft.rfft(frames * np.hanning(SPECTROGRAM_WINDOW), SPECTROGRAM_FFT)) ** 2
    mel = power @ mel_filterbank(MEL_BANDS, SPECTROGRAM_FFT, SAMPLE_RATE).T  # (T, MEL_BANDS)
    db = 10 * np.log10(np.maximum(mel, 1e-12))
    db -= db.max()  # 0 dB = the loudest bin of the file
    return np.maximum(db, -DYNAMIC_RANGE_DB).T  # a floor: digital silence would swamp the colour scale


# ----- files and pooling -------------------------------------------------------------------------

FramesOf = Callable[[list[np.ndarray]], list[np.ndarray]]  # waveforms (L,) -> frames (C, T), in order


def file_frames(files: Sequence[Path], frames_of: FramesOf, min_samples: int, batch_size: int = 8,
                desc: str = "features") -> Iterator[tuple[Path, np.ndarray]]:
    """(file, frames (C, T)) for every usable file in order, loaded at 16 kHz `batch_size` files at a time.

    Unreadable files and files shorter than `min_samples` (one frame) are logged and skipped."""
    used = 0
    with progress_bar(total=len(files), desc=desc, unit="file") as progress:
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


def pool(frames: np.ndarray, how: str) -> np.ndarray:
    """frames (C, T) -> (C, T) for "none", (C,) for "mean", (2C,) for "mean+std" over time."""
    if how == "none":
        return frames
    if how == "mean":
        return frames.mean(axis=1)
    if how == "mean+std":
        return np.concatenate([frames.mean(axis=1), frames.std(axis=1)])
    raise UserError(f"--pool must be one of {POOLINGS}, not {how!r}.")

# ----- the backbone grammar: what --checkpoint names -----------------------------------------------

BACKBONE_HELP = ("a checkpoint of main.py or of fairseq's wav2vec 1.0; random:CKPT, the network of CKPT's "
                 "configuration randomly initialised with --seed (the baseline to compare CKPT with); "
                 "random, the same for the base configuration (512 channels); mfcc, 13 MFCCs and their "
                 "deltas per 10 ms; or an offline graph written by export.py (.onnx)")


def is_random(spec: str) -> bool:
    """Whether a backbone spec names a randomly initialised network: `random` or `random:CKPT`."""
    return spec == "random" or spec.startswith("random:")


def backbone_config(spec: str) -> Wav2VecConfig | None:
    """The network behind a backbone spec: None for MFCCs and exported graphs, the base preset for `random`,
    the checkpoint's own configuration for `random:CKPT` and a checkpoint path."""
    if spec == "mfcc" or spec.endswith(".onnx"):
        return None
    if spec == "random":
        return Wav2VecConfig.preset("wav2vec")
    return load_checkpoint_weights(spec.removeprefix("random:"))[0]


def load_network(spec: str, seed: int = 0, device: torch.device | str = "cpu",
                 needs: str = "a wav2vec network") -> Wav2Vec:
    """The model in eval mode behind random[:CKPT] (initialised with `seed`) or a checkpoint path; `needs`
    words the error for a spec that names no network (mfcc, .onnx)."""
    config = backbone_config(spec)
    if config is None:
        raise UserError(f"This needs {needs}: give a checkpoint or random:CKPT, not {spec}.")
    if not is_random(spec):
        return Wav2Vec.from_pretrained(spec, map_location=device)
    return random_network(config, seed, device)


def random_network(config: Wav2VecConfig, seed: int = 0, device: torch.device | str = "cpu") -> Wav2Vec:
    """A network of `config` in eval mode, initialised from `seed`: the baseline a checkpoint is compared with
    (every script builds it here, so the same seed gives the same weights everywhere)."""
    torch.manual_seed(seed)
    return Wav2Vec(config).to(device).eval()


def backbone_label(spec: str) -> str:
    """A backbone spec for a title: mfcc, random, a checkpoint's file name, or "random NAME"."""
    if spec in ("mfcc", "random"):
        return spec
    name = Path(spec.removeprefix("random:")).name
    return f"random {name}" if is_random(spec) else name


def featurizer(spec: str, layer: str = "c", seed: int = 0, device: torch.device | str = "cpu",
               chunk_samples: int = 60 * SAMPLE_RATE) -> tuple[FramesOf, int]:
    """(waveforms -> frames (C, T), samples one frame covers) for any backbone spec; `layer` (c or z) is
    ignored by MFCCs."""
    if spec == "mfcc":
        return (lambda wavs: [mfcc(w) for w in wavs]), MFCC_WINDOW
    if spec.endswith(".onnx"):  # an offline graph written by export.py (fp32 or int8), run by ONNX Runtime
        session = onnx_session(Path(spec))
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("form") != "offline":
            raise UserError(f"{spec} is a {meta.get('form', 'foreign')} graph, not features: give the "
                            "offline graph of a pre-trained checkpoint (export.py without --streaming).")
        window = int(meta["receptive_field"])
        return (lambda wavs: [onnx_offline(session, wav)[layer][0] for wav in wavs]), window
    model = load_network(spec, seed, device)
    return partial(model_features, model, layer=layer, chunk_samples=chunk_samples), model.receptive_field
