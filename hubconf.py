"""torch.hub entry points: a pre-trained wav2vec, or a classifier, regressor or recognizer from finetune.py.

    wav2vec = torch.hub.load(REPO_DIR, "wav2vec", checkpoint="checkpoints/best_model.pt", source="local")
    classifier = torch.hub.load(REPO_DIR, "classifier", checkpoint="runs/ft/finetuned.pt", source="local")
    recognizer = torch.hub.load(REPO_DIR, "recognizer", checkpoint="runs/ctc/finetuned.pt", source="local")
"""

from __future__ import annotations

from heads import Classifier, Recognizer
from model import Wav2Vec

dependencies = ["torch", "numpy", "scipy", "soundfile", "threadpoolctl"]


def wav2vec(checkpoint: str, map_location: str = "cpu") -> Wav2Vec:
    """A wav2vec 1.0 model in eval mode from a checkpoint of main.py or of fairseq."""
    return Wav2Vec.from_pretrained(checkpoint, map_location=map_location)


def classifier(checkpoint: str, map_location: str = "cpu") -> Classifier:
    """A fine-tuned classifier or regressor in eval mode from a finetuned.pt; `.predict(wav)` labels audio."""
    return Classifier.from_pretrained(checkpoint, map_location=map_location)


def recognizer(checkpoint: str, map_location: str = "cpu") -> Recognizer:
    """A speech recognizer (finetune.py --task ctc) in eval mode from a finetuned.pt; `.transcribe(wav)`."""
    return Recognizer.from_pretrained(checkpoint, map_location=map_location)
