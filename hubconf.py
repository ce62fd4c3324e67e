"""torch.hub entry points: a pre-trained wav2vec, or a classifier/regressor written by finetune.py.

    wav2vec = torch.hub.load(REPO_DIR, "wav2vec", checkpoint="checkpoints/best_model.pt", source="local")
    classifier = torch.hub.load(REPO_DIR, "classifier", checkpoint="runs/ft/finetuned.pt", source="local")
"""

from __future__ import annotations

from heads import Classifier
from model import Wav2Vec

dependencies = ["torch", "numpy", "scipy", "soundfile", "threadpoolctl"]


def wav2vec(checkpoint: str, map_location: str = "cpu") -> Wav2Vec:
    """A wav2vec 1.0 model in eval mode from a checkpoint of main.py or of fairseq."""
    return Wav2Vec.from_pretrained(checkpoint, map_location=map_location)


def classifier(checkpoint: str, map_location: str = "cpu") -> Classifier:
    """A fine-tuned classifier or regressor in eval mode from a finetuned.pt; `.predict(wav)` labels audio."""
    return Classifier.from_pretrained(checkpoint, map_location=map_location)
