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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import GroupShuffleSplit
from torch.utils.tensorboard import SummaryWriter

from data import FRAME_HOP, SAMPLE_RATE, augment, change_speed, find_audio_files, load_audio
from features import BACKBONE_HELP, backbone_label, load_network
from heads import Classifier, HeadConfig, pad_frames
from labels import (
    LABELS_HELP,
    LabelledFiles,
    classification_metrics,
    cross_validation,
    labelled_files,
    regression_metrics,
)
from model import Wav2VecConfig
from plots import plot_results
from training import build_optimizer, lr_lambda, make_grad_scaler, optimizer_step, save_checkpoint
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_precision_argument,
    add_progress_argument,
    add_threads_argument,
    autocast_context,
    check_writable_dir,
    ensure_writable_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    progress_bar,
    resolve_device,
    resolve_precision,
    run_cli,
    set_threads,
    setup_logging,
    start_log_file,
)

log = logging.getLogger(__name__)

STATS_FILES = 200  # training files, spread over the fold, whose frames set the head's standardisation


# ----- the model: backbone, pooling, head ----------------------------------------------------------













# ----- data ----------------------------------------------------------------------------------------

def load_dataset(args: argparse.Namespace) -> LabelledFiles:
    """The labelled files of the run, with their targets, checked for the task before any audio is decoded."""
    return labelled_files(args.data_dir, args.labels, args.label_column, args.group_column, args.split,
                          args.task)


def validation_rows(data: LabelledFiles, train: np.ndarray, fraction: float,
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
    for path in progress_bar(paths, desc=f"loading ({stage})", unit="file", leave=False):
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
            per_second = SAMPLE_RATE if stage == "wav" else SAMPLE_RATE // FRAME_HOP
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

def build_model(args: argparse.Namespace, data: LabelledFiles, backbone: tuple[Wav2VecConfig, dict] | None,
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


def train_fold(args: argparse.Namespace, name: str, data: LabelledFiles, inputs: list, rows: np.ndarray,
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
        optimizer, lr_lambda("cosine", args.warmup_updates, total, args.min_lr / args.lr))
    precision = resolve_precision(args.precision, device)
    scaler, autocast = make_grad_scaler(device, precision), autocast_context(device, precision)
    rng = np.random.default_rng(args.seed)  # every fold draws batches, crops and masks from the same seed,
    generator = torch.Generator().manual_seed(args.seed)  # as its model starts from the same weights
    eval_every = args.eval_every or updates_per_epoch
    valid_inputs = [inputs[i] for i in valid_rows]

    best, best_state, best_update, stale, update = None, None, 0, 0, 0
    start = time.perf_counter()
    progress = progress_bar(total=None if math.isinf(total) else total, desc=f"fold {name}", unit="update")
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




def write_outputs(args: argparse.Namespace, out: Path, data: LabelledFiles, description: str,
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
        plot_results(config.labels, true, [p["label"] for p in predictions], out / "confusion_matrix.png",
                     title)
    else:
        plot_results((), targets, [p["value"] for p in predictions], out / "scatter.png", title)
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
    network = load_network(spec, seed, needs="a network to fine-tune, or mfcc")
    return network.config, network.state_dict()


def train(args: argparse.Namespace) -> dict:
    """Cross-validated fine-tuning as the flags say; returns the pooled test metrics."""
    data = load_dataset(args)  # before the output folder: a user error is then the first thing said
    out = Path(args.output_dir)
    check_writable_dir(out)
    setup_logging(progress=args.progress)
    set_threads(args.threads)
    device = resolve_device(args.device)
    groups = None if data.groups is None else np.array(data.groups)
    description, folds = cross_validation(data.targets, args.folds, args.seed, data.test_mask, groups,
                                          group_folds=args.folds, regress=args.task == "regress",
                                          class_remedy="drop the rare classes from the labels, add data, "
                                                       "or give --group-column")
    backbone = backbone_weights(args.checkpoint, args.seed)
    start_log_file(out / "train.log")  # the inputs are checked: now the output folder is made
    log.info("%d files, %s, %s; %s", len(data.names), f"{len(data.classes)} classes" if data.classes
             else "regression", description, f"{len(folds)} folds" + (f", running {args.max_folds}"
                                                                     if args.max_folds else ""))
    stage = cached_stage(args)
    start = time.perf_counter()
    with torch.no_grad():
        template = build_model(args, data, backbone, data.targets).to(device)
    inputs = prepare_inputs(template, data.paths, stage, device)
    log.info("inputs (%s) of %d files ready in %.0f s", stage, len(inputs), time.perf_counter() - start)
    tested = []
    with SummaryWriter(out / "tensorboard") as writer:
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
    """Label (and probabilities) or value for every audio file under --data-dir, to a CSV; a file that cannot
    be read or is shorter than one frame is named, counted and left out."""
    setup_logging(progress=args.progress)
    set_threads(args.threads)
    ensure_writable_file(args.output, "--output")
    model = Classifier.from_pretrained(args.model, resolve_device(args.device))
    files = find_audio_files(args.data_dir)
    if not files:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    names, predictions = [], []
    for path in progress_bar(files, desc="predicting", unit="file"):
        try:
            predictions.append(model.predict(path))
        except UserError as error:
            log.warning("Skipping: %s", error)
            continue
        names.append(path.relative_to(args.data_dir).as_posix())
    if not names:
        raise UserError(f"None of the {len(files)} audio files under {args.data_dir} could be predicted; see "
                        "the warnings above.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_csv(args.output, *prediction_rows(model.config, names, predictions))
    log.info("wrote %d predictions to %s; %d of %d files unreadable or too short, skipped", len(names),
             args.output, len(files) - len(names), len(files))


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and labels")
    data.add_argument("--checkpoint", required=True,
                      help=BACKBONE_HELP.replace("; or an offline graph written by export.py (.onnx)", ""))
    data.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    data.add_argument("--labels", required=True, help=LABELS_HELP)
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
    optim.add_argument("--min-lr", type=non_negative_float, default=None,
                       help="where the head's cosine ends (default: --lr / 100); the backbone's ends at the "
                            "same fraction of --backbone-lr")
    optim.add_argument("--min-lr-ratio", type=non_negative_float, help=argparse.SUPPRESS)  # deprecated
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
    add_precision_argument(optim, default="fp32")
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
    add_device_argument(evaluation)
    add_threads_argument(evaluation)
    add_progress_argument(evaluation)
    args = parser.parse_args(argv)
    if args.min_lr_ratio is not None:
        print("warning: --min-lr-ratio R is now --min-lr (R x --lr); the old name goes in the next release.",
              file=sys.stderr)
        args.min_lr = args.min_lr_ratio * args.lr
    args.min_lr = args.lr / 100 if args.min_lr is None else args.min_lr
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine would climb; give a "
                        "--min-lr of at most --lr.")
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
    parser = argparse.ArgumentParser(prog="finetune.py predict", formatter_class=HelpFormatter,
                                     description="Predict every audio file under a folder.")
    parser.add_argument("--model", type=Path, required=True, help="a finetuned.pt written by finetune.py")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    add_device_argument(parser)
    add_threads_argument(parser)
    add_progress_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        predict(parse_predict_args(argv[1:]))
    else:
        train(parse_train_args(argv))


if __name__ == "__main__":
    run_cli(main)
