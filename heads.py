"""Heads on a wav2vec backbone (or on MFCCs): what finetune.py trains and the models it saves.

Classifier: frames -> per-channel standardisation -> pooling over the valid frames (mean, mean+std or
attentive statistics) -> a linear layer or a small MLP: a label (with probabilities) or a value per file.
Recognizer: frames -> per-channel standardisation -> a linear layer or a BiLSTM and a linear layer -> CTC
log-probabilities per frame, decoded greedily (argmax, repeats merged, blanks dropped) into a transcript.
The backbone runs on each file alone, because its GroupNorm statistics span the whole input: padding
would change every frame; the head then pads and masks. `Classifier.from_pretrained(path).predict(wav)` and
`Recognizer.from_pretrained(path).transcribe(wav)` are the two-line uses of a finetuned.pt.
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

from data import FRAME_HOP, SAMPLE_RATE
from decoding import BEAM_SIZE, INSERTION_BONUS, LM_WEIGHT, BeamSearch
from features import MFCC_WINDOW, load_waveform, mfcc
from labels import detokenize
from model import Wav2Vec, Wav2VecConfig, read_checkpoint
from utils import UserError

MASK_SPAN = 5  # frames per masked span with --mask-frames (50 ms)


@dataclass(frozen=True)
class HeadConfig:
    """Everything besides the weights that rebuilds a fine-tuned model; saved in finetuned.pt."""

    task: str = "classify"  # "classify", "regress" or "ctc"
    labels: tuple[str, ...] = ()  # class names in output order; ctc: the symbols after the blank; regress: ()
    backbone: str = "wav2vec"  # "wav2vec" (a checkpoint or random init; see backbone_config) or "mfcc"
    layer: str = "c"  # "c", "z" or "all" (learned weighted sum of every context layer's output)
    pool: str = "mean"  # "mean", "mean+std" or "attentive" (attentive statistics pooling)
    head: str = "linear"  # "linear" or "mlp"; ctc: "linear" or "bilstm"
    channels: int = 512  # channels of the frames the head reads
    num_layers: int = 1  # layers mixed by the weighted sum (layer "all")
    hidden: int = 256  # width of the MLP and of the attention; ctc: of each LSTM direction
    dropout: float = 0.1
    lstm_layers: int = 2  # ctc "bilstm": bidirectional layers
    subsample: int = 1  # ctc: frames stacked into one output frame (2: 50 outputs per second)
    units: str = "tokens"  # ctc: what a symbol is, "tokens" or "chars" (labels.tokenize)
    target_mean: float = 0.0  # regression targets are standardised for training; predictions are not
    target_std: float = 1.0

    @property
    def outputs(self) -> int:
        return {"classify": len(self.labels), "ctc": len(self.labels) + 1}.get(self.task, 1)

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

class FineTuned(nn.Module):
    """A backbone (wav2vec or MFCCs) under a head: what Classifier and Recognizer share (the backbone in two
    stages, the layer mix, the standardisation, saving and loading)."""

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

    @property
    def shortest_input(self) -> int:
        """Samples at 16 kHz that make one frame."""
        return MFCC_WINDOW if self.backbone is None else self.backbone.receptive_field

    def num_frames(self, samples: int) -> int:
        """Frames the head sees for `samples` samples at 16 kHz (0 below one frame)."""
        if self.backbone is None:
            return 0 if samples < MFCC_WINDOW else (samples - MFCC_WINDOW) // FRAME_HOP + 1
        return self.backbone.num_frames(samples)

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

    def standardised(self, frames: torch.Tensor, mask: torch.Tensor, mask_spans: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded frames (B, [layers,] C, T) -> mixed, standardised (B, C, T); in training, spans of frames
        masked to the mean (0) when mask_spans > 0 (SpecAugment's time masks)."""
        x = (self.mix(frames) - self.feature_mean[:, None]) / self.feature_std[:, None]
        if mask_spans > 0 and self.training:
            x = x * ~span_mask(mask, mask_spans, generator)[:, None]
        return x

    def head(self, frames: torch.Tensor, mask: torch.Tensor, mask_spans: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded frames (B, [layers,] C, T) and mask (B, T) -> the head's outputs."""
        raise NotImplementedError

    def forward(self, wavs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Waveforms (L_i,) of any lengths -> the head's outputs (see head)."""
        return self.head(*pad_frames([self.frames(self.latent(w)) for w in wavs]))

    def waveform(self, wav: np.ndarray | torch.Tensor | str | Path, sample_rate: int = SAMPLE_RATE
                 ) -> torch.Tensor:
        """A path, or a waveform (L,) at `sample_rate` -> 16 kHz float samples on the model's device; input
        shorter than one frame is a UserError."""
        samples = load_waveform(wav, sample_rate)
        if len(samples) < self.shortest_input:
            source = wav if isinstance(wav, (str, Path)) else "The waveform"
            raise UserError(f"{source} is shorter than one frame ({len(samples)} of {self.shortest_input} "
                            "samples at 16 kHz): nothing to predict from.")
        return torch.from_numpy(samples).to(self.feature_mean.device)

    def payload(self, extra: dict) -> dict:
        """What finetuned.pt holds: configs as plain dicts and tensors only, so weights_only loads it."""
        return {"head_config": self.config.to_dict(),
                "backbone_config": None if self.backbone is None else self.backbone.config.to_dict(),
                "model": self.state_dict(), **extra}

    @classmethod
    def from_payload(cls, ckpt: dict, path: str | Path = "the checkpoint") -> FineTuned:
        """The model (Classifier or Recognizer, as its task says) that payload() saved, in eval mode."""
        if "head_config" not in ckpt or "model" not in ckpt:
            raise UserError(f"{path} is not a finetuned.pt of finetune.py (no head_config): "
                            "pre-trained checkpoints load with Wav2Vec.from_pretrained instead.")
        config = HeadConfig.from_dict(ckpt["head_config"])
        built = Recognizer if config.task == "ctc" else Classifier
        if not issubclass(built, cls):
            raise UserError(f"{path} holds a {built.__name__} ({config.task}): load it with "
                            f"{built.__name__}.from_pretrained.")
        backbone = ckpt["backbone_config"]
        model = built(config, None if backbone is None else Wav2VecConfig.from_dict(backbone))
        model.load_state_dict(ckpt["model"])
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> FineTuned:
        """A fine-tuned model in eval mode from a finetuned.pt written by finetune.py."""
        ckpt = read_checkpoint(path, remedy="use a finetuned.pt written by finetune.py.")  # on the CPU
        return cls.from_payload(ckpt, path).to(map_location)


class Classifier(FineTuned):
    """A backbone (wav2vec or MFCCs) and a head: frames -> standardise -> pool -> linear or MLP."""

    def __init__(self, config: HeadConfig, backbone_config: Wav2VecConfig | None):
        super().__init__(config, backbone_config)
        self.pool = Pooling(config.pool, config.channels, config.hidden)
        width = self.pool.factor * config.channels
        if config.head == "mlp":
            self.out = nn.Sequential(nn.Linear(width, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
                                     nn.Linear(config.hidden, config.outputs))
        else:
            self.out = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.outputs))

    def head(self, frames: torch.Tensor, mask: torch.Tensor, mask_spans: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded frames (B, [layers,] C, T) and mask (B, T) -> logits (B, classes) or values (B, 1)."""
        return self.out(self.pool(self.standardised(frames, mask, mask_spans, generator), mask))

    def targets(self, targets: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """A batch's targets (class indices or values) as the loss takes them."""
        return torch.as_tensor(targets, device=device)

    def loss(self, outputs: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on logits, or the squared error on standardised targets (regression)."""
        if self.config.task == "classify":
            return F.cross_entropy(outputs.float(), targets)
        standardised = (targets.float() - self.config.target_mean) / self.config.target_std
        return F.mse_loss(outputs[:, 0].float(), standardised)

    @torch.no_grad()
    def predict(self, wav: np.ndarray | torch.Tensor | str | Path, sample_rate: int = SAMPLE_RATE) -> dict:
        """One file, or a waveform (L,) at `sample_rate` -> {"label", "probabilities"} (classify) or
        {"value"} (regress); input shorter than one frame is a UserError."""
        self.eval()
        return self.describe(self([self.waveform(wav, sample_rate)]))[0]

    def describe(self, outputs: torch.Tensor, mask: torch.Tensor | None = None) -> list[dict]:
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


def exportable(model: FineTuned) -> FineTuned:
    """The model in eval mode, if a graph can hold it: not one that reads MFCCs."""
    if model.backbone is None:
        raise UserError("This finetuned.pt reads MFCCs, which are computed in NumPy outside any graph: "
                        "only a model fine-tuned from a wav2vec checkpoint (or random) exports.")
    return model.eval()


def head_outputs(model: FineTuned, wav: torch.Tensor) -> torch.Tensor:
    """wav (1, L) -> the head's outputs on the whole file, with a mask made from a tensor (so that the number
    of frames stays dynamic in an exported graph)."""
    z = model.latent(wav[0])
    mask = torch.ones_like(z[:1], dtype=torch.bool)  # (1, T)
    return model.head(model.frames(z)[None], mask)


class ClassifierGraph(nn.Module):
    """wav (1, L) -> a finetune.py model's logits and probabilities, or its value: backbone and head as one
    graph. One file per call, as Classifier.predict runs it (GroupNorm statistics span the file)."""

    form = "classifier"
    output_axes: dict = {}

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = exportable(classifier)

    @property
    def output_names(self) -> list[str]:
        return ["logits", "probabilities"] if self.classifier.config.task == "classify" else ["value"]

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.classifier
        outputs = head_outputs(model, wav)
        if model.config.task == "classify":
            return outputs, outputs.softmax(-1)
        return (outputs[:, 0] * model.config.target_std + model.config.target_mean,)


# ----- speech recognition: a CTC head ----------------------------------------------------------------

BLANK = 0  # the CTC blank is output 0; output i + 1 is config.labels[i]


class BiLSTM(nn.Module):
    """Bidirectional LSTM layers over padded frames (B, T, C) -> (B, T, 2 hidden). Each direction is a
    unidirectional nn.LSTM; the backward one reads every sequence reversed within its own length, so padding
    never reaches a real frame (exact, unlike an unpacked bidirectional LSTM, and without packing)."""

    def __init__(self, inputs: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        widths = [inputs] + [2 * hidden] * (layers - 1)
        self.forward_layers = nn.ModuleList(nn.LSTM(w, hidden, batch_first=True) for w in widths)
        self.backward_layers = nn.ModuleList(nn.LSTM(w, hidden, batch_first=True) for w in widths)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        t = torch.arange(x.shape[1], device=x.device)
        order = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B, T): rows reversed
        index = order[:, :, None]

        def reverse(y: torch.Tensor) -> torch.Tensor:
            return y.gather(1, index.expand_as(y))

        for forward, backward in zip(self.forward_layers, self.backward_layers, strict=True):
            x = self.dropout(x)
            x = torch.cat([forward(x)[0], reverse(backward(reverse(x))[0])], dim=-1)
        return self.dropout(x)


def greedy_paths(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Greedy CTC decoding of log_probs (B, T, V) with valid lengths (B,): per row the argmax of every frame,
    repeats merged, blanks dropped -> output ids (blank excluded)."""
    best = log_probs.argmax(-1).cpu()
    paths = []
    for row, length in zip(best, lengths.tolist(), strict=True):
        merged = torch.unique_consecutive(row[:length]).tolist()
        paths.append([i for i in merged if i != BLANK])
    return paths


class Recognizer(FineTuned):
    """A backbone (wav2vec or MFCCs) and a CTC head: frames -> standardise -> [BiLSTM ->] linear -> log-probs
    over the blank and the symbols, per frame."""

    def __init__(self, config: HeadConfig, backbone_config: Wav2VecConfig | None):
        super().__init__(config, backbone_config)
        width = config.channels * config.subsample
        if config.head == "bilstm":
            self.rnn = BiLSTM(width, config.hidden, config.lstm_layers, config.dropout)
            width = 2 * config.hidden
        self.out = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.outputs))
        self.beam: BeamSearch | None = None  # greedy decoding until beam_search() sets one

    def beam_search(self, beam_size: int = BEAM_SIZE, lm: str | Path | None = None,
                    lm_weight: float = LM_WEIGHT, insertion_bonus: float = INSERTION_BONUS) -> Recognizer:
        """Decode with a CTC beam search of `beam_size` prefixes from now on (0: greedily again), with an
        n-gram language model if `lm` names one (see decoding.py); returns the recognizer."""
        self.beam = (BeamSearch(self.config.labels, self.config.units, beam_size, lm, lm_weight,
                                insertion_bonus) if beam_size else None)
        return self

    @property
    def shortest_input(self) -> int:
        """Samples at 16 kHz that make one output frame (`subsample` frames)."""
        return super().shortest_input + (self.config.subsample - 1) * FRAME_HOP

    @property
    def causal(self) -> bool:
        """Whether no frame's output depends on later audio: per-frame LayerNorm, the causal context network
        and a per-frame (linear) head on z or c."""
        config = self.config
        return (self.backbone is not None and self.backbone.config.norm == "layer" and config.head == "linear"
                and config.layer in ("z", "c") and config.subsample == 1)

    def output_lengths(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Output frames (log-probability rows) for `frames` input frames: subsampling drops a ragged end."""
        return frames // self.config.subsample

    def head(self, frames: torch.Tensor, mask: torch.Tensor, mask_spans: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Padded frames (B, [layers,] C, T) and mask (B, T) -> log-probabilities (B, T / subsample, symbols
        + 1), of which the first output_lengths(mask.sum(-1)) of each row are valid."""
        x = self.standardised(frames, mask, mask_spans, generator).transpose(1, 2)  # (B, T, C)
        s = self.config.subsample
        if s > 1:  # neighbouring frames side by side: (B, T / s, s C)
            steps = x.shape[1] // s
            x = x[:, :steps * s].reshape(len(x), steps, x.shape[-1] * s)
        if self.config.head == "bilstm":
            x = self.rnn(x, self.output_lengths(mask.sum(-1)))
        return self.out(x).float().log_softmax(-1)

    def targets(self, targets: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's transcripts (symbol lists) -> (concatenated output ids, lengths) as CTC takes them."""
        index = {symbol: i + 1 for i, symbol in enumerate(self.config.labels)}
        ids = [index[symbol] for symbols in targets for symbol in symbols]
        return (torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor([len(symbols) for symbols in targets], dtype=torch.long, device=device))

    def loss(self, outputs: torch.Tensor, mask: torch.Tensor,
             targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """CTC loss per target symbol, averaged over the batch. Files too short for their transcript are
        removed before training (finetune.py), so no infinite loss is zeroed here behind anyone's back."""
        ids, lengths = targets
        return F.ctc_loss(outputs.transpose(0, 1), ids, self.output_lengths(mask.sum(-1)), lengths,
                          blank=BLANK, reduction="mean")

    def symbols(self, path: Sequence[int]) -> list[str]:
        return [self.config.labels[i - 1] for i in path]

    def describe(self, outputs: torch.Tensor, mask: torch.Tensor) -> list[dict]:
        """Log-probabilities (B, T, V) and mask (B, T) -> {"transcript"} per row by greedy decoding, or by the
        beam search of beam_search() with greedy's transcript beside it under "greedy"."""
        lengths = self.output_lengths(mask.sum(-1))
        paths = greedy_paths(outputs, lengths)
        greedy = [detokenize(self.symbols(path), self.config.units) for path in paths]
        if self.beam is None:
            return [{"transcript": transcript} for transcript in greedy]
        rows = outputs.float().cpu().numpy()  # the beam's transcript, and greedy's of the same outputs
        return [{"transcript": self.beam(row[:length]), "greedy": transcript}
                for row, length, transcript in zip(rows, lengths.tolist(), greedy, strict=True)]

    @torch.no_grad()
    def recognize(self, wav: np.ndarray | torch.Tensor | str | Path, sample_rate: int = SAMPLE_RATE
                  ) -> tuple[torch.Tensor, str]:
        """One file, or a waveform (L,) at `sample_rate` -> (log-probabilities (frames, symbols + 1), its
        transcript)."""
        self.eval()
        frames, mask = pad_frames([self.frames(self.latent(self.waveform(wav, sample_rate)))])
        log_probs = self.head(frames, mask)
        return log_probs[0], self.describe(log_probs, mask)[0]["transcript"]

    def transcribe(self, wav: np.ndarray | torch.Tensor | str | Path, sample_rate: int = SAMPLE_RATE) -> str:
        """One file, or a waveform (L,) at `sample_rate` -> its transcript: tokens joined by spaces, or
        words."""
        return self.recognize(wav, sample_rate)[1]

    def streamer(self) -> StreamingTranscriber:
        """A stateful recognizer: `s.push(chunk)` takes audio as it arrives and returns the symbols it
        completes; `s.transcript` is then what transcribe() gives for the whole audio."""
        return StreamingTranscriber(self)

    def export_graph(self) -> RecognizerGraph:
        """Backbone and CTC head as one traceable module for ondevice.py's exporters."""
        return RecognizerGraph(self)


class StreamingTranscriber:
    """Greedy CTC decoding as audio arrives, on a causal recognizer (Recognizer.causal): each push runs the
    backbone's Streamer, the head on the frames it completes, and emits the symbols they decide."""

    def __init__(self, recognizer: Recognizer):
        if not recognizer.causal:
            raise UserError("Streaming recognition needs a causal model: a backbone with per-frame LayerNorm "
                            "(norm='layer', e.g. wav2vec_tiny) under a linear head on z or c; this one "
                            "needs the whole file (transcribe it instead).")
        self.recognizer = recognizer.eval()
        self.stream = recognizer.backbone.streamer()
        self.previous = BLANK  # the last frame's argmax: a repeat of it is merged
        self.emitted: list[str] = []

    @torch.no_grad()
    def push(self, chunk: np.ndarray | torch.Tensor) -> list[str]:
        """chunk (L,) of 16 kHz audio -> the symbols its frames complete (often none)."""
        frames = self.stream.push(torch.as_tensor(np.asarray(chunk, dtype=np.float32)))
        layer = frames[self.recognizer.config.layer]
        if layer.shape[-1] == 0:
            return []
        mask = torch.ones(1, layer.shape[-1], dtype=torch.bool, device=layer.device)
        best = self.recognizer.head(layer, mask)[0].argmax(-1).tolist()
        before = [self.previous] + best[:-1]
        new = [i for i, last in zip(best, before, strict=True) if i != last and i != BLANK]
        self.previous = best[-1]
        symbols = self.recognizer.symbols(new)
        self.emitted += symbols
        return symbols

    @property
    def transcript(self) -> str:
        return detokenize(self.emitted, self.recognizer.config.units)


class RecognizerGraph(nn.Module):
    """wav (1, L) -> `log_probs` (1, T, symbols + 1), a recognizer's CTC log-probabilities per frame (blank
    first): backbone and head as one graph; greedy decoding (argmax, merge, drop blanks) is left to the
    caller, as it is a few lines anywhere."""

    form = "recognizer"
    output_names = ["log_probs"]
    output_axes = {"log_probs": {1: "frames"}}

    def __init__(self, recognizer: Recognizer):
        super().__init__()
        self.recognizer = exportable(recognizer)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return head_outputs(self.recognizer, wav)
