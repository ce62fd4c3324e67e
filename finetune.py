"""Fine-tune a pre-trained wav2vec (or MFCCs, or the network from scratch) into a classifier or regressor.

    python finetune.py --checkpoint CKPT|random:CKPT|mfcc --data-dir DIR --labels SOURCE --output-dir runs/ft
                       [--task classify|regress] [--group-column speaker | --split fsdd-official]
                       [--freeze all|encoder|none] [--layer c|z|all] [--pool mean|mean+std|attentive]
                       [--head linear|mlp] [--epochs N] [--max-updates N] [--max-minutes M] [--threads 1]
    python finetune.py predict --model runs/ft/finetuned.pt --data-dir NEW --output predictions.csv

In Python: `Classifier.from_pretrained("runs/ft/finetuned.pt").predict(wav)` (wav: 16 kHz float array or a
path) gives {"label", "probabilities"} or {"value"}.

- --checkpoint: a checkpoint of main.py or fairseq's wav2vec 1.0; `random:CKPT`: CKPT's network randomly
  initialised (training from scratch with --freeze none: the baseline to compare CKPT with); `random`: the
  same for the base network (512 channels); `mfcc`: 13 MFCCs + deltas per 10 ms frame under the same head
  (a baseline in the same harness).
- --labels: as probe.py: a TSV with `path` and a label column (--label-column), `folder`, `pattern:REGEX`
  (a named group `label`), `fsdd-digit` / `fsdd-speaker`. --task regress needs numeric labels.
- The head: the frames of `c`, `z` or a learned softmax-weighted sum of every context layer's output
  (`all`, as SUPERB), standardised per channel with statistics of the training files, pooled over the
  valid frames only (mean, mean+std or attentive statistics pooling), then a linear layer or a small MLP.
- --freeze all: the backbone is frozen and its frames are computed once and cached, so the head trains in
  seconds. encoder: z is cached and the context network trains with the head. none: everything trains,
  the backbone at --backbone-lr and only after --freeze-updates updates, while the new head settles.
- Batches: files of different lengths are padded and masked. The backbone runs on each file alone,
  because its GroupNorm statistics span the whole input: padding would change every frame. Training crops
  files longer than --crop-seconds at random; evaluation and prediction see whole files.
- Augmentation (training only): --speed (speed perturbation), --augment (shift, gain, noise), both on the
  waveform, so they turn the cache of --freeze all / encoder off; --mask-frames masks spans of frames.
- Evaluation: --group-column COLUMN gives folds disjoint in that column (--folds 0: leave one group out,
  else that many grouped folds); --split fsdd-official tests on FSDD repetitions 0-4; otherwise
  stratified (classify) or plain (regress) k-fold. Each fold holds out --valid-fraction of its training
  groups (or files) for early stopping; the best model on them is kept. A budget (--epochs, --max-updates,
  --max-minutes) applies to each fold; --max-folds runs only the first folds.
- Outputs in --output-dir: metrics.json (over all tested files, and per fold), predictions.csv (every
  tested file: fold, true, predicted, probabilities), confusion_matrix.png or scatter.png, finetuned.pt
  (the model of the fold with the best validation score, named in metrics.json's saved_model; the last
  fold's without validation files: backbone config and weights, head, label names, the flags; loads with
  torch.load(weights_only=True)), train.log and TensorBoard curves in tensorboard/.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import GroupShuffleSplit
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import SAMPLE_RATE, augment, change_speed, find_audio_files, load_audio
from features import MFCC_WINDOW, mfcc
from model import UserError, Wav2Vec, Wav2VecConfig, load_checkpoint_weights, read_checkpoint
from probe import feature_config, is_random
from utils import (
    PRECISIONS,
    add_threads_argument,
    autocast_context,
    build_optimizer,
    check_classes,
    classification_metrics,
    cross_validation,
    ensure_writable_dir,
    fsdd_test_mask,
    lr_lambda,
    make_grad_scaler,
    non_negative_int,
    numeric_labels,
    optimizer_step,
    positive_float,
    positive_int,
    read_labels,
    regression_metrics,
    resolve_device,
    run_cli,
    save_checkpoint,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # wav2vec and MFCC frames are 10 ms apart
MASK_SPAN = 5  # frames per masked span with --mask-frames (50 ms)
STATS_FILES = 200  # training files, spread over the fold, whose frames set the head's standardisation


# ----- the model: backbone, pooling, head ----------------------------------------------------------

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
    def predict(self, wav: np.ndarray | torch.Tensor | str | Path) -> dict:
        """One file or 16 kHz waveform -> {"label", "probabilities"} (classify) or {"value"} (regress)."""
        if isinstance(wav, (str, Path)):
            wav = load_audio(wav, SAMPLE_RATE)
        wav = torch.as_tensor(np.asarray(wav, dtype=np.float32)).to(self.feature_mean.device)
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

    def payload(self, extra: dict) -> dict:
        """What finetuned.pt holds: configs as plain dicts and tensors only, so weights_only loads it."""
        return {"head_config": self.config.to_dict(),
                "backbone_config": None if self.backbone is None else self.backbone.config.to_dict(),
                "model": self.state_dict(), **extra}

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
        """A fine-tuned model in eval mode from a finetuned.pt written by finetune.py."""
        ckpt = read_checkpoint(path, map_location, remedy="use a finetuned.pt written by finetune.py.")
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


# ----- data ----------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """The labelled files of a run: relative names, paths, targets (class index or value), groups."""

    data_dir: Path
    names: list[str]
    labels: list[str]  # as read from the label source
    groups: list[str] | None
    test_mask: np.ndarray | None  # fsdd-official: True for the test files
    classes: tuple[str, ...] = ()
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def paths(self) -> list[Path]:
        return [self.data_dir / name for name in self.names]


def load_dataset(args: argparse.Namespace) -> Dataset:
    """Files with a label (and group), checked for the task before any audio is decoded."""
    files = find_audio_files(args.data_dir)
    if not files:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    names = [f.relative_to(args.data_dir).as_posix() for f in files]
    labels, groups = read_labels(names, args.labels, args.data_dir, args.group_column, args.label_column)
    keep = [i for i, label in enumerate(labels)
            if label is not None and (groups is None or groups[i] is not None)]
    if not keep:
        hint = ("put each class's files in a sub-folder named after it" if args.labels == "folder"
                else "check the label source and --label-column / --group-column")
        raise UserError(f"None of the {len(files)} audio files under {args.data_dir} has a label from "
                        f"--labels {args.labels}: {hint}.")
    if len(keep) < len(files):
        log.info("skipping %d of %d files without a label%s", len(files) - len(keep), len(files),
                 "" if groups is None else " or group")
    kept = [names[i] for i in keep]
    data = Dataset(args.data_dir, kept, [labels[i] for i in keep],
                   None if groups is None else [groups[i] for i in keep],
                   fsdd_test_mask(kept, args.data_dir) if args.split == "fsdd-official" else None)
    if args.task == "regress":
        data.targets = numeric_labels(data.labels, kept)
    else:
        check_classes(data.labels)
        data.classes = tuple(sorted(set(data.labels), key=natural_key))
        data.targets = np.array([data.classes.index(label) for label in data.labels])
    return data


def natural_key(text: str) -> tuple:
    """Numbers sort as numbers ("2" before "10"), other labels alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def validation_rows(data: Dataset, train: np.ndarray, fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): whole groups held out when there are groups, so that early
    stopping measures what the test measures (unseen speakers, say)."""
    if fraction <= 0:
        return train, train[:0]
    groups = None if data.groups is None else np.array(data.groups)[train]
    if groups is not None and len(set(groups)) >= 2:
        splitter = GroupShuffleSplit(1, test_size=fraction, random_state=seed)
        fit, valid = next(splitter.split(train, groups=groups))
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        cut = max(1, round(fraction * len(train)))
        fit, valid = order[cut:], order[:cut]
    return train[np.sort(fit)], train[np.sort(valid)]


# ----- cached inputs ---------------------------------------------------------------------------------

def cached_stage(args: argparse.Namespace) -> str:
    """What each training item starts from: "frames" (backbone frozen), "latent" (encoder frozen) or
    "wav". Waveform augmentation needs the waveform, so it turns the cache off."""
    if args.augment or args.speed or args.freeze == "none":
        return "wav"
    if args.freeze == "all" or args.checkpoint == "mfcc":
        return "frames"
    return "latent"


@torch.no_grad()
def prepare_inputs(model: Classifier, paths: Sequence[Path], stage: str, device: torch.device) -> list:
    """Per file: the waveform (numpy, stage "wav"), or the output of the frozen stages, computed once."""
    inputs = []
    for path in tqdm(paths, desc=f"loading ({stage})", unit="file", leave=False):
        wav = load_audio(path, SAMPLE_RATE)
        shortest = model.shortest_input
        if len(wav) < shortest:
            raise UserError(f"{path} is shorter than one frame ({len(wav)} of {shortest} samples at 16 kHz): "
                            "remove it or pad it.")
        if stage == "wav":
            inputs.append(wav)
            continue
        x = model.latent(torch.from_numpy(wav).to(device))
        inputs.append((model.frames(x) if stage == "frames" else x).cpu())
    return inputs


def crop(item: np.ndarray | torch.Tensor, length: int, rng: np.random.Generator) -> np.ndarray | torch.Tensor:
    """A random window of at most `length` along the last axis (samples or frames)."""
    total = item.shape[-1]
    if total <= length:
        return item
    start = int(rng.integers(0, total - length + 1))
    return item[..., start:start + length]


def batch_frames(model: Classifier, items: Sequence, stage: str, device: torch.device,
                 train: bool = False, rng: np.random.Generator | None = None,
                 args: argparse.Namespace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded frames (B, [layers,] C, T) and mask (B, T) for items at `stage`; training crops and augments."""
    frames = []
    for item in items:
        if train:
            per_second = SAMPLE_RATE if stage == "wav" else FRAMES_PER_SECOND
            item = crop(item, int(args.crop_seconds * per_second), rng)
            if stage == "wav" and args.speed:
                item = change_speed(item, rng, args.speed, model.shortest_input)
            if stage == "wav" and args.augment:
                item = augment(item.copy(), rng)
        if stage == "wav":
            item = model.latent(torch.from_numpy(np.ascontiguousarray(item)).to(device))
        item = item.to(device)
        frames.append(model.frames(item) if stage != "frames" else item)
    return pad_frames(frames)


@torch.no_grad()
def set_feature_statistics(model: Classifier, inputs: Sequence, stage: str, device: torch.device) -> None:
    """Per-channel mean and std of the (mixed) frames of up to STATS_FILES training files spread over the
    fold (not its first files: sorted names put one class or speaker first)."""
    spread = [inputs[i] for i in np.linspace(0, len(inputs) - 1, min(STATS_FILES, len(inputs))).astype(int)]
    frames = [model.mix(batch_frames(model, [item], stage, device)[0])[0] for item in spread]
    every = torch.cat(frames, -1)  # (C, all frames)
    model.feature_mean.copy_(every.mean(-1))
    model.feature_std.copy_(every.std(-1).clamp(min=1e-5))


# ----- training one fold -------------------------------------------------------------------------

def build_model(args: argparse.Namespace, data: Dataset, backbone: tuple[Wav2VecConfig, dict] | None,
                targets: np.ndarray) -> Classifier:
    """A fresh classifier for one fold: the backbone's starting weights and a new head."""
    if backbone is None:
        channels, num_layers = 26, 1
        config = None
    else:
        config, weights = backbone
        channels = config.encoder_layers[-1][0] if args.layer == "z" else config.context_layers[-1][0]
        num_layers = len(config.context_layers) if args.layer == "all" else 1
    head = HeadConfig(task=args.task, labels=data.classes, backbone="mfcc" if backbone is None else "wav2vec",
                      layer="c" if backbone is None else args.layer, pool=args.pool, head=args.head,
                      channels=channels, num_layers=num_layers, hidden=args.hidden, dropout=args.dropout)
    if args.task == "regress":
        head = replace(head, target_mean=float(targets.mean()), target_std=float(targets.std() or 1.0))
    torch.manual_seed(args.seed)
    model = Classifier(head, config)
    if backbone is not None:
        model.backbone.load_state_dict(weights)
    return model


def trainable_backbone(model: Classifier, freeze: str) -> list[nn.Parameter]:
    """The backbone parameters that --freeze leaves trainable (the prediction head of pre-training never)."""
    if model.backbone is None or freeze == "all":
        return []
    parts = [model.backbone.context] + ([model.backbone.encoder] if freeze == "none" else [])
    return [p for part in parts for p in part.parameters()]


def set_backbone_trainable(model: Classifier, params: Sequence[nn.Parameter], on: bool) -> None:
    if model.backbone is not None:
        model.backbone.requires_grad_(False)
    for p in params:
        p.requires_grad_(on)


def loss_of(model: Classifier, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if model.config.task == "classify":
        return F.cross_entropy(outputs.float(), targets)
    standardised = (targets.float() - model.config.target_mean) / model.config.target_std
    return F.mse_loss(outputs[:, 0].float(), standardised)


@torch.no_grad()
def evaluate(model: Classifier, inputs: Sequence, targets: np.ndarray, stage: str, device: torch.device,
             autocast, batch_size: int) -> tuple[dict, list[dict]]:
    """(metrics, one prediction dict per item) on whole files."""
    model.eval()
    predictions, loss_sum = [], 0.0
    for begin in range(0, len(inputs), batch_size):
        with autocast:
            outputs = model.head(*batch_frames(model, inputs[begin:begin + batch_size], stage, device))
        batch_targets = torch.as_tensor(targets[begin:begin + batch_size], device=device)
        loss_sum += float(loss_of(model, outputs, batch_targets)) * len(batch_targets)
        predictions += model.describe(outputs.float())
    model.train()
    metrics = score(model.config, targets, predictions)
    metrics["loss"] = loss_sum / max(1, len(inputs))
    return metrics, predictions


def score(config: HeadConfig, targets: np.ndarray, predictions: list[dict]) -> dict:
    if config.task == "regress":
        return regression_metrics(targets, np.array([p["value"] for p in predictions]))
    return classification_metrics([config.labels[t] for t in targets], [p["label"] for p in predictions])


def better(config: HeadConfig, metrics: dict, best: dict | None) -> bool:
    """Early stopping's yardstick: accuracy (then loss) for classification, MAE for regression."""
    if best is None:
        return True
    if config.task == "regress":
        return metrics["mae"] < best["mae"]
    return (metrics["accuracy"], -metrics["loss"]) > (best["accuracy"], -best["loss"])


@dataclass
class FoldResult:
    """A fold's best model, its predictions for the fold's test files, and its test metrics."""

    model: Classifier
    predictions: list[dict]
    metrics: dict


def train_fold(args: argparse.Namespace, name: str, data: Dataset, inputs: list, rows: np.ndarray,
               valid_rows: np.ndarray, test_rows: np.ndarray, backbone, device: torch.device,
               writer: SummaryWriter) -> FoldResult:
    """Train a fresh model on `rows`, early-stopped on `valid_rows`, then predict `test_rows`."""
    stage = cached_stage(args)
    model = build_model(args, data, backbone, data.targets[rows]).to(device)
    set_feature_statistics(model, [inputs[i] for i in rows], stage, device)
    backbone_params = trainable_backbone(model, args.freeze)
    if model.backbone is not None:
        model.backbone.requires_grad_(False)  # the head's parameters alone go into build_optimizer's groups
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    if backbone_params:  # the backbone trains at its own, lower rate, with the same schedule
        optimizer.add_param_group({"params": backbone_params, "lr": args.backbone_lr,
                                   "weight_decay": args.weight_decay})
    updates_per_epoch = math.ceil(len(rows) / args.batch_size)
    total = min(args.max_updates or math.inf, args.epochs * updates_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda("cosine", args.warmup_updates, total, args.min_lr_ratio))
    scaler = make_grad_scaler(device, args.precision)
    autocast = autocast_context(device, args.precision)
    rng = np.random.default_rng(args.seed)  # every fold draws batches, crops and masks from the same seed,
    generator = torch.Generator().manual_seed(args.seed)  # as its model starts from the same weights
    eval_every = args.eval_every or updates_per_epoch
    valid_inputs = [inputs[i] for i in valid_rows]

    best, best_state, best_update, stale, update = None, None, 0, 0, 0
    start = time.perf_counter()
    progress = tqdm(total=None if math.isinf(total) else total, desc=f"fold {name}", unit="update")
    model.train()
    while update < total and stale < args.patience:
        order = rng.permutation(rows)
        for begin in range(0, len(order), args.batch_size):
            batch = order[begin:begin + args.batch_size]
            set_backbone_trainable(model, backbone_params, update >= args.freeze_updates)
            with autocast:
                frames = batch_frames(model, [inputs[i] for i in batch], stage, device, True, rng, args)
                outputs = model.head(*frames, args.mask_frames, generator)
            loss = loss_of(model, outputs, torch.as_tensor(data.targets[batch], device=device))
            loss = loss.float()
            scaler.scale(loss).backward()
            optimizer_step(model, optimizer, scaler, args.clip_norm, loss.detach())
            scheduler.step()
            update += 1
            loss_value = loss.item()
            progress.update()
            progress.set_postfix(loss=f"{loss_value:.3f}")
            writer.add_scalar(f"{name}/train_loss", loss_value, update)
            out_of_time = args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes
            if update % eval_every == 0 or update >= total or out_of_time:
                if len(valid_rows):
                    metrics, _ = evaluate(model, valid_inputs, data.targets[valid_rows], stage, device,
                                          autocast, args.batch_size)
                    key = "mae" if args.task == "regress" else "accuracy"
                    writer.add_scalar(f"{name}/valid_{key}", metrics[key], update)
                    writer.add_scalar(f"{name}/valid_loss", metrics["loss"], update)
                    log.info("fold %s update %d: validation %s %.4f, loss %.4f", name, update, key,
                             metrics[key], metrics["loss"])
                    if better(model.config, metrics, best):
                        best, best_update, stale = metrics, update, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        stale += 1
            if update >= total or out_of_time or stale >= args.patience:
                break
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            break
    progress.close()
    seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_update = update
    metrics, predictions = evaluate(model, [inputs[i] for i in test_rows], data.targets[test_rows], stage,
                                    device, autocast, args.batch_size)
    metrics.update(updates=update, best_update=best_update, train_seconds=round(seconds, 1),
                   n_train=len(rows), n_valid=len(valid_rows), n_test=len(test_rows))
    if best is not None:
        metrics["valid"] = {k: v for k, v in best.items() if k != "per_class_recall"}
    log.info("fold %s: %d updates in %.0f s (best at %d); test %s", name, update, seconds, best_update,
             summary(metrics))
    return FoldResult(model, predictions, metrics)


def summary(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    return f"MAE {metrics['mae']:.3f}, RMSE {metrics['rmse']:.3f}, Pearson r {metrics['pearson_r']:.3f}"


# ----- outputs -------------------------------------------------------------------------------------

def prediction_rows(config: HeadConfig, names: Sequence[str], predictions: Sequence[dict],
                    extra: dict[str, Sequence] | None = None) -> tuple[list[str], list[list]]:
    """(header, rows) of a predictions.csv: path, any extra columns, predicted, then p_<class> per class."""
    extra = extra or {}
    header = ["path", *extra, "predicted"] + [f"p_{label}" for label in config.labels]
    rows = []
    for i, (name, p) in enumerate(zip(names, predictions, strict=True)):
        row = [name, *(column[i] for column in extra.values())]
        if config.task == "regress":
            row.append(f"{p['value']:.6g}")
        else:
            row += [p["label"]] + [f"{p['probabilities'][label]:.6f}" for label in config.labels]
        rows.append(row)
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot_results(config: HeadConfig, true: Sequence, predicted: Sequence, path: Path, title: str) -> None:
    """A confusion matrix (classify) or predicted against true values (regress)."""
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    if config.task == "classify":
        counts = confusion_matrix(true, predicted, labels=list(config.labels))
        image = ax.imshow(counts, cmap="Blues")
        fig.colorbar(image, ax=ax)
        ticks = range(len(config.labels))
        ax.set_xticks(ticks, config.labels, rotation=90 if len(config.labels) > 12 else 0)
        ax.set_yticks(ticks, config.labels)
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > counts.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        ax.scatter(true, predicted, s=6, alpha=0.5)
        low, high = min(np.min(true), np.min(predicted)), max(np.max(true), np.max(predicted))
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(args: argparse.Namespace, out: Path, data: Dataset, description: str,
                  tested: list[tuple[str, np.ndarray, FoldResult]]) -> dict:
    """metrics.json, predictions.csv, the plot and finetuned.pt (the model of saved_fold)."""
    config = tested[-1][2].model.config
    names = [data.names[i] for _, test, _ in tested for i in test]
    predictions = [p for _, _, result in tested for p in result.predictions]
    targets = np.concatenate([data.targets[test] for _, test, _ in tested])
    folds_column = [name for name, test, _ in tested for _ in test]
    true = [data.labels[i] for _, test, _ in tested for i in test]
    metrics = score(config, targets, predictions)
    metrics.update(evaluation=description, folds={name: result.metrics for name, _, result in tested},
                   n_tested=len(names), n_files=len(data.names),
                   settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    header, rows = prediction_rows(config, names, predictions, {"fold": folds_column, "true": true})
    write_csv(out / "predictions.csv", header, rows)
    title = f"{backbone_label(args.checkpoint)}, freeze {args.freeze}, {description}: {summary(metrics)}"
    if config.task == "classify":
        plot_results(config, true, [p["label"] for p in predictions], out / "confusion_matrix.png", title)
    else:
        plot_results(config, targets, [p["value"] for p in predictions], out / "scatter.png", title)
    fold, test, result = saved_fold(tested)
    metrics["saved_model"] = {"fold": fold, "valid": result.metrics.get("valid"),
                              "chosen_by": "best validation score" if "valid" in result.metrics
                              else "last fold (no validation split)"}
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    save_checkpoint(result.model.cpu().payload({"args": flags, "fold": fold,
                                                "test_files": [data.names[i] for i in test],
                                                "metrics": json.loads(json.dumps(result.metrics))}),
                    out / "finetuned.pt")
    return metrics


def backbone_label(spec: str) -> str:
    """--checkpoint for a plot title: mfcc, random, or the file name of the checkpoint (or "random NAME")."""
    if spec in ("mfcc", "random"):
        return spec
    name = Path(spec.removeprefix("random:")).name
    return f"random {name}" if is_random(spec) else name


def saved_fold(tested: list[tuple[str, np.ndarray, FoldResult]]) -> tuple[str, np.ndarray, FoldResult]:
    """The fold whose model finetuned.pt keeps: the best on its own validation files (the first of equals;
    no test file has a say), or the last fold when nothing was held out for validation."""
    if any("valid" not in result.metrics for _, _, result in tested):
        return tested[-1]
    config = tested[0][2].model.config
    best = tested[0]
    for candidate in tested[1:]:
        if better(config, candidate[2].metrics["valid"], best[2].metrics["valid"]):
            best = candidate
    return best


# ----- command line -------------------------------------------------------------------------------

def backbone_weights(spec: str, seed: int) -> tuple[Wav2VecConfig, dict] | None:
    """(config, state dict) of the starting backbone: a checkpoint, a random network (of a checkpoint's
    configuration for random:CKPT, else the base one), or None for MFCCs."""
    if spec == "mfcc":
        return None
    if is_random(spec):
        torch.manual_seed(seed)
        model = Wav2Vec(feature_config(spec))
        return model.config, model.state_dict()
    return load_checkpoint_weights(spec)


def train(args: argparse.Namespace) -> dict:
    """Cross-validated fine-tuning as the flags say; returns the pooled test metrics."""
    data = load_dataset(args)  # before the output folder: a user error is then the first thing said
    out = Path(args.output_dir)
    ensure_writable_dir(out)
    setup_logging(out / "train.log")
    set_threads(args.threads)
    device = resolve_device(args.device)
    groups = None if data.groups is None else np.array(data.groups)
    description, folds = cross_validation(data.targets, args.folds, args.seed, data.test_mask, groups,
                                          group_folds=args.folds, regress=args.task == "regress",
                                          class_remedy="drop the rare classes from the labels, add data, "
                                                       "or give --group-column")
    log.info("%d files, %s, %s; %s", len(data.names), f"{len(data.classes)} classes" if data.classes
             else "regression", description, f"{len(folds)} folds" + (f", running {args.max_folds}"
                                                                     if args.max_folds else ""))
    backbone = backbone_weights(args.checkpoint, args.seed)
    stage = cached_stage(args)
    start = time.perf_counter()
    with torch.no_grad():
        template = build_model(args, data, backbone, data.targets).to(device)
    inputs = prepare_inputs(template, data.paths, stage, device)
    log.info("inputs (%s) of %d files ready in %.0f s", stage, len(inputs), time.perf_counter() - start)
    tested = []
    with SummaryWriter(out / "tensorboard") as writer, logging_redirect_tqdm():
        for name, train_rows, test_rows in folds[:args.max_folds or None]:
            fit_rows, valid_rows = validation_rows(data, train_rows, args.valid_fraction, args.seed)
            result = train_fold(args, name, data, inputs, fit_rows, valid_rows, test_rows, backbone, device,
                                writer)
            tested.append((name, test_rows, result))
    metrics = write_outputs(args, out, data, description, tested)
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("all %d tested files: %s; wrote %s", metrics["n_tested"], summary(metrics), out)
    return metrics


def predict(args: argparse.Namespace) -> None:
    """Label (and probabilities) or value for every audio file under --data-dir, to a CSV."""
    set_threads(args.threads)
    device = resolve_device(args.device)
    model = Classifier.from_pretrained(args.model, device)
    files = find_audio_files(args.data_dir)
    if not files:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    names = [f.relative_to(args.data_dir).as_posix() for f in files]
    predictions = [model.predict(path) for path in tqdm(files, desc="predicting", unit="file")]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.output, *prediction_rows(model.config, names, predictions))
    print(f"wrote {len(names)} predictions to {args.output}")


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and labels")
    data.add_argument("--checkpoint", required=True,
                      help="a checkpoint (ours or fairseq's), random:CKPT (CKPT's network, randomly "
                           "initialised), random (the base network's) or mfcc")
    data.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    data.add_argument("--labels", required=True,
                      help="TSV path, folder, pattern:REGEX, fsdd-digit or fsdd-speaker")
    data.add_argument("--label-column", default="label", help="TSV column (or pattern group) of the label")
    data.add_argument("--task", choices=("classify", "regress"), default="classify")
    data.add_argument("--output-dir", type=Path, default=Path("runs/ft"))
    model = parser.add_argument_group("model")
    model.add_argument("--layer", choices=("c", "z", "all"), default="c",
                       help="frames the head reads: c, z, or a learned weighted sum of all context layers")
    model.add_argument("--pool", choices=("mean", "mean+std", "attentive"), default="mean+std")
    model.add_argument("--head", choices=("linear", "mlp"), default="linear")
    model.add_argument("--hidden", type=positive_int, default=256, help="width of the MLP and the attention")
    model.add_argument("--dropout", type=float, default=0.1)
    model.add_argument("--freeze", choices=("all", "encoder", "none"), default="all",
                       help="all: train the head on cached features; encoder: context and head train; "
                            "none: everything trains")
    optim = parser.add_argument_group("optimisation and budget (per fold)")
    optim.add_argument("--epochs", type=positive_int, default=30)
    optim.add_argument("--max-updates", type=positive_int, default=None)
    optim.add_argument("--max-minutes", type=positive_float, default=None, help="training time per fold")
    optim.add_argument("--batch-size", type=positive_int, default=16)
    optim.add_argument("--lr", type=positive_float, default=5e-3, help="peak learning rate of the head")
    optim.add_argument("--backbone-lr", type=positive_float, default=5e-5,
                       help="peak learning rate of the backbone")
    optim.add_argument("--freeze-updates", type=non_negative_int, default=100,
                       help="with --freeze encoder/none, updates before the backbone starts to train")
    optim.add_argument("--warmup-updates", type=non_negative_int, default=20)
    optim.add_argument("--min-lr-ratio", type=float, default=0.01, help="the cosine's end / the peak")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--clip-norm", type=float, default=5.0)
    optim.add_argument("--crop-seconds", type=float, default=4.0, help="training crops of longer files")
    optim.add_argument("--augment", action="store_true",
                       help="pre-training augmentations (shift, gain, noise); turns the feature cache off")
    optim.add_argument("--speed", type=float, default=0.0,
                       help="speed perturbation: each training crop plays at a random rate in 1 +- SPEED "
                            "(0.1: 0.9-1.1x; pitch and tempo move together); turns the feature cache off")
    optim.add_argument("--mask-frames", type=float, default=0.0,
                       help="fraction of frames masked in spans of 50 ms during training")
    optim.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--group-column", help="TSV column or pattern group: folds disjoint in it")
    evaluation.add_argument("--split", choices=("cv", "fsdd-official"), default="cv")
    evaluation.add_argument("--folds", type=int, default=5, help="k of k-fold; 0 with --group-column: one "
                                                                   "group out per fold")
    evaluation.add_argument("--max-folds", type=positive_int, default=None, help="run only the first folds")
    evaluation.add_argument("--valid-fraction", type=float, default=0.15,
                            help="of each fold's training groups (or files), for early stopping")
    evaluation.add_argument("--eval-every", type=positive_int, default=None,
                            help="updates between validations (default: once per epoch)")
    evaluation.add_argument("--patience", type=positive_int, default=10,
                            help="validations without improvement before stopping")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--device", default="auto")
    add_threads_argument(evaluation)
    args = parser.parse_args(argv)
    if args.split == "fsdd-official" and args.group_column:
        raise UserError("--split fsdd-official and --group-column are alternatives: choose one.")
    if args.checkpoint in ("mfcc",) and (args.freeze != "all" or args.layer != "c"):
        raise UserError("--checkpoint mfcc has no network to train or layers to choose: "
                        "drop --freeze and --layer.")
    if not 0 <= args.valid_fraction < 1 or args.folds < 0:
        raise UserError("--valid-fraction must be in [0, 1) and --folds at least 0.")
    if not 0 <= args.speed < 0.5:
        raise UserError(f"--speed must be in [0, 0.5) (0.1 plays crops at 0.9-1.1x), not {args.speed}.")
    return args


def parse_predict_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="finetune.py predict",
                                     description="Predict every audio file under a folder.")
    parser.add_argument("--model", type=Path, required=True, help="a finetuned.pt written by finetune.py")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--device", default="auto")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        predict(parse_predict_args(argv[1:]))
    else:
        train(parse_train_args(argv))


if __name__ == "__main__":
    run_cli(main)
