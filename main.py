"""Pre-train wav2vec 1.0 on a folder of audio: one process (CPU or GPU), or many GPUs and nodes with torchrun.

    python main.py --demo            # synthesise a small corpus, pre-train on it (1-3 min on 2 cores)
    python main.py --data-dir DIR --precision bf16
    torchrun --nproc_per_node 8 main.py --data-dir DIR --precision bf16

The run is meant to be killed and restarted: <output-dir>/latest.pt is written every epoch, every
--save-every updates and on SIGINT/SIGTERM, to the process or its whole group (the loop finishes its
update first; a signal before the first update stops at once, saving nothing). `--output-dir RUN --resume`
continues with the run's stored flags (those given override them), exactly (same step, schedule, loss
scale, data order and distractors) as long as the flags, --max-updates and --epochs included, stay the
same; with other batch flags or another number of processes it continues after the same crops.

Optimisation: AdamW (0.9, 0.999), the gradient norm clipped to 5. The learning rate warms up linearly from
about 0 over --warmup-updates (50), then follows a cosine down to --min-lr at --max-updates (or at the end
of --epochs), or with --lr-schedule constant stays at --lr (the seed's schedule). fairseq's recipe for
wav2vec large, as flags here (README, *fairseq's large recipe*, lists what still differs): --model
wav2vec_large --loss-type contrastive --segment-length 150000 --batch-size 10 --lr 5e-3 --warmup-updates 500
--min-lr 1e-6 --max-updates 400000 --clip-norm 275 --precision fp16, on as many GPUs as fairseq used.

The default model is the paper's base layout at 128 channels (--model wav2vec_small): on a 2-core CPU it
learned the most per hour of the widths we screened (README, *Choosing the default recipe*); --model wav2vec
is the paper's 512 channels. The default objective is InfoNCE, not the paper's binary loss: from a random
start the binary loss first falls to its collapsed value (every score equal); at 512 channels it sat there
for about 300 updates without warm-up and was heading there with one, while InfoNCE with a warm-up learned
from the first updates (README, *Collapse* and *Does pre-training help?*).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import (
    DEFAULT_CACHE_DIR,
    PACKED_INDEX,
    SAMPLE_RATE,
    CropDataset,
    EpochSampler,
    PackedCropDataset,
    build_manifest,
    default_num_workers,
    make_demo_corpus,
    make_loader,
    prepare_packed_corpus,
    split_manifest,
)
from model import PRESETS, UserError, Wav2Vec, Wav2VecConfig, sample_cross_distractors, sample_distractors
from utils import (
    PRECISIONS,
    Distributed,
    MetricSums,
    StopRequest,
    add_threads_argument,
    any_rank,
    autocast_context,
    build_optimizer,
    capture_rng_state,
    config_differences,
    configure_backends,
    derived_seed,
    ensure_writable_dir,
    fast_precision,
    fraction,
    load_training_checkpoint,
    lr_lambda,
    main_process_first,
    make_grad_scaler,
    non_negative_float,
    non_negative_int,
    optimizer_step,
    positive_float,
    positive_int,
    prune_numbered_checkpoints,
    resolve_device,
    restore_rng_state,
    run_cli,
    save_checkpoint,
    setup_distributed,
    setup_logging,
    teardown_distributed,
)

log = logging.getLogger(__name__)

DEMO_DIR = Path("data/demo")
# A small model that learns visibly in about a minute on a 2-core CPU; explicit flags override these.
# One thread: on a CPU shared with other jobs, two OpenMP threads that wait for each other made the demo
# 8 times slower (544 s against 66 s).
DEMO_DEFAULTS = dict(data_dir=str(DEMO_DIR), segment_length=16000, batch_size=8, epochs=100,
                     max_updates=400, lr=2e-3, warmup_updates=40, num_workers=0, threads=1, log_every=10,
                     valid_fraction=0.05)
COLLAPSE_UPDATES = 300  # updates at the collapsed loss before the run warns (escapes took 50-300)
# Above this share of an interval's wall time spent waiting for batches, the loader is the bottleneck.
LOADER_BOUND_SHARE = 0.2
MAX_NONFINITE_UPDATES = 20  # this many skipped updates in a row means the run diverged: stop it
VALID_SEED_KEY = 1 << 30  # distractor seeds for validation batches, apart from the training steps'
# What a resumed run cannot change: the model's shape and objective (the weights are for them), and the
# seed (the data order, crops and distractors of the rest of the run follow it).
FIXED_FLAGS = ("model", "channels", "norm", "skip_connections", "num_steps", "num_negatives",
               "cross_negatives", "offset", "loss_type", "seed")


# ----- command line -------------------------------------------------------------------------------

def offset_type(text: str) -> int | str:
    return "auto" if text == "auto" else non_negative_int(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a flag's default only where there is one (not for switches and optional paths)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hidden = action.default is None or action.default is False
        return action.help if hidden else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line, grouped as in --help: data, model, objective, optimisation, speed, checkpoints."""
    parser = argparse.ArgumentParser(
        description="Pre-train wav2vec 1.0 (Schneider et al. 2019) on a folder of unlabeled audio.",
        formatter_class=HelpFormatter,
        epilog="fairseq's wav2vec large recipe (per GPU; README lists what still differs): --model "
               "wav2vec_large --loss-type contrastive --segment-length 150000 --batch-size 10 --lr 5e-3 "
               "--warmup-updates 500 --min-lr 1e-6 --max-updates 400000 --clip-norm 275 --precision fp16. "
               "Multi-GPU: torchrun --nproc_per_node N main.py ... (the batch size is per GPU).")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder of audio files, searched recursively (wav flac mp3 ogg m4a)")
    data.add_argument("--demo", action="store_true",
                      help=f"synthesise a demo corpus into {DEMO_DIR}/ if absent and pre-train a small model "
                           "on it (70 s on a 2-core CPU with bf16 instructions, 2.5 min without); flags "
                           "given explicitly override its settings")
    data.add_argument("--packed-dir",
                      help="decode the corpus once into this folder (16 kHz int16 memmap) and read crops "
                           "from there: faster for compressed or resampled audio")
    data.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                      help="where the manifest (the cached scan of --data-dir) goes; never the data folder")
    data.add_argument("--sample-rate", type=int, default=SAMPLE_RATE,
                      help="the model's rate; audio at other rates is resampled to it: only 16000 is valid")
    data.add_argument("--segment-length", type=positive_int, default=32000,
                      help="crop length in samples (32000 = 2 s at 16 kHz)")
    data.add_argument("--valid-fraction", type=fraction, default=0.05,
                      help="share of the files held out for validation (chosen by a hash of the path)")
    data.add_argument("--use-transforms", action="store_true",
                      help="augment training crops: random time shift, gain and additive noise")
    data.add_argument("--pad-short", action="store_true",
                      help="zero-pad files shorter than one crop instead of skipping them")
    data.add_argument("--num-workers", type=non_negative_int, default=default_num_workers(),
                      help="DataLoader worker processes per training process (0: load in the main process; "
                           "default: the CPUs available less one, at most 4)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(PRESETS), default="wav2vec_small",
                       help="wav2vec_small: the paper's base layout (5 + 9 conv layers) at 128 channels, the "
                            "most learned per CPU-hour we measured (README: Choosing the default recipe); "
                            "wav2vec: the paper's base at 512 channels; wav2vec_large: the released one; "
                            "wav2vec_tiny: 64 channels, per-frame LayerNorm, streams (README: On the device)")
    model.add_argument("--channels", type=positive_int, default=None,
                       help="width of every layer (default: the preset's: 128, 512, 512 or 64)")
    model.add_argument("--norm", choices=("group", "layer"), default=None,
                       help="group: statistics over each crop's channels and time (the paper's; default of "
                            "all presets but wav2vec_tiny); layer: per frame, strictly causal, so the model "
                            "streams")
    model.add_argument("--skip-connections", action=argparse.BooleanOptionalAction, default=None,
                       help="residual connections around the context layers (default: on in every preset; "
                            "without them the binary loss collapses, see README)")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--num-steps", type=positive_int, default=12, help="prediction steps K")
    objective.add_argument("--num-negatives", type=non_negative_int, default=10,
                           help="distractors per target frame, from the same utterance")
    objective.add_argument("--cross-negatives", type=non_negative_int, default=0,
                           help="extra distractors per target frame drawn from the whole batch")
    objective.add_argument("--offset", type=offset_type, default="auto",
                           help="first predicted frame is t + offset; auto = ceil(receptive field / stride) "
                                "= 3, fairseq's; 1 is the paper's z(t+k)")
    objective.add_argument("--loss-type", choices=("contrastive", "infonce"), default="infonce",
                           help="InfoNCE, or the paper's binary contrastive loss (eq. 1), which from a "
                                "random start can spend up to a few hundred updates at its collapsed value")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=100, help="passes over the training crops")
    optim.add_argument("--max-updates", type=positive_int, default=None,
                       help="stop after this many optimizer updates (default: epochs x updates per epoch); "
                            "also the length of the cosine schedule")
    optim.add_argument("--max-minutes", type=positive_float, default=None,
                       help="stop, validate and save once training (validation and checkpoints included) "
                            "has taken this many minutes of wall time, counted across --resume; the cosine "
                            "schedule still follows --max-updates")
    optim.add_argument("--batch-size", type=positive_int, default=8, help="crops per micro-batch and process")
    optim.add_argument("--accumulate-steps", type=positive_int, default=1,
                       help="micro-batches per update: the same update as one batch this many times larger")
    optim.add_argument("--lr", type=positive_float, default=1e-3,
                       help="peak learning rate of AdamW (0.9, 0.999)")
    optim.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                       help="after the warm-up: cosine down to --min-lr at --max-updates, or at the end of "
                            "--epochs without it (fairseq's recipe), or constant (the seed's)")
    optim.add_argument("--warmup-updates", type=non_negative_int, default=50,
                       help="linear warm-up of the learning rate from about 0 over this many updates; "
                            "without it our 512-channel InfoNCE run at lr 1e-3 collapsed within 40 updates")
    optim.add_argument("--min-lr", type=non_negative_float, default=1e-6,
                       help="where the cosine schedule ends (at most --lr)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                       help="decoupled weight decay on conv and projection weights (not norms, biases)")
    optim.add_argument("--clip-norm", type=non_negative_float, default=5.0,
                       help="clip the global gradient norm to this (0: no clipping)")
    optim.add_argument("--seed", type=non_negative_int, default=0,
                       help="seeds the initial weights, data order, crops and distractors")

    speed = parser.add_argument_group("precision & speed")
    speed.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                       help="bf16: autocast, no loss scaling (fast on recent GPUs and on CPUs with AMX); "
                            "fp16: autocast with a dynamic loss scale")
    speed.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                       help="the same as --precision fp16")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow start, faster steps)")
    speed.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add_threads_argument(speed)

    checkpoints = parser.add_argument_group("checkpoints & logging")
    checkpoints.add_argument("--output-dir", default="checkpoints",
                             help="checkpoints, train.log and the TensorBoard run (tensorboard/)")
    checkpoints.add_argument("--resume", action="store_true",
                             help="continue from <output-dir>/latest.pt with the run's own flags; flags "
                                  "given here override them (e.g. --max-updates, --lr), except the model's "
                                  "and --seed")
    checkpoints.add_argument("--save-every", type=non_negative_int, default=1000,
                             help="also write latest.pt and checkpoint_<step>.pt every this many "
                                  "updates (0: off)")
    checkpoints.add_argument("--save-every-minutes", type=positive_float, default=None,
                             help="also write latest.pt and checkpoint_<step>.pt after every this many "
                                  "minutes of training (learning curves against time: add --keep-last 0)")
    checkpoints.add_argument("--keep-last", type=non_negative_int, default=2,
                             help="keep only the newest N checkpoint_<step>.pt files (0: keep all)")
    checkpoints.add_argument("--log-every", type=positive_int, default=20,
                             help="updates between log lines, TensorBoard points and history entries")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; with --demo its defaults apply to every flag not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:  # bf16 where the device computes it in hardware (CUDA, AMX or AVX512-BF16), else fp32
        parser.set_defaults(**DEMO_DEFAULTS, precision=fast_precision(resolve_device(args.device)))
        args = parser.parse_args(argv)
    if args.resume:
        args = with_stored_flags(parser, argv, args)
    if args.data_dir is None:
        raise UserError("Give --data-dir DIR (a folder of audio files to pre-train on), "
                        "or run `python main.py --demo` to try it on a synthetic corpus.")
    if args.sample_rate != SAMPLE_RATE:
        raise UserError(f"--sample-rate must be {SAMPLE_RATE}: wav2vec works on 16 kHz audio and files at "
                        "other rates are resampled to it automatically.")
    check_flags(args)
    return args


def with_stored_flags(parser: argparse.ArgumentParser, argv: list[str] | None,
                      args: argparse.Namespace) -> argparse.Namespace:
    """--resume: the flags the run was trained with (stored in its latest.pt), overridden by those given on
    this command line. A given flag that would change the model or the data order mid-run is refused."""
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
    kept = {key: value for key, value in stored.items() if key in vars(args) and key != "output_dir"}
    return argparse.Namespace(**{**vars(args), **kept, **given})


def flag_text(key: str, value: object) -> str:
    """A flag and its value as on the command line: --channels 64."""
    return f"--{key.replace('_', '-')} {value}"


def check_flags(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags that are valid alone but not together (single values are checked by
    their argparse types): each refusal names the flag and the value that works."""
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine would climb; give a "
                        "--min-lr of at most --lr.")
    config = build_config(args)
    # The objective scores c(t) against z(t + offset + k - 1), k = 1..K, inside one crop.
    offset, steps = config.resolved_offset, config.prediction_steps
    fewest = max(2, offset + 1)  # a target frame at the offset, and another frame to be its distractor
    if args.segment_length < crop_samples(config, fewest):
        raise UserError(f"--segment-length {args.segment_length} is shorter than the smallest crop this "
                        f"model learns from: {crop_samples(config, fewest)} samples (its receptive field of "
                        f"{config.receptive_field} and {fewest - 1} more frames of {config.stride}, as the "
                        f"prediction offset is {offset}); raise --segment-length.")
    frames = (args.segment_length - config.receptive_field) // config.stride + 1
    if offset + steps > frames:
        raise UserError(f"--num-steps {steps} predicts up to frame t + {offset + steps - 1}, but a crop of "
                        f"{args.segment_length} samples has only {frames} frames: raise --segment-length to "
                        f"{crop_samples(config, offset + steps)} or lower --num-steps to {frames - offset}.")


def flag_warnings(args: argparse.Namespace) -> list[str]:
    """Flags that work together but probably not as meant (a short smoke test may want them): warned of."""
    warnings = []
    if args.max_updates is not None and args.warmup_updates > args.max_updates:
        peak = args.lr * lr_lambda(args.lr_schedule, args.warmup_updates, args.max_updates, 1.0)(
            args.max_updates - 1)
        warnings.append(f"--warmup-updates {args.warmup_updates} is longer than --max-updates "
                        f"{args.max_updates}: the learning rate stops at {peak:.2g}, below --lr {args.lr:g}; "
                        "lower --warmup-updates for the whole schedule.")
    return warnings


def crop_samples(config: Wav2VecConfig, frames: int) -> int:
    """The shortest crop in samples from which the encoder makes `frames` frames of z."""
    return config.receptive_field + (frames - 1) * config.stride


def build_config(args: argparse.Namespace) -> Wav2VecConfig:
    """The model configuration, built only from a preset plus the flags that override it."""
    overrides = {name: getattr(args, name) for name in ("norm", "skip_connections")
                 if getattr(args, name) is not None}
    return Wav2VecConfig.preset(args.model, channels=args.channels, prediction_steps=args.num_steps,
                                num_negatives=args.num_negatives, cross_negatives=args.cross_negatives,
                                offset=args.offset, loss_type=args.loss_type, **overrides)


# ----- data ---------------------------------------------------------------------------------------

def ensure_demo_corpus(folder: Path) -> None:
    """Synthesise the demo corpus into `folder` unless it already holds audio."""
    if not any(folder.rglob("*.wav")):
        log.info("Synthesising the demo corpus into %s", folder)
        make_demo_corpus(folder)


def build_loaders(args: argparse.Namespace, ddp: Distributed) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (sharded, shuffled, seeded per epoch) and validation loader (centre crops), or None."""
    with main_process_first(ddp):  # rank 0 writes the manifest cache and packed corpus, the others read them
        if args.demo:
            ensure_demo_corpus(Path(args.data_dir))
        entries = build_manifest(args.data_dir, args.cache_dir)
        if args.packed_dir:
            prepare_packed_corpus(args.data_dir, entries, args.packed_dir)
    train_entries, valid_entries = split_manifest(entries, args.valid_fraction)

    def dataset(entries, train):
        options = dict(segment_length=args.segment_length, train=train, transforms=args.use_transforms,
                       pad_short=args.pad_short, seed=args.seed)
        if args.packed_dir:
            return PackedCropDataset(args.packed_dir, entries=entries, **options)
        return CropDataset(args.data_dir, entries, **options)

    def loader(ds, train):
        sampler = EpochSampler(len(ds), shuffle=train, seed=args.seed, rank=ddp.rank,
                               world_size=ddp.world_size, drop_last=train)
        pin_memory = ddp.device.type == "cuda"
        return make_loader(ds, sampler, args.batch_size, args.num_workers, pin_memory, args.seed)

    train_loader = loader(dataset(train_entries, True), True)
    if len(train_loader) < args.accumulate_steps:
        raise UserError(f"One update needs {args.accumulate_steps} batches of {args.batch_size} crops per "
                        f"process but there are only {len(train_loader)}: lower --batch-size or "
                        "--accumulate-steps, or add audio.")
    if not valid_entries:
        log.warning("No validation files (--valid-fraction %s): no validation loss, no best_model.pt.",
                    args.valid_fraction)
        return train_loader, None
    return train_loader, loader(dataset(valid_entries, False), False)


def next_batch(batches: Iterator[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The next wav (B, L) on `device`, copied asynchronously from pinned memory; None when the epoch ends."""
    wav = next(batches, None)
    return None if wav is None else wav.to(device, non_blocking=True)


def draw_distractors(model: Wav2Vec, batch_size: int, length: int, micro_batches: int,
                     generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(negatives (B, N, T), cross negatives (B, N', T) or None) for each micro-batch of one update, from
    `generator` alone. In-utterance ones are drawn for all micro-batches at once, so k accumulated
    batches of B get exactly the distractors one batch of kB would."""
    cfg, frames, device = model.config, model.num_frames(length), generator.device
    negatives = sample_distractors(micro_batches * batch_size, frames, cfg.num_negatives, device, generator)
    return [(n, sample_cross_distractors(batch_size, frames, cfg.cross_negatives, device, generator)
             if cfg.cross_negatives else None) for n in negatives.split(batch_size)]


# ----- model, optimizer, checkpoints --------------------------------------------------------------

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


def checkpoint_payload(model: Wav2Vec, optimizer, scheduler, scaler, progress: Progress,
                       args: argparse.Namespace, world_size: int) -> dict:
    """Everything --resume needs, as plain types and tensors (loadable with weights_only=True)."""
    return {"config": model.config.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), **asdict(progress), "rng": capture_rng_state(), "args": vars(args),
            "world_size": world_size}


def resume(path: Path, model: Wav2Vec, optimizer, scheduler, scaler, args: argparse.Namespace,
           world_size: int) -> Progress:
    """Restore model, optimizer, schedule, loss scale, RNG and progress from `path`; the peak learning rate
    and the schedule's shape follow the current flags."""
    ckpt = load_training_checkpoint(path)
    differences = config_differences(ckpt["config"], model.config.to_dict())
    if differences:
        hint = (" (runs started before skip connections became the default need --no-skip-connections)"
                if any(d.startswith("skip_connections") for d in differences) else "")
        raise UserError(f"{path} holds a model of another configuration ({'; '.join(differences)}): resume "
                        f"with the flags it was trained with{hint}, or start a new run in another "
                        "--output-dir.")
    saved_args = ckpt["args"]
    changed = [f"{flag_text(k, saved_args[k])} -> {v}" for k, v in sorted(vars(args).items())
               if k in saved_args and saved_args[k] != v and k != "resume"]
    if changed:
        log.info("Flags changed since the checkpoint: %s", ", ".join(changed))
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


@torch.no_grad()
def validate(model: Wav2Vec, loader: DataLoader, autocast, seed: int, ddp: Distributed) -> dict:
    """Mean loss (nats, bits) and accuracy over the validation crops, averaged over ranks. Distractors are
    fixed per batch (a seeded generator), so the numbers compare across epochs."""
    model.eval()
    sums, generator = MetricSums(), torch.Generator(ddp.device)
    for index, wav in enumerate(loader):
        wav = wav.to(ddp.device, non_blocking=True)
        generator.manual_seed(derived_seed(seed, VALID_SEED_KEY, ddp.rank, index))
        [(negatives, cross)] = draw_distractors(model, wav.shape[0], wav.shape[1], 1, generator)
        with autocast:
            loss, metrics = model(wav, negatives, cross)
        sums.add(loss=loss, loss_bits=metrics["loss_bits"], accuracy=metrics["accuracy"])
    model.train()
    return sums.pop_means()


# ----- logging ------------------------------------------------------------------------------------

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
        self.history, self.is_main, self.device = progress.history, ddp.is_main, ddp.device
        self.collapse = collapse
        self.loader_remedy, self.loader_warned, self.intervals = loader_remedy, False, 0
        self.audio_per_update = audio_per_update  # seconds of audio in one update, over all ranks
        self.writer = SummaryWriter(output_dir / "tensorboard", purge_step=progress.step + 1) \
            if ddp.is_main else None
        self.bar = tqdm(total=total_updates, initial=progress.step, unit="update", dynamic_ncols=True,
                        disable=not ddp.is_main)
        self.micro_batches, self.updates = MetricSums(), MetricSums()
        self.streak = torch.zeros((), device=ddp.device)  # non-finite updates in a row, on the device
        self.nonfinite_streak, self.skipped = 0, 0
        self.restart_clock(progress.step)

    def restart_clock(self, step: int) -> None:
        """Throughput and the data wait count from here, leaving out validation and checkpoint time."""
        self.clock_step, self.clock, self.data_wait = step, time.perf_counter(), 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Time the loop spent blocked on the loader for the next batch (this rank's)."""
        self.data_wait += seconds

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

    def add_update(self, grad_norm: torch.Tensor, nonfinite: torch.Tensor) -> None:
        finite = (~nonfinite).float()
        self.updates.add(grad_norm=torch.where(nonfinite, 0.0, grad_norm), finite=finite)
        self.streak = (self.streak + 1) * (1 - finite)
        self.bar.update()

    def write_train(self, step: int, epoch: int, lr: float, loss_scale: float) -> None:
        """Average the interval over ranks (the loop's only host sync) and write it everywhere."""
        updates_done = self.updates.count
        means, updates = self.micro_batches.pop_means(), self.updates.pop_means()
        self.nonfinite_streak = int(self.streak.item())
        self.skipped += round((1 - updates["finite"]) * updates_done)
        seconds = max(1e-9, time.perf_counter() - self.clock)
        rate = (step - self.clock_step) * self.audio_per_update / seconds
        wait_share = min(1.0, self.data_wait / seconds)
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
        self.next_save = self.every * (self.before // self.every + 1) if self.every < math.inf else math.inf

    def tick(self) -> None:
        """Bring progress.train_seconds up to now."""
        self.progress.train_seconds = self.before + time.perf_counter() - self.start

    @property
    def out_of_time(self) -> bool:
        """Whether --max-minutes of training time have passed (as of the last tick)."""
        return self.progress.train_seconds >= self.limit

    def save_due(self) -> bool:
        """True when a --save-every-minutes boundary has passed since the last call (once for several)."""
        if self.progress.train_seconds < self.next_save:
            return False
        self.next_save = self.every * (self.progress.train_seconds // self.every + 1)
        return True


# ----- training -----------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run: the model (plain and as called), its optimizer, schedule, loss scale, data and
    progress, with the steps the loop takes: update, log, validate, save."""

    args: argparse.Namespace
    ddp: Distributed
    out: Path
    model: Wav2Vec  # the plain module: checkpoints, validation and distractor shapes use it
    trained: torch.nn.Module  # what the loop calls: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: AbstractContextManager
    train_loader: DataLoader
    valid_loader: DataLoader | None
    progress: Progress
    total_updates: int
    log: TrainingLog
    saved: list[tuple[Path, int]]  # (checkpoint, step) written so far: the last is named if the run must stop
    clock: TrainingClock
    last_lr: float = 0.0

    def __post_init__(self) -> None:
        self.generator = torch.Generator(self.ddp.device)

    def next_batch(self, batches: Iterator[torch.Tensor]) -> torch.Tensor | None:
        """next_batch, timing how long the loop waits for the loader (the data-wait share in the log)."""
        start = time.perf_counter()
        wav = next_batch(batches, self.ddp.device)
        self.log.add_data_wait(time.perf_counter() - start)
        return wav

    def update(self, wav: torch.Tensor, batches: Iterator[torch.Tensor]) -> torch.Tensor | None:
        """One optimizer update over --accumulate-steps micro-batches, the first being wav (B, L); returns
        the batch that follows them, loaded while the device computed."""
        args, ddp, accumulate = self.args, self.ddp, self.args.accumulate_steps
        # Distractors depend on (seed, rank, step) only: a resumed run draws the same ones.
        self.generator.manual_seed(derived_seed(args.seed, ddp.rank, self.progress.step))
        distractors = draw_distractors(self.model, args.batch_size, args.segment_length, accumulate,
                                       self.generator)
        loss_sum = torch.zeros((), device=ddp.device)
        for micro, (negatives, cross) in enumerate(distractors):
            # DDP all-reduces the gradients once per update, in the backward pass of the last micro-batch.
            no_sync = ddp.enabled and micro < accumulate - 1
            with self.trained.no_sync() if no_sync else nullcontext():
                with self.autocast:
                    loss, metrics = self.trained(wav, negatives, cross)
                wav = self.next_batch(batches)  # load the next batch while the device computes
                self.scaler.scale(loss / accumulate).backward()
            loss_sum += loss.detach()
            self.log.add_micro_batch(loss.detach(), metrics)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, nonfinite = optimizer_step(self.model, self.optimizer, self.scaler, args.clip_norm,
                                              loss_sum)
        self.scheduler.step()
        self.log.add_update(grad_norm, nonfinite)
        self.progress.step += 1
        self.progress.batch_in_epoch += 1
        self.progress.crops_in_epoch += args.batch_size * accumulate * ddp.world_size
        return wav

    def vote(self, stop: StopRequest) -> tuple[bool, bool]:
        """(stop requested, out of time), true on every rank when true on any: all ranks leave after the same
        update even when a signal reaches one of them only (a node's preemption)."""
        signalled, out_of_time = any_rank((stop.requested, self.clock.out_of_time), self.ddp)
        if signalled and not stop.requested:
            stop.signal_name = "a signal to another rank"
        return signalled, out_of_time

    def write_log(self) -> None:
        """Log the interval; stop the run when the recent updates were all skipped as non-finite."""
        self.log.write_train(self.progress.step, self.progress.epoch, self.last_lr, self.scaler.get_scale())
        if self.log.nonfinite_streak >= MAX_NONFINITE_UPDATES:
            raise UserError(self.diverged_message())

    def flush_log(self) -> None:
        """Log the updates since the last log line, so that every checkpoint's history covers every update
        (a run shorter than --log-every still has one: vis.py's loss curves). Never raises: the save
        that follows must happen; the non-finite streak is checked at the next log line."""
        if self.log.updates.count:
            progress = self.progress
            self.log.write_train(progress.step, progress.epoch, self.last_lr, self.scaler.get_scale())

    def save(self, *names: str) -> None:
        """Write the checkpoint under each name in the output folder, atomically (rank 0 only)."""
        self.flush_log()
        self.clock.tick()  # the checkpoint's training time includes the validation just done
        if self.ddp.is_main:
            payload = checkpoint_payload(self.model, self.optimizer, self.scheduler, self.scaler,
                                         self.progress, self.args, self.ddp.world_size)
            for name in names:
                save_checkpoint(payload, self.out / name)
            prune_numbered_checkpoints(self.out, self.args.keep_last)
            log.info("Saved %s at step %d.", ", ".join(names), self.progress.step)
        self.saved.append((self.out / names[0], self.progress.step))
        self.log.restart_clock(self.progress.step)

    def validate_and_save(self, epoch_done: bool) -> None:
        """Validate, keep best_model.pt for the lowest validation loss, and save latest.pt."""
        self.flush_log()  # before validation, so that its time does not count as training throughput
        names, progress = ["latest.pt"], self.progress
        if self.valid_loader is not None:
            means = validate(self.model, self.valid_loader, self.autocast, self.args.seed, self.ddp)
            is_best = means["loss"] < progress.best_valid_loss
            if is_best:
                progress.best_valid_loss = means["loss"]
                names.append("best_model.pt")
            self.log.write_valid(progress.step, progress.epoch, means, is_best)
        if epoch_done:  # the checkpoint resumes at the start of the next epoch
            progress.epoch, progress.batch_in_epoch, progress.crops_in_epoch = progress.epoch + 1, 0, 0
            if self.ddp.is_main and self.train_loader.dataset.num_read_errors:
                log.warning("%d unreadable files skipped so far.", self.train_loader.dataset.num_read_errors)
        self.save(*names)

    def diverged_message(self) -> str:
        """Why the run stops after many non-finite updates, and where to restart from."""
        fp16 = self.args.precision == "fp16"
        cause = "fp16 overflowed or training diverged" if fp16 else "training diverged"
        last = (f"the last good checkpoint is {self.saved[-1][0]} (step {self.saved[-1][1]})" if self.saved
                else "no checkpoint has been saved yet")
        return (f"The loss or gradients were not finite for {self.log.nonfinite_streak} updates in a row up "
                f"to step {self.progress.step} ({cause}): {last}; lower --lr, raise --warmup-updates or use "
                "--precision bf16/fp32, and check the audio.")


def prepare_output_dir(args: argparse.Namespace, ddp: Distributed) -> Path:
    """The output folder, checked writable, with train.log; refuses to overwrite a run without --resume."""
    out = Path(args.output_dir)
    if ddp.is_main:
        ensure_writable_dir(out)
        if args.packed_dir and not (Path(args.packed_dir) / PACKED_INDEX).is_file():  # it will be packed
            ensure_writable_dir(Path(args.packed_dir), "--packed-dir", "the packed-corpus folder")
    setup_logging(out / "train.log" if ddp.is_main else None,
                  logging.INFO if ddp.is_main else logging.WARNING)
    if ddp.is_main and not args.resume and (out / "latest.pt").exists():
        raise UserError(f"{out} already holds a run (latest.pt): continue it with --resume, or start a new "
                        "one with another --output-dir.")
    return out


def loader_remedy(args: argparse.Namespace) -> str:
    """What to change when the loader cannot keep up, given the run's flags."""
    remedies = [] if args.packed_dir else ["--packed-dir DIR (decode the corpus once, then slice it)"]
    remedies.append(f"more --num-workers (now {args.num_workers}; about one per 2,600 audio-s/s decoded on "
                    "the fly)")
    return f"Use {' and '.join(remedies)}, or a larger --batch-size per update."


def setup_run(args: argparse.Namespace, ddp: Distributed) -> Run:
    """Data, model, optimizer, schedule and loss scale, restored from latest.pt with --resume."""
    out = prepare_output_dir(args, ddp)
    for warning in flag_warnings(args) if ddp.is_main else []:
        log.warning(warning)
    configure_backends(ddp.device, args.threads)
    train_loader, valid_loader = build_loaders(args, ddp)
    updates_per_epoch = len(train_loader) // args.accumulate_steps
    total_updates = min(args.max_updates or math.inf, args.epochs * updates_per_epoch)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Wav2Vec(build_config(args)).to(ddp.device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    schedule = lr_lambda(args.lr_schedule, args.warmup_updates, total_updates, args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = make_grad_scaler(ddp.device, args.precision)
    progress = resume(out / "latest.pt", model, optimizer, scheduler, scaler, args, ddp.world_size) \
        if args.resume else Progress()
    crops = train_loader.sampler.num_items
    if progress.crops_in_epoch and progress.epoch_crops not in (0, crops):  # 0: saved before it was kept
        log.warning("Epoch %d's order had %d crops when it was saved and has %d now (the files changed, or "
                    "--data-dir, --valid-fraction, --segment-length or --pad-short), so where it stopped "
                    "cannot be found: it ends here, and epoch %d starts.", progress.epoch,
                    progress.epoch_crops, crops, progress.epoch + 1)
        progress.crops_in_epoch = crops  # the loop finds the epoch done: it validates, then starts the next
    progress.epoch_crops = crops
    trained = torch.compile(model) if args.compile else model
    if ddp.enabled:
        device_ids = [ddp.device.index] if ddp.device.type == "cuda" else None
        trained = DistributedDataParallel(trained, device_ids=device_ids)

    log.info("%s, %s parameters, %s on %s x %d | %d updates per epoch of %d x %d x %d crops of %d samples; "
             "%d updates in all", args.model, f"{model.num_parameters():,}", args.precision, ddp.device,
             ddp.world_size, updates_per_epoch, args.batch_size, args.accumulate_steps, ddp.world_size,
             args.segment_length, total_updates)
    audio_per_update = (args.batch_size * args.accumulate_steps * ddp.world_size * args.segment_length
                        / SAMPLE_RATE)
    training_log = TrainingLog(out, progress, total_updates, audio_per_update, CollapseWatch(model), ddp,
                               loader_remedy(args))
    saved = [(out / "latest.pt", progress.step)] if args.resume else []
    clock = TrainingClock(progress, args.max_minutes, args.save_every_minutes)
    return Run(args, ddp, out, model, trained, optimizer, scheduler, scaler,
               autocast_context(ddp.device, args.precision), train_loader, valid_loader, progress,
               total_updates, training_log, saved, clock)


def train_loop(run: Run, stop: StopRequest) -> None:
    """Updates, epoch after epoch, until --max-updates, --epochs, --max-minutes or a signal; validation and
    checkpoints after every epoch, every --save-every updates (or minutes) and on the way out. Every rank
    takes the same branches: they follow votes, never one rank's own flags."""
    args, progress, clock = run.args, run.progress, run.clock
    start_step = progress.step
    signalled, out_of_time = run.vote(stop)
    while progress.step < run.total_updates and not (signalled or out_of_time):
        # An epoch continues after the crops it has trained on, whatever the batch flags or process count.
        run.train_loader.sampler.set_epoch(progress.epoch, start=progress.crops_in_epoch)
        left = len(run.train_loader) // args.accumulate_steps  # updates left in this epoch
        if left:
            batches = iter(run.train_loader)
            wav = run.next_batch(batches)
        while left and progress.step < run.total_updates:
            wav = run.update(wav, batches)
            left -= 1
            clock.tick()
            if progress.step % args.log_every == 0:
                run.write_log()
            time_due = clock.save_due()  # called every update, so that a step-triggered save resets it too
            if time_due or (args.save_every and progress.step % args.save_every == 0):
                run.save("latest.pt", f"checkpoint_{progress.step}.pt")
            signalled, out_of_time = run.vote(stop)
            if signalled or out_of_time:
                break
        if not left and not signalled:  # the epoch's end; after a signal, the resumed run validates it
            run.validate_and_save(epoch_done=True)
            signalled, out_of_time = run.vote(stop)  # validation counts too

    if signalled:
        if not run.saved or run.saved[-1][1] != progress.step:  # unless the epoch's end has just saved it
            run.save("latest.pt")
        log.info("Stopped by %s at step %d; continue with --resume.", stop.signal_name, progress.step)
        return
    if progress.batch_in_epoch and progress.step > start_step:  # ended mid-epoch: --max-updates or -minutes
        run.validate_and_save(epoch_done=False)
    if out_of_time:
        log.info("The --max-minutes budget (%g) is used up after %.1f minutes of training.", args.max_minutes,
                 progress.train_seconds / 60)
    log.info("Done: %d updates; best validation loss %.4f nats; checkpoints in %s", progress.step,
             progress.best_valid_loss, run.out)


def train(args: argparse.Namespace) -> Path:
    """Pre-train as the flags say; under torchrun every rank calls this. Returns the output folder."""
    ddp = setup_distributed(args.device)
    try:
        with StopRequest() as stop, logging_redirect_tqdm():
            run = setup_run(args, ddp)  # a signal before the first update stops at once: nothing to save
            stop.graceful = True  # from here one finishes the update, saves and stops
            try:
                train_loop(run, stop)
            finally:
                run.log.close()
        return run.out
    finally:
        teardown_distributed()


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
