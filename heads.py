"""Heads on a wav2vec backbone (or on MFCCs): what finetune.py trains and the models it saves.

Classifier: frames -> per-channel standardisation -> pooling over the valid frames (mean, mean+std or
attentive statistics) -> a linear layer or a small MLP: a label (with probabilities) or a value per file.
The backbone runs on each file alone, because its GroupNorm statistics span the whole input: padding
would change every frame; the head then pads and masks. `Classifier.from_pretrained(path).predict(wav)`
is the two-line use of a finetuned.pt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import SAMPLE_RATE
from features import MFCC_WINDOW, load_waveform, mfcc
from model import Wav2Vec, Wav2VecConfig, read_checkpoint
from utils import UserError

MASK_SPAN = 5  # frames per masked span with --mask-frames (50 ms)


@dataclass(frozen=True)
class HeadConfig:
    """Everything besides the weights that rebuilds a fine-tuned model; saved in finetuned.pt."""

    task: str = "classify"  # "classify" or "regress"
    labels: tuple[str, ...] = ()  # class names in output order; empty for regression
    backbone: str = "wav2vec"  # "wav2vec" (a checkpoint or random init; see backbone_config) or "mfcc"
    layer: str = "c"  # "c", "z" or "all" (learned weighted sum of every context layer's output)
    pool: str = "mean"  # "mean", "mean+std" or "attentive" (attentive statistics pooling)
    head: str = "linear"  # "linear" or "mlp"
    channels: int = 512  # channels of the frames the head reads
    num_layers: int = 1  # layers mixed by the weighted sum (layer "all")
    hidden: int = 256  # width of the MLP and of the attention
    dropout: float = 0.1
    target_mean: float = 0.0  # regression targets are standardised for training; predictions are not
    target_std: float = 1.0

    @property
    def outputs(self) -> int:
        return len(self.labels) if self.task == "classify" else 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        return cls(**{**d, "labels": tuple(d["labels"])})

def masked_mean_std(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T), weights (B, T) summing to 1 over time -> mean and std (B, C) under those weights."""
    mean = (x * weights[:, None]).sum(-1)
    variance = (x.square() * weights[:, None]).sum(-1) - mean.square()
    return mean, variance.clamp(min=1e-8).sqrt()

class Pooling(nn.Module):
    """Frames (B, C, T) with a mask (B, T) -> one vector per file; padded frames never count."""

    def __init__(self, how: str, channels: int, hidden: int):
        super().__init__()
        self.how = how
        if how == "attentive":  # Okabe et al. 2018: a score per frame, softmax over the valid frames
            self.attention = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.Tanh(), nn.Conv1d(hidden, 1, 1))

    @property
    def factor(self) -> int:
        return 1 if self.how == "mean" else 2

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.how == "attentive":
            scores = self.attention(x)[:, 0].masked_fill(~mask, -math.inf)
            weights = scores.softmax(-1)
        else:
            weights = mask / mask.sum(-1, keepdim=True)
        mean, std = masked_mean_std(x, weights.to(x.dtype))
        return mean if self.how == "mean" else torch.cat([mean, std], 1)

class Classifier(nn.Module):
    """A backbone (wav2vec or MFCCs) and a head: frames -> standardise -> pool -> linear or MLP."""

    def __init__(self, config: HeadConfig, backbone_config: Wav2VecConfig | None):
        super().__init__()
        self.config = config
        self.backbone = Wav2Vec(backbone_config) if backbone_config is not None else None
        if config.layer == "all":
            self.layer_weights = nn.Parameter(torch.zeros(config.num_layers))  # uniform at first
        # Per-channel standardisation with training-set statistics (set once, then saved): MFCCs and wav2vec
        # channels differ in scale by orders of magnitude, which a linear head trained by AdamW dislikes.
        self.register_buffer("feature_mean", torch.zeros(config.channels))
        self.register_buffer("feature_std", torch.ones(config.channels))
        self.pool = Pooling(config.pool, config.channels, config.hidden)
        width = self.pool.factor * config.channels
        if config.head == "mlp":
            self.out = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
                                     nn.Linear(config.hidden, config.outputs))
        else:
            self.out = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.outputs))

    @property
    def shortest_input(self) -> int:
        """Samples at 16 kHz that make one frame."""
        return MFCC_WINDOW if self.backbone is None else self.backbone.receptive_field

    # The backbone in two stages, so that a frozen prefix can be computed once and cached:
    # wav (L,) --latent--> z or MFCCs (C, T) --frames--> (C, T), or (layers, C, T) for the weighted sum.

    def latent(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (L,) at 16 kHz -> z (C, T) of the encoder, or the MFCCs and deltas (26, T)."""
        if self.backbone is None:
            return torch.from_numpy(mfcc(wav.detach().cpu().numpy())).to(self.feature_mean.device)
        return self.backbone.encoder(wav[None])[0]

    def frames(self, z: torch.Tensor) -> torch.Tensor:
        """latent (C, T) -> the frames the head reads: (C, T), or (layers, C, T) with layer "all"."""
        if self.backbone is None or self.config.layer == "z":
            return z
        outputs = self.backbone.context.layer_outputs(z[None])
        return outputs[-1][0] if self.config.layer == "c" else torch.cat(outputs)

    def mix(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, [layers,] C, T) -> (B, C, T): the softmax-weighted sum of layers, or the frames as they are."""
        if self.config.layer != "all":
            return frames
        return torch.einsum("l,blct->bct", self.layer_weights.softmax(0), frames)

    def head(self, frames: torch.Tensor, mask: torch.Tensor, mask_spans: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded frames (B, [layers,] C, T) and mask (B, T) -> logits (B, classes) or values (B, 1)."""
        x = (self.mix(frames) - self.feature_mean[:, None]) / self.feature_std[:, None]
        if mask_spans > 0 and self.training:
            x = x * ~span_mask(mask, mask_spans, generator)[:, None]
        return self.out(self.pool(x, mask))

    def forward(self, wavs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Waveforms (L_i,) of any lengths -> logits (B, classes) or standardised values (B, 1)."""
        return self.head(*pad_frames([self.frames(self.latent(w)) for w in wavs]))

    @torch.no_grad()
    def predict(self, wav: np.ndarray | torch.Tensor | str | Path, sample_rate: int = SAMPLE_RATE) -> dict:
        """One file, or a waveform (L,) at `sample_rate` -> {"label", "probabilities"} (classify) or
        {"value"} (regress); input shorter than one frame is a UserError."""
        samples = load_waveform(wav, sample_rate)
        if len(samples) < self.shortest_input:
            source = wav if isinstance(wav, (str, Path)) else "The waveform"
            raise UserError(f"{source} is shorter than one frame ({len(samples)} of {self.shortest_input} "
                            "samples at 16 kHz): nothing to predict from.")
        wav = torch.from_numpy(samples).to(self.feature_mean.device)
        self.eval()
        return self.describe(self([wav]))[0]

    def describe(self, outputs: torch.Tensor) -> list[dict]:
        """Head outputs (B, classes or 1) -> one prediction dict per row."""
        cfg = self.config
        if cfg.task == "regress":
            values = (outputs[:, 0].double() * cfg.target_std + cfg.target_mean).tolist()
            return [{"value": v} for v in values]
        probabilities = outputs.float().softmax(-1).tolist()
        return [{"label": cfg.labels[int(np.argmax(p))],
                 "probabilities": dict(zip(cfg.labels, p, strict=True))} for p in probabilities]

    def export_graph(self) -> ClassifierGraph:
        """Backbone and head as one traceable module for ondevice.py's exporters."""
        return ClassifierGraph(self)

    def payload(self, extra: dict) -> dict:
        """What finetuned.pt holds: configs as plain dicts and tensors only, so weights_only loads it."""
        return {"head_config": self.config.to_dict(),
                "backbone_config": None if self.backbone is None else self.backbone.config.to_dict(),
                "model": self.state_dict(), **extra}

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
        """A fine-tuned model in eval mode from a finetuned.pt written by finetune.py."""
        ckpt = read_checkpoint(path, remedy="use a finetuned.pt written by finetune.py.")  # on the CPU
        if "head_config" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path} is not a finetuned.pt of finetune.py (no head_config): "
                            "pre-trained checkpoints load with Wav2Vec.from_pretrained instead.")
        backbone = ckpt["backbone_config"]
        model = cls(HeadConfig.from_dict(ckpt["head_config"]),
                    None if backbone is None else Wav2VecConfig.from_dict(backbone))
        model.load_state_dict(ckpt["model"])
        return model.to(map_location).eval()

def pad_frames(frames: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (..., C, T_i) -> zero-padded (B, ..., C, T_max) and the mask (B, T_max) of real frames."""
    lengths = torch.tensor([f.shape[-1] for f in frames], device=frames[0].device)
    padded = torch.stack([F.pad(f, (0, int(lengths.max()) - f.shape[-1])) for f in frames])
    mask = torch.arange(padded.shape[-1], device=padded.device) < lengths[:, None]
    return padded, mask

def span_mask(mask: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, T) True on spans of MASK_SPAN frames starting at a random `fraction / MASK_SPAN` of the frames."""
    draws = torch.rand(mask.shape, generator=generator, device="cpu")
    starts = (draws < fraction / MASK_SPAN).to(mask.device)
    kernel = torch.ones(1, 1, MASK_SPAN, device=mask.device)
    covered = F.conv1d(F.pad(starts[:, None].float(), (MASK_SPAN - 1, 0)), kernel)[:, 0] > 0
    return covered & mask


class ClassifierGraph(nn.Module):
    """wav (1, L) -> a finetune.py model's logits and probabilities, or its value: backbone and head as one
    graph. One file per call, as Classifier.predict runs it (GroupNorm statistics span the file)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        if classifier.backbone is None:
            raise UserError("This finetuned.pt reads MFCCs, which are computed in NumPy outside any graph: "
                            "only a model fine-tuned from a wav2vec checkpoint (or random) exports.")
        self.classifier = classifier.eval()

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probabilities"] if self.classifier.config.task == "classify" else ["value"]

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.classifier
        z = model.latent(wav[0])
        mask = torch.ones_like(z[:1], dtype=torch.bool)  # (1, T) from a tensor: T stays dynamic in the graph
        outputs = model.head(model.frames(z)[None], mask)
        if model.config.task == "classify":
            return outputs, outputs.softmax(-1)
        return (outputs[:, 0] * model.config.target_std + model.config.target_mean,)
