"""The machinery of a training run, below main.py's loop: processes, optimisation, checkpoints, logging.

- Distributed: where a process sits in a torchrun job, set-up in turns, votes on a CPU group.
- Optimisation: AdamW with decay on weights only, the unscale-clip-step of an update, the schedule.
- Metrics that stay on the device until a log line, and the SIGINT/SIGTERM stop request.
- The training checkpoint, in one place: what it holds (Progress, checkpoint_payload), how it is written
  (atomically), read back (load_training_checkpoint) and resumed (resume, with_stored_flags).
- The training log (progress bar, train.log, TensorBoard, the checkpoint's history), the collapse warning,
  and the clock behind --max-minutes and --save-every-minutes.
finetune.py and bench.py use the optimisation helpers too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from data import STOP_SIGNALS
from model import Wav2Vec, read_checkpoint
from utils import (
    UserError,
    check_writable_dir,
    progress_bar,
    resolve_device,
    setup_logging,
    start_log_file,
)

log = logging.getLogger(__name__)

MAX_NONFINITE_UPDATES = 20  # this many skipped updates in a row means the run diverged: stop it

# ----- distributed set-up -------------------------------------------------------------------------

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
    torchrun = "RANK" in os.environ
    if torchrun:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if torchrun or device.index is None:
            device = torch.device("cuda", local_rank if torchrun else torch.cuda.current_device())
        # The loader's pin-memory thread, cuDNN and NCCL work on the current device: without this,
        # --device cuda:1 opened a context on GPU 0 as well.
        torch.cuda.set_device(device)
    if not torchrun:
        return Distributed(device=device)
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

def max_over_ranks(values: tuple[float, ...], ddp: Distributed) -> tuple[float, ...]:
    """Each value's maximum over ranks (a flag: true on every rank when true on any), in one all_reduce on
    the CPU group, so no host-device sync."""
    if not ddp.enabled:
        return values
    maxima = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=ddp.cpu_group)
    return tuple(maxima.tolist())

def vote(stop: StopRequest, clock: TrainingClock, ddp: Distributed) -> tuple[bool, bool, bool]:
    """(stop requested, out of time, a --save-every-minutes boundary passed), each decided once for all
    ranks: every rank saves, validates and leaves after the same update, whatever its own clock says or
    whichever rank a signal reached (a node's preemption). A boundary is saved at once, when the first
    rank's clock passes it, whichever rank that is."""
    signalled, out_of_time, boundaries = max_over_ranks(
        (stop.requested, clock.out_of_time, clock.boundaries_passed()), ddp)
    if signalled and not stop.requested:
        stop.signal_name = "a signal to another rank"
    return bool(signalled), bool(out_of_time), clock.save_due(int(boundaries))

# ----- optimisation -------------------------------------------------------------------------------

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
    finite is skipped on the device (fused AdamW's found_inf), so nothing waits for the host. Under torchrun
    the flag is all-reduced: a loss that is not finite on one rank skips the update on every rank, whose
    weights would otherwise part (the gradients are the same everywhere, the losses are each rank's own)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm > 0 else math.inf)
    nonfinite = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_sum))
    if dist.is_initialized() and dist.get_world_size() > 1:
        nonfinite = nonfinite.float()
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)  # on the device: no host sync
        nonfinite = nonfinite.bool()
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


# ----- metrics and stop requests ------------------------------------------------------------------

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

    SIGNALS = STOP_SIGNALS  # the ones the loader workers leave to the main process
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


# ----- the training checkpoint --------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands; stored in every checkpoint so that --resume continues exactly."""

    step: int = 0  # optimizer updates done
    epoch: int = 0
    batch_in_epoch: int = 0  # updates done in the current epoch
    crops_in_epoch: int = 0  # crops all ranks together have trained on in this epoch: where a resume starts
    epoch_crops: int = 0  # crops in an epoch's order (one per usable training file), to check a resume
    best_valid_loss: float = math.inf
    train_seconds: float = 0.0  # wall time spent in the training loop, over all resumed runs
    history: dict = field(default_factory=lambda: {"train": [], "valid": []})

    def advance(self, crops: int) -> None:
        """Count one update of `crops` crops (over all ranks)."""
        self.step, self.batch_in_epoch, self.crops_in_epoch = (self.step + 1, self.batch_in_epoch + 1,
                                                               self.crops_in_epoch + crops)

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch, self.crops_in_epoch = self.epoch + 1, 0, 0

    def check_epoch(self, crops: int) -> None:
        """Check a resumed position against the `crops` of this run's epoch order: when the training set
        changed mid-epoch, the place cannot be found, and the epoch ends (the loop then validates)."""
        if self.crops_in_epoch and self.epoch_crops not in (0, crops):  # 0: saved before it was kept
            log.warning("Epoch %d's order had %d crops when it was saved and has %d now (the files changed, "
                        "or --data-dir, --valid-fraction, --segment-length or --pad-short), so where it "
                        "stopped cannot be found: it ends here, and epoch %d starts.", self.epoch,
                        self.epoch_crops, crops, self.epoch + 1)
            self.crops_in_epoch = crops
        self.epoch_crops = crops


def checkpoint_payload(model: Wav2Vec, optimizer, scheduler, scaler, progress: Progress,
                       args: argparse.Namespace, world_size: int) -> dict:
    """Everything --resume needs, as plain types and tensors (loadable with weights_only=True)."""
    return {"config": model.config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), **asdict(progress), "rng": capture_rng_state(), "args": vars(args),
            "world_size": world_size}

def save_run(out: Path, names: tuple[str, ...], model: Wav2Vec, optimizer, scheduler, scaler,
             progress: Progress, args: argparse.Namespace, world_size: int) -> None:
    """Write the training checkpoint under each of `names` in `out`, then keep the newest --keep-last
    numbered ones."""
    payload = checkpoint_payload(model, optimizer, scheduler, scaler, progress, args, world_size)
    for name in names:
        save_checkpoint(payload, out / name)
    prune_numbered_checkpoints(out, args.keep_last)
    log.info("Saved %s at step %d.", ", ".join(names), progress.step)


def prepare_output_dir(args: argparse.Namespace, is_main: bool) -> Path:
    """The output folder, checked before any work but not yet created (start_run_log does that once the data
    has been checked); refuses to overwrite a run without --resume, while a demo re-run starts over."""
    out = Path(args.output_dir)
    if is_main and not args.resume and (out / "latest.pt").exists():
        if not args.demo:
            raise UserError(f"{out} already holds a run (latest.pt): continue it with --resume, or start a "
                            "new one with another --output-dir.")
        clear_run(out)  # the demo is the first thing a user repeats: a re-run starts it over
    if is_main:
        check_writable_dir(out)
        if args.packed_dir and not (Path(args.packed_dir) / "index.json").is_file():  # it will be packed
            check_writable_dir(Path(args.packed_dir), "--packed-dir", "the packed-corpus folder")
    setup_logging(logging.INFO if is_main else logging.WARNING, args.progress)
    return out


def start_run_log(out: Path, is_main: bool) -> None:
    """Create the output folder with train.log (rank 0's), which starts with the lines logged so far."""
    if is_main:
        start_log_file(out / "train.log")


def clear_run(out: Path) -> None:
    """Delete what a run wrote into `out` (checkpoints, train.log, TensorBoard events), nothing else."""
    for path in [*out.glob("*.pt"), out / "train.log"]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


def resume(path: Path, model: Wav2Vec, optimizer, scheduler, scaler, args: argparse.Namespace,
           ddp: Distributed) -> Progress:
    """Restore model, optimizer, schedule, loss scale, RNG and progress from `path`; the peak learning rate
    and the schedule's shape follow the current flags. Every rank reads `path`: see check_same_checkpoint."""
    ckpt = load_training_checkpoint(path)
    check_same_checkpoint(ckpt, path, ddp)
    world_size = ddp.world_size
    differences = config_differences(ckpt["config"], model.config.to_dict())
    if differences:
        hint = (" (runs started before skip connections became the default need --no-skip-connections)"
                if any(d.startswith("skip_connections") for d in differences) else "")
        raise UserError(f"{path} holds a model of another configuration ({'; '.join(differences)}): resume "
                        f"with the flags it was trained with{hint}, or start a new run in another "
                        "--output-dir.")
    saved_args = ckpt["args"]
    changed = [f"{flag_text(k, saved_args[k])} -> {v}" for k, v in sorted(vars(args).items())
               if k in saved_args and saved_args[k] != v and k not in ("resume", *MACHINE_FLAGS)]
    if changed:
        log.info("Flags changed since the checkpoint: %s", ", ".join(changed))
    log.info("This machine's settings, not the checkpoint's: %s", machine_settings(args, saved_args))
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = args.lr, args.lr * scheduler.lr_lambdas[0](ckpt["step"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when the run was not fp16
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng_state(ckpt["rng"])
    saved_world_size = ckpt.get("world_size", world_size)
    crops = ckpt.get("crops_in_epoch")
    if crops is None:  # written before the position was kept in crops, by as many processes as now
        crops = ckpt["batch_in_epoch"] * saved_args["batch_size"] * saved_args["accumulate_steps"]
        crops *= world_size
    log.info("Resumed from %s at step %d (epoch %d, after %d of its crops%s).", path, ckpt["step"],
             ckpt["epoch"], crops, "" if saved_world_size == world_size
             else f"; written by {saved_world_size} processes, continued by {world_size}")
    return Progress(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], crops, ckpt.get("epoch_crops", 0),
                    ckpt["best_valid_loss"], ckpt.get("train_seconds", 0.0), ckpt["history"])


def check_same_checkpoint(ckpt: dict, path: Path, ddp: Distributed) -> None:
    """Refuse to resume unless every rank read the same checkpoint (the same step and training time). Only
    rank 0 writes latest.pt, so on several nodes --output-dir must be one folder on a disk they all share;
    a node with a folder of its own finds an older checkpoint there, or none (load_training_checkpoint)."""
    step, seconds = ckpt["step"], ckpt.get("train_seconds", 0.0)
    most_step, most_seconds, minus_least_step, minus_least_seconds = max_over_ranks(
        (step, seconds, -step, -seconds), ddp)
    if (most_step, most_seconds) != (-minus_least_step, -minus_least_seconds):
        raise UserError(f"The ranks read different checkpoints at {path} (from step "
                        f"{-minus_least_step:.0f} to {most_step:.0f}): only rank 0 writes it, so put "
                        "--output-dir on a disk that every node shares, with rank 0's latest.pt in it, and "
                        "resume again.")


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
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun's: the group may not exist yet
        where = f" on {socket.gethostname()} (rank {os.environ.get('RANK')})" if several else ""
        shared = ", on a disk that every node shares (every rank reads latest.pt)" if several else ""
        raise UserError(f"--resume found no checkpoint at {path}{where}: start without --resume, or point "
                        f"--output-dir at the folder of the run to continue{shared}.")
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


# What describes the machine, not the run: on --resume these come from this command line (or its defaults,
# computed here: --num-workers from this machine's CPUs, --precision auto from its hardware), never from the
# checkpoint, so that a run started on a laptop continues on a GPU node with the node's settings.
MACHINE_FLAGS = ("device", "num_workers", "threads", "compile", "precision", "cache_dir", "progress")

# What a resumed run cannot change: the model's shape and objective (the weights are for them), and the
# seed (the data order, crops and distractors of the rest of the run follow it).
FIXED_FLAGS = ("model", "channels", "norm", "skip_connections", "num_steps", "num_negatives",
               "cross_negatives", "offset", "loss_type", "seed")

def with_stored_flags(parser: argparse.ArgumentParser, argv: list[str] | None,
                      args: argparse.Namespace) -> argparse.Namespace:
    """--resume: the flags the run was trained with (stored in its latest.pt), overridden by those given on
    this command line, and this machine's own settings (MACHINE_FLAGS). A given flag that would change the
    model or the data order mid-run is refused."""
    stored = load_training_checkpoint(Path(args.output_dir) / "latest.pt")["args"]
    for action in parser._actions:  # parsed again without defaults: only the flags given explicitly remain
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    fixed = [key for key in FIXED_FLAGS if key in given and key in stored and given[key] != stored[key]]
    if fixed:
        names = " and ".join(f"--{key.replace('_', '-')}" for key in fixed)
        raise UserError(f"{names} cannot change in the middle of a run: the run in {args.output_dir} was "
                        f"trained with {' '.join(flag_text(key, stored[key]) for key in fixed)}, so resume "
                        "without it, or start a new run in another --output-dir.")
    # The checkpoint is read where this command line says, wherever the run was when it was stored.
    kept = {key: value for key, value in stored.items()
            if key in vars(args) and key not in ("output_dir", *MACHINE_FLAGS)}
    return argparse.Namespace(**{**vars(args), **kept, **given})

def machine_settings(args: argparse.Namespace, saved_args: dict) -> str:
    """'--device auto (was cpu), --num-workers 4 (was 1), ...': the MACHINE_FLAGS a resumed run uses."""
    texts = []
    for key in MACHINE_FLAGS:
        value = getattr(args, key)
        changed = key in saved_args and saved_args[key] != value
        texts.append(flag_text(key, value) + (f" (was {saved_args[key]})" if changed else ""))
    return ", ".join(texts)

def flag_text(key: str, value: object) -> str:
    """A flag and its value as on the command line: --channels 64."""
    return f"--{key.replace('_', '-')} {value}"


# ----- the training log ---------------------------------------------------------------------------

COLLAPSE_UPDATES = 300  # updates at the collapsed loss before the run warns (escapes took 50-300)

# Above this share of an interval's wall time spent waiting for batches, the loader is the bottleneck.
LOADER_BOUND_SHARE = 0.2

class CollapseWatch:
    """Counts the updates a run spends at its collapsed loss (every score equal) and words one warning."""

    def __init__(self, model: Wav2Vec, patience: int = COLLAPSE_UPDATES):
        self.collapsed_loss, self.patience = model.collapsed_loss, patience
        self.updates, self.warned = 0, False
        remedies = [] if model.config.skip_connections else ["--skip-connections"]
        remedies += ["--loss-type infonce"] if model.config.loss_type == "contrastive" else []
        self.remedies = remedies + ["a lower --lr or a longer --warmup-updates"]

    def add(self, step: int, loss: float, updates: int) -> str | None:
        """Take the mean loss of the last `updates` updates; the warning, the first time they add up to
        `patience` updates at the collapsed loss in a row."""
        if abs(loss - self.collapsed_loss) >= 1e-3 * self.collapsed_loss:
            self.updates, self.warned = 0, False
            return None
        self.updates += updates
        if self.updates < self.patience or self.warned:
            return None
        self.warned = True
        return (f"The loss has sat at {self.collapsed_loss:.4f} nats, its value when every score is equal, "
                f"for {self.updates} updates (step {step}): the model has collapsed to features that do not "
                f"change over time. If it stays there, restart with {', or '.join(self.remedies)}.")

class TrainingLog:
    """Training and validation metrics to the progress bar, train.log, TensorBoard and the checkpoint
    history. Metrics stay tensors on the device until a log interval; only rank 0 writes."""

    def __init__(self, output_dir: Path, progress: Progress, total_updates: int, audio_per_update: float,
                 collapse: CollapseWatch, ddp: Distributed, loader_remedy: str = ""):
        self.history, self.ddp, self.is_main, self.device = progress.history, ddp, ddp.is_main, ddp.device
        self.collapse = collapse
        self.loader_remedy, self.loader_warned, self.intervals = loader_remedy, False, 0
        self.audio_per_update = audio_per_update  # seconds of audio in one update, over all ranks
        self.writer = SummaryWriter(output_dir / "tensorboard", purge_step=progress.step + 1) \
            if ddp.is_main else None
        self.bar = progress_bar(total=total_updates, initial=progress.step, unit="update", dynamic_ncols=True,
                                hidden=not ddp.is_main)
        self.micro_batches, self.updates = MetricSums(), MetricSums()
        self.streak = torch.zeros((), device=ddp.device)  # non-finite updates in a row, on the device
        self.nonfinite_streak, self.skipped, self.lr = 0, 0, 0.0
        self.restart_clock(progress.step)

    def restart_clock(self, step: int) -> None:
        """Throughput and the data wait count from here, leaving out validation and checkpoint time."""
        self.clock_step, self.clock, self.data_wait = step, time.perf_counter(), 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Time the loop spent blocked on the loader for the next batch (this rank's)."""
        self.data_wait += seconds

    def slowest_wait_share(self, seconds: float) -> float:
        """The largest share of the last `seconds` that any rank waited for its loader: another rank's
        starving loader shows on this one as time in the gradient all_reduce, not as data wait."""
        return max_over_ranks((min(1.0, self.data_wait / seconds),), self.ddp)[0]

    def loader_warning(self, wait_share: float, updates: int) -> str | None:
        """The warning, once, when the loop waited for data more than LOADER_BOUND_SHARE of an interval.
        The first interval is left out: it includes the loader workers' start-up."""
        self.intervals += 1
        if self.loader_warned or self.intervals == 1 or wait_share <= LOADER_BOUND_SHARE:
            return None
        self.loader_warned = True
        return (f"The updates waited for data {wait_share:.0%} of the time over the last {updates}: the "
                f"loader is the bottleneck, not the model. {self.loader_remedy}")

    def add_micro_batch(self, loss: torch.Tensor, metrics: dict) -> None:
        self.micro_batches.add(loss=loss, loss_bits=metrics["loss_bits"], accuracy=metrics["accuracy"],
                               accuracy_per_step=metrics["accuracy_per_step"])

    def add_update(self, grad_norm: torch.Tensor, nonfinite: torch.Tensor, lr: float) -> None:
        """Count one update made at learning rate `lr`, with its gradient norm and non-finite flag."""
        self.lr = lr
        finite = (~nonfinite).float()
        self.updates.add(grad_norm=torch.where(nonfinite, 0.0, grad_norm), finite=finite)
        self.streak = (self.streak + 1) * (1 - finite)
        self.bar.update()

    def flush(self, progress: Progress, loss_scale: float) -> None:
        """Log the updates since the last log line, if any, so that every checkpoint's history covers every
        update (a run shorter than --log-every still has one: vis.py's loss curves)."""
        if self.updates.count:
            self.write_train(progress, loss_scale)

    def write_train(self, progress: Progress, loss_scale: float) -> None:
        """Average the interval over ranks (the loop's only host sync) and write it everywhere."""
        step, epoch, lr = progress.step, progress.epoch, self.lr
        updates_done = self.updates.count
        means, updates = self.micro_batches.pop_means(), self.updates.pop_means()
        self.nonfinite_streak = int(self.streak.item())
        self.skipped += round((1 - updates["finite"]) * updates_done)
        seconds = max(1e-9, time.perf_counter() - self.clock)
        rate = (step - self.clock_step) * self.audio_per_update / seconds
        wait_share = self.slowest_wait_share(seconds)
        self.restart_clock(step)
        entry = {"step": step, "epoch": epoch, "loss": means["loss"], "loss_bits": means["loss_bits"],
                 "accuracy": means["accuracy"], "accuracy_per_step": means["accuracy_per_step"], "lr": lr}
        self.history["train"].append(entry)
        if not self.is_main:
            return
        for warning in (self.collapse.add(step, entry["loss"], updates_done),
                        self.loader_warning(wait_share, updates_done)):
            if warning:
                log.warning(warning)
        grad_norm = updates["grad_norm"] / updates["finite"] if updates["finite"] else math.nan
        scalars = {"train/loss_bits": entry["loss_bits"], "train/accuracy": entry["accuracy"], "train/lr": lr,
                   "train/grad_norm": grad_norm, "train/loss_scale": loss_scale,
                   "train/skipped_updates": self.skipped, "speed/audio_seconds_per_second": rate,
                   "speed/data_wait_share": wait_share}
        for k, accuracy in enumerate(entry["accuracy_per_step"]):
            scalars[f"train_accuracy_per_step/k{k + 1:02d}"] = accuracy
        if self.device.type == "cuda":
            scalars["cuda/memory_allocated_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            scalars["cuda/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.bar.set_postfix(loss_bits=f"{entry['loss_bits']:.3f}", acc=f"{entry['accuracy']:.3f}",
                             lr=f"{lr:.2e}", audio_s_per_s=f"{rate:.1f}")
        log.info("step %d epoch %d | loss %.4f (%.3f bits) | accuracy %.3f | lr %.2e | grad norm %.3f | "
                 "loss scale %g | %.1f audio-s/s | data wait %.0f%% | skipped %d", step, epoch, entry["loss"],
                 entry["loss_bits"], entry["accuracy"], lr, grad_norm, loss_scale, rate, 100 * wait_share,
                 self.skipped)

    def write_valid(self, step: int, epoch: int, means: dict, is_best: bool) -> None:
        self.history["valid"].append({"step": step, "epoch": epoch, "loss": means["loss"],
                                      "loss_bits": means["loss_bits"], "accuracy": means["accuracy"]})
        if not self.is_main:
            return
        self.writer.add_scalar("valid/loss_bits", means["loss_bits"], step)
        self.writer.add_scalar("valid/accuracy", means["accuracy"], step)
        log.info("validation after epoch %d (step %d) | loss %.4f (%.3f bits) | accuracy %.3f%s", epoch, step,
                 means["loss"], means["loss_bits"], means["accuracy"], " | best so far" if is_best else "")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

class TrainingClock:
    """Wall time in the training loop, summed over resumed runs: --max-minutes, --save-every-minutes."""

    def __init__(self, progress: Progress, max_minutes: float | None, save_every_minutes: float | None):
        self.progress, self.start, self.before = progress, time.perf_counter(), progress.train_seconds
        self.limit = 60 * max_minutes if max_minutes else math.inf
        self.every = 60 * save_every_minutes if save_every_minutes else math.inf
        self.saved_boundaries = self.boundaries_passed()  # a resumed run saved at those already

    def tick(self) -> None:
        """Bring progress.train_seconds up to now."""
        self.progress.train_seconds = self.before + time.perf_counter() - self.start

    @property
    def out_of_time(self) -> bool:
        """Whether --max-minutes of training time have passed (as of the last tick)."""
        return self.progress.train_seconds >= self.limit

    def boundaries_passed(self) -> int:
        """How many --save-every-minutes boundaries the training time has passed (as of the last tick)."""
        return int(self.progress.train_seconds // self.every) if self.every < math.inf else 0

    def save_due(self, boundaries: int) -> bool:
        """Whether `boundaries` (voted: the most any rank's clock has passed) include one not saved at yet;
        remembered, so that each boundary is saved once, on every rank at the same update."""
        if boundaries <= self.saved_boundaries:
            return False
        self.saved_boundaries = boundaries
        return True


# ----- the run -------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the loop works with; checkpoints hold the model, optimizer, schedule, scaler, progress."""

    args: argparse.Namespace
    ddp: Distributed
    out: Path
    model: Wav2Vec  # the plain module: checkpoints, validation and distractor shapes use it
    trained: torch.nn.Module  # what the loop calls: the model wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: AbstractContextManager
    train_loader: DataLoader
    valid_loader: DataLoader | None
    progress: Progress
    total_updates: int
    log: TrainingLog
    clock: TrainingClock
    saved: list[tuple[Path, int]]  # (checkpoint, step) written so far: the last is named if the run must stop

    def save(self, *names: str) -> None:
        """Log the updates since the last log line (so that every checkpoint's history covers every update),
        then write the checkpoint under each name in the output folder, atomically (rank 0 only)."""
        self.log.flush(self.progress, self.scaler.get_scale())
        self.clock.tick()  # the checkpoint's training time includes the validation just done
        if self.ddp.is_main:
            save_run(self.out, names, self.model, self.optimizer, self.scheduler, self.scaler, self.progress,
                     self.args, self.ddp.world_size)
        self.saved.append((self.out / names[0], self.progress.step))
        self.log.restart_clock(self.progress.step)

    def write_log(self) -> None:
        """Log the interval; stop the run when the recent updates were all skipped as non-finite."""
        self.log.write_train(self.progress, self.scaler.get_scale())
        if self.log.nonfinite_streak < MAX_NONFINITE_UPDATES:
            return
        cause = "fp16 overflowed or training diverged" if self.scaler.is_enabled() else "training diverged"
        last = (f"the last good checkpoint is {self.saved[-1][0]} (step {self.saved[-1][1]})" if self.saved
                else "no checkpoint has been saved yet")
        raise UserError(f"The loss or gradients were not finite for {self.log.nonfinite_streak} updates in a "
                        f"row up to step {self.progress.step} ({cause}): {last}; lower --lr, raise "
                        "--warmup-updates or use --precision bf16/fp32, and check the audio.")
