"""Synthetic audio for tests: tones with a little noise, noise alone, and a tiny FSDD-like folder."""

from pathlib import Path

import numpy as np
import soundfile as sf


def write_tone(path: Path, hz: float, seconds: float = 0.5, seed: np.random.Generator | int = 0) -> None:
    """A sine of `hz` with 1% noise from `seed` (a generator, or the seed of a new one), as 16-bit WAV."""
    t = np.arange(int(16000 * seconds)) / 16000
    wav = 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), 16000)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """wav (L,) float32: Gaussian noise at a tenth of full scale."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def write_fsdd(folder: Path) -> Path:
    """A tiny FSDD-like folder: 2 digits (a low and a high tone) x 3 speakers (a pitch shift) x repetitions
    0, 1 (official test) and 5, 6 (official train), 0.3 s at 8 kHz like FSDD."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(2400) / 8000
    for digit, hz in ((0, 300.0), (1, 1500.0)):
        for s, speaker in enumerate(("ann", "bob", "cy")):
            for index in (0, 1, 5, 6):
                rng = np.random.default_rng((digit, s, index))
                wav = 0.3 * np.sin(2 * np.pi * hz * (1 + 0.05 * s) * t) + 0.02 * rng.standard_normal(len(t))
                sf.write(folder / f"{digit}_{speaker}_{index}.wav", wav, 8000)
    return folder
