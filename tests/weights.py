"""Models and checkpoints for tests: a feature extractor's checkpoint (the config and weights, the part of
main.py's format that Wav2Vec.from_pretrained reads) and a fine-tuned classifier as training leaves it."""

from pathlib import Path

import torch

from heads import Classifier, HeadConfig, Recognizer
from model import Wav2Vec, Wav2VecConfig


def recorded_load_locations(monkeypatch) -> list:
    """The map_location of every torch.load from now on (None where none was given)."""
    locations, load = [], torch.load

    def recorded(*args, **kwargs):
        locations.append(kwargs.get("map_location"))
        return load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", recorded)
    return locations


def save_weights(model: Wav2Vec, path: Path) -> Path:
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, path)
    return path


def random_checkpoint(path: Path, channels: int, seed: int = 0) -> Path:
    """A base network of `channels` channels initialised from `seed`, in main.py's checkpoint format."""
    torch.manual_seed(seed)
    return save_weights(Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=channels)), path)


def tiny_model(norm: str = "group") -> Wav2Vec:
    """A 32-channel base network in eval mode, initialised from seed 0."""
    torch.manual_seed(0)
    return Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=32, norm=norm)).eval()


def fine_tuned(task: str, **head) -> Classifier:
    """A finetune.py model on a tiny base backbone, with every weight and the standardisation moved off its
    initial value, as training would."""
    torch.manual_seed(0)
    config = HeadConfig(task=task, labels=("no", "yes", "stop") if task == "classify" else (), channels=8,
                        num_layers=9, hidden=16, target_mean=3.0, target_std=2.0, **head)
    model = Classifier(config, Wav2VecConfig.preset("wav2vec", channels=8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.feature_mean.normal_()
        model.feature_std.uniform_(0.5, 2.0)
    return model.eval()


def recognizer(preset: str = "wav2vec", **head) -> Recognizer:
    """A CTC recognizer of 5 symbols on a tiny backbone of `preset` (8 channels), with the standardisation and
    every weight moved off its initial value, as training would."""
    torch.manual_seed(0)
    config = HeadConfig(task="ctc", labels=("a", "b", "c", "d", "e"), channels=8, num_layers=9, hidden=8,
                        lstm_layers=1, **head)
    model = Recognizer(config, Wav2VecConfig.preset(preset, channels=8))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.feature_std.uniform_(0.5, 2.0)
    return model.eval()
