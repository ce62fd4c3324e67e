"""Pre-train wav2vec 1.0 on a folder of audio: one process (CPU or GPU), or many GPUs and nodes with torchrun.

    python main.py --demo                 # a synthetic corpus and a small model: 1-3 minutes on 2 cores
    python main.py --data-dir DIR         # the default recipe (wav2vec_small, InfoNCE, cosine)
    torchrun --nproc_per_node 8 main.py --data-dir DIR --model wav2vec

The file reads top to bottom: the command line, the data, the model and optimizer, one update, validation,
the loop. The machinery below it (processes, checkpoints, the log) is in training.py; docs/TRAINING.md says
how resuming, stopping, budgets and torchrun behave. In short: <output-dir>/latest.pt is written every
epoch, every --save-every updates (or minutes) and on SIGINT/SIGTERM (the update finishes first), and
`--output-dir RUN --resume` continues exactly where it stopped, with the run's stored flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data import (
    DEFAULT_CACHE_DIR,
    SAMPLE_RATE,
    build_manifest,
    crop_dataset,
    epoch_loader,
    prepare_packed_corpus,
    split_manifest,
)
from demo import DEMO_DIR, ensure_demo_corpus
from fastpath import fast_or_plain
from model import PRESETS, Wav2Vec, Wav2VecConfig
from training import (
    CollapseWatch,
    Distributed,
    MetricSums,
    Progress,
    Run,
    StopRequest,
    TrainingClock,
    TrainingLog,
    build_optimizer,
    derived_seed,
    lr_lambda,
    main_process_first,
    make_grad_scaler,
    optimizer_step,
    prepare_output_dir,
    resume,
    setup_distributed,
    start_run_log,
    teardown_distributed,
    vote,
    with_stored_flags,
)
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_precision_argument,
    add_progress_argument,
    add_renamed,
    add_threads_argument,
    autocast_context,
    configure_backends,
    default_num_workers,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_precision,
    run_cli,
)

log = logging.getLogger(__name__)

DEMO_OUTPUT = Path("checkpoints/demo")
# A small model that learns visibly in about a minute on a 2-core CPU; explicit flags override these.
# One thread: on a CPU shared with other jobs, two OpenMP threads that wait for each other made the demo
# 8 times slower (544 s against 66 s).
DEMO_DEFAULTS = dict(data_dir=str(DEMO_DIR), output_dir=str(DEMO_OUTPUT), segment_length=16000, batch_size=8,
                     epochs=100, max_updates=400, lr=2e-3, warmup_updates=40, num_workers=0, threads=1,
                     log_every=10, valid_fraction=0.05)
VALID_SEED_KEY = 1 << 30  # distractor seeds for validation batches, apart from the training steps'


# ----- command line -------------------------------------------------------------------------------

def offset_type(text: str) -> int | str:
    return "auto" if text == "auto" else non_negative_int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line, grouped as in --help: data, model, objective, optimisation, speed, checkpoints."""
    parser = argparse.ArgumentParser(
        description="Pre-train wav2vec 1.0 (Schneider et al. 2019) on a folder of unlabeled audio.",
        formatter_class=HelpFormatter,
        epilog="fairseq's wav2vec large recipe (per GPU; docs/TRAINING.md lists what still differs): --model "
               "wav2vec_large --loss-type contrastive --segment-length 150000 --batch-size 10 --lr 5e-3 "
               "--warmup-updates 500 --min-lr 1e-6 --max-updates 400000 --clip-norm 275 --precision fp16. "
               "Multi-GPU: torchrun --nproc_per_node N main.py ... (the batch size is per GPU).")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="folder of audio files, searched recursively (wav flac mp3 ogg m4a)")
    data.add_argument("--demo", action="store_true",
                      help=f"pre-train a small model into {DEMO_OUTPUT}/ on a corpus synthesised into "
                           f"{DEMO_DIR}/ (a re-run starts over, --resume continues); explicit flags override "
                           "its settings")
    data.add_argument("--packed-dir", help="decode the corpus once into this folder (16 kHz int16) and read "
                                           "crops from there: faster for compressed or resampled audio")
    data.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                      help="where the manifest (the cached scan of --data-dir) goes; never the data folder")
    data.add_argument("--segment-length", type=positive_int, default=32000,
                      help="crop length in samples (32000 = 2 s at 16 kHz)")
    data.add_argument("--valid-fraction", type=fraction, default=0.05,
                      help="share of the files held out for validation (chosen by a hash of the path)")
    data.add_argument("--augment", action="store_true",
                      help="augment training crops: random time shift, gain and additive noise")
    add_renamed(data, "--use-transforms", "--augment", switch=True)
    data.add_argument("--sample-rate", type=int, default=None, help=argparse.SUPPRESS)  # deprecated: 16 kHz
    data.add_argument("--pad-short", action="store_true",
                      help="zero-pad files shorter than one crop instead of skipping them")
    data.add_argument("--num-workers", type=non_negative_int, default=default_num_workers(),
                      help="DataLoader worker processes per training process (0: load in the main process; "
                           "default: the CPUs available less one, at most 4)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(PRESETS), default="wav2vec_small",
                       help="wav2vec_small: the paper's base layout at 128 channels, the most learned per "
                            "CPU-hour we measured; wav2vec: the paper's base (512 channels); wav2vec_large: "
                            "the released one; wav2vec_tiny: 64 channels, per-frame LayerNorm, streams")
    model.add_argument("--channels", type=positive_int, default=None,
                       help="width of every layer (default: the preset's: 128, 512, 512 or 64)")
    model.add_argument("--norm", choices=("group", "layer"), default=None,
                       help="group: over each crop's channels and time (the paper's); layer: per frame, "
                            "strictly causal, so the model streams (default: the preset's)")
    model.add_argument("--skip-connections", action=argparse.BooleanOptionalAction, default=None,
                       help="residual connections around the context layers (default: on in every preset; "
                            "without them the binary loss collapses, see docs/DESIGN.md)")

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
                       help="stop, validate and save after this many minutes of training (counted across "
                            "--resume); the cosine schedule still follows --max-updates")
    optim.add_argument("--batch-size", type=positive_int, default=8, help="crops per micro-batch and process")
    optim.add_argument("--accumulate-steps", type=positive_int, default=1,
                       help="micro-batches per update: the same update as one batch this many times larger")
    optim.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate of AdamW")
    optim.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                       help="after the warm-up: cosine down to --min-lr at --max-updates, or at the end of "
                            "--epochs without it (fairseq's recipe), or constant (the seed's)")
    optim.add_argument("--warmup-updates", type=non_negative_int, default=50,
                       help="linear warm-up of the learning rate from about 0 over this many updates")
    optim.add_argument("--min-lr", type=non_negative_float, default=1e-6,
                       help="where the cosine schedule ends (at most --lr)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.0,
                       help="decoupled weight decay on conv and projection weights (not norms, biases)")
    optim.add_argument("--clip-norm", type=non_negative_float, default=5.0,
                       help="clip the global gradient norm to this (0: no clipping)")
    optim.add_argument("--seed", type=non_negative_int, default=0,
                       help="seeds the initial weights, data order, crops and distractors")

    speed = parser.add_argument_group("precision & speed")
    add_precision_argument(speed)
    speed.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                       help="the same as --precision fp16")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the model (slow start, faster steps)")
    add_device_argument(speed)
    add_threads_argument(speed)

    checkpoints = parser.add_argument_group("checkpoints & logging")
    checkpoints.add_argument("--output-dir", default="checkpoints",
                             help="checkpoints, train.log and the TensorBoard run (tensorboard/)")
    checkpoints.add_argument("--resume", action="store_true",
                             help="continue from <output-dir>/latest.pt with the run's flags; flags given "
                                  "here override them, except the model's and --seed")
    checkpoints.add_argument("--save-every", type=non_negative_int, default=1000,
                             help="also write latest.pt and checkpoint_<step>.pt every this many updates")
    checkpoints.add_argument("--save-every-minutes", type=positive_float, default=None,
                             help="also write latest.pt and checkpoint_<step>.pt after every this many "
                                  "minutes of training (learning curves against time: add --keep-last 0)")
    checkpoints.add_argument("--keep-last", type=non_negative_int, default=2,
                             help="keep only the newest N checkpoint_<step>.pt files (0: keep all)")
    checkpoints.add_argument("--log-every", type=positive_int, default=20,
                             help="updates between log lines, TensorBoard points and history entries")
    add_progress_argument(checkpoints)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; with --demo its defaults apply to every flag not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.resume:
        args = with_stored_flags(parser, argv, args)
    if args.data_dir is None:
        raise UserError("Give --data-dir DIR (a folder of audio files to pre-train on), "
                        "or run `python main.py --demo` to try it on a synthetic corpus.")
    if args.sample_rate not in (None, SAMPLE_RATE):
        raise UserError(f"--sample-rate must be {SAMPLE_RATE}: wav2vec works on 16 kHz audio and files at "
                        "other rates are resampled to it automatically (the flag goes in the next release).")
    check_flags(args)
    return args


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
    if args.segment_length < config.samples_for(fewest):
        raise UserError(f"--segment-length {args.segment_length} is shorter than the smallest crop this "
                        f"model learns from: {config.samples_for(fewest)} samples (its receptive field of "
                        f"{config.receptive_field} and {fewest - 1} more frames of {config.stride}, as the "
                        f"prediction offset is {offset}); raise --segment-length.")
    frames = (args.segment_length - config.receptive_field) // config.stride + 1
    if offset + steps > frames:
        raise UserError(f"--num-steps {steps} predicts up to frame t + {offset + steps - 1}, but a crop of "
                        f"{args.segment_length} samples has only {frames} frames: raise --segment-length to "
                        f"{config.samples_for(offset + steps)} or lower --num-steps to {frames - offset}.")


def flag_warnings(args: argparse.Namespace) -> list[str]:
    """Flags that work together but probably not as meant (a short smoke test may want them): warned of."""
    if args.max_updates is None or args.warmup_updates <= args.max_updates:
        return []
    peak = args.lr * lr_lambda(args.lr_schedule, args.warmup_updates, args.max_updates, 1.0)(
        args.max_updates - 1)
    return [f"--warmup-updates {args.warmup_updates} is longer than --max-updates {args.max_updates}: the "
            f"learning rate stops at {peak:.2g}, below --lr {args.lr:g}; lower --warmup-updates for the "
            "whole schedule."]


def build_config(args: argparse.Namespace) -> Wav2VecConfig:
    """The model configuration, built only from a preset plus the flags that override it."""
    overrides = {name: getattr(args, name) for name in ("norm", "skip_connections")
                 if getattr(args, name) is not None}
    return Wav2VecConfig.preset(args.model, channels=args.channels, prediction_steps=args.num_steps,
                                num_negatives=args.num_negatives, cross_negatives=args.cross_negatives,
                                offset=args.offset, loss_type=args.loss_type, **overrides)


# ----- data ---------------------------------------------------------------------------------------

def build_loaders(args: argparse.Namespace, ddp: Distributed) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (sharded, shuffled, seeded per epoch) and validation loader (centre crops), or None."""
    with main_process_first(ddp):  # rank 0 writes the manifest cache and packed corpus, the others read them
        if args.demo:
            ensure_demo_corpus(Path(args.data_dir))
        entries = build_manifest(args.data_dir, args.cache_dir)
        if args.packed_dir:
            prepare_packed_corpus(args.data_dir, entries, args.packed_dir)
    train_entries, valid_entries = split_manifest(entries, args.valid_fraction)

    def loader(entries, train: bool) -> DataLoader:
        dataset = crop_dataset(args.data_dir, entries, args.packed_dir, segment_length=args.segment_length,
                               train=train, transforms=args.augment, pad_short=args.pad_short, seed=args.seed)
        return epoch_loader(dataset, args.batch_size, args.num_workers, args.seed, ddp.rank, ddp.world_size,
                            pin_memory=ddp.device.type == "cuda")

    train_loader = loader(train_entries, True)
    if len(train_loader) < args.accumulate_steps:
        raise UserError(f"One update needs {args.accumulate_steps} batches of {args.batch_size} crops per "
                        f"process but there are only {len(train_loader)}: lower --batch-size or "
                        "--accumulate-steps, or add audio.")
    if not valid_entries:
        log.warning("No validation files (--valid-fraction %s): no validation loss, no best_model.pt.",
                    args.valid_fraction)
        return train_loader, None
    return train_loader, loader(valid_entries, False)


def loader_remedy(args: argparse.Namespace) -> str:
    """What to change when the loader cannot keep up, given the run's flags."""
    remedies = [] if args.packed_dir else ["--packed-dir DIR (decode the corpus once, then slice it)"]
    remedies.append(f"more --num-workers (now {args.num_workers}; about one per 2,600 audio-s/s decoded on "
                    "the fly)")
    return f"Use {' and '.join(remedies)}, or a larger --batch-size per update."


# ----- the run: model, optimizer, schedule, loss scale --------------------------------------------

def setup_run(args: argparse.Namespace, ddp: Distributed) -> Run:
    """Data, model, optimizer, schedule and loss scale, restored from latest.pt with --resume."""
    out = prepare_output_dir(args, ddp.is_main)
    configure_backends(ddp.device, args.threads)
    train_loader, valid_loader = build_loaders(args, ddp)
    start_run_log(out, ddp.is_main)  # the data is usable: now the output folder is made
    for warning in flag_warnings(args) if ddp.is_main else []:
        log.warning(warning)
    updates_per_epoch = len(train_loader) // args.accumulate_steps
    total_updates = min(args.max_updates or math.inf, args.epochs * updates_per_epoch)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Wav2Vec(build_config(args)).to(ddp.device)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    schedule = lr_lambda(args.lr_schedule, args.warmup_updates, total_updates, args.min_lr / args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    precision = resolve_precision(args.precision, ddp.device)
    scaler = make_grad_scaler(ddp.device, precision)
    progress = resume(out / "latest.pt", model, optimizer, scheduler, scaler, args, ddp) \
        if args.resume else Progress()
    progress.check_epoch(train_loader.sampler.num_items)
    # The time-major CPU step (fastpath.py), or model.py's own path when compiled (measured faster, #27);
    # then DDP, then compile: DDP's hooks overlap the all_reduce with the compiled backward.
    trained = model if args.compile else fast_or_plain(model)
    if ddp.enabled:
        trained = DistributedDataParallel(trained, device_ids=[ddp.device.index] if ddp.device.type == "cuda"
                                          else None)
    trained = torch.compile(trained) if args.compile else trained

    log.info("%s, %s parameters, %s on %s x %d | %d updates per epoch of %d x %d x %d crops of %d samples; "
             "%d updates in all", args.model, f"{model.num_parameters():,}", precision, ddp.device,
             ddp.world_size, updates_per_epoch, args.batch_size, args.accumulate_steps, ddp.world_size,
             args.segment_length, total_updates)
    audio_per_update = (args.batch_size * args.accumulate_steps * ddp.world_size * args.segment_length
                        / SAMPLE_RATE)
    training_log = TrainingLog(out, progress, total_updates, audio_per_update, CollapseWatch(model), ddp,
                               loader_remedy(args))
    return Run(args, ddp, out, model, trained, optimizer, scheduler, scaler,
               autocast_context(ddp.device, precision), train_loader, valid_loader, progress, total_updates,
               training_log,
               TrainingClock(progress, args.max_minutes, args.save_every_minutes),
               [(out / "latest.pt", progress.step)] if args.resume else [])


# ----- one update, validation, saving -------------------------------------------------------------

def next_batch(run: Run, batches: Iterator[torch.Tensor]) -> torch.Tensor | None:
    """The next wav (B, L) on the device (copied asynchronously from pinned memory), None when the epoch
    ends; the time the loop waited for it goes into the log's data-wait share."""
    start = time.perf_counter()
    wav = next(batches, None)
    run.log.add_data_wait(time.perf_counter() - start)
    return None if wav is None else wav.to(run.ddp.device, non_blocking=True)


def update(run: Run, wav: torch.Tensor, batches: Iterator[torch.Tensor],
           generator: torch.Generator) -> torch.Tensor | None:
    """One optimizer update over --accumulate-steps micro-batches, the first being wav (B, L); returns the
    batch that follows them, loaded while the device computed."""
    args, ddp, accumulate = run.args, run.ddp, run.args.accumulate_steps
    # Distractors depend on (seed, rank, step) only: a resumed run draws the same ones.
    generator.manual_seed(derived_seed(args.seed, ddp.rank, run.progress.step))
    distractors = run.model.draw_distractors(args.batch_size, args.segment_length, accumulate, generator)
    loss_sum = torch.zeros((), device=ddp.device)
    for micro, (negatives, cross) in enumerate(distractors):
        # DDP all-reduces the gradients once per update, in the backward pass of the last micro-batch.
        no_sync = ddp.enabled and micro < accumulate - 1
        with run.trained.no_sync() if no_sync else nullcontext():
            with run.autocast:
                loss, metrics = run.trained(wav, negatives, cross)
            wav = next_batch(run, batches)  # load the next batch while the device computes
            run.scaler.scale(loss / accumulate).backward()
        loss_sum += loss.detach()
        run.log.add_micro_batch(loss.detach(), metrics)
    lr = run.optimizer.param_groups[0]["lr"]
    grad_norm, nonfinite = optimizer_step(run.model, run.optimizer, run.scaler, args.clip_norm, loss_sum)
    run.scheduler.step()
    run.log.add_update(grad_norm, nonfinite, lr)
    run.progress.advance(args.batch_size * accumulate * ddp.world_size)
    return wav


@torch.no_grad()
def validate(run: Run) -> dict:
    """Mean loss (nats, bits) and accuracy over the validation crops, averaged over ranks. Distractors are
    fixed per batch (a seeded generator), so the numbers compare across epochs."""
    model, ddp = run.model.eval(), run.ddp
    sums, generator = MetricSums(), torch.Generator(ddp.device)
    for index, wav in enumerate(run.valid_loader):
        wav = wav.to(ddp.device, non_blocking=True)
        generator.manual_seed(derived_seed(run.args.seed, VALID_SEED_KEY, ddp.rank, index))
        [(negatives, cross)] = model.draw_distractors(wav.shape[0], wav.shape[1], 1, generator)
        with run.autocast:
            loss, metrics = model(wav, negatives, cross)
        sums.add(loss=loss, loss_bits=metrics["loss_bits"], accuracy=metrics["accuracy"])
    model.train()
    return sums.pop_means()


def validate_and_save(run: Run, epoch_done: bool) -> None:
    """Validate, keep best_model.pt for the lowest validation loss, and save latest.pt."""
    run.log.flush(run.progress, run.scaler.get_scale())  # validation time is not training throughput
    names, progress = ["latest.pt"], run.progress
    if run.valid_loader is not None:
        means = validate(run)
        is_best = means["loss"] < progress.best_valid_loss
        if is_best:
            progress.best_valid_loss = means["loss"]
            names.append("best_model.pt")
        run.log.write_valid(progress.step, progress.epoch, means, is_best)
    if epoch_done:  # the checkpoint resumes at the start of the next epoch
        progress.next_epoch()
        if run.ddp.is_main and run.train_loader.dataset.num_read_errors:
            log.warning("%d unreadable files skipped so far.", run.train_loader.dataset.num_read_errors)
    run.save(*names)


# ----- the loop -----------------------------------------------------------------------------------

def train_loop(run: Run, stop: StopRequest) -> None:
    """Updates, epoch after epoch, until --max-updates, --epochs, --max-minutes or a signal; validation and
    checkpoints after every epoch, every --save-every updates (or minutes) and on the way out. Every rank
    takes the same branches: they follow votes, never one rank's own flags."""
    args, progress, clock = run.args, run.progress, run.clock
    start_step, generator = progress.step, torch.Generator(run.ddp.device)
    signalled, out_of_time, _ = vote(stop, run.clock, run.ddp)
    while progress.step < run.total_updates and not (signalled or out_of_time):
        # An epoch continues after the crops it has trained on, whatever the batch flags or process count.
        run.train_loader.sampler.set_epoch(progress.epoch, start=progress.crops_in_epoch)
        left = len(run.train_loader) // args.accumulate_steps  # updates left in this epoch
        if left:
            batches = iter(run.train_loader)
            wav = next_batch(run, batches)
        while left and progress.step < run.total_updates:
            wav = update(run, wav, batches, generator)
            left -= 1
            clock.tick()
            if progress.step % args.log_every == 0:
                run.write_log()
            signalled, out_of_time, time_due = vote(stop, run.clock, run.ddp)
            if time_due or (args.save_every and progress.step % args.save_every == 0):
                run.save("latest.pt", f"checkpoint_{progress.step}.pt")
            if signalled or out_of_time:
                break
        if not left and not signalled:  # the epoch's end; after a signal, the resumed run validates it
            validate_and_save(run, epoch_done=True)
            signalled, out_of_time, _ = vote(stop, run.clock, run.ddp)  # validation counts too

    if signalled:
        if not run.saved or run.saved[-1][1] != progress.step:  # unless the epoch's end has just saved it
            run.save("latest.pt")
        log.info("Stopped by %s at step %d; continue with --resume.", stop.signal_name, progress.step)
        return
    if progress.batch_in_epoch and progress.step > start_step:  # ended mid-epoch: --max-updates or -minutes
        validate_and_save(run, epoch_done=False)
    if out_of_time:
        log.info("The --max-minutes budget (%g) is used up after %.1f minutes of training.", args.max_minutes,
                 progress.train_seconds / 60)
    log.info("Done: %d updates; best validation loss %.4f nats; checkpoints in %s", progress.step,
             progress.best_valid_loss, run.out)


def train(args: argparse.Namespace) -> Path:
    """Pre-train as the flags say; under torchrun every rank calls this. Returns the output folder."""
    ddp = setup_distributed(args.device)
    try:
        with StopRequest() as stop:
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
