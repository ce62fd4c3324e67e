"""The command-line edge shared by every script: errors, logging, devices, precision, threads, flags.

A UserError is a mistake the user can fix (a missing folder, a bad flag): run_cli prints its one sentence
and exits with code 2, never a trace. It is defined in model.py, the bottom layer, because the model
raises it too (a foreign checkpoint, a bad config); every other module takes it from here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import logging
import math
import os
import platform
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import threadpoolctl
import torch
from tqdm import tqdm

from model import UserError

__all__ = ["UserError"]  # and the functions below

log = logging.getLogger(__name__)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2, never a trace."""
    try:
        main()
    except UserError as err:
        tqdm.write(f"error: {err}", file=sys.stderr)  # on a line of its own, below any progress bar
        sys.exit(2)
    except KeyboardInterrupt:
        tqdm.write("interrupted", file=sys.stderr)
        sys.exit(130)


# ----- the log and progress bars ------------------------------------------------------------------

PROGRESS_MODES = ("auto", "always", "never")
_progress = "auto"  # the --progress of this process, set by setup_logging


class ConsoleHandler(logging.StreamHandler):
    """Log lines on stdout, where `> file` captures them; a progress bar on the terminal is cleared before
    each line and redrawn below it, so a line never shares a row with a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class HeldLines(logging.Handler):
    """The lines logged before a run's log file can be opened (while its inputs are checked, before any
    output exists): start_log_file writes them first. At most `limit`, the newest."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=limit)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logging(level: int = logging.INFO, progress: str = "auto") -> None:
    """Dated log lines to stdout, one event per line, Python warnings among them; lines are held for
    start_log_file. `progress` is --progress: whether progress_bar draws (see add_progress_argument)."""
    global _progress
    _progress = progress
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", handlers=[ConsoleHandler(sys.stdout), HeldLines()],
                        force=True)
    warnings.showwarning = log_warning


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                line=None) -> None:
    """A Python warning as one log line (warnings.showwarning's signature), not two lines on stderr."""
    text = " ".join(str(message).split())
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def start_log_file(log_file: Path) -> None:
    """Write the log to `log_file` as well (its folder created), starting with the lines held since
    setup_logging: call it once the inputs are checked, so that a refused run leaves no file behind."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(root.handlers[0].formatter)
    for held in [h for h in root.handlers if isinstance(h, HeldLines)]:
        for record in held.records:
            file_handler.handle(record)
        root.removeHandler(held)
    root.addHandler(file_handler)


def add_progress_argument(group: argparse._ArgumentGroup) -> None:
    """--progress, the same in every script that draws a progress bar."""
    group.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                       help="progress bars on stderr: auto draws them only when stderr is a terminal (not "
                            "into a log file or a cluster job's output), always, or never")


def progress_bar(iterable: Iterable | None = None, hidden: bool = False, **options) -> tqdm:
    """A tqdm bar that draws as --progress says (setup_logging's `progress`); `hidden` keeps it from drawing
    whatever the flag (a DDP rank other than 0, a scan too short to need one)."""
    drawn = _progress == "always" or (_progress == "auto" and sys.stderr.isatty())
    return tqdm(iterable, disable=hidden or not drawn, **options)


# ----- devices and precision ----------------------------------------------------------------------

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

def resolve_precision(name: str, device: torch.device) -> str:
    """--precision as the run computes: "auto" is bf16 where the device has bf16 hardware, fp32 elsewhere."""
    return fast_precision(device) if name == "auto" else name


def configure_backends(device: torch.device, threads: int | None = None) -> None:
    """The backend flags of a training step, set the same way by main.py and bench.py: CPU threads, on the
    CPU freed memory kept in the process, and on CUDA cuDNN autotuning with TF32 convolutions while matmuls
    stay in true fp32."""
    set_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True  # every crop has the same length: autotune each conv once
    # The convolutions (nearly all the FLOPs) may round their inputs to TF32. The matmuls are the step
    # projections and the scores: TF32's ~5e-4 relative error there exceeds the accuracy's tie threshold
    # (1e-5), so under --precision fp32 the objective stays in true fp32.
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False

def keep_freed_memory() -> bool:
    """Make glibc's malloc (PyTorch's CPU allocator) serve every allocation from its heap and never give
    freed memory back to the system; True if it took the settings, False off Linux/glibc. Otherwise each
    training step maps its large activations afresh and faults every 4 KiB page in again: 20-35 thousand
    faults per step of the 128-channel model, and 0.91-0.92x the CPU time without them (docs/RESULTS.md).
    The cost: the process keeps its peak heap resident until it exits (a training process reuses it)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim_threshold, mmap_max = -1, -4  # M_TRIM_THRESHOLD, M_MMAP_MAX in <malloc.h>
    # 2**31 - 1, the largest C int, is "never trim" (a larger Python int would wrap to a small one).
    return bool(mallopt(mmap_max, 0)) and bool(mallopt(trim_threshold, 2**31 - 1))


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The one mixed-precision context of a run: nullcontext for fp32, autocast to fp16 or bf16 otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cuda" and not cuda_has_bf16_hardware(device):
        log.warning("This GPU (compute capability %d.%d) has no bf16 hardware, so bf16 runs emulated and "
                    "slower than fp16: use --precision fp16 here.", *torch.cuda.get_device_capability(device))
    if device.type == "cpu" and not cpu_has_half_instructions(precision):
        log.warning("This CPU has no %s instructions, so %s runs emulated and far slower than fp32: "
                    "use --precision fp32 here.", precision, precision)
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


# ----- flags shared by the scripts ----------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's layout (a script's docstring) and shows a flag's default where there is
    one (not for switches and optional paths)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hidden = action.default is None or action.default is False
        return action.help if hidden else super()._get_help_string(action)



class Renamed(argparse.Action):
    """A flag's old name, kept for one release: it sets the new flag's value, says so on stderr, and has no
    line of its own in --help."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is now {self.new}; the old name goes in the next release.",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_renamed(group: argparse._ArgumentGroup, old: str, new: str, switch: bool = False, **kwargs) -> None:
    """Keep `old` working as a deprecated name of the flag `new` (a switch takes no value)."""
    dest = new.lstrip("-").replace("-", "_")
    extra = {"nargs": 0, "const": True} if switch else {}
    group.add_argument(old, dest=dest, action=Renamed, new=new, **extra, **kwargs)


def add_precision_argument(group: argparse._ArgumentGroup, default: str = "auto") -> None:
    """--precision, the same in every script that trains."""
    group.add_argument("--precision", choices=("auto", *PRECISIONS), default=default,
                       help="auto: bf16 where the device computes it in hardware (a GPU of compute "
                            "capability 8.0+, a CPU with AMX or AVX512-BF16), fp32 elsewhere; bf16: autocast "
                            "without loss scaling; fp16: autocast with a dynamic loss scale")


def add_device_argument(group: argparse._ArgumentGroup) -> None:
    """--device, the same in every entry script."""
    group.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_threads_argument(group: argparse._ArgumentGroup, default: int | None = None) -> None:
    """--threads, the same in every entry script (export.py defaults to 1: one core, as on a device)."""
    usual = "their own, one per core" if default is None else str(default)
    group.add_argument("--threads", type=positive_int, default=default,
                       help=f"CPU threads of PyTorch and of NumPy's BLAS per process (default: {usual}); "
                            "give 1 on a CPU that other jobs share, where threads that wait for each other "
                            "are far slower")


def default_num_workers() -> int:
    """Loader workers this machine has room for: the CPUs this process may use (its affinity, which
    containers and taskset narrow), less one for the training process itself, at most 4. Asking for more
    makes PyTorch warn that the loader might freeze."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, available - 1)


def set_threads(threads: int | None) -> None:
    """Apply --threads to PyTorch and to the BLAS under NumPy, SciPy and scikit-learn (a probe's logistic
    regression ran 15 times slower with 2 BLAS threads on a loaded 2-core CPU); None leaves their defaults."""
    if threads:
        torch.set_num_threads(threads)
        threadpoolctl.threadpool_limits(threads)  # stays in force for the rest of the process


# ----- command-line value types (argparse turns their ArgumentTypeError into one usage line) --------

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

def check_writable_dir(folder: Path, flag: str = "--output-dir", what: str = "the output folder") -> None:
    """Check, before any time is spent computing and creating nothing, that `folder` can be written: a file
    is written and removed in it, or in its nearest existing parent when it is still to be made."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"Cannot write to {what} {folder} ({err.strerror or err}): "
                        f"choose a writable {flag}.") from None

def ensure_writable_dir(folder: Path, flag: str = "--output-dir", what: str = "the output folder") -> None:
    """check_writable_dir, then create `folder`."""
    check_writable_dir(folder, flag, what)
    folder.mkdir(parents=True, exist_ok=True)

def ensure_writable_file(path: Path, flag: str) -> None:
    """Check that the file `path` can be written without creating or changing it or its folder (the writer
    makes the folder), so that a run ends with its result rather than a PermissionError."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give the path of a file.")
    check_writable_dir(path.parent, flag)
    if path.exists():
        try:
            with open(path, "ab"):  # appends nothing: the file stays as it is
                pass
        except OSError as err:
            raise UserError(f"Cannot write to {path} ({err.strerror or err}): "
                            f"choose a writable {flag}.") from None

def temporary_beside(path: Path) -> Path:
    """A new empty file in path's folder, for writing `path` atomically (write it, then os.replace). Its
    name is unique even among processes on several machines that share the folder (O_EXCL), unlike a
    fixed name or one made from the process id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    open(tmp, "x").close()  # the umask's permissions, unlike tempfile.mkstemp's 0600
    return tmp
