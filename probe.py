"""Linear probe: how well do frozen features separate labelled audio, against MFCCs and a random network?

    python probe.py --data-dir DIR --labels LABELS --checkpoint CKPT [--group-column COLUMN] [--layer z]
    python probe.py --data-dir DIR --frame-level --checkpoint CKPT
    python suite.py fsdd --data-dir FSDD --checkpoint CKPT      (the standard table in one command)

Features are pooled over each file (or, with --frame-level, kept per 10 ms frame), standardised, and
fed to a logistic regression (or, with --task regress, a ridge regression); the score is out-of-fold
accuracy and macro-F1 (or MAE, RMSE, R^2 and correlations), printed as a table; --json writes every number.
- --checkpoint: the backbone grammar of every script: a checkpoint (ours or fairseq's), `random:CKPT` (a
  network of the checkpoint's own configuration, randomly initialised with --seed: the baseline to compare
  CKPT with), `random` (the same for the base configuration, 512 channels), `mfcc` (13 MFCCs + deltas, 25 ms
  window every 10 ms), or an offline ONNX graph written by export.py (`.onnx`, fp32 or int8, run by ONNX
  Runtime). The JSON records the configuration of the network used.
- --labels: a TSV whose header has `path` (relative to --data-dir) and `label` (or the column named by
  --label-column); `folder` (each file's sub-folder); `pattern:REGEX` (a regular expression matching the
  whole file name, with a named group `label`, or --label-column's); `fsdd-digit` / `fsdd-speaker` (FSDD
  names `{digit}_{speaker}_{index}.wav`). Files without a label are skipped.
- Evaluation: stratified k-fold by default; --group-column COLUMN (a TSV column or a named group of the
  pattern, e.g. `speaker` with the fsdd shortcuts) leaves one group out per fold; --split fsdd-official
  trains on FSDD repetitions 5-49 and tests on 0-4.
- --frame-level: one label per 10 ms frame from `<name>.frames.npy` beside each `<name>.wav` (label t
  covers samples [160 t, 160 t + 160), as demo.make_demo_corpus writes them); a feature frame takes the
  label at its centre (wav2vec frame t covers samples [160 t, 160 t + 465), an MFCC frame
  [160 t, 160 t + 400)); folds group frames by file so that no file is on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data import find_audio_files
from features import (
    BACKBONE_HELP,
    LAYERS,
    FramesOf,
    backbone_config,
    featurizer,
    file_frames,
    is_random,
    pool,
)
from labels import (
    LABELS_HELP,
    LabelledFiles,
    Split,
    check_classes,
    cross_validation,
    frame_label_path,
    labelled_files,
    labels_at_centres,
    regression_metrics,
)
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_progress_argument,
    add_renamed,
    add_threads_argument,
    ensure_writable_dir,
    ensure_writable_file,
    resolve_device,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)



@dataclass
class Examples:
    """A probe's data: features X (N, D), labels y (N,), each row's file index, and an optional test mask."""

    X: np.ndarray
    y: np.ndarray
    file_index: np.ndarray
    groups: np.ndarray | None = None  # (N,) group of each row for leave-one-group-out
    test_mask: np.ndarray | None = None  # (N,) True for rows of a fixed test split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data and labels")
    data.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    data.add_argument("--labels", help=f"{LABELS_HELP} (not with --frame-level: those labels sit beside "
                                       "the audio)")
    data.add_argument("--label-column", default="label", help="TSV column (or pattern group) of the label")
    data.add_argument("--group-column", help="TSV column or pattern group for leave-one-group-out folds")
    data.add_argument("--frame-level", action="store_true", help="probe every 10 ms frame instead of files")
    data.add_argument("--max-frames", type=int, default=50000,
                      help="with --frame-level, frames kept in all (drawn evenly over files, for speed)")
    data.add_argument("--task", choices=("classify", "regress"), default="classify",
                      help="regress: numeric labels, ridge (or --regressor hgb) on pooled features")
    feats = parser.add_argument_group("features")
    feats.add_argument("--checkpoint", help=f"the features: {BACKBONE_HELP}")
    add_renamed(feats, "--features", "--checkpoint")
    feats.add_argument("--layer", choices=LAYERS, default="c", help="wav2vec layer: c or z")
    feats.add_argument("--pool", choices=("mean", "mean+std"), default="mean+std",
                       help="pooling over time of each file's frames (ignored with --frame-level)")
    feats.add_argument("--cache-dir", type=Path,
                       help="keep pooled features here and reuse them when the files, --checkpoint, "
                            "--layer, --pool and --seed are the same (e.g. to probe other labels)")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--split", choices=("cv", "fsdd-official"), default="cv",
                            help="cv: cross-validation (default); fsdd-official: test on repetitions 0-4")
    evaluation.add_argument("--folds", type=int, default=5, help="folds of stratified or grouped k-fold")
    evaluation.add_argument("--max-iter", type=int, default=5000,
                            help="iteration limit of the logistic regression")
    evaluation.add_argument("--regressor", choices=("ridge", "hgb"), default="ridge",
                            help="with --task regress: ridge regression or scikit-learn's "
                                 "HistGradientBoostingRegressor")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of the random network, folds, frames")
    evaluation.add_argument("--json", type=Path, help="also write every number (per fold, settings) here")
    add_device_argument(evaluation)
    add_threads_argument(evaluation)
    add_progress_argument(evaluation)
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        parser.error("the following arguments are required: --checkpoint")
    if args.frame_level and (args.labels or args.group_column):
        raise UserError("--frame-level reads labels from the files beside the audio: "
                        "drop --labels and --group-column (folds already group frames by file).")
    if args.frame_level and args.task == "regress":
        raise UserError("--task regress works on pooled files: drop --frame-level.")
    if args.split == "fsdd-official" and args.group_column:
        raise UserError("--split fsdd-official and --group-column are alternatives: choose one.")
    if not args.frame_level and not args.labels:
        raise UserError("--labels is required: a TSV, folder, pattern:REGEX, fsdd-digit or fsdd-speaker.")
    if args.folds < 2 or args.max_frames < 1:
        raise UserError("--folds must be at least 2 and --max-frames positive.")
    return args


# ----- features -----------------------------------------------------------------------------------









def stamp(path: Path) -> str:
    """A file's identity for cache keys: where it is, its size and when it last changed."""
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def feature_source(spec: str) -> str:
    """What the features of --features depend on: a checkpoint's file, or a random network's configuration
    (so that checkpoints of one configuration share their random baseline)."""
    if spec == "mfcc":
        return spec
    if is_random(spec):
        return "random:" + json.dumps(backbone_config(spec).to_dict(), sort_keys=True)
    return stamp(Path(spec))


def feature_key(args: argparse.Namespace, paths: list[Path]) -> str:
    """Names the pooled features of these files under these settings; changed inputs give a new name."""
    description = [feature_source(args.checkpoint), args.layer, args.pool, args.seed,
                   [stamp(p) for p in paths]]
    return hashlib.sha1(json.dumps(description).encode()).hexdigest()[:16]


def pooled_features(args: argparse.Namespace, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """X (N, D), one pooled vector per readable file, and file_index (N,) into `paths`; read from and
    written to --cache-dir when given."""
    cached = args.cache_dir / f"{feature_key(args, paths)}.npz" if args.cache_dir else None
    if cached is not None and cached.is_file():
        return read_pooled(cached)
    frames_of, window = featurizer(args.checkpoint, args.layer, args.seed, resolve_device(args.device))
    position = {path: i for i, path in enumerate(paths)}
    rows = [(position[path], pool(frames, args.pool))
            for path, frames in file_frames(paths, frames_of, window)]
    X, file_index = np.stack([vector for _, vector in rows]), np.array([i for i, _ in rows])
    if cached is not None:
        write_pooled(cached, X, file_index)
    return X, file_index


def read_pooled(cached: Path) -> tuple[np.ndarray, np.ndarray]:
    """(X, file_index) from a cache file written by write_pooled."""
    log.info("pooled features from the cache %s", cached)
    with np.load(cached) as saved:
        return saved["X"], saved["file_index"]


def write_pooled(cached: Path, X: np.ndarray, file_index: np.ndarray) -> None:
    partial_file = cached.with_suffix(".partial.npz")  # renamed when complete: no half-written cache
    np.savez(partial_file, X=X, file_index=file_index)
    partial_file.replace(cached)


def frame_examples(paths: list[Path], frames_of: FramesOf, window: int, max_frames: int,
                   seed: int) -> Examples:
    """Feature frames with their per-frame labels, at most ceil(max_frames / files) frames from each file."""
    rng = np.random.default_rng(seed)
    per_file = math.ceil(max_frames / len(paths))
    position = {path: i for i, path in enumerate(paths)}
    X, y, file_index = [], [], []
    for path, frames in file_frames(paths, frames_of, window):
        labels = labels_at_centres(np.load(frame_label_path(path)), frames.shape[1], window)
        keep = np.sort(rng.permutation(frames.shape[1])[:per_file])
        X.append(frames[:, keep].T)
        y.append(labels[keep])
        file_index.append(np.full(len(keep), position[path]))
    return Examples(np.concatenate(X), np.concatenate(y).astype(str), np.concatenate(file_index))


# ----- the probe ----------------------------------------------------------------------------------

def folds(examples: Examples, n_folds: int, seed: int, frame_level: bool = False,
          regress: bool = False) -> tuple[str, list[Split]]:
    """(description, splits): the fixed split, leave-one-group-out, k-fold by file (frames), stratified
    (classification) or plain (regression) k-fold; see utils.cross_validation."""
    if frame_level:  # frames of one file are alike: keep each file on one side
        return cross_validation(examples.y, n_folds, seed, examples.test_mask, examples.file_index,
                                group_folds=n_folds, group_name="file",
                                group_remedy="give at least two files with frame labels")
    return cross_validation(examples.y, n_folds, seed, examples.test_mask, examples.groups, regress=regress)


def fit_and_score(X: np.ndarray, y: np.ndarray, splits: list[Split], max_iter: int = 5000) -> dict:
    """Standardise + logistic regression per fold; accuracy and macro-F1 over all out-of-fold predictions."""
    true, predicted, fold_accuracies = [], [], []
    for name, train, test in splits:
        unseen = set(y[test]) - set(y[train])
        if unseen:
            log.warning("fold %s: %d test classes never occur in its training data and cannot be predicted",
                        name, len(unseen))
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        classifier.fit(X[train], y[train])
        prediction = classifier.predict(X[test])
        fold_accuracies.append(float(accuracy_score(y[test], prediction)))
        true.append(y[test])
        predicted.append(prediction)
    true, predicted = np.concatenate(true), np.concatenate(predicted)
    return {"accuracy": float(accuracy_score(true, predicted)),
            "macro_f1": float(f1_score(true, predicted, average="macro")),
            "fold_accuracies": fold_accuracies, "n_tested": len(true)}


def fit_and_score_regression(X: np.ndarray, y: np.ndarray, splits: list[Split],
                             regressor: str = "ridge") -> dict:
    """Standardise + ridge (alpha by internal cross-validation) or gradient boosting per fold; regression
    metrics over all out-of-fold predictions, and each fold's MAE."""
    true, predicted, fold_maes = [], [], []
    for _, train, test in splits:
        model = (make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
                 if regressor == "ridge" else HistGradientBoostingRegressor(random_state=0))
        prediction = model.fit(X[train], y[train]).predict(X[test])
        fold_maes.append(float(np.mean(np.abs(prediction - y[test]))))
        true.append(y[test])
        predicted.append(prediction)
    return {**regression_metrics(np.concatenate(true), np.concatenate(predicted)), "fold_maes": fold_maes,
            "n_tested": sum(len(t) for t in true)}


def print_table(splits: list[Split], result: dict) -> None:
    """One row per fold, then the pooled scores."""
    column = "accuracy" if "accuracy" in result else "mae"
    print(f"{'fold':<16}{'test':>8}{column:>10}")
    per_fold = result["fold_accuracies"] if column == "accuracy" else result["fold_maes"]
    for (name, _, test), value in zip(splits, per_fold, strict=True):
        print(f"{name:<16}{len(test):>8}{value:>10.3f}")
    scores = (f"macro-F1 {result['macro_f1']:.3f}" if column == "accuracy"
              else f"RMSE {result['rmse']:.3f}, R^2 {result['r2']:.3f}, Pearson r {result['pearson_r']:.3f}, "
                   f"Spearman rho {result['spearman_rho']:.3f}")
    classes = f", {result['n_classes']} classes" if "n_classes" in result else ""
    print(f"{'all':<16}{result['n_tested']:>8}{result[column]:>10.3f}   {scores}; {result['n_examples']} "
          f"examples{classes}, {result['evaluation']}")


# ----- command line -------------------------------------------------------------------------------



def select_files(args: argparse.Namespace) -> LabelledFiles:
    """The files with labels (and groups) and the fixed split, checked before any feature is computed; with
    --frame-level, the files with per-frame labels beside them."""
    if not args.frame_level:
        return labelled_files(args.data_dir, args.labels, args.label_column, args.group_column, args.split,
                              args.task)
    files = find_audio_files(args.data_dir)
    kept = [f.relative_to(args.data_dir).as_posix() for f in files if frame_label_path(f).is_file()]
    if not kept:
        raise UserError(f"No per-frame labels (<name>.frames.npy beside <name>.wav) under {args.data_dir}.")
    return LabelledFiles(args.data_dir, kept, [], None, None, len(files) - len(kept))


def load_examples(args: argparse.Namespace, selection: LabelledFiles) -> Examples:
    """Features, labels, groups and the fixed test split, if any, for every example of the run."""
    if args.frame_level:
        frames_of, window = featurizer(args.checkpoint, args.layer, args.seed, resolve_device(args.device))
        examples = frame_examples(selection.paths, frames_of, window, args.max_frames, args.seed)
    else:
        examples = file_examples(selection, *pooled_features(args, selection.paths), args.task == "regress")
    return with_split(examples, selection, args.task == "regress")


def file_examples(selection: LabelledFiles, X: np.ndarray, file_index: np.ndarray,
                  regress: bool = False) -> Examples:
    """The pooled features X (N, D) of the files selection.paths[file_index] with their labels and groups."""
    y = np.array(selection.labels)[file_index]
    examples = Examples(X, y.astype(float) if regress else y, file_index)
    if selection.groups is not None:
        examples.groups = np.array(selection.groups)[file_index]
    return examples


def with_split(examples: Examples, selection: LabelledFiles, regress: bool = False) -> Examples:
    """The examples with the selection's fixed test split, if any, checked for two classes at least."""
    if selection.test_mask is not None:
        examples.test_mask = selection.test_mask[examples.file_index]
    if not regress:
        check_classes(list(examples.y))  # again: frame labels, or unreadable files may have left one class
    return examples


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--suite" or arg.startswith("--suite=") for arg in argv):
        run_suite(argv)
    args = parse_args(argv)
    if args.json:
        ensure_writable_file(args.json, "--json")  # before the work: a result must not be lost at the end
    if args.cache_dir:
        ensure_writable_dir(args.cache_dir, "--cache-dir")
    set_threads(args.threads)
    config = backbone_config(args.checkpoint)
    selection = select_files(args)  # before logging starts: a user error is then the first line on stderr
    setup_logging(progress=args.progress)
    if args.checkpoint == "random":
        log.info("--checkpoint random is the base configuration (%d channels); to compare with a checkpoint, "
                 "give --checkpoint random:CKPT, a random network of the checkpoint's configuration",
                 config.context_layers[-1][0])
    if selection.skipped:
        log.info("skipping %d files without a label%s", selection.skipped,
                 "" if selection.groups is None else " or group")
    start = time.perf_counter()
    examples = load_examples(args, selection)
    feature_seconds = time.perf_counter() - start
    description, splits = folds(examples, args.folds, args.seed, args.frame_level, args.task == "regress")
    log.info("%d examples of dimension %d, %s", len(examples.y), examples.X.shape[1], description)
    if args.task == "regress":
        result = fit_and_score_regression(examples.X, examples.y, splits, args.regressor)
    else:
        result = fit_and_score(examples.X, examples.y, splits, args.max_iter)
        result["n_classes"] = len(set(examples.y))
    result.update(n_examples=len(examples.y), n_files=len(np.unique(examples.file_index)),
                  skipped_files=selection.skipped, evaluation=description,
                  fold_names=[name for name, _, _ in splits], feature_seconds=round(feature_seconds, 2),
                  total_seconds=round(time.perf_counter() - start, 2),
                  features_config=None if config is None else config.to_dict(),
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    print_table(splits, result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)


def run_suite(argv: list[str]) -> None:
    """probe.py --suite NAME ...: the suite moved to its own script; run it there (for one more release)."""
    script = Path(__file__).with_name("suite.py")
    print(f"warning: probe.py --suite is now python {script.name} NAME ...; the old form goes in the next "
          "release.", file=sys.stderr)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, str(script), *argv])


if __name__ == "__main__":
    run_cli(main)
