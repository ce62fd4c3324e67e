"""A feature-extractor checkpoint for tests: the config and weights, the part of main.py's format that
Wav2Vec.from_pretrained reads."""

from pathlib import Path

import torch

from model import Wav2Vec


def save_weights(model: Wav2Vec, path: Path) -> Path:
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, path)
    return path
