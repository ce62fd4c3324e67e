"""Shared helpers for the entry scripts: the CLI error edge, logging, devices, labels and training."""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import threadpoolctl
import torch
import torch.distributed as dist

from model import UserError, read_checkpoint

log = logging.getLogger(__name__)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2, never a trace."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to a plain-text file as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; an unavailable explicit device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu.")
    return device


# ----- labels -------------------------------------------------------------------------------------
# A label source is one of:
#   a path to a TSV with a header holding `path` (relative to the data folder) and `label` columns,
#   "folder"   : the name of each file's parent folder,
#   "pattern:REGEX" : a regular expression on the file name with a named group `label`, e.g. FSDD's
#                     "pattern:(?P<label>\d+)_(?P<speaker>[a-z]+)_\d+\.wav".

FSDD_PATTERN = r"(?P<digit>\d+)_(?P<speaker>[a-z]+)_(?P<index>\d+)\.wav"


def read_label_table(tsv: Path, column: str = "label") -> dict[str, str]:
    """{relative path: value of `column`} from a TSV with a header that has `path` and `column`."""
    if not tsv.is_file():
        raise UserError(f"No label file at {tsv}: give a TSV with `path` and `{column}` columns.")
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "path" not in rows[0] or column not in rows[0]:
        raise UserError(f"{tsv} needs a header with `path` and `{column}` columns (tab-separated).")
    return {row["path"]: row[column] for row in rows}


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
    tsv = Path(source)
    if not tsv.is_file() and (data_dir / source).is_file():
        tsv = data_dir / source  # a TSV named relative to the data folder
    table = read_label_table(tsv, column)
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


# ----- cross-validation ---------------------------------------------------------------------------

Split = tuple[str, np.ndarray, np.ndarray]  # (fold name, training rows, test rows)


def cross_validation(y: np.ndarray, n_folds: int, seed: int, test_mask: np.ndarray | None = None,
                     groups: np.ndarray | None = None, group_folds: int = 0, group_name: str = "group",
                     group_remedy: str = "check --group-column", regress: bool = False,
                     class_remedy: str = "drop the rare classes from the labels or add data"
                     ) -> tuple[str, list[Split]]:
    """(description, splits) of the rows of y (probe.py's and finetune.py's), the first that applies:
    - test_mask: the fixed split, training on the other rows;
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
        return "FSDD official split", [("test", rows[~test_mask], rows[test_mask])]
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


# ----- training: distributed set-up ---------------------------------------------------------------

# Packing a large corpus before training can take hours; the other ranks wait this long for it (on gloo).
SETUP_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torchrun job; rank 0 of 1 when started without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # A gloo group for host-side waits and votes (set-up barriers, stop now?) that must not touch the GPU
    # or run into NCCL's 10-minute watchdog; None in a single process.
    cpu_group: object = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> Distributed:
    """Join the torchrun process group when RANK is set (nccl on CUDA, gloo on CPU); else a single process."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        return Distributed(device=device)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    cpu_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return Distributed(rank, local_rank, world_size, device, cpu_group)


def teardown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(ddp: Distributed) -> Iterator[None]:
    """Rank 0 runs the block first (writing caches, a packed corpus, a demo corpus), then local rank 0 of
    every other node (reusing them on a shared disk, making its own without one), then all other ranks.
    The waits are barriers on the gloo group with SETUP_TIMEOUT, never inside an NCCL collective."""
    if not ddp.enabled:
        yield
        return
    turn = 0 if ddp.is_main else 1 if ddp.local_rank == 0 else 2
    for _ in range(turn):
        dist.barrier(group=ddp.cpu_group)
    yield
    for _ in range(2 - turn):
        dist.barrier(group=ddp.cpu_group)


def any_rank(flags: tuple[bool, ...], ddp: Distributed) -> tuple[bool, ...]:
    """Each flag true on every rank when it is true on any: one CPU all_reduce, so no host-device sync."""
    if not ddp.enabled:
        return flags
    vote = torch.tensor([float(flag) for flag in flags])
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=ddp.cpu_group)
    return tuple(bool(v) for v in vote.tolist())


# ----- training: precision, schedule, seeds, metrics, signals --------------------------------------

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_half_instructions(precision: str) -> bool:
    """Whether this CPU computes `precision` (bf16 or fp16) in hardware: AVX512-BF16 or AMX tiles for bf16,
    AMX-FP16 for fp16. Without them oneDNN emulates it: a bf16 matmul measured 140 times slower than fp32
    on a 2-core AVX2 EPYC, where it is 4 times faster than fp32 on a CPU with AMX."""
    checks = {"bf16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              "fp16": ("_is_amx_fp16_supported",)}
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks[precision])


def cuda_has_bf16_hardware(device: torch.device) -> bool:
    """Whether this GPU computes bf16 in hardware (compute capability 8.0+, Ampere on). Not
    torch.cuda.is_bf16_supported(), which by default counts emulation and says True on a T4 or V100."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def fast_precision(device: torch.device) -> str:
    """bf16 where the device computes it in hardware, fp32 elsewhere."""
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16_hardware(device) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_half_instructions("bf16") else "fp32"


def configure_backends(device: torch.device, threads: int | None = None) -> None:
    """The backend flags of a training step, set the same way by main.py and bench.py: CPU threads, and on
    CUDA cuDNN autotuning with TF32 convolutions while matmuls stay in true fp32."""
    set_threads(threads)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # every crop has the same length: autotune each conv once
    # The convolutions (nearly all the FLOPs) may round their inputs to TF32. The matmuls are the step
    # projections and the scores: TF32's ~5e-4 relative error there exceeds the accuracy's tie threshold
    # (1e-5), so under --precision fp32 the objective stays in true fp32.
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one mixed-precision context of a run: nullcontext for fp32, autocast to fp16 or bf16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16_hardware(device):
        if not torch.cuda.is_bf16_supported():
            raise UserError("This GPU has no bf16 support: use --precision fp16 (or fp32).")
        log.warning("This GPU (compute capability %d.%d) has no bf16 hardware, so bf16 runs emulated and "
                    "slower than fp16: use --precision fp16 here.", *torch.cuda.get_device_capability(device))
    if device.type == "cpu" and not cpu_has_half_instructions(precision):
        log.warning("This CPU has no %s instructions, so %s runs emulated and far slower than fp32: "
                    "use --precision fp32 here.", precision, precision)
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Fused AdamW (0.9, 0.999); weight decay on conv and projection weights only, never norms and biases.
    Fused, because it can skip a non-finite update on the device (found_inf) without a host sync."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen parts stay out
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The run's loss scaler: dynamic under fp16, a no-op for fp32 and bf16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_norm: float, loss_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, clip, step: (gradient norm, non-finite flag). An update whose loss or gradients are not
    finite is skipped on the device (fused AdamW's found_inf), so nothing waits for the host."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm > 0 else math.inf)
    nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
    optimizer.found_inf = nonfinite.float()
    optimizer.step()
    del optimizer.found_inf
    scaler.update()  # fp16: lowers the loss scale after an overflow; a no-op otherwise
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, nonfinite


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate for update u (0-based): linear warm-up from about 0 over
    `warmup` updates, then constant, or a cosine from 1 down to `min_ratio` at update `total`."""
    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on all of `keys` (seed, rank, step...), unlike seed + step which repeats."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


class MetricSums:
    """Running sums of metric tensors, kept on the device; read (averaged over ranks) only when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **metrics: torch.Tensor) -> None:
        """Add one observation of every metric (the same names each time); no host transfer."""
        for name, value in metrics.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def pop_means(self) -> dict[str, float | list[float]]:
        """Means since the last call, averaged over ranks (one all_reduce, one host transfer); then reset."""
        if not self.sums:
            return {}
        flat = torch.cat([value.reshape(-1) for value in self.sums.values()]) / self.count
        if dist.is_initialized():
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        values, means = flat.tolist(), {}
        for name, value in self.sums.items():
            means[name] = values[:value.numel()] if value.dim() else values[0]
            values = values[value.numel():]
        self.sums, self.count = {}, 0
        return means


class StopRequest:
    """SIGINT and SIGTERM set a flag so the training loop can finish its update, save and exit; a second
    signal stops at once. Until `graceful` is set (the training loop has begun) there is nothing to save,
    so the first signal already stops at once. Use as a context manager: the previous handlers come back
    on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # One stop can arrive twice: under torchrun, Ctrl-C or a scheduler signals the whole group, and the
    # agent forwards the signal it got to every rank milliseconds later. A repeat within this many seconds
    # is that duplicate, not a second request.
    REPEAT_SECONDS = 1.0

    def __init__(self) -> None:
        self.signal_name: str | None = None  # also set when another rank was signalled (the loop's vote)
        self.graceful = False
        self._first_at: float | None = None  # when this process got its own first signal

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._first_at is not None:
            if now - self._first_at < self.REPEAT_SECONDS:
                return
            raise KeyboardInterrupt
        self._first_at, name = now, signal.Signals(signum).name
        if not self.graceful:
            log.warning("%s received before the first update: stopping now, nothing saved.", name)
            raise KeyboardInterrupt
        self.signal_name = name
        log.warning("%s received: finishing this update, then saving and stopping "
                    "(send it again to stop at once, without saving).", self.signal_name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


# ----- command-line value types (argparse turns their ArgumentTypeError into one usage line) ------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1), such as --valid-fraction."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, not {value}")
    return value


# ----- outputs: checked before the work starts -----------------------------------------------------

def ensure_writable_dir(folder: Path, flag: str = "--output-dir", what: str = "the output folder") -> None:
    """Create `folder` and check that a file can be written in it, before any time is spent computing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"Cannot write to {what} {folder} ({err.strerror or err}): "
                        f"choose a writable {flag}.") from None


def ensure_writable_file(path: Path, flag: str) -> None:
    """Check that the file `path` can be written (its folder created if need be) without creating or changing
    the file itself, so that a run ends with its result rather than a PermissionError."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give the path of a file.")
    ensure_writable_dir(path.parent, flag)
    if path.exists():
        try:
            with open(path, "ab"):  # appends nothing: the file stays as it is
                pass
        except OSError as err:
            raise UserError(f"Cannot write to {path} ({err.strerror or err}): "
                            f"choose a writable {flag}.") from None


# ----- CPU threads --------------------------------------------------------------------------------

def add_threads_argument(group: argparse._ArgumentGroup) -> None:
    """--threads, the same in every entry script."""
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads of PyTorch and of NumPy's BLAS per process (default: their own, "
                            "one per core); give 1 on a CPU that other jobs share, where threads that wait "
                            "for each other are far slower")


def set_threads(threads: int | None) -> None:
    """Apply --threads to PyTorch and to the BLAS under NumPy, SciPy and scikit-learn (a probe's logistic
    regression ran 15 times slower with 2 BLAS threads on a loaded 2-core CPU); None leaves their defaults."""
    if threads:
        torch.set_num_threads(threads)
        threadpoolctl.threadpool_limits(threads)  # stays in force for the rest of the process


# ----- training: checkpoints and RNG state --------------------------------------------------------


def save_checkpoint(payload: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename over it: a crash mid-save leaves
    the previous file intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename itself durable; not every filesystem allows it
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


TRAINING_KEYS = ("config", "model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                 "best_valid_loss", "history", "rng", "args")


def load_training_checkpoint(path: Path) -> dict:
    """A training checkpoint written by save_checkpoint, loaded without executing pickled code."""
    if not path.is_file():
        raise UserError(f"--resume found no checkpoint at {path}: start without --resume, or point "
                        "--output-dir at the folder of the run to continue.")
    ckpt = read_checkpoint(path, remedy="restore it from a numbered checkpoint_<step>.pt in the same folder, "
                                        "or start without --resume.")
    missing = [key for key in TRAINING_KEYS if key not in ckpt]
    if missing:
        raise UserError(f"{path} is not a training checkpoint of main.py (missing {', '.join(missing)}): "
                        "resume from a latest.pt written by main.py.")
    return ckpt


def prune_numbered_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoint_<step>.pt files in `folder` (keep 0: delete none)."""
    numbered = sorted(folder.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for path in numbered[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field: saved X, now Y' for every model-config field that differs between two config dicts."""
    def short(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return [f"{key}: saved {short(saved.get(key))}, now {short(current.get(key))}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def capture_rng_state() -> dict:
    """torch (CPU and CUDA), numpy and Python RNG states, as tensors and lists so weights_only loads them."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss],
            "python": [version, list(python_state), gauss_next]}


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state; CUDA states are restored only onto the same number of devices."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    version, python_state, gauss_next = state["python"]
    random.setstate((version, tuple(python_state), gauss_next))
