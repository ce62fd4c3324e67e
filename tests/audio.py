"""Synthetic audio for tests: tones with a little noise, and noise alone, at 16 kHz."""

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
