"""Pre-training (main.py): runs and their outputs, exact resume, accumulation, precision, budgets, the
flags' defaults, torchrun and signals.

Tiny configs on small synthetic corpora; subprocesses only where a test needs a separate process
(torchrun, a signal to a process group)."""

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist
from scripts import ONE_THREAD, REPO, free_port, load, run_script, short_run_flags, tiny_flags, train
from torch.nn.parallel import DistributedDataParallel

import bench
import data
import main
import plots
import training
import utils
import vis
from data import CropDataset
from demo import make_demo_corpus
from fastpath import FastTraining
from model import UserError, Wav2Vec, Wav2VecConfig
from training import save_checkpoint


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """10 files of 1 s (2 speakers); --valid-fraction 0.2 holds out 1, so an epoch is 4 batches of 2."""
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2, files_per_speaker=5,
                            seconds_per_file=1.0)


@pytest.fixture
def fresh_corpus(tmp_path) -> Path:
    """8 files of 1 s (2 speakers), made for one test: with --valid-fraction 0 an epoch is 4 batches of 2."""
    return make_demo_corpus(tmp_path / "audio", num_speakers=2, files_per_speaker=4, seconds_per_file=1.0)


def train_losses(ckpt: dict) -> list[float]:
    return [entry["loss"] for entry in ckpt["history"]["train"]]


# ----- a run and its outputs ----------------------------------------------------------------------

def test_short_run_writes_checkpoints_and_tensorboard_and_the_binary_loss_goes_down(corpus, tmp_path):
    # The binary loss falls by nats within a dozen updates from a random start (InfoNCE by a tenth).
    ckpt = train(corpus, tmp_path, "--epochs", "3", "--save-every", "5", "--keep-last", "1",
                 "--loss-type", "contrastive")
    assert {"config", "model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
            "best_valid_loss", "history", "rng", "args"} <= set(ckpt)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (12, 3, 0)
    assert [p.name for p in tmp_path.glob("checkpoint_*.pt")] == ["checkpoint_10.pt"]  # 5 pruned
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "validation after epoch 2" in (tmp_path / "train.log").read_text()
    losses = train_losses(ckpt)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5
    assert len(ckpt["history"]["valid"]) == 3
    assert Wav2Vec.from_pretrained(tmp_path / "best_model.pt").config.to_dict() == ckpt["config"]


def test_best_model_is_the_epoch_with_the_lowest_validation_loss(corpus, tmp_path):
    # Continue with a learning rate far too high: later epochs get worse, so latest is not best. (Not with
    # InfoNCE: its collapsed value, ln 11, is below the loss of the first epochs.)
    binary = ("--loss-type", "contrastive", "--lr-schedule", "constant")
    train(corpus, tmp_path, "--epochs", "2", *binary)
    ckpt = train(corpus, tmp_path, "--epochs", "4", "--lr", "0.5", "--resume", *binary)
    valid = ckpt["history"]["valid"]
    best = min(valid, key=lambda entry: entry["loss"])
    assert best is not valid[-1], "the setup must make a later epoch worse"
    best_ckpt = load(tmp_path / "best_model.pt")
    assert (best_ckpt["step"], best_ckpt["best_valid_loss"]) == (best["step"], best["loss"])
    assert ckpt["best_valid_loss"] == best["loss"]


def test_a_run_shorter_than_log_every_keeps_its_history_and_draws_loss_curves(fresh_corpus, tmp_path):
    main.train(main.parse_args(short_run_flags(fresh_corpus, tmp_path / "run", "--max-updates", "3")))
    history = vis.load_history(str(tmp_path / "run" / "latest.pt"))
    assert [entry["step"] for entry in history["train"]] == [3]
    plots.plot_loss_curves(history, Wav2VecConfig.preset("wav2vec", channels=16),
                           tmp_path / "loss_curves.png")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_the_manifest_goes_to_cache_dir_and_never_into_the_data_folder(fresh_corpus, tmp_path):
    main.train(main.parse_args(short_run_flags(fresh_corpus, tmp_path / "run", "--max-updates", "1")))
    assert list((tmp_path / "run" / "cache").glob("*.tsv"))
    assert not list(fresh_corpus.rglob(".wav2vec_manifest*"))
    assert main.parse_args(["--data-dir", "x"]).cache_dir == str(Path.home() / ".cache" / "wav2vec")


class SlowCrops(CropDataset):
    def _read(self, item: int, start: int, length: int):
        time.sleep(0.1)  # a loader far slower than the tiny model's step
        return super()._read(item, start, length)


def test_a_loader_slower_than_the_step_is_measured_and_named_with_its_remedies(fresh_corpus, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(data, "CropDataset", SlowCrops)
    main.train(main.parse_args(short_run_flags(fresh_corpus, tmp_path / "run", "--max-updates", "4",
                                               "--log-every", "1")))
    text = (tmp_path / "run" / "train.log").read_text()
    shares = [int(line.split("data wait ")[1].split("%")[0]) for line in text.splitlines()
              if "data wait" in line]
    assert len(shares) == 4 and min(shares[:3]) > 50  # the 4th update ends the epoch: nothing to fetch
    assert text.count("the loader is the bottleneck") == 1
    assert "--packed-dir" in text and "--num-workers (now 0" in text


def test_two_accumulated_batches_make_the_same_update_as_one_double_batch(corpus, tmp_path):
    unclipped = ("--max-updates", "1", "--clip-norm", "0")  # clipping would hide a gradient twice too big
    double = train(corpus, tmp_path / "double", "--batch-size", "4", *unclipped)
    accumulated = train(corpus, tmp_path / "accumulated", "--batch-size", "2", "--accumulate-steps", "2",
                        *unclipped)
    assert train_losses(accumulated) == pytest.approx(train_losses(double), rel=1e-6)
    # After one AdamW update exp_avg is 0.1 x the gradient: compare the gradients themselves.
    for state_double, state_accumulated in zip(double["optimizer"]["state"].values(),
                                               accumulated["optimizer"]["state"].values(), strict=True):
        # fp32 sums in a different order differ by rounding relative to the largest entry, not each entry.
        scale = state_double["exp_avg"].abs().max().item()
        torch.testing.assert_close(state_accumulated["exp_avg"], state_double["exp_avg"], rtol=1e-5,
                                   atol=1e-6 * scale)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(corpus, tmp_path, precision):
    ckpt = train(corpus, tmp_path, "--precision", precision, "--max-updates", "3")
    assert ckpt["step"] == 3 and all(math.isfinite(x) for x in train_losses(ckpt))
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # a loss scale only where fp16 needs one
    assert all(p.dtype == torch.float32 for p in ckpt["model"].values())


def test_time_budget_stops_the_run_after_validating_and_saving(corpus, tmp_path):
    ckpt = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001")  # 60 ms of 200 updates
    assert 0 < ckpt["step"] < 200 and ckpt["train_seconds"] >= 0.06
    assert "--max-minutes budget (0.001) is used up" in (tmp_path / "train.log").read_text()
    assert ckpt["history"]["valid"][-1]["step"] == ckpt["step"]


def test_non_finite_updates_are_skipped_and_a_long_streak_stops_the_run(tmp_path):
    data_dir = tmp_path / "nan"
    data_dir.mkdir()
    for k in range(8):
        wav = np.random.default_rng(k).standard_normal(6000).astype(np.float32) * 0.1
        wav[::100] = 3e38  # finite samples (NaN ones are skipped as bad files) whose sums overflow
        sf.write(data_dir / f"{k}.wav", wav, 16000, subtype="FLOAT")
    with pytest.raises(UserError, match="not finite for 20 updates in a row") as error:
        train(data_dir, tmp_path / "out", "--epochs", "100", "--log-every", "10", "--batch-size", "1",
              "--valid-fraction", "0")  # 8 updates per epoch
    assert "last good checkpoint" in str(error.value)
    ckpt = load(tmp_path / "out" / "latest.pt")  # written at an epoch's end, during the streak
    assert all(torch.isfinite(p).all() for p in ckpt["model"].values())  # every update was skipped


def test_unreadable_and_truncated_audio_files_are_skipped(corpus, tmp_path):
    data_dir = tmp_path / "corpus"
    shutil.copytree(corpus, data_dir, ignore=shutil.ignore_patterns(".*"))
    wavs = sorted(data_dir.rglob("*.wav"))
    wavs[0].write_bytes(wavs[0].read_bytes()[:30])  # cut inside the header: unreadable when scanned
    flac = wavs[1].with_suffix(".flac")  # a FLAC cut short still promises every frame: fails when read
    sf.write(flac, sf.read(wavs[1])[0], 16000)
    wavs[1].unlink()
    flac.write_bytes(flac.read_bytes()[:flac.stat().st_size // 3])
    ckpt = train(data_dir, tmp_path / "out", "--epochs", "2")
    assert ckpt["step"] == 8 and all(math.isfinite(x) for x in train_losses(ckpt))
    log_text = (tmp_path / "out" / "train.log").read_text()
    assert f"Skipping {wavs[0]}: " in log_text
    assert f"Skipping {flac} from now on: " in log_text


def test_main_and_bench_set_the_backend_flags_through_one_function(backend_flags, monkeypatch, tmp_path):
    calls = []
    for module in (main, bench):
        monkeypatch.setattr(module, "configure_backends", lambda device, threads=None: calls.append(device))
    bench.main(["--what", "train", "--channels", "8", "--batch-size", "1", "--segment-length", "4000",
                "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--device", "cpu"])
    corpus = make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=4, seconds_per_file=1.0)
    main.train(main.parse_args(short_run_flags(corpus, tmp_path / "run", "--max-updates", "1")))
    assert calls == [torch.device("cpu")] * 2


@pytest.mark.parametrize("flags, fast", [((), True), (("--compile",), False), (("--norm", "layer"), False)])
def test_cpu_training_takes_the_fast_step_unless_compiled_or_unsupported(fresh_corpus, tmp_path, flags, fast):
    args = main.parse_args(short_run_flags(fresh_corpus, tmp_path / "run", *flags))
    run = main.setup_run(args, training.Distributed(device=torch.device("cpu")))
    run.log.close()
    trained = getattr(run.trained, "_orig_mod", run.trained)  # under torch.compile
    assert isinstance(trained, FastTraining) == fast
    assert (trained.model if fast else trained) is run.model  # checkpoints save run.model, names unchanged


# ----- resume -------------------------------------------------------------------------------------

def test_stopped_and_resumed_run_follows_the_uninterrupted_one(corpus, tmp_path, monkeypatch):
    straight = train(corpus, tmp_path / "straight", "--max-updates", "7")
    with monkeypatch.context() as budget:  # a --max-minutes budget used up after update 3, mid-epoch 0
        budget.setattr(training.TrainingClock, "out_of_time",
                       property(lambda clock: clock.progress.step >= 3))
        assert train(corpus, tmp_path / "resumed", "--max-updates", "7")["step"] == 3
    resumed = train(corpus, tmp_path / "resumed", "--max-updates", "7", "--resume")
    assert resumed["step"] == straight["step"] == 7
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-6)
    for name, weight in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], weight, msg=name)


def trained_keys(monkeypatch) -> list[tuple[int, int]]:
    """The (index, epoch) keys of every training crop read from now on, in order (with --num-workers 0)."""
    keys = []
    read = data._CropDataset.__getitem__

    def recorded(dataset, key):
        keys.extend([key] if dataset.train else [])
        return read(dataset, key)
    monkeypatch.setattr(data._CropDataset, "__getitem__", recorded)
    return keys


def stop_after(monkeypatch, step: int):
    """A --max-minutes budget that runs out after update `step`."""
    return monkeypatch.setattr(training.TrainingClock, "out_of_time",
                               property(lambda clock: clock.progress.step >= step))


def test_resume_with_another_batch_size_continues_after_the_crops_already_trained_on(corpus, tmp_path,
                                                                                     monkeypatch):
    with monkeypatch.context() as budget:
        stop_after(budget, 1)
        assert train(corpus, tmp_path, "--batch-size", "2")["crops_in_epoch"] == 2
    keys = trained_keys(monkeypatch)
    train(corpus, tmp_path, "--batch-size", "4", "--max-updates", "2", "--resume")
    train_files = data.split_manifest(data.build_manifest(corpus), 0.2)[0]
    order = list(data.EpochSampler(len(train_files), seed=0))  # epoch 0's order
    assert keys[:4] == order[2:6]  # the first update after the resume takes the next 4 crops in the order


def test_resume_past_the_end_of_the_epoch_for_a_larger_batch_ends_the_epoch_instead_of_spinning(
        corpus, tmp_path, monkeypatch):
    with monkeypatch.context() as budget:
        stop_after(budget, 3)
        train(corpus, tmp_path, "--batch-size", "2")  # 6 of 9 crops: fewer left than a batch of 4
    with fail_after(seconds=60):
        ckpt = train(corpus, tmp_path, "--batch-size", "4", "--epochs", "10", "--max-updates", "5",
                     "--resume")
    assert (ckpt["step"], ckpt["epoch"]) == (5, 2)  # epoch 0 ended at the resume, epoch 1 took 2 updates
    assert [(entry["step"], entry["epoch"]) for entry in ckpt["history"]["valid"]] == [(3, 0), (3, 0), (5, 1)]


def test_resume_mid_epoch_with_another_training_set_ends_that_epoch_with_a_warning(corpus, tmp_path,
                                                                                  monkeypatch):
    with monkeypatch.context() as budget:
        stop_after(budget, 1)
        train(corpus, tmp_path)  # 9 training files
    keys = trained_keys(monkeypatch)
    ckpt = train(corpus, tmp_path, "--valid-fraction", "0.5", "--max-updates", "2", "--resume")
    assert "where it stopped cannot be found: it ends here, and epoch 1 starts" in (
        tmp_path / "train.log").read_text()
    assert ckpt["epoch"] == 1 and {epoch for _, epoch in keys} == {1}  # nothing more from epoch 0's order


class TimedOut(Exception):
    pass


@contextlib.contextmanager
def fail_after(seconds: int):
    """Raise TimedOut in the main thread after `seconds`: a loop that spins fails instead of hanging."""
    def expire(signum, frame):
        raise TimedOut(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_resume_with_only_the_output_dir_continues_with_the_runs_own_flags(corpus, tmp_path):
    train(corpus, tmp_path, "--max-updates", "2", "--channels", "16")
    args = main.parse_args(["--output-dir", str(tmp_path), "--resume", "--max-updates", "3"])
    assert (args.data_dir, args.channels, args.segment_length, args.batch_size) == (str(corpus), 16, 6000, 2)
    main.train(args)
    assert load(tmp_path / "latest.pt")["step"] == 3
    log_text = (tmp_path / "train.log").read_text()
    assert "Flags changed since the checkpoint: --max-updates 2 -> 3\n" in log_text
    assert "This machine's settings, not the checkpoint's: --device auto (was cpu), " in log_text


def test_resume_on_another_machine_takes_its_settings_from_that_machine(corpus, tmp_path, monkeypatch):
    # Started on a 2-core laptop (one loader worker, --threads 1, fp32 on the CPU), resumed on an 8-core node.
    train(corpus, tmp_path, "--max-updates", "1", "--num-workers", "1", "--threads", "1", "--cache-dir",
          str(tmp_path / "laptop-cache"))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    args = main.parse_args(["--output-dir", str(tmp_path), "--resume"])
    assert (args.num_workers, args.threads, args.device, args.precision, args.compile) == (
        4, None, "auto", "auto", False)
    assert args.cache_dir == str(data.DEFAULT_CACHE_DIR) and args.channels == 32  # the run's own flags stay


def test_a_resumed_run_counts_the_time_already_spent(corpus, tmp_path):
    first = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001")
    again = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001", "--resume")
    assert again["step"] == first["step"]  # the budget was already spent


def test_resume_refuses_a_model_flag_that_differs_in_one_sentence_naming_it(corpus, tmp_path):
    train(corpus, tmp_path, "--max-updates", "1")
    with pytest.raises(UserError, match="^--channels cannot change .* trained with --channels 32, so resume "
                                        "without it"):
        main.parse_args(["--output-dir", str(tmp_path), "--resume", "--channels", "64"])


def test_resuming_a_run_from_before_skip_connections_were_the_default_names_the_flag_it_needs(corpus,
                                                                                            tmp_path):
    train(corpus, tmp_path, "--max-updates", "1", "--no-skip-connections")
    ckpt = load(tmp_path / "latest.pt")
    ckpt["args"]["skip_connections"] = None  # the flag's value in such runs: the default, then no skips
    save_checkpoint(ckpt, tmp_path / "latest.pt")
    with pytest.raises(UserError, match="skip_connections: saved False, now True.*--no-skip-connections"):
        train(corpus, tmp_path, "--resume")


def test_resume_without_a_checkpoint_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(UserError, match="--resume found no checkpoint"):
        train(corpus, tmp_path, "--resume")


def test_starting_over_an_existing_run_needs_resume(corpus, tmp_path):
    train(corpus, tmp_path, "--max-updates", "1")
    with pytest.raises(UserError, match="already holds a run"):
        train(corpus, tmp_path, "--max-updates", "1")


def test_the_demo_runs_again_from_the_start_and_continues_with_resume(demo_corpus, tmp_path):
    out = tmp_path / "demo"
    flags = short_run_flags(demo_corpus, out, "--demo", "--max-updates", "2")
    for _ in range(2):  # the second run starts over where another run would be refused
        main.train(main.parse_args(flags))
        assert load(out / "latest.pt")["step"] == 2
        assert (out / "train.log").read_text().count("Done: 2 updates") == 1
    main.train(main.parse_args([*flags[:-1], "3", "--resume"]))
    assert load(out / "latest.pt")["step"] == 3
    assert main.parse_args(["--demo"]).output_dir == "checkpoints/demo"  # not the default run's folder


# ----- flags and their defaults -------------------------------------------------------------------

def test_fp16_alias_selects_fp16():
    assert main.parse_args(["--data-dir", "x", "--fp16"]).precision == "fp16"


def test_the_old_use_transforms_flag_still_turns_augmentation_on_and_warns(capsys):
    assert main.parse_args(["--data-dir", "x", "--use-transforms"]).augment
    assert "warning: --use-transforms is now --augment" in capsys.readouterr().err


def test_the_default_model_is_the_base_layout_at_128_channels():
    config = main.build_config(main.parse_args(["--data-dir", "x"]))
    base = Wav2VecConfig.preset("wav2vec")
    assert {c for c, _, _ in config.encoder_layers + config.context_layers} == {128}
    assert [k for _, k, _ in config.context_layers] == [k for _, k, _ in base.context_layers]
    paper = main.build_config(main.parse_args(["--data-dir", "x", "--model", "wav2vec"]))
    assert paper.context_layers == base.context_layers and paper.encoder_layers == base.encoder_layers


def test_skip_connections_follow_the_preset_unless_a_flag_says_otherwise():
    def skip(*flags: str) -> bool:
        return main.build_config(main.parse_args(["--data-dir", ".", *flags])).skip_connections
    assert skip() and skip("--model", "wav2vec_large") and not skip("--no-skip-connections")


def test_norm_follows_the_preset_unless_a_flag_says_otherwise():
    def norm(*flags: str) -> str:
        return main.build_config(main.parse_args(["--data-dir", ".", *flags])).norm
    assert norm() == "group" and norm("--model", "wav2vec_tiny") == "layer"
    assert norm("--norm", "layer") == "layer"
    assert norm("--model", "wav2vec_tiny", "--norm", "group") == "group"


def test_demo_defaults_give_way_to_explicit_flags():
    args = main.parse_args(["--demo", "--channels", "48"])
    assert args.channels == 48 and args.segment_length == main.DEMO_DEFAULTS["segment_length"]
    assert args.data_dir == str(main.DEMO_DIR)


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_demo_uses_bf16_only_on_a_cpu_that_computes_it_in_hardware(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(utils, "cpu_has_half_instructions", lambda precision: has_bf16)
    args = main.parse_args(["--demo", "--device", "cpu"])
    assert utils.resolve_precision(args.precision, torch.device(args.device)) == expected


@pytest.mark.parametrize("offset", ["auto", 1])
def test_the_shortest_crop_allowed_gives_a_finite_loss(offset):
    args = main.parse_args(["--data-dir", "d", "--channels", "16", "--num-steps", "1", "--offset",
                            str(offset), "--segment-length", "945" if offset == "auto" else "625"])
    model = Wav2Vec(main.build_config(args))
    loss, _ = model(torch.randn(2, args.segment_length))
    assert torch.isfinite(loss)


def test_a_warm_up_longer_than_the_run_is_warned_of():
    args = main.parse_args(["--data-dir", "d", "--max-updates", "10", "--warmup-updates", "50"])
    (warning,) = main.flag_warnings(args)
    assert warning.startswith("--warmup-updates 50 is longer than --max-updates 10")
    assert not main.flag_warnings(main.parse_args(["--data-dir", "d", "--max-updates", "50"]))


def test_the_default_loader_workers_fit_the_machine(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert main.build_parser().parse_args([]).num_workers == 1  # 2 CPUs: no "might freeze" warning


# ----- torchrun and signals (separate processes) --------------------------------------------------

def test_compile_wraps_the_ddp_module_and_no_sync_still_reaches_ddp(corpus, tmp_path, monkeypatch):
    # torch.compile inside DDP hid the backward from DDP's hooks: no overlap of the gradient all_reduce.
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or compile(module))
    monkeypatch.setattr(training.Distributed, "enabled", property(lambda ddp: True))  # DDP on 1 process
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = training.Distributed(cpu_group=dist.group.WORLD)
        run = main.setup_run(main.parse_args(tiny_flags(corpus, tmp_path / "run", "--compile")), ddp)
    finally:
        dist.destroy_process_group()
    assert [type(module) for module in compiled] == [DistributedDataParallel]
    assert run.trained.no_sync.__func__ is DistributedDataParallel.no_sync  # --accumulate-steps needs it
    run.log.close()


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_writes_a_checkpoint_that_one_process_continues(corpus, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py",
         *tiny_flags(corpus, tmp_path, "--batch-size", "1", "--max-updates", "3")],
        cwd=REPO, capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load(tmp_path / "latest.pt")
    assert ckpt["step"] == 3 and len(ckpt["history"]["train"]) == 3
    assert "cpu x 2" in (tmp_path / "train.log").read_text()
    model = Wav2Vec.from_pretrained(tmp_path / "latest.pt")
    assert model.extract_features(torch.zeros(6000))["c"].shape[-1] == model.num_frames(6000)
    assert (ckpt["world_size"], ckpt["crops_in_epoch"]) == (2, 6)  # 3 updates x 1 crop x 2 processes
    resumed = train(corpus, tmp_path, "--batch-size", "1", "--max-updates", "4", "--resume")
    assert (resumed["epoch"], resumed["crops_in_epoch"]) == (0, 7)  # one more crop into epoch 0
    assert "written by 2 processes, continued by 1" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_a_log_redirected_to_a_file_holds_one_dated_event_per_line(corpus, tmp_path):
    # As `python main.py ... > run.log 2>&1` or a cluster job writes it: no bars, no carriage returns.
    flags = tiny_flags(corpus, tmp_path / "out", "--max-updates", "3", "--warmup-updates", "5")
    with open(tmp_path / "run.log", "w") as output:
        subprocess.run([sys.executable, "main.py", *flags], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                       env=ONE_THREAD, timeout=120, check=True)
    text = (tmp_path / "run.log").read_text()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) >= 6
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) ", line) for line in lines), text
    assert any("WARNING --warmup-updates 5 is longer" in line for line in lines)
    assert sum("INFO step " in line for line in lines) == 3


def start_training(out: Path, *flags: str, cwd: Path = REPO, script: tuple[str, ...] = ("main.py",),
                   env: dict | None = None) -> subprocess.Popen:
    """main.py in its own process group, as a terminal or a scheduler starts it; its output (stdout and
    stderr, as a cluster job's) to out/output.txt."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "output.txt", "w") as output:
        return subprocess.Popen([sys.executable, *script, *flags], cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT, env=env or ONE_THREAD, start_new_session=True)


def wait_for_line(process: subprocess.Popen, log_file: Path, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (log_file.exists() and text in log_file.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, f"no log line with {text!r} appeared"
        time.sleep(0.1)


def stop_group(process: subprocess.Popen, sig: signal.Signals, timeout: float) -> tuple[int, float]:
    """Send `sig` to the whole process group (Ctrl-C, torchrun, SLURM): (exit code, seconds it took)."""
    start = time.monotonic()
    os.killpg(process.pid, sig)
    try:
        code = process.wait(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # workers or a hung run must not outlive the test
    return code, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_sigterm_to_the_process_group_saves_the_last_update_and_the_run_resumes(corpus, tmp_path, workers):
    # The loader workers get the signal too; a worker it kills used to fail the run without saving it.
    process = start_training(tmp_path, *tiny_flags(corpus, tmp_path, "--epochs", "1000", "--num-workers",
                                                   str(workers)))
    wait_for_line(process, tmp_path / "train.log", "INFO step 2 ")
    code, seconds = stop_group(process, signal.SIGTERM, timeout=30)
    assert code == 0 and seconds < 30, (tmp_path / "output.txt").read_text()[-3000:]
    log_text = (tmp_path / "train.log").read_text()
    ckpt = load(tmp_path / "latest.pt")
    last_update = max(entry["step"] for entry in ckpt["history"]["train"])
    assert ckpt["step"] == last_update == len(ckpt["history"]["train"]) >= 2
    assert f"INFO step {last_update + 1} " not in log_text  # no update ran after the one saved
    assert ckpt["epoch"] * 4 + ckpt["batch_in_epoch"] == ckpt["step"]  # a mid-epoch resume point
    assert f"Stopped by SIGTERM at step {ckpt['step']}" in log_text
    resumed = train(corpus, tmp_path, "--max-updates", str(ckpt["step"] + 1), "--resume")
    assert resumed["step"] == ckpt["step"] + 1


@pytest.mark.slow
def test_one_ctrl_c_is_announced_once_not_once_per_loader_worker(corpus, tmp_path):
    flags = tiny_flags(corpus, tmp_path, "--epochs", "1000", "--num-workers", "2")
    process = start_training(tmp_path, *flags)
    wait_for_line(process, tmp_path / "train.log", "INFO step 5 ")  # after a validation: its workers exist
    assert stop_group(process, signal.SIGINT, timeout=30)[0] == 0
    assert (tmp_path / "train.log").read_text().count("SIGINT received") == 1


@pytest.mark.slow
def test_ctrl_c_while_the_demo_corpus_is_synthesised_stops_at_once_and_leaves_no_run(tmp_path):
    out = tmp_path / "checkpoints"
    process = start_training(out, "--demo", "--output-dir", str(out), cwd=tmp_path,
                             script=(str(REPO / "main.py"),))
    wait_for_line(process, out / "output.txt", "Synthesising the demo corpus")  # before train.log exists
    code, seconds = stop_group(process, signal.SIGINT, timeout=30)
    assert code == 130 and seconds < 10
    assert not (out / "latest.pt").exists()
    assert not list((tmp_path / "data").rglob("*.wav"))  # no partial corpus for the next run to take


INTERRUPT_PACKING = """
import os, signal, main
pack = main.prepare_packed_corpus
def interrupted(*args, **kwargs):  # Ctrl-C just as packing starts
    os.kill(os.getpid(), signal.SIGINT)
    return pack(*args, **kwargs)
main.prepare_packed_corpus = interrupted
main.run_cli(main.main)
"""


@pytest.mark.slow
def test_ctrl_c_while_the_corpus_is_packed_stops_at_once_and_leaves_no_run(corpus, tmp_path):
    result = run_script("-c", INTERRUPT_PACKING, *tiny_flags(corpus, tmp_path, "--packed-dir",
                                                             str(tmp_path / "packed")))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "SIGINT received before the first update" in result.stdout  # the log: stdout
    assert not (tmp_path / "latest.pt").exists()


SIGNAL_RANK_1_IN_VALIDATION = """
import os, signal, main
validate = main.validate
def signalled(*args, **kwargs):  # a SIGTERM that reaches rank 1 only, while the ranks validate
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return validate(*args, **kwargs)
main.validate = signalled
main.run_cli(main.main)
"""


def run_two_ranks(out: Path, script: str, *flags: str, timeout: float = 60) -> list[int]:
    """`python -c script flags` as ranks 0 and 1 of a gloo job (output in out/rank<r>/); their exit codes."""
    env = {**ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [start_training(out / f"rank{r}", "-c", script, *flags, script=(),
                            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    codes = []
    for process in ranks:
        try:
            codes.append(process.wait(timeout=timeout))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return codes


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_update(corpus, tmp_path):
    # Before the vote, the signalled rank left at the epoch's end and the other waited for it forever.
    codes = run_two_ranks(tmp_path, SIGNAL_RANK_1_IN_VALIDATION,
                          *tiny_flags(corpus, tmp_path, "--epochs", "1000", "--batch-size", "1"))
    assert codes == [0, 0], (tmp_path / "rank0" / "output.txt").read_text()[-3000:]
    ckpt = load(tmp_path / "latest.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["crops_in_epoch"]) == (4, 1, 0)  # the end of epoch 0
    assert "Stopped by a signal to another rank at step 4" in (tmp_path / "train.log").read_text()
    assert "SIGTERM received" in (tmp_path / "rank1" / "output.txt").read_text()


SKEWED_CLOCKS = """
import os, main, training
ahead = 1.5 if os.environ["RANK"] == "0" else 0.0  # rank 0 started earlier: its clock is 1.5 updates ahead
def tick(clock):  # one second of training per update, however fast this machine is
    clock.progress.train_seconds = clock.progress.step + ahead
training.TrainingClock.tick = tick
main.run_cli(main.main)
"""


@pytest.mark.slow
def test_save_every_minutes_saves_each_boundary_once_on_every_rank_whichever_clock_passes_it_first(
        corpus, tmp_path):
    # Every 3 s: rank 0's clock passes a boundary after updates 2, 5, 8, rank 1's one update later. Each rank
    # deciding for itself deadlocked (one saved, in an all_reduce, while the other voted); OR-ing their
    # decisions saved twice, one update apart.
    codes = run_two_ranks(tmp_path, SKEWED_CLOCKS, *tiny_flags(
        corpus, tmp_path, "--batch-size", "1", "--epochs", "3", "--max-updates", "10", "--log-every", "7",
        "--save-every-minutes", "0.05", "--keep-last", "0"))
    assert codes == [0, 0], (tmp_path / "rank0" / "output.txt").read_text()[-3000:]
    numbered = sorted(int(path.stem.split("_")[1]) for path in tmp_path.glob("checkpoint_*.pt"))
    assert numbered == [2, 5, 8]
    logged = [entry["step"] for entry in load(tmp_path / "latest.pt")["history"]["train"]]
    assert {2, 5, 8} <= set(logged) and logged[-1] == 10  # each save logged its updates first: an all_reduce
