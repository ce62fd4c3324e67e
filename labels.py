"""Labels for downstream tasks: where they come from, which files have one, folds, and scores.

A label source (--labels) is one of:
  a TSV path  : a header holding `path` (relative to the data folder) and the label column (--label-column),
  folder      : the name of each file's parent folder (one sub-folder per class),
  pattern:RE  : a regular expression matching the whole file name, with a named group holding the label,
                e.g. FSDD's "pattern:(?P<label>\\d+)_(?P<speaker>[a-z]+)_\\d+\\.wav",
  fsdd-digit, fsdd-speaker : shortcuts for the Free Spoken Digit Dataset's {digit}_{speaker}_{index}.wav.
With --task ctc the label is a transcript: space-separated symbols (`tokens`, e.g. phones) or text spelled in
characters (`chars`); see tokenize.
A corpus may also label every 10 ms frame: <name>.frames.npy beside <name>.wav holds one label id per frame,
label t covering samples [160 t, 160 t + 160) (demo.make_demo_corpus writes them), and frame_labels.json in
the data folder may name the ids.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import FRAME_HOP, find_audio_files
from utils import UserError

log = logging.getLogger(__name__)


LABELS_HELP = ("a TSV with `path` (relative to --data-dir) and a label column (--label-column); folder "
               "(each file's sub-folder names its class); pattern:REGEX (a named group, `label` or "
               "--label-column's, in a regular expression matching the whole file name); fsdd-digit or "
               "fsdd-speaker (FSDD's {digit}_{speaker}_{index}.wav names)")


def natural_key(text: str) -> list:
    """Sort key under which '2' comes before '10' (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ----- label sources ------------------------------------------------------------------------------

FSDD_PATTERN = r"(?P<digit>\d+)_(?P<speaker>[a-z]+)_(?P<index>\d+)\.wav"

def read_label_table(tsv: Path, column: str = "label") -> dict[str, str]:
    """{relative path: value of `column`} from a TSV with a header that has `path` and `column`."""
    if not tsv.is_file():
        raise UserError(f"No label file at {tsv}: give a TSV with `path` and `{column}` columns.")
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "path" not in rows[0]:
        raise UserError(f"{tsv} needs a header with `path` and `{column}` columns (tab-separated).")
    if column not in rows[0]:
        raise UserError(f"{tsv} has no column `{column}` (it has {', '.join(rows[0])}): choose one of them "
                        "with --label-column (or --group-column).")
    return {row["path"]: row[column] for row in rows}

def tsv_source(source: str, data_dir: Path) -> Path | None:
    """The TSV file a label source names (as given, or relative to the data folder), or None for folder and
    pattern sources."""
    if source == "folder" or source.startswith("pattern:"):
        return None
    tsv = Path(source)
    return data_dir / source if not tsv.is_file() and (data_dir / source).is_file() else tsv

def labels_for_files(files: Sequence[str], source: str, data_dir: Path,
                     column: str = "label") -> list[str | None]:
    """One label per relative file path (None where the source has none), from a TSV, folder or pattern."""
    if source == "folder":
        return [Path(f).parent.name or None for f in files]
    if source.startswith("pattern:"):
        pattern = source[len("pattern:"):]
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise UserError(f"The label pattern '{pattern}' is not a valid regular expression ({err}): "
                            f"fix it, e.g. pattern:(?P<{column}>\\d+)_.*\\.wav.") from None
        if column not in regex.groupindex:
            raise UserError(f"The label pattern needs a named group (?P<{column}>...).")
        matches = [regex.fullmatch(Path(f).name) for f in files]
        return [m.group(column) if m else None for m in matches]
    table = read_label_table(tsv_source(source, data_dir), column)
    return [table.get(f) for f in files]

# Label shortcuts: a source for labels_for_files and the column (or pattern group) that holds the label.
FSDD_SOURCE = f"pattern:{FSDD_PATTERN}"

SHORTCUTS = {"fsdd-digit": (FSDD_SOURCE, "digit"), "fsdd-speaker": (FSDD_SOURCE, "speaker")}

FSDD_TEST_REPETITIONS = 5  # official split: repetitions 0-4 test, 5-49 train

def label_source(spec: str, column: str = "label") -> tuple[str, str]:
    """(source for labels_for_files, column or pattern group holding the label) for a --labels value."""
    return SHORTCUTS.get(spec, (spec, column))

def read_labels(files: list[str], spec: str, data_dir: Path, group_column: str | None = None,
                label_column: str = "label") -> tuple[list[str | None], list[str | None] | None]:
    """(label, group) per relative file path, None where missing; groups are None without a group column."""
    source, column = label_source(spec, label_column)
    labels = labels_for_files(files, source, data_dir, column)
    if group_column is None:
        return labels, None
    if source == "folder":
        raise UserError("--group-column needs a TSV or a pattern label source, not --labels folder.")
    return labels, labels_for_files(files, source, data_dir, group_column)

def check_classes(labels: list[str]) -> None:
    """Classification needs at least two classes."""
    classes = set(labels)
    if len(classes) < 2:
        found = f"only {classes.pop()!r}" if classes else "none"
        raise UserError(f"Classification needs at least two classes, found {found}: "
                        "check --labels and --data-dir.")

def numeric_labels(labels: Sequence[str], files: Sequence[str]) -> np.ndarray:
    """(N,) float64 targets for regression; a label that is not a finite number is a user error."""
    values = []
    for label, name in zip(labels, files, strict=True):
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"--task regress needs numeric labels, but {name} has {label!r}: "
                            "choose a numeric --labels/--label-column, or use --task classify.")
        values.append(value)
    return np.array(values)

def fsdd_test_mask(files: list[str], data_dir: Path) -> np.ndarray:
    """(N,) True for FSDD's official test files (repetitions 0-4)."""
    index = labels_for_files(files, FSDD_SOURCE, data_dir, "index")
    unnamed = [f for f, i in zip(files, index, strict=True) if i is None]
    if unnamed:
        raise UserError(f"--split fsdd-official needs FSDD names {{digit}}_{{speaker}}_{{index}}.wav, "
                        f"but {len(unnamed)} files differ (e.g. {unnamed[0]}).")
    return np.array([int(i) < FSDD_TEST_REPETITIONS for i in index])


# ----- the labelled files of a run ----------------------------------------------------------------

@dataclass
class LabelledFiles:
    """The files of a run that have a label (and a group), with their targets and fixed test split if any."""

    data_dir: Path
    names: list[str]  # relative to data_dir, '/'-separated
    labels: list[str]  # as the label source gives them
    groups: list[str] | None
    test_mask: np.ndarray | None  # (files,) True for the files of a fixed test split
    skipped: int  # files without a label (or group)
    classes: tuple[str, ...] = ()  # classification: the class names in natural order
    targets: np.ndarray | None = None  # (files,) class indices (classify) or values (regress)

    @property
    def paths(self) -> list[Path]:
        return [self.data_dir / name for name in self.names]


def no_label_error(spec: str, files: int, data_dir: Path) -> UserError:
    """The error for a label source that labels none of the files, with what to check for this source."""
    hint = {"folder": "folder labels are the names of the sub-folders the files sit in, so put each "
                      "class's files in a sub-folder named after it"}.get(
        spec, "check the label source and --label-column / --group-column")
    return UserError(f"None of the {files} audio files under {data_dir} has a label from --labels {spec}: "
                     f"{hint}.")


def labelled_files(data_dir: Path, spec: str, label_column: str = "label", group_column: str | None = None,
                   split: str = "cv", task: str = "classify", units: str = "tokens",
                   test_groups: str | None = None) -> LabelledFiles:
    """The audio files under data_dir that have a label (and a group, with group_column), checked for the
    task before any audio is decoded, with their targets: class indices ("classify": two classes at least),
    values ("regress": numbers) or symbol lists ("ctc": transcripts in `units`; empty ones are skipped);
    with split "fsdd-official", FSDD's fixed test split, with test_groups (see read_group_list) the files of
    those groups."""
    files = find_audio_files(data_dir)
    if not files:
        raise UserError(f"No audio files under {data_dir}; check --data-dir.")
    names = [f.relative_to(data_dir).as_posix() for f in files]
    warn_rows_without_audio(spec, label_column, data_dir, names)
    labels, groups = read_labels(names, spec, data_dir, group_column, label_column)
    if task == "ctc":
        labels = without_empty_transcripts(names, labels, units)
    keep = [i for i, label in enumerate(labels)
            if label is not None and (groups is None or groups[i] is not None)]
    if not keep:
        raise no_label_error(spec, len(files), data_dir)
    kept = [names[i] for i in keep]
    chosen = LabelledFiles(data_dir, kept, [labels[i] for i in keep],
                           None if groups is None else [groups[i] for i in keep],
                           fsdd_test_mask(kept, data_dir) if split == "fsdd-official" else None,
                           len(files) - len(keep))
    if test_groups is not None:
        chosen.test_mask = group_test_mask(chosen.groups, test_groups)
    if task == "regress":
        chosen.targets = numeric_labels(chosen.labels, kept)
    elif task == "classify":
        check_classes(chosen.labels)
        chosen.classes = tuple(sorted(set(chosen.labels), key=natural_key))
        chosen.targets = np.array([chosen.classes.index(label) for label in chosen.labels])
    elif task == "ctc":
        chosen.targets = np.empty(len(kept), dtype=object)
        chosen.targets[:] = [tokenize(label, units) for label in chosen.labels]
    return chosen


def first_few(names: Sequence[str], count: int = 3) -> str:
    """`a, b, c` (and how many more): the first names of a list, for a message."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def warn_rows_without_audio(spec: str, column: str, data_dir: Path, names: Sequence[str]) -> None:
    """Name (and count) the rows of a TSV label source whose audio file is not under data_dir."""
    source, column = label_source(spec, column)
    tsv = tsv_source(source, data_dir)
    if tsv is None:
        return
    missing = sorted(set(read_label_table(tsv, column)) - set(names), key=natural_key)
    if missing:
        log.warning("%d rows of %s name audio that is not under %s (%s): skipped", len(missing), tsv.name,
                    data_dir, first_few(missing))


def without_empty_transcripts(names: Sequence[str], labels: list[str | None], units: str) -> list[str | None]:
    """The transcripts with the empty ones (no symbol in `units`) set to None, named and counted."""
    empty = [i for i, label in enumerate(labels) if label is not None and not tokenize(label, units)]
    if empty:
        log.warning("%d files have an empty transcript (%s): skipped", len(empty),
                    first_few([names[i] for i in empty]))
    return [None if i in set(empty) else label for i, label in enumerate(labels)]


def read_group_list(spec: str) -> list[str]:
    """Group names from a file (one or more per line, white-space separated; `#` starts a comment) or from a
    comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = (line.split("#", 1)[0] for line in path.read_text().splitlines())
        return [name for line in lines for name in line.split()]
    return [name.strip() for name in spec.split(",") if name.strip()]


def group_test_mask(groups: list[str] | None, spec: str) -> np.ndarray:
    """(files,) True for the files of the groups `spec` names (see read_group_list), each of which must
    exist."""
    if groups is None:
        raise UserError("--test-groups needs --group-column, the column that holds the groups it names.")
    chosen = read_group_list(spec)
    unknown = sorted(set(chosen) - set(groups))
    if not chosen or unknown:
        found = f"{first_few(unknown)} are not among the groups" if unknown else "it names no group"
        raise UserError(f"--test-groups {spec}: {found} of the labelled files; check the list and "
                        "--group-column.")
    return np.isin(np.array(groups), chosen)


# ----- transcripts (task "ctc") ---------------------------------------------------------------------

UNITS = ("tokens", "chars")
WORD_BOUNDARY = "|"  # the symbol between the words of a `chars` transcript


def tokenize(text: str, units: str) -> list[str]:
    """A transcript as recognition symbols. tokens: split on white space (phones, say). chars: case-folded
    letters, digits and apostrophes, WORD_BOUNDARY between words; any other punctuation separates words."""
    if units == "tokens":
        return text.split()
    words = "".join(ch if ch.isalnum() or ch == "'" else " " for ch in text.casefold()).split()
    return list(WORD_BOUNDARY.join(words))


def detokenize(symbols: Sequence[str], units: str) -> str:
    """Symbols back to text: tokens joined by spaces, or characters with WORD_BOUNDARY as the space."""
    if units == "tokens":
        return " ".join(symbols)
    return " ".join("".join(symbols).replace(WORD_BOUNDARY, " ").split())


def vocabulary(transcripts: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Every symbol of the transcripts (the training folds'), in natural order."""
    return tuple(sorted({symbol for symbols in transcripts for symbol in symbols}, key=natural_key))


def unknown_symbols(symbols: Sequence[str], known: Sequence[str]) -> list[str]:
    """The symbols of a transcript outside the vocabulary `known`, in order of first appearance."""
    known = set(known)
    return list(dict.fromkeys(symbol for symbol in symbols if symbol not in known))


def known_symbol_folds(data: LabelledFiles, folds: list[Split], skip: bool) -> list[Split]:
    """The folds, each test transcript checked against the vocabulary of its fold's training files: an unknown
    symbol is an error naming it and the file, or with `skip` (--skip-unknown) the file is left out."""
    checked = []
    for name, train_rows, test_rows in folds:
        known = vocabulary(data.targets[train_rows])
        unknown = {i: unknown_symbols(data.targets[i], known) for i in test_rows}
        bad = [i for i in test_rows if unknown[i]]
        if bad and not skip:
            raise UserError(f"{data.names[bad[0]]} has the symbol {unknown[bad[0]][0]!r}, which no training "
                            f"file of fold {name} has ({len(bad)} test files have such symbols): fix the "
                            "transcripts, or give --skip-unknown to skip those files.")
        if bad:
            log.warning("fold %s: %d test files have symbols outside the training vocabulary (%s): skipped",
                        name, len(bad), first_few([f"{data.names[i]}: {' '.join(unknown[i])}" for i in bad]))
        checked.append((name, train_rows, np.setdiff1d(test_rows, bad)))
    return checked


def error_rate_name(units: str) -> str:
    """The headline error rate of a recognizer: PER over tokens (phones), CER over characters."""
    return "per" if units == "tokens" else "cer"


def transcript_errors(reference: str, hypothesis: str, units: str) -> tuple[int, int]:
    """(edits, reference length) of one transcript in its units (tokens, or characters with the spaces)."""
    import jiwer  # imported here, as sklearn is: only recognition scores transcripts
    if units == "tokens":
        if not reference.split():
            return len(hypothesis.split()), 0
        out = jiwer.process_words(reference, hypothesis)
    else:
        if not reference:
            return len(hypothesis), 0
        out = jiwer.process_characters(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def recognition_metrics(references: Sequence[str], hypotheses: Sequence[str], units: str) -> dict:
    """Corpus-level error rates in percent (edits summed over files / reference length summed): "per" for
    tokens; "cer" and "wer" for chars (texts as detokenize writes them). jiwer aligns."""
    import jiwer
    pairs = zip(references, hypotheses, strict=True)
    edits, length = np.sum([transcript_errors(r, h, units) for r, h in pairs], axis=0)
    metrics = {error_rate_name(units): 100 * float(edits) / max(1, int(length)), "edits": int(edits),
               "reference_length": int(length), "files": len(references)}
    if units == "chars":
        words = jiwer.process_words(list(references), list(hypotheses))
        metrics["wer"] = 100 * float(words.wer)
    return metrics


# ----- per-frame labels ---------------------------------------------------------------------------

def frame_label_path(audio: Path) -> Path:
    """Where the per-frame labels of an audio file live: a.wav -> a.frames.npy."""
    return audio.with_suffix(".frames.npy")

def labels_at_centres(frame_labels: np.ndarray, num_frames: int, window: int) -> np.ndarray:
    """(T,) label of feature frame t, which covers samples [160 t, 160 t + window): the one at its centre."""
    centres = FRAME_HOP * np.arange(num_frames) + window // 2
    return frame_labels[np.minimum(centres // FRAME_HOP, len(frame_labels) - 1)]

def frame_label_names(data_dir: Path) -> list[str] | None:
    """The name of each frame label id from data_dir/frame_labels.json ({"names": [...]}), if there is one."""
    try:
        return [str(name) for name in json.loads((data_dir / "frame_labels.json").read_text())["names"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----- cross-validation ---------------------------------------------------------------------------

Split = tuple[str, np.ndarray, np.ndarray]  # (fold name, training rows, test rows)

def cross_validation(y: np.ndarray, n_folds: int, seed: int, test_mask: np.ndarray | None = None,
                     groups: np.ndarray | None = None, group_folds: int = 0, group_name: str = "group",
                     group_remedy: str = "check --group-column", regress: bool = False,
                     class_remedy: str = "drop the rare classes from the labels or add data",
                     fixed_split: str = "FSDD official split") -> tuple[str, list[Split]]:
    """(description, splits) of the rows of y (probe.py's and finetune.py's), the first that applies:
    - test_mask: the fixed split (named fixed_split), training on the other rows;
    - groups: folds disjoint in groups, one group out per fold, or group_folds folds when that is at least
      2 and less than the number of groups;
    - regress: shuffled k-fold (k = n_folds, at least 2);
    - otherwise stratified k-fold, k shrunk to the smallest class (with a warning).
    The remedies end the errors a user can cause: too few groups, a class too small."""
    from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut, StratifiedKFold

    rows = np.arange(len(y))
    if test_mask is not None:
        if test_mask.all() or not test_mask.any():
            raise UserError("The fixed split leaves no training or no test files; check the file names.")
        return fixed_split, [("test", rows[~test_mask], rows[test_mask])]
    if groups is not None:
        distinct = len(set(groups))
        if distinct < 2:
            raise UserError(f"Folds by {group_name} need at least two {group_name}s; {group_remedy}.")
        if 2 <= group_folds < distinct:
            splits = GroupKFold(n_splits=group_folds).split(rows, groups=groups)
            return f"{group_folds}-fold by {group_name}", numbered(splits)
        splits = LeaveOneGroupOut().split(rows, groups=groups)
        return f"leave-one-{group_name}-out", [(str(groups[test[0]]), train, test) for train, test in splits]
    k = max(2, n_folds)
    if regress:
        return f"{k}-fold", numbered(KFold(n_splits=k, shuffle=True, random_state=seed).split(rows))
    smallest = min(Counter(y.tolist()).values())
    if smallest < 2:
        raise UserError(f"Every class needs at least 2 examples for cross-validation; {class_remedy}.")
    if smallest < k:
        log.warning("the smallest class has %d examples: using %d folds instead of %d", smallest, smallest, k)
        k = smallest
    splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(rows, y)
    return f"stratified {k}-fold", numbered(splits)

def numbered(splits: Iterator[tuple[np.ndarray, np.ndarray]]) -> list[Split]:
    return [(str(i + 1), train, test) for i, (train, test) in enumerate(splits)]


# ----- evaluation metrics -------------------------------------------------------------------------

def classification_metrics(true: Sequence[str], predicted: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and the recall of every class (by name)."""
    # Imported here, not at the top: main.py, which never scores, then starts without scikit-learn.
    from sklearn.metrics import accuracy_score, f1_score, recall_score
    classes = sorted(set(true) | set(predicted))
    recalls = recall_score(true, predicted, labels=classes, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(true, predicted)),
            "macro_f1": float(f1_score(true, predicted, average="macro")),
            "per_class_recall": {str(c): float(r) for c, r in zip(classes, recalls, strict=True)}}

def regression_metrics(true: np.ndarray, predicted: np.ndarray) -> dict:
    """MAE, RMSE, R^2, Pearson r and Spearman rho of predictions against true values."""
    from scipy.stats import pearsonr, spearmanr
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    error = predicted - true
    total = np.sum((true - true.mean()) ** 2)
    constant = np.ptp(true) == 0 or np.ptp(predicted) == 0  # correlation undefined
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))),
            "r2": float(1 - np.sum(error ** 2) / total) if total > 0 else math.nan,
            "pearson_r": math.nan if constant else float(pearsonr(true, predicted)[0]),
            "spearman_rho": math.nan if constant else float(spearmanr(true, predicted)[0])}
