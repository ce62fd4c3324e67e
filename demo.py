"""The synthetic demo corpus: speech-like audio with speaker and per-frame labels, made in seconds.

Speech-like enough for the demo, the tests and the probes: a harmonic voice through formant resonators
(vowels), high-passed noise (fricatives) and near-silence, with a label for every 10 ms frame.
`python main.py --demo` pre-trains on it; suite.py's frame-label task probes it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import butter, lfilter, sosfilt

from data import FRAME_HOP, SAMPLE_RATE
from utils import UserError

logger = logging.getLogger(__name__)

DEMO_DIR = Path("data/demo")  # where `python main.py --demo` writes the corpus

DEMO_LABELS = ("silence", "a", "e", "i", "o", "u", "fricative")
# F1, F2, F3 (Hz) of an adult male voice (Peterson & Barney 1952); each speaker scales them.
VOWEL_FORMANTS = {"a": (730, 1090, 2440), "e": (530, 1840, 2480), "i": (270, 2290, 3010),
                  "o": (570, 840, 2410), "u": (300, 870, 2240)}

FORMANT_BANDWIDTHS = (80, 100, 140)

# (label, probability, frames min, frames max) per segment kind
DEMO_SEGMENTS = (("vowel", 0.55, 8, 25), ("fricative", 0.2, 6, 15), ("silence", 0.25, 5, 30))

@dataclass(frozen=True)
class _Speaker:
    name: str
    pitch: float  # Hz
    formant_scale: float  # vocal tract length: higher voices have higher formants
    fricative_cutoff: float  # Hz

def _demo_speaker(index: int, seed: int) -> _Speaker:
    rng = np.random.default_rng((seed, index))
    pitch = rng.uniform(90, 240)
    formant_scale = 0.85 + 0.3 * (pitch - 90) / 150 + rng.normal(0, 0.03)
    return _Speaker(f"speaker{index:02d}", pitch, formant_scale, rng.uniform(2500, 4500))

def _vowel(vowel: str, speaker: _Speaker, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Glottal pulses with drifting pitch, spectral tilt, then a cascade of 2-pole formant resonators."""
    t = np.arange(num_samples) / SAMPLE_RATE
    pitch = speaker.pitch * rng.uniform(0.9, 1.1) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = np.cumsum(pitch / SAMPLE_RATE)
    source = np.diff(np.floor(phase), prepend=0.0)  # one impulse per pitch period
    wav = lfilter([1.0], [1.0, -0.9], source)  # glottal spectral tilt
    for formant, bandwidth in zip(VOWEL_FORMANTS[vowel], FORMANT_BANDWIDTHS, strict=True):
        radius = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
        angle = 2 * np.pi * formant * speaker.formant_scale / SAMPLE_RATE
        wav = lfilter([1 - radius], [1.0, -2 * radius * np.cos(angle), radius**2], wav)
    return wav

def _demo_utterance(speaker: _Speaker, num_frames: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """wav (num_frames * 160,) float32 and one label id per 10 ms frame (num_frames,)."""
    probabilities = [segment[1] for segment in DEMO_SEGMENTS]
    pieces, labels = [], []
    while len(labels) < num_frames:
        kind, _, low, high = DEMO_SEGMENTS[rng.choice(len(DEMO_SEGMENTS), p=probabilities)]
        frames = int(rng.integers(low, high + 1))
        n = frames * FRAME_HOP
        if kind == "vowel":
            label = str(rng.choice(list(VOWEL_FORMANTS)))
            wav, level = _vowel(label, speaker, n, rng), 0.1
        elif kind == "fricative":
            label = kind
            highpass = butter(4, speaker.fricative_cutoff * rng.uniform(0.9, 1.1), "highpass",
                              fs=SAMPLE_RATE, output="sos")
            wav, level = sosfilt(highpass, rng.standard_normal(n)), 0.03
        else:
            label, wav, level = kind, rng.standard_normal(n), 0.001
        fade = np.minimum(np.arange(n), np.arange(n)[::-1]) / FRAME_HOP
        ramp = np.minimum(1, fade)  # 10 ms fades in and out: no clicks at segment boundaries
        pieces.append(wav / (np.sqrt(np.mean(wav**2)) + 1e-9) * level * rng.uniform(0.7, 1.3) * ramp)
        labels += [DEMO_LABELS.index(label)] * frames
    wav = np.concatenate(pieces)[:num_frames * FRAME_HOP]
    return np.clip(wav, -1, 1).astype(np.float32), np.array(labels[:num_frames], dtype=np.int64)

def make_demo_corpus(folder: Path | str, num_speakers: int = 4, files_per_speaker: int = 25,
                     seconds_per_file: float = 6.0, seed: int = 0) -> Path:
    """Write a synthetic speech-like corpus (16 kHz PCM16 WAV) with speaker and per-frame labels; see below.

    folder/<speaker>/<speaker>_<k>.wav         audio; one sub-folder per speaker ("labels from folder names")
    folder/<speaker>/<speaker>_<k>.frames.npy  int64 label id per 10 ms frame t (samples 160t to 160t+159)
    folder/labels.tsv                          header `path<TAB>label<TAB>speaker`; label is the speaker
    folder/frame_labels.json                   {"frame_seconds": 0.01, "names": [...]}: label id -> name

    It is written beside `folder` and renamed into place (`folder` must be absent or empty), so that an
    interrupted synthesis leaves no partial corpus for a later run to take for the whole one.
    """
    target = Path(folder)
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"{target} is not empty: synthesise the demo corpus into a new or empty folder.")
    folder = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        _write_demo_corpus(folder, num_speakers, files_per_speaker, seconds_per_file, seed)
        folder.replace(target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    logger.info("Wrote a demo corpus of %d speakers x %d files x %.1f s to %s.", num_speakers,
                files_per_speaker, seconds_per_file, target)
    return target

def _write_demo_corpus(folder: Path, num_speakers: int, files_per_speaker: int, seconds_per_file: float,
                       seed: int) -> None:
    num_frames = round(seconds_per_file * SAMPLE_RATE / FRAME_HOP)
    rows = []
    for s in range(num_speakers):
        speaker = _demo_speaker(s, seed)
        (folder / speaker.name).mkdir(parents=True, exist_ok=True)
        for k in range(files_per_speaker):
            wav, frame_labels = _demo_utterance(speaker, num_frames, np.random.default_rng((seed, s, k)))
            relative = f"{speaker.name}/{speaker.name}_{k:03d}.wav"
            sf.write(folder / relative, wav, SAMPLE_RATE, subtype="PCM_16")
            np.save(folder / relative.replace(".wav", ".frames.npy"), frame_labels)
            rows.append((relative, speaker.name, speaker.name))
    with open(folder / "labels.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("path", "label", "speaker"))
        writer.writerows(rows)
    with open(folder / "frame_labels.json", "w") as f:
        json.dump({"frame_seconds": FRAME_HOP / SAMPLE_RATE, "names": list(DEMO_LABELS)}, f, indent=1)


def ensure_demo_corpus(folder: Path) -> None:
    """Synthesise the demo corpus into `folder` unless it already holds audio."""
    if not any(folder.rglob("*.wav")):
        logger.info("Synthesising the demo corpus into %s", folder)
        make_demo_corpus(folder)


TRANSCRIPT_SYMBOLS = {"a": "a", "e": "e", "i": "i", "o": "o", "u": "u", "fricative": "s"}  # silence: none


def transcript_of(frame_labels: np.ndarray) -> str:
    """A demo file's transcript from its frame labels: its segments in order ("s" for a fricative), equal
    neighbours merged, the silences between them cutting it into words."""
    runs = [DEMO_LABELS[int(label)] for i, label in enumerate(frame_labels)
            if i == 0 or label != frame_labels[i - 1]]
    text = "".join(TRANSCRIPT_SYMBOLS.get(run, " ") for run in runs)
    return " ".join(text.split())


def make_transcribed_corpus(folder: Path | str, num_speakers: int = 2, files_per_speaker: int = 20,
                            seconds_per_file: float = 1.5, seed: int = 0) -> Path:
    """The demo corpus (make_demo_corpus) with a transcript per file in folder/transcripts.tsv (`path`,
    `speaker`, `text`: words of the letters a e i o u s), for speech recognition (finetune.py --task ctc,
    --units chars, or tokens after splitting the letters)."""
    make_demo_corpus(folder, num_speakers, files_per_speaker, seconds_per_file, seed)
    folder = Path(folder)
    with open(folder / "labels.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(folder / "transcripts.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("path", "speaker", "text", "letters"))
        for row in rows:
            text = transcript_of(np.load(folder / row["path"].replace(".wav", ".frames.npy")))
            writer.writerow((row["path"], row["speaker"], text, " ".join(text.replace(" ", ""))))
    return folder
