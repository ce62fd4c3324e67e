"""Audio data pipeline: discovery, a cached manifest, decoding + resampling, crop datasets, the loader.

Any folder of .wav .flac .mp3 .ogg .m4a (searched recursively) becomes fixed-length 16 kHz mono float32
crops, wav (B, L). Crops live on the 16 kHz timeline whatever the native rate, so the on-the-fly dataset
(a seek + partial read of each file) and the packed one (slices of one int16 memmap) give the same samples
for the same key. Unreadable files are logged once with a reason, counted and skipped, at scan time and at
read time (as are files with NaN or infinite samples, which float WAV can hold); training never stops for
one bad file.

Decoding: libsndfile (soundfile) for WAV, FLAC, OGG and, from libsndfile 1.1 on, MP3; PyAV (FFmpeg) for
M4A/AAC and for any file libsndfile rejects. Resampling: scipy.signal.resample_poly at the reduced ratio.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from functools import cache, partial
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import firwin, resample_poly
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import UserError, progress_bar, temporary_beside

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# 10 ms: the stride of wav2vec's frames, and the hop of MFCCs, spectrograms and per-frame labels.
FRAME_HOP = 160
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# libsndfile decodes MP3 from version 1.1 on; older builds leave MP3 to PyAV.
SOUNDFILE_MP3 = "MP3" in sf.available_formats()
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".ogg"} | ({".mp3"} if SOUNDFILE_MP3 else set()))
MANIFEST_NAME = ".wav2vec_manifest.tsv"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "wav2vec"
PACKED_AUDIO = "audio.int16"  # every usable file at 16 kHz, little-endian int16, back to back
PACKED_INDEX = "index.json"

# The anti-aliasing filter (resample_poly's default design) reaches 10 * max(up, down) taps either side of
# each output sample at the upsampled rate: 10 native samples when upsampling, 10 output samples otherwise.
RESAMPLE_HALF_WIDTH = 10

# Training augmentations (transforms=True), drawn per crop.
GAIN_DB = (-6.0, 6.0)
NOISE_SNR_DB = (10.0, 40.0)
MAX_SHIFT_SECONDS = 0.1
# The share of a corpus that the --segment-length suggested for files shorter than one crop keeps whole.
KEEP_WHOLE = 0.9


# ----- decoding -----------------------------------------------------------------------------------

class AudioReadError(UserError):
    """A file that cannot be decoded; datasets and the scanner log it once, count it and skip it."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"Cannot read audio file {path}: {reason}")
        self.path, self.reason = Path(path), reason


def _reason(error: Exception) -> str:
    """The useful part of a decoder's error message, without the path it repeats."""
    return getattr(error, "error_string", None) or getattr(error, "strerror", None) or str(error)


class _SoundFileReader:
    """libsndfile: exact seeking, so only the frames asked for are decoded."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = sf.SoundFile(str(path))
        except (sf.SoundFileError, OSError) as error:
            raise AudioReadError(path, _reason(error)) from None
        self.samplerate, self.frames, self.channels = (self._file.samplerate, self._file.frames,
                                                       self._file.channels)

    def read(self, begin: int, end: int) -> np.ndarray:
        """Native frames [begin, end) as float32 (frames, channels). A truncated FLAC raises here; a read
        that ends early (an MP3 whose length was estimated from its header) returns fewer frames."""
        try:
            self._file.seek(begin)
            return self._file.read(end - begin, dtype="float32", always_2d=True)
        except (sf.SoundFileError, OSError) as error:
            raise AudioReadError(self.path, _reason(error)) from None

    def close(self) -> None:
        self._file.close()


class _DecodedReader:
    """PyAV: MP4/AAC and MP3 offer no sample-exact seeking, so the whole file is decoded once and sliced."""

    def __init__(self, path: Path):
        self.path = path
        self._audio, self.samplerate = _decode_with_pyav(path)  # (frames, channels)
        self.frames, self.channels = self._audio.shape

    def read(self, begin: int, end: int) -> np.ndarray:
        return self._audio[begin:end]

    def close(self) -> None:
        pass


def _decode_with_pyav(path: Path) -> tuple[np.ndarray, int]:
    """The first audio stream of `path`, all of it: float32 (frames, channels), sample rate."""
    try:
        import av  # lazy: only M4A (and files libsndfile rejects) need FFmpeg
    except ImportError:
        raise UserError(f"Decoding {path.suffix} files such as {path} needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioReadError(path, "no audio stream")
            stream = container.streams.audio[0]
            to_float = av.AudioResampler(format="fltp")  # planar float32 whatever the codec's sample format
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
            rate = stream.rate
    except (av.FFmpegError, OSError) as error:
        raise AudioReadError(path, _reason(error)) from None
    if not chunks or not rate:
        raise AudioReadError(path, "no audio frames could be decoded")
    return np.concatenate(chunks, axis=1).T, rate  # (channels, frames) -> (frames, channels)


def _open_reader(path: Path) -> _SoundFileReader | _DecodedReader:
    """libsndfile where it knows the format, PyAV otherwise and as the fallback when libsndfile refuses."""
    if path.suffix.lower() not in SOUNDFILE_EXTENSIONS:
        return _DecodedReader(path)
    try:
        return _SoundFileReader(path)
    except AudioReadError as soundfile_error:
        if importlib.util.find_spec("av") is None:
            raise
        try:
            return _DecodedReader(path)
        except AudioReadError as pyav_error:
            raise AudioReadError(path, f"{soundfile_error.reason} (PyAV: {pyav_error.reason})") from None


@dataclass(frozen=True)
class AudioInfo:
    frames: int  # at the native sample rate
    sample_rate: int
    channels: int


def probe_audio(path: Path | str) -> AudioInfo:
    """Length, rate and channels from the header (libsndfile) or by decoding (PyAV, exact counts)."""
    path = Path(path)
    reader = _open_reader(path)
    reader.close()
    if min(reader.channels, reader.frames, reader.samplerate) < 1:
        raise AudioReadError(path, "no audio frames")
    return AudioInfo(reader.frames, reader.samplerate, reader.channels)


def _ratio(native_rate: int, sample_rate: int) -> tuple[int, int]:
    """(up, down): the resampling ratio in lowest terms, e.g. 44100 -> 16000 is 160/441."""
    divisor = math.gcd(native_rate, sample_rate)
    return sample_rate // divisor, native_rate // divisor


def resampled_length(frames: int, native_rate: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples that `frames` native frames become at `sample_rate` (resample_poly's ceil(n * up / down))."""
    up, down = _ratio(native_rate, sample_rate)
    return -(-frames * up // down)


@cache
def _lowpass(up: int, down: int) -> np.ndarray:
    """resample_poly's own Kaiser-windowed sinc, designed once per ratio instead of once per crop."""
    width = max(up, down)
    return firwin(2 * RESAMPLE_HALF_WIDTH * width + 1, 1 / width, window=("kaiser", 5.0)).astype(np.float32)


def resample(wav: np.ndarray, native_rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """wav (L,) from native_rate to sample_rate (resample_poly with _lowpass, its filter designed once)."""
    up, down = _ratio(native_rate, sample_rate)
    return wav if up == down or not len(wav) else resample_poly(wav, up, down, window=_lowpass(up, down))


def _native_window(start: int, stop: int, frames: int, up: int, down: int) -> tuple[int, int]:
    """Native frames [begin, end) whose resampling covers output samples [start, stop).

    A margin covers the resampling filter, and `begin` is a multiple of `down` so that the window's
    output lands on the same sample grid as a whole-file resampling: the crop equals that slice of it."""
    if up == down:
        return min(start, frames), min(stop, frames)
    margin = RESAMPLE_HALF_WIDTH * max(up, down) // up + 2
    begin = max(0, start * down // up - margin) // down * down
    end = min(frames, -(-stop * down // up) + margin)
    return min(begin, end), end


def load_audio(path: Path | str, sample_rate: int = SAMPLE_RATE, offset: int = 0,
               num_samples: int | None = None) -> np.ndarray:
    """Decode to float32 mono at `sample_rate`: the whole file, or `num_samples` from `offset` (counted at
    `sample_rate`, zero-padded past the end), reading only the native frames that window needs."""
    path = Path(path)
    reader = _open_reader(path)
    try:
        up, down = _ratio(reader.samplerate, sample_rate)
        total = resampled_length(reader.frames, reader.samplerate, sample_rate)
        stop = total if num_samples is None else offset + num_samples
        begin, end = _native_window(offset, stop, reader.frames, up, down)
        mono = reader.read(begin, end).mean(axis=1)  # mixing before resampling: fewer samples, same result
    finally:
        reader.close()
    bad = np.count_nonzero(~np.isfinite(mono))  # only float formats can hold them; one poisons every update
    if bad:
        raise AudioReadError(path, f"it holds NaN or infinite samples ({bad} of the {len(mono)} read)")
    wav = resample(mono, reader.samplerate, sample_rate)
    first = offset - begin * up // down
    wav = wav[first:stop - begin * up // down].astype(np.float32, copy=False)
    if num_samples is not None and len(wav) < num_samples:
        wav = np.pad(wav, (0, num_samples - len(wav)))
    return wav


# ----- discovery and the manifest -----------------------------------------------------------------

def find_audio_files(data_dir: Path | str) -> list[Path]:
    """Every audio file under `data_dir` (recursive, extensions case-insensitive), sorted by relative path.

    Hidden files and folders are left out (macOS '._x.wav' resource forks are not audio); symlinked folders
    are followed, each real folder once, so a link to a parent ends there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a folder" if data_dir.exists() else "does not exist"
        raise UserError(f"The data folder {data_dir} {what}: point --data-dir at a folder of audio files.")
    found, walked = [], {os.path.realpath(data_dir)}
    for folder, subfolders, names in os.walk(data_dir, followlinks=True):
        kept = []
        for name in sorted(subfolders):
            real = os.path.realpath(os.path.join(folder, name))
            if not name.startswith(".") and real not in walked:
                walked.add(real)
                kept.append(name)
        subfolders[:] = kept
        found += [Path(folder, n) for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in AUDIO_EXTENSIONS]
    return sorted(found, key=lambda p: p.relative_to(data_dir).as_posix())


@dataclass(frozen=True)
class ManifestEntry:
    """One usable audio file; size and mtime tell whether it changed since it was scanned."""

    path: str  # relative to the data folder, '/'-separated
    frames: int  # at the native sample rate
    sample_rate: int
    channels: int
    size: int  # bytes
    mtime_ns: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


MANIFEST_COLUMNS = tuple(f.name for f in fields(ManifestEntry))


def manifest_locations(data_dir: Path, cache_dir: Path | str | None = None) -> list[Path]:
    """Where the manifest may live, in order of preference: `cache_dir` when given, else the data folder
    itself, else ~/.cache/wav2vec (for read-only corpora)."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:12]
    cached_name = f"{data_dir.resolve().name}-{digest}.tsv"
    if cache_dir is not None:
        return [Path(cache_dir) / cached_name]
    return [data_dir / MANIFEST_NAME, DEFAULT_CACHE_DIR / cached_name]


def _read_manifest(path: Path) -> dict[str, ManifestEntry]:
    """{relative path: entry} from a manifest file; empty when it is missing, unreadable or outdated."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or tuple(rows[0]) != MANIFEST_COLUMNS:
            logger.info("Manifest %s has another format; rescanning.", path)
            return {}
        entries = [ManifestEntry(row[0], *map(int, row[1:])) for row in rows[1:]]
    except (OSError, ValueError, TypeError, csv.Error) as error:
        logger.warning("Ignoring the unreadable manifest %s (%s); rescanning.", path, error)
        return {}
    return {e.path: e for e in entries}


def _write_manifest(entries: Sequence[ManifestEntry], locations: Sequence[Path]) -> Path | None:
    """Write to the first location that accepts it (atomically: concurrent runs never read half a file)."""
    for path in locations:
        tmp = None
        try:
            tmp = temporary_beside(path)
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f, delimiter="\t", lineterminator="\n")
                writer.writerow(MANIFEST_COLUMNS)
                writer.writerows(astuple(e) for e in entries)
            os.replace(tmp, path)
            return path
        except OSError as error:
            logger.debug("Cannot write the manifest to %s: %s", path, error)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return None


def _scan(path: Path, relative: str, size: int, mtime_ns: int) -> ManifestEntry | AudioReadError:
    try:
        info = probe_audio(path)
    except AudioReadError as error:
        return error
    return ManifestEntry(relative, info.frames, info.sample_rate, info.channels, size, mtime_ns)


def build_manifest(data_dir: Path | str, cache_dir: Path | str | None = None) -> list[ManifestEntry]:
    """One entry per readable audio file under `data_dir`, sorted by path. Files whose size and mtime match
    the cached manifest are not opened again; new and changed ones are scanned and the manifest rewritten."""
    data_dir = Path(data_dir)
    files = find_audio_files(data_dir)
    if not files:
        raise UserError(f"No audio files ({' '.join(AUDIO_EXTENSIONS)}) under {data_dir}: check --data-dir.")
    locations = manifest_locations(data_dir, cache_dir)
    existing = [p for p in locations if p.is_file()]
    newest = max(existing, key=lambda p: p.stat().st_mtime_ns, default=None)
    cached = _read_manifest(newest) if newest else {}

    relatives = [path.relative_to(data_dir).as_posix() for path in files]
    entries: list[ManifestEntry | None] = [None] * len(files)
    stale, jobs = [], []  # new or changed files: their positions in `entries`, and _scan's arguments
    for position, (path, relative) in enumerate(zip(files, relatives, strict=True)):
        try:
            stat = path.stat()
        except OSError as error:  # a dangling symlink, or a file deleted since the walk
            logger.warning("Skipping %s: %s", path, _reason(error))
            continue
        entry = cached.get(relative)
        if entry is not None and (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            entries[position] = entry
        else:
            stale.append(position)
            jobs.append((path, relative, stat.st_size, stat.st_mtime_ns))
    reused = sum(e is not None for e in entries)
    # Threads: libsndfile and FFmpeg release the GIL, and on network storage a scan is mostly waiting.
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(lambda job: _scan(*job), jobs)
        try:
            for position, result in progress_bar(zip(stale, results, strict=True), hidden=len(jobs) < 100,
                                                 total=len(jobs), desc="scanning audio", unit="file"):
                if isinstance(result, AudioReadError):
                    logger.warning("Skipping %s: %s", result.path, result.reason)
                else:
                    entries[position] = result
        except BaseException:  # Ctrl-C: stop now, not after every file still queued has been scanned
            pool.shutdown(cancel_futures=True)
            raise
    usable = [e for e in entries if e is not None]
    removed = len(set(cached) - set(relatives))

    if {e.path: e for e in usable} != cached:
        saved = _write_manifest(usable, locations)
        if saved is None:
            logger.warning("Could not save the manifest in %s; the next run scans again.",
                           " or ".join(str(p.parent) for p in locations))
    else:
        saved = newest
    logger.info("%d audio files under %s: %d from the manifest, %d scanned, %d gone since the last scan, "
                "%d unreadable and skipped (manifest: %s)", len(files), data_dir, reused, len(jobs), removed,
                len(files) - len(usable), saved)
    if not usable:
        raise UserError(f"None of the {len(files)} audio files under {data_dir} could be read; "
                        "see the warnings above.")
    return usable


def split_manifest(entries: Sequence[ManifestEntry], valid_fraction: float = 0.05
                   ) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """(train, valid) by a hash of each relative path: stable across runs and machines, and adding files
    never moves old ones. With valid_fraction > 0 and >= 2 files each side gets at least one file."""
    if not 0 <= valid_fraction < 1:
        raise UserError(f"valid_fraction must be in [0, 1), not {valid_fraction}.")

    def position(entry: ManifestEntry) -> float:  # uniform in [0, 1)
        return int(hashlib.sha1(entry.path.encode()).hexdigest()[:12], 16) / 16**12

    ranked = sorted(entries, key=position)
    num_valid = sum(position(e) < valid_fraction for e in ranked)
    if valid_fraction > 0 and len(ranked) >= 2:
        num_valid = min(max(num_valid, 1), len(ranked) - 1)
    valid = {e.path for e in ranked[:num_valid]}
    return [e for e in entries if e.path not in valid], [e for e in entries if e.path in valid]


# ----- crop datasets ------------------------------------------------------------------------------

def augment(wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random time shift (zero fill), gain and additive Gaussian noise at a random SNR: wav (L,) float32."""
    max_shift = min(int(MAX_SHIFT_SECONDS * SAMPLE_RATE), len(wav) // 4)
    shift = int(rng.integers(-max_shift, max_shift + 1))
    wav = np.roll(wav, shift)
    if shift > 0:
        wav[:shift] = 0
    elif shift < 0:
        wav[shift:] = 0
    wav *= np.float32(10 ** (rng.uniform(*GAIN_DB) / 20))
    noise_power = np.mean(wav**2) / 10 ** (rng.uniform(*NOISE_SNR_DB) / 10)
    return wav + rng.standard_normal(len(wav), dtype=np.float32) * np.float32(np.sqrt(noise_power))


def change_speed(wav: np.ndarray, rng: np.random.Generator, max_change: float,
                 min_length: int = 1) -> np.ndarray:
    """Speed perturbation (Ko et al. 2015): play wav (L,) faster or slower by a factor drawn from
    1 +- max_change, which moves pitch, formants and tempo together, as a different speaker would. Never
    faster than leaves min_length samples (a model's shortest input)."""
    factor = min(rng.uniform(1 - max_change, 1 + max_change), (len(wav) - 1) / min_length)
    positions = np.arange(0, len(wav) - 1, factor)
    return np.interp(positions, np.arange(len(wav)), wav).astype(np.float32)


class _CropDataset(Dataset):
    """Keys (index, epoch) -> fixed-length 16 kHz crops, wav (segment_length,). Subclasses only read samples.

    Crop offsets and augmentations come from np.random.default_rng((seed, epoch, index)), so a key gives the
    same crop whatever the worker count, the worker that serves it, or where a run resumed."""

    def __init__(self, names: Sequence[str], lengths: Sequence[int], segment_length: int, train: bool,
                 transforms: bool, pad_short: bool, seed: int):
        if segment_length < 1:
            raise UserError(f"The segment length must be a positive number of samples, not {segment_length}.")
        self.names, self.lengths = list(names), np.asarray(lengths, dtype=np.int64)  # lengths at 16 kHz
        self.segment_length, self.train, self.transforms, self.seed = segment_length, train, transforms, seed
        if not self.names:
            raise UserError("No audio files to take crops from (is this split empty?).")
        short = self.lengths < segment_length
        self.num_short_skipped = 0 if pad_short else int(short.sum())  # make_loader's advice needs it
        if short.any() and pad_short:
            logger.info("%d of %d files are shorter than one crop (%d samples, %.2f s): padded with zeros.",
                        short.sum(), len(short), segment_length, segment_length / SAMPLE_RATE)
        elif short.any():
            logger.warning("%d of %d files are shorter than one crop (%d samples, %.2f s): skipped; %s.",
                           short.sum(), len(short), segment_length, segment_length / SAMPLE_RATE,
                           self.short_file_advice())
        self._usable = np.arange(len(self.names)) if pad_short else np.flatnonzero(~short)
        if not len(self._usable):
            raise UserError(f"All {len(self.names)} files are shorter than one crop of {segment_length} "
                            f"samples (the longest has {self.lengths.max()}): {self.short_file_advice()}.")
        # Shared memory: a file that fails in one DataLoader worker is skipped (and logged) by all of them.
        self._failed = torch.zeros(len(self._usable), dtype=torch.bool).share_memory_()

    def short_file_advice(self) -> str:
        """The flags that keep files shorter than one crop, with the numbers for this corpus."""
        # A length at least KEEP_WHOLE of the files reach ("lower": one of the lengths, not interpolated).
        keeps = int(np.quantile(self.lengths, 1 - KEEP_WHOLE, method="lower"))
        pad = "--pad-short keeps them (zero-padded)"
        if keeps >= self.segment_length:  # the crop already keeps that share: a shorter one is no remedy
            return pad
        return f"{pad}, or --segment-length {keeps} keeps {100 * KEEP_WHOLE:.0f}% of the files whole"

    def _read(self, item: int, start: int, length: int) -> np.ndarray:
        """Samples [start, start + length) of item `item` at 16 kHz, float32, zero-padded past its end."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._usable)

    @property
    def num_read_errors(self) -> int:
        """Files that failed at read time (in any worker) and are skipped from then on."""
        return int(self._failed.sum())

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, epoch = (int(k) for k in key) if isinstance(key, tuple) else (int(key), 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} files")
        # A file that cannot be read is replaced by the next readable one: batches keep their shape.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self._failed[candidate]:
                continue
            rng = np.random.default_rng((self.seed, epoch, index))
            try:
                return torch.from_numpy(self._crop(candidate, rng))
            except AudioReadError as error:
                if not self._failed[candidate]:
                    self._failed[candidate] = True
                    logger.warning("Skipping %s from now on: %s", error.path, error.reason)
        raise UserError(f"None of the {len(self)} audio files could be read; see the warnings above.")

    def _crop(self, index: int, rng: np.random.Generator) -> np.ndarray:
        item = int(self._usable[index])
        room = int(self.lengths[item]) - self.segment_length
        # Validation takes the centre crop, the same every epoch: losses compare across epochs and runs.
        start = 0 if room <= 0 else int(rng.integers(0, room + 1)) if self.train else room // 2
        wav = self._read(item, start, self.segment_length)
        return augment(wav, rng) if self.train and self.transforms else wav


class CropDataset(_CropDataset):
    """Crops decoded on the fly: each read decodes only the native frames the crop needs, then resamples."""

    def __init__(self, data_dir: Path | str, entries: Sequence[ManifestEntry], segment_length: int = 32000,
                 train: bool = True, transforms: bool = False, pad_short: bool = False, seed: int = 0):
        self.data_dir = Path(data_dir)
        lengths = [resampled_length(e.frames, e.sample_rate) for e in entries]
        super().__init__([e.path for e in entries], lengths, segment_length, train, transforms, pad_short,
                         seed)

    def _read(self, item: int, start: int, length: int) -> np.ndarray:
        return load_audio(self.data_dir / self.names[item], SAMPLE_RATE, start, length)


def _read_packed_index(packed_dir: Path) -> dict | None:
    try:
        with open(packed_dir / PACKED_INDEX) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None


def prepare_packed_corpus(data_dir: Path | str, entries: Sequence[ManifestEntry],
                          out_dir: Path | str) -> Path:
    """Decode and resample every file once into out_dir/audio.int16 (16 kHz int16, back to back) plus
    out_dir/index.json (paths, offsets, lengths); reused as is while the entries are unchanged."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    sources = [[e.path, e.size, e.mtime_ns] for e in entries]
    index = _read_packed_index(out_dir)
    if index is not None and index.get("sources") == sources:
        logger.info("Reusing the packed corpus in %s (%d files).", out_dir, len(index["items"]))
        return out_dir
    try:  # before any decoding, so an unwritable folder costs no time
        tmp = temporary_beside(out_dir / PACKED_AUDIO)
    except OSError as err:
        raise UserError(f"Cannot write the packed corpus to {out_dir} ({err.strerror or err}): choose a "
                        "writable folder (--packed-dir).") from None
    (out_dir / PACKED_INDEX).unlink(missing_ok=True)  # no index until the audio beside it is complete
    items, offset = [], 0
    with open(tmp, "wb") as f:
        for entry in progress_bar(entries, desc="packing audio", unit="file"):
            try:
                wav = load_audio(data_dir / entry.path, SAMPLE_RATE)
            except AudioReadError as error:
                logger.warning("Skipping %s: %s", error.path, error.reason)
                continue
            pcm = np.clip(np.round(wav * 32768), -32768, 32767).astype("<i2")
            f.write(pcm.tobytes())
            items.append([entry.path, offset, len(pcm)])
            offset += len(pcm)
    if not items:
        tmp.unlink()
        raise UserError(f"None of the {len(entries)} files under {data_dir} could be read; nothing to pack.")
    os.replace(tmp, out_dir / PACKED_AUDIO)
    tmp = temporary_beside(out_dir / PACKED_INDEX)
    with open(tmp, "w") as f:
        json.dump({"sample_rate": SAMPLE_RATE, "dtype": "<i2", "items": items, "sources": sources}, f)
    os.replace(tmp, out_dir / PACKED_INDEX)
    logger.info("Packed %d files, %.2f h at 16 kHz, into %s (%d unreadable, skipped).",
                len(items), offset / SAMPLE_RATE / 3600, out_dir, len(entries) - len(items))
    return out_dir


class PackedCropDataset(_CropDataset):
    """The same crops as CropDataset (up to int16 rounding), sliced from the memmap of prepare_packed_corpus.

    `entries` restricts it to those files (e.g. one split of a corpus packed whole)."""

    def __init__(self, packed_dir: Path | str, segment_length: int = 32000, train: bool = True,
                 transforms: bool = False, pad_short: bool = False, seed: int = 0,
                 entries: Sequence[ManifestEntry] | None = None):
        self.packed_dir = Path(packed_dir)
        index = _read_packed_index(self.packed_dir)
        if index is None:
            raise UserError(f"No packed corpus in {self.packed_dir}: run prepare_packed_corpus on it first.")
        items = index["items"]
        if entries is not None:
            wanted = {e.path for e in entries}
            items = [item for item in items if item[0] in wanted]
        names, self._offsets, lengths = zip(*items, strict=True) if items else ((), (), ())
        self._audio: np.ndarray | None = None  # opened lazily in each process: a memmap must not be pickled
        super().__init__(names, lengths, segment_length, train, transforms, pad_short, seed)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_audio": None}

    def _read(self, item: int, start: int, length: int) -> np.ndarray:
        if self._audio is None:
            self._audio = np.memmap(self.packed_dir / PACKED_AUDIO, dtype="<i2", mode="r")
        begin = self._offsets[item] + start
        pcm = self._audio[begin:begin + max(0, min(length, self.lengths[item] - start))]
        wav = np.zeros(length, dtype=np.float32)
        wav[:len(pcm)] = pcm / np.float32(32768)
        return wav


def crop_dataset(data_dir: Path | str, entries: Sequence[ManifestEntry], packed_dir: Path | str | None = None,
                 **options) -> _CropDataset:
    """The crops of `entries` (a split of the corpus under data_dir), sliced from the packed corpus in
    packed_dir (written by prepare_packed_corpus) or decoded on the fly; options as CropDataset's. main.py
    and bench.py draw their training crops through this one function."""
    if packed_dir is not None:
        return PackedCropDataset(packed_dir, entries=entries, **options)
    return CropDataset(data_dir, entries, **options)


# ----- sampling and loading -----------------------------------------------------------------------

class EpochSampler(Sampler):
    """Yields (index, epoch) keys: a seeded permutation per epoch, dealt out over ranks in turn like
    DistributedSampler (every rank gets the same count). Rank r of W takes keys r, r + W, r + 2W... of what
    is left, so the keys all ranks have trained on are always a prefix of the epoch's order: a resume point
    counted in crops holds for any batch size and any number of processes."""

    def __init__(self, num_items: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve `epoch` from position `start` of its order: the crops all ranks together trained on."""
        self.epoch, self.start = epoch, start

    def _per_rank(self, keys: int) -> int:
        """Keys per rank for `keys` keys; the tail is dropped (drop_last) or refilled from the start."""
        whole, rest = divmod(keys, self.world_size)
        return whole + (rest > 0 and not self.drop_last)

    @property
    def keys_per_epoch(self) -> int:
        """Keys per rank in a whole epoch."""
        return self._per_rank(self.num_items)

    def __len__(self) -> int:
        return self._per_rank(max(0, self.num_items - self.start))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(_seed_from(self.seed, self.epoch))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        rest, total = order[self.start:], len(self) * self.world_size
        rest = (rest * math.ceil(total / max(1, len(rest))))[:total]
        for index in rest[self.rank::self.world_size]:
            yield index, self.epoch


def _seed_from(*numbers: int) -> int:
    """A 32-bit seed that depends on all of `numbers` (seed + epoch would repeat across runs)."""
    return int(np.random.SeedSequence(numbers).generate_state(1)[0])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM in this thread for the block: one that comes meanwhile waits, is not lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@cache
def _kill_workers_left_at_exit() -> None:
    """Once per process: at exit, SIGKILL the worker processes still alive. They ignore SIGTERM, so the
    terminate() of multiprocessing's own exit hook, which then joins them, would wait forever."""
    def kill_left() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # no "worker killed" error from torch's handler now
        for worker in multiprocessing.active_children():
            worker.kill()
    atexit.register(kill_left)  # after multiprocessing's hook, so it runs before it


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers are forked with SIGINT and SIGTERM held: a signal to the process group
    that comes while they start reaches the main process (once) instead of killing a worker."""

    def __iter__(self):
        _kill_workers_left_at_exit()
        with stop_signals_held():
            return super().__iter__()


def _init_worker(worker_id: int, seed: int, rank: int) -> None:
    """Seed numpy, random and torch in each DataLoader worker from (seed, rank, worker_id), and leave SIGINT
    and SIGTERM to the main process.

    torchrun, SLURM and Ctrl-C signal the whole process group. torch's own SIGTERM handler in a worker exits
    on a signal from anyone but its parent (the main process then fails with "worker killed"), and the
    training's handler, inherited through fork, would announce a Ctrl-C once per worker. Ignoring both, the
    workers go on serving batches while the main process finishes its update and saves; they end when it
    shuts the loader down, when it exits (_kill_workers_left_at_exit), or by torch's watchdog if it dies."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held by SignalSafeLoader while it forked us
    worker_seed = _seed_from(seed, rank, worker_id)
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)


def make_loader(dataset: _CropDataset, sampler: EpochSampler, batch_size: int, num_workers: int = 0,
                pin_memory: bool = False, seed: int = 0) -> DataLoader:
    """Batches wav (B, segment_length). Training drops the last partial batch; validation keeps every file."""
    if dataset.train and sampler.keys_per_epoch < batch_size:
        remedy = (f"{dataset.num_short_skipped} files were skipped as shorter than one crop: "
                  f"{dataset.short_file_advice()}" if dataset.num_short_skipped
                  else "lower --batch-size or add audio")
        raise UserError(f"{sampler.keys_per_epoch} training crops per epoch are fewer than one batch of "
                        f"{batch_size}; {remedy}.")
    # Crops of one length stack into wav (B, L): no padding, as in fairseq.
    return SignalSafeLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=torch.stack,
                            num_workers=num_workers, pin_memory=pin_memory, drop_last=dataset.train,
                            worker_init_fn=partial(_init_worker, seed=seed, rank=sampler.rank),
                            persistent_workers=num_workers > 0)


def epoch_loader(dataset: _CropDataset, batch_size: int, num_workers: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """make_loader over an EpochSampler: training crops shuffled per epoch and dealt out over ranks,
    validation crops in order."""
    sampler = EpochSampler(len(dataset), shuffle=dataset.train, seed=seed, rank=rank, world_size=world_size,
                           drop_last=dataset.train)
    return make_loader(dataset, sampler, batch_size, num_workers, pin_memory, seed)
