"""Fine-tune a pre-trained wav2vec (or MFCCs, or the network from scratch) into a classifier, a regressor or
a speech recognizer.

    python finetune.py --checkpoint CKPT|random:CKPT|mfcc --data-dir DIR --labels SOURCE --output-dir runs/ft
                       [--task classify|regress|ctc] [--group-column speaker | --split fsdd-official]
                       [--freeze all|encoder|none] [--layer c|z|all] [--pool mean|mean+std|attentive]
                       [--head linear|mlp|bilstm] [--epochs N] [--max-updates N] [--max-minutes M]
    python finetune.py --task ctc --labels metadata.tsv --label-column phones --units tokens|chars ...
    python finetune.py predict --model runs/ft/finetuned.pt --data-dir NEW --output predictions.csv

In Python: `Classifier.from_pretrained(path).predict(wav)` (a 16 kHz array or a path): {"label",
"probabilities"} or {"value"}; `Recognizer.from_pretrained(path).transcribe(wav)`: a transcript.

- --task ctc: speech recognition. The label column holds a transcript: --units tokens (space-separated
  symbols, e.g. phones) or chars (letters and apostrophes, case folded, | between words). The vocabulary
  is that of each fold's training files; a test transcript with another symbol is an error (--skip-unknown
  skips such files). Heads: linear (SUPERB's phone recognition) or bilstm (--hidden, --layers; --subsample
  stacks frames into fewer outputs), CTC loss on length-bucketed batches of whole files; empty transcripts
  and files too short for theirs are named and left out. Decoding: greedy, or a beam search (--beam-size,
  --lm) of the test files and predict's. PER (tokens) or CER and WER (chars), posteriorgram.png.

- The head: the frames of `c`, `z` or a learned softmax-weighted sum of every context layer's output
  (`all`, as SUPERB), standardised per channel with statistics of the training files, pooled over the
  valid frames only (mean, mean+std or attentive statistics pooling), then a linear layer or a small MLP.
- --freeze all: the backbone is frozen and its frames are computed once and cached, so the head trains in
  seconds. encoder: z is cached and the context network trains with the head. none: everything trains,
  the backbone at --backbone-lr and only after --freeze-updates updates, while the new head settles.
- Batches: padded and masked; the backbone runs on each file alone (its GroupNorm spans the whole input).
  Training crops files longer than --crop-seconds at random; evaluation and prediction see whole files.
  Augmentations of the waveform (--speed, --augment) turn the cache of --freeze all / encoder off.
- Evaluation: --group-column COLUMN gives folds disjoint in it (--folds 0: one group out per fold;
  --test-groups: one fixed test fold); --split fsdd-official tests on FSDD repetitions 0-4; otherwise
  (stratified) k-fold. Each fold holds out --valid-fraction of its training groups (or files) for early
  stopping, and keeps its best model. A budget (--epochs, --max-updates, --max-minutes) is per fold.
- Outputs: metrics.json (all tested files, and per fold), predictions.csv, confusion_matrix.png or
  scatter.png, finetuned.pt (the fold with the best validation score), train.log, tensorboard/, folds/
  (each fold as it ends: --resume takes the finished ones of the same settings and runs the rest).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.model_selection import GroupShuffleSplit
from torch.utils.tensorboard import SummaryWriter

from batching import (
    batch_frames,
    bucketed_batches,
    cached_inputs,
    cached_stage,
    ctc_feasible,
    frame_counts,
    prepare_inputs,
    set_feature_statistics,
)
from data import FRAME_HOP, SAMPLE_RATE, find_audio_files, load_audio
from decoding import add_decoding_arguments, beam_settings, beam_wanted
from features import BACKBONE_HELP, backbone_label, load_network
from heads import Classifier, FineTuned, HeadConfig, Recognizer
from labels import (
    LABELS_HELP,
    UNITS,
    LabelledFiles,
    classification_metrics,
    cross_validation,
    detokenize,
    error_rate_name,
    known_symbol_folds,
    labelled_files,
    recognition_metrics,
    regression_metrics,
    transcript_errors,
    vocabulary,
)
from model import Wav2VecConfig
from plots import plot_posteriorgram, plot_results
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

POSTERIORGRAM_FILES = 3  # test files drawn in posteriorgram.png
# Flags that change nothing a finished fold computed: a --resume may differ in them.
RUN_FLAGS = ("resume", "threads", "device", "max_folds", "output_dir", "cache_dir")


# ----- data ----------------------------------------------------------------------------------------

def load_dataset(args: argparse.Namespace) -> LabelledFiles:
    """The labelled files of the run, with their targets, checked for the task before any audio is decoded."""
    return labelled_files(args.data_dir, args.labels, args.label_column, args.group_column, args.split,
                          args.task, args.units, args.test_groups)


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


# ----- training one fold -------------------------------------------------------------------------

def build_model(args: argparse.Namespace, data: LabelledFiles, backbone: tuple[Wav2VecConfig, dict] | None,
                targets: np.ndarray) -> FineTuned:
    """A fresh model for one fold: the backbone's starting weights and a new head (for recognition, over the
    vocabulary of the fold's training transcripts `targets`)."""
    if backbone is None:
        channels, num_layers = 26, 1
        config = None
    else:
        config, weights = backbone
        channels = config.encoder_layers[-1][0] if args.layer == "z" else config.context_layers[-1][0]
        num_layers = len(config.context_layers) if args.layer == "all" else 1
    head = HeadConfig(task=args.task, labels=data.classes, backbone="mfcc" if backbone is None else "wav2vec",
                      layer="c" if backbone is None else args.layer, pool=args.pool, head=args.head,
                      channels=channels, num_layers=num_layers, hidden=args.hidden, dropout=args.dropout,
                      lstm_layers=args.layers, units=args.units, subsample=args.subsample)
    if args.task == "regress":
        head = replace(head, target_mean=float(targets.mean()), target_std=float(targets.std() or 1.0))
    if args.task == "ctc":
        head = replace(head, labels=vocabulary(targets))
    torch.manual_seed(args.seed)
    model = (Recognizer if args.task == "ctc" else Classifier)(head, config)
    if backbone is not None:
        model.backbone.load_state_dict(weights)
    return model


def trainable_backbone(model: FineTuned, freeze: str) -> list[nn.Parameter]:
    """The backbone parameters that --freeze leaves trainable (the prediction head of pre-training never)."""
    if model.backbone is None or freeze == "all":
        return []
    parts = [model.backbone.context] + ([model.backbone.encoder] if freeze == "none" else [])
    return [p for part in parts for p in part.parameters()]


def set_backbone_trainable(model: FineTuned, params: Sequence[nn.Parameter], on: bool) -> None:
    if model.backbone is not None:
        model.backbone.requires_grad_(False)
    for p in params:
        p.requires_grad_(on)


@torch.no_grad()
def evaluate(model: FineTuned, inputs: Sequence, targets: np.ndarray, stage: str, device: torch.device,
             autocast, batch_size: int) -> tuple[dict, list[dict]]:
    """(metrics, one prediction dict per item) on whole files."""
    model.eval()
    predictions, loss_sum = [], 0.0
    for begin in range(0, len(inputs), batch_size):
        with autocast:
            frames, mask = batch_frames(model, inputs[begin:begin + batch_size], stage, device)
            outputs = model.head(frames, mask)
        batch_targets = targets[begin:begin + batch_size]
        loss = model.loss(outputs, mask, model.targets(batch_targets, device))
        loss_sum += float(loss) * len(batch_targets)
        predictions += model.describe(outputs.float(), mask)
    model.train()
    metrics = score(model.config, targets, predictions)
    metrics["loss"] = loss_sum / max(1, len(inputs))
    return metrics, predictions


def score(config: HeadConfig, targets: np.ndarray, predictions: list[dict]) -> dict:
    if config.task == "ctc":
        return recognition_metrics([detokenize(t, config.units) for t in targets],
                                   [p["transcript"] for p in predictions], config.units)
    if config.task == "regress":
        return regression_metrics(targets, np.array([p["value"] for p in predictions]))
    return classification_metrics([config.labels[t] for t in targets], [p["label"] for p in predictions])


def headline(config: HeadConfig) -> str:
    """The metric early stopping watches: accuracy, MAE, or the error rate (PER or CER) of recognition."""
    return {"classify": "accuracy", "regress": "mae"}.get(config.task) or error_rate_name(config.units)


def better(config: HeadConfig, metrics: dict, best: dict | None) -> bool:
    """Early stopping's yardstick: accuracy (then loss) for classification, MAE for regression, the error
    rate (then loss) for recognition."""
    if best is None:
        return True
    if config.task == "regress":
        return metrics["mae"] < best["mae"]
    if config.task == "ctc":
        key = headline(config)
        return (metrics[key], metrics["loss"]) < (best[key], best["loss"])
    return (metrics["accuracy"], -metrics["loss"]) > (best["accuracy"], -best["loss"])


@dataclass
class FoldResult:
    """A fold's best model, its predictions for the fold's test files, and its test metrics."""

    model: FineTuned
    predictions: list[dict]
    metrics: dict


def train_fold(args: argparse.Namespace, name: str, data: LabelledFiles, inputs: list, rows: np.ndarray,
               valid_rows: np.ndarray, test_rows: np.ndarray, backbone, device: torch.device,
               writer: SummaryWriter) -> FoldResult:
    """Train a fresh model on `rows`, early-stopped on `valid_rows`, then predict `test_rows`."""
    stage = cached_stage(args)
    model = build_model(args, data, backbone, data.targets[np.concatenate([rows, valid_rows])]).to(device)
    lengths = frame_counts(model, inputs)
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
        for batch in epoch_batches(args, model, rows, lengths, rng):
            set_backbone_trainable(model, backbone_params, update >= args.freeze_updates)
            with autocast:
                frames, mask = batch_frames(model, [inputs[i] for i in batch], stage, device, True, rng, args)
                outputs = model.head(frames, mask, args.mask_frames, generator)
            loss = model.loss(outputs, mask, model.targets(data.targets[batch], device)).float()
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
                    key = headline(model.config)
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
    metrics, predictions = test(args, model, [inputs[i] for i in test_rows], data.targets[test_rows], stage,
                                device, autocast)
    metrics.update(updates=update, best_update=best_update, train_seconds=round(seconds, 1),
                   n_train=len(rows), n_valid=len(valid_rows), n_test=len(test_rows))
    if best is not None:
        metrics["valid"] = {k: v for k, v in best.items() if k != "per_class_recall"}
    log.info("fold %s: %d updates in %.0f s (best at %d); test %s", name, update, seconds, best_update,
             summary(metrics))
    return FoldResult(model, predictions, metrics)


def test(args: argparse.Namespace, model: FineTuned, inputs: Sequence, targets: np.ndarray, stage: str,
         device: torch.device, autocast) -> tuple[dict, list[dict]]:
    """(metrics, predictions) of the test files: greedy, or a beam's with greedy's metrics under "greedy"."""
    if not beam_wanted(args):  # (validation, for early stopping, is always greedy)
        return evaluate(model, inputs, targets, stage, device, autocast, args.batch_size)
    model.beam_search(**beam_settings(args))
    metrics, predictions = evaluate(model, inputs, targets, stage, device, autocast, args.batch_size)
    return {**metrics, "greedy": greedy_metrics(model.config, targets, predictions)}, predictions


def greedy_metrics(config: HeadConfig, targets: np.ndarray, predictions: list[dict]) -> dict:
    """Error rate, edits and reference length of the greedy transcripts kept beside a beam search's."""
    metrics = score(config, targets, [{"transcript": p["greedy"]} for p in predictions])
    return {k: metrics[k] for k in (headline(config), "edits", "reference_length")}


def epoch_batches(args: argparse.Namespace, model: FineTuned, rows: np.ndarray, lengths: np.ndarray,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of training rows in batches: random ones, or for recognition (whole files, of very
    different lengths) batches of similar length."""
    if model.config.task == "ctc":
        return bucketed_batches(rows, lengths, args.batch_size, rng)
    order = rng.permutation(rows)
    return [order[begin:begin + args.batch_size] for begin in range(0, len(order), args.batch_size)]


def summary(metrics: dict) -> str:
    if "per" in metrics:
        return f"PER {metrics['per']:.1f}%"
    if "cer" in metrics:
        return f"CER {metrics['cer']:.1f}%, WER {metrics['wer']:.1f}%"
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    return f"MAE {metrics['mae']:.3f}, RMSE {metrics['rmse']:.3f}, Pearson r {metrics['pearson_r']:.3f}"


# ----- outputs -------------------------------------------------------------------------------------

def prediction_rows(config: HeadConfig, names: Sequence[str], predictions: Sequence[dict],
                    extra: dict[str, Sequence] | None = None) -> tuple[list[str], list[list]]:
    """(header, rows) of a predictions.csv: path, any extra columns, predicted, then p_<class> per class; for
    recognition, path, any extra columns and the transcript."""
    extra = extra or {}
    if config.task == "ctc":
        return (["path", *extra, "transcript"],
                [[name, *(column[i] for column in extra.values()), p["transcript"]]
                 for i, (name, p) in enumerate(zip(names, predictions, strict=True))])
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


def outcome_columns(config: HeadConfig, data: LabelledFiles, tested: list[tuple[str, np.ndarray, FoldResult]],
                    predictions: list[dict]) -> dict[str, list]:
    """predictions.csv's columns between the path and the prediction: the fold and the truth; for recognition
    also the reference's length and the edits from it to the transcript, in its units."""
    rows = [i for _, test, _ in tested for i in test]
    columns = {"fold": [name for name, test, _ in tested for _ in test]}
    if config.task != "ctc":
        return {**columns, "true": [data.labels[i] for i in rows]}
    references = [detokenize(data.targets[i], config.units) for i in rows]
    errors = [transcript_errors(r, p["transcript"], config.units)
              for r, p in zip(references, predictions, strict=True)]
    return {**columns, "reference": references, "errors": [e for e, _ in errors],
            "length": [n for _, n in errors]}


def write_outputs(args: argparse.Namespace, out: Path, data: LabelledFiles, description: str,
                  tested: list[tuple[str, np.ndarray, FoldResult]]) -> dict:
    """metrics.json, predictions.csv, the plot and finetuned.pt (the model of saved_fold)."""
    config = tested[-1][2].model.config
    names = [data.names[i] for _, test, _ in tested for i in test]
    predictions = [p for _, _, result in tested for p in result.predictions]
    targets = np.concatenate([data.targets[test] for _, test, _ in tested])
    metrics = score(config, targets, predictions)
    if beam_wanted(args):
        metrics["greedy"] = greedy_metrics(config, targets, predictions)
    metrics.update(evaluation=description, folds={name: result.metrics for name, _, result in tested},
                   n_tested=len(names), n_files=len(data.names), skipped=data.skipped,
                   settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    columns = outcome_columns(config, data, tested, predictions)
    write_csv(out / "predictions.csv", *prediction_rows(config, names, predictions, columns))
    title = f"{backbone_label(args.checkpoint)}, freeze {args.freeze}, {description}: {summary(metrics)}"
    fold, test, result = saved_fold(tested)
    true = columns.get("true")
    if config.task == "ctc":
        draw_posteriorgram(result.model, data, test, out / "posteriorgram.png", title)
    elif config.task == "classify":
        plot_results(config.labels, true, [p["label"] for p in predictions], out / "confusion_matrix.png",
                     title)
    else:
        plot_results((), targets, [p["value"] for p in predictions], out / "scatter.png", title)
    metrics["saved_model"] = {"fold": fold, "valid": result.metrics.get("valid"),
                              "chosen_by": "best validation score" if "valid" in result.metrics
                              else "last fold (no validation split)"}
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    save_checkpoint(result.model.cpu().payload({"args": flags, "fold": fold,
                                                "test_files": [data.names[i] for i in test],
                                                "metrics": json.loads(json.dumps(result.metrics))}),
                    out / "finetuned.pt")
    return metrics


@torch.no_grad()
def draw_posteriorgram(model: Recognizer, data: LabelledFiles, test: np.ndarray, path: Path,
                       title: str) -> None:
    """posteriorgram.png: POSTERIORGRAM_FILES test files of the saved fold, spread over it, each as its
    spectrogram over its frame-by-frame CTC posteriors, with the reference and the transcript."""
    model.eval()
    shown = []
    for i in test[np.unique(np.linspace(0, len(test) - 1, min(POSTERIORGRAM_FILES, len(test))).astype(int))]:
        wav = load_audio(data.paths[i], SAMPLE_RATE)
        log_probs, transcript = model.recognize(wav)
        shown.append({"name": data.names[i], "wav": wav, "posteriors": log_probs.exp().cpu().numpy(),
                      "reference": detokenize(data.targets[i], model.config.units), "transcript": transcript})
    plot_posteriorgram(shown, ("<blank>", *model.config.labels), model.shortest_input,
                       FRAME_HOP * model.config.subsample, path, title)




def fold_settings(args: argparse.Namespace) -> dict:
    """The flags that decide what a fold computes (not RUN_FLAGS), as plain values."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in RUN_FLAGS}


def save_fold(path: Path, args: argparse.Namespace, name: str, result: FoldResult) -> None:
    """A finished fold on disk (its model, test predictions, metrics), so that --resume need not redo it."""
    save_checkpoint({"settings": fold_settings(args), "fold": name, "predictions": result.predictions,
                     "metrics": json.loads(json.dumps(result.metrics)),
                     "model": result.model.cpu().payload({})}, path)


def finished_fold(path: Path, args: argparse.Namespace, name: str, device: torch.device) -> FoldResult | None:
    """The fold save_fold wrote at `path`, or None if there is none; one made with other settings is an
    error (resuming would mix two experiments)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    differ = sorted(k for k, v in fold_settings(args).items() if saved["settings"].get(k) != v)
    if saved["fold"] != name or differ:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in differ) or "the folds"
        raise UserError(f"{path} was made by a run with other settings ({flags} differ): drop --resume to "
                        "start over, or choose another --output-dir.")
    log.info("fold %s: finished before, taken from %s", name, path)
    return FoldResult(FineTuned.from_payload(saved["model"], path).to(device), saved["predictions"],
                      saved["metrics"])


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

def input_key(args: argparse.Namespace, data: LabelledFiles, stage: str) -> dict:
    """What the cached inputs of a run depend on: the backbone (its file's size and time, the seed of a random
    one), the stage, the layer and the files."""
    checkpoint = Path(args.checkpoint.removeprefix("random:"))
    stat = checkpoint.stat() if checkpoint.is_file() else None
    return {"checkpoint": args.checkpoint, "file": stat and [stat.st_size, stat.st_mtime_ns], "stage": stage,
            "seed": args.seed if args.checkpoint.startswith("random") else None, "layer": args.layer,
            "files": hashlib.sha256("\n".join(map(str, data.paths)).encode()).hexdigest()}


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
    fixed = f"{int(data.test_mask.sum())} files of the --test-groups" if args.test_groups else None
    description, folds = cross_validation(data.targets, args.folds, args.seed, data.test_mask, groups,
                                          group_folds=args.folds, regress=args.task != "classify",
                                          class_remedy="drop the rare classes from the labels, add data, "
                                                       "or give --group-column",
                                          fixed_split=fixed or "FSDD official split")
    folds = folds[:args.max_folds or None]
    if args.task == "ctc":
        folds = known_symbol_folds(data, folds, args.skip_unknown)
    backbone = backbone_weights(args.checkpoint, args.seed)
    start_log_file(out / "train.log")  # the inputs are checked: now the output folder is made
    kind = {"classify": f"{len(data.classes)} classes", "regress": "regression"}.get(args.task, "transcripts")
    log.info("%d files, %s, %s; %s", len(data.names), kind, description,
             f"{len(folds)} folds" + (f", running {args.max_folds}" if args.max_folds else ""))
    stage = cached_stage(args)
    start = time.perf_counter()
    with torch.no_grad():
        template = build_model(args, data, backbone, data.targets).to(device)
    inputs = cached_inputs(args.cache_dir if stage != "wav" else None, input_key(args, data, stage),
                           lambda: prepare_inputs(template, data.paths, stage, device))
    log.info("inputs (%s) of %d files ready in %.0f s", stage, len(inputs), time.perf_counter() - start)
    if args.task == "ctc":
        usable = ctc_feasible(template, data.targets, data.names, inputs, args.speed)
        folds = [(name, train[usable[train]], test[usable[test]]) for name, train, test in folds]
    fold_dir = out / "folds"
    if not args.resume:
        shutil.rmtree(fold_dir, ignore_errors=True)  # a new run: the folds of an earlier one do not count
    fold_dir.mkdir(exist_ok=True)
    tested = []
    with SummaryWriter(out / "tensorboard") as writer:
        for k, (name, train_rows, test_rows) in enumerate(folds):
            path = fold_dir / f"fold_{k:03d}.pt"
            result = finished_fold(path, args, name, device) if args.resume else None
            if result is None:
                fit_rows, valid_rows = validation_rows(data, train_rows, args.valid_fraction, args.seed)
                result = train_fold(args, name, data, inputs, fit_rows, valid_rows, test_rows, backbone,
                                    device, writer)
                save_fold(path, args, name, result)
            tested.append((name, test_rows, result))
    metrics = write_outputs(args, out, data, description, tested)
    metrics["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("all %d tested files: %s; wrote %s", metrics["n_tested"], summary(metrics), out)
    return metrics


def predict(args: argparse.Namespace) -> None:
    """Label (and probabilities), value or transcript for every audio file under --data-dir, to a CSV; a file
    that cannot be read or is shorter than one frame is named, counted and left out."""
    setup_logging(progress=args.progress)
    set_threads(args.threads)
    ensure_writable_file(args.output, "--output")
    model = FineTuned.from_pretrained(args.model, resolve_device(args.device))
    if beam_wanted(args):
        if not isinstance(model, Recognizer):
            raise UserError(f"{args.model} is not a recognizer (--task ctc): --beam-size and --lm decode "
                            "transcripts only; drop them.")
        model.beam_search(**beam_settings(args))
    files = find_audio_files(args.data_dir)
    if not files:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    describe = ((lambda path: {"transcript": model.transcribe(path)}) if isinstance(model, Recognizer)
                else model.predict)
    names, predictions = [], []
    for path in progress_bar(files, desc="predicting", unit="file"):
        try:
            predictions.append(describe(path))
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
    data.add_argument("--label-column", default="label",
                      help="TSV column (or pattern group) of the label; --task ctc: of the transcript")
    data.add_argument("--task", choices=("classify", "regress", "ctc"), default="classify",
                      help="ctc: speech recognition, a transcript per file (CTC loss; greedy or beam-search "
                           "decoding)")
    data.add_argument("--units", choices=UNITS, default="tokens",
                      help="--task ctc: tokens (space-separated symbols, e.g. phones) or chars (letters and "
                           "apostrophes, case folded, | between words)")
    data.add_argument("--skip-unknown", action="store_true",
                      help="--task ctc: skip (and count) test files whose transcript has a symbol no "
                           "training file has, rather than stop")
    data.add_argument("--output-dir", type=Path, default=Path("runs/ft"))
    model = parser.add_argument_group("model")
    model.add_argument("--layer", choices=("c", "z", "all"), default="c",
                       help="frames the head reads: c, z, or a learned weighted sum of all context layers")
    model.add_argument("--pool", choices=("mean", "mean+std", "attentive"), default="mean+std")
    model.add_argument("--head", choices=("linear", "mlp", "bilstm"), default="linear",
                       help="linear or mlp (classify, regress); linear or bilstm (ctc)")
    model.add_argument("--hidden", type=positive_int, default=256,
                       help="width of the MLP and the attention; of each LSTM direction")
    model.add_argument("--layers", type=positive_int, default=2, help="--head bilstm: bidirectional layers")
    model.add_argument("--subsample", type=positive_int, default=1,
                       help="--task ctc: frames stacked side by side into one output step (2: 50 per second)")
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
    evaluation.add_argument("--test-groups", metavar="FILE_OR_LIST",
                            help="one fixed test fold: the files of these groups of --group-column (a file "
                                 "of names, white-space separated, or a comma-separated list)")
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
    evaluation.add_argument("--cache-dir", type=Path,
                            help="keep the frozen inputs (frames or z) here, for later runs on the backbone")
    evaluation.add_argument("--resume", action="store_true",
                            help="take the folds an interrupted run of the same settings finished in "
                                 "--output-dir/folds/, and run the rest (without it, a run starts over)")
    add_device_argument(evaluation)
    add_threads_argument(evaluation)
    add_progress_argument(evaluation)
    add_decoding_arguments(parser)
    args = parser.parse_args(argv)
    if args.min_lr_ratio is not None:
        print("warning: --min-lr-ratio R is now --min-lr (R x --lr); the old name goes in the next release.",
              file=sys.stderr)
        args.min_lr = args.min_lr_ratio * args.lr
    args.min_lr = args.lr / 100 if args.min_lr is None else args.min_lr
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine would climb; give a "
                        "--min-lr of at most --lr.")
    if args.split == "fsdd-official" and (args.group_column or args.test_groups):
        raise UserError("--split fsdd-official and --group-column or --test-groups are alternatives: "
                        "choose one.")
    if beam_wanted(args) and args.task != "ctc":
        raise UserError("--beam-size and --lm decode transcripts: they go with --task ctc.")
    heads = ("linear", "bilstm") if args.task == "ctc" else ("linear", "mlp")
    if args.head not in heads:
        raise UserError(f"--task {args.task} takes --head {' or '.join(heads)}, not {args.head}.")
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
    add_decoding_arguments(parser)
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
