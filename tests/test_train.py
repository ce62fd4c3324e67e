"""Pre-training (main.py): checkpoints, exact resume, accumulation, precision, DDP, signals and bad input.

Tiny configs on a small synthetic corpus; subprocesses only where a test needs a separate process
(torchrun, SIGTERM, the command line's error text)."""

import contextlib
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import main
import training
import utils
from demo import make_demo_corpus
from model import UserError, Wav2Vec, Wav2VecConfig
from training import lr_lambda, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """10 files of 1 s (2 speakers); --valid-fraction 0.2 holds out 1, so an epoch is 4 batches of 2."""
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2, files_per_speaker=5,
                            seconds_per_file=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
    wait for each other make steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--channels", "32", "--segment-length",
            "6000", "--batch-size", "2", "--epochs", "2", "--log-every", "1", "--num-workers", "0",
            "--valid-fraction", "0.2", "--save-every", "0", "--device", "cpu", "--warmup-updates", "0",
            "--precision", "fp32", *extra]  # fp32: exact resumes and loss comparisons (auto is bf16 on AMX)


def train(data_dir: Path, out: Path, *extra: str) -> dict:
    """Train in this process; the checkpoint it leaves in latest.pt."""
    main.train(main.parse_args(tiny_flags(data_dir, out, *extra)))
    return load(out / "latest.pt")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ONE_THREAD)


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
    assert "Flags changed since the checkpoint: --max-updates 2 -> 3" in (tmp_path / "train.log").read_text()


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


def test_fp16_alias_selects_fp16():
    assert main.parse_args(["--data-dir", "x", "--fp16"]).precision == "fp16"


def test_the_default_model_is_the_base_layout_at_128_channels():
    config = main.build_config(main.parse_args(["--data-dir", "x"]))
    base = Wav2VecConfig.preset("wav2vec")
    assert {c for c, _, _ in config.encoder_layers + config.context_layers} == {128}
    assert [k for _, k, _ in config.context_layers] == [k for _, k, _ in base.context_layers]
    paper = main.build_config(main.parse_args(["--data-dir", "x", "--model", "wav2vec"]))
    assert paper.context_layers == base.context_layers and paper.encoder_layers == base.encoder_layers


def test_demo_defaults_give_way_to_explicit_flags():
    args = main.parse_args(["--demo", "--channels", "48"])
    assert args.channels == 48 and args.segment_length == main.DEMO_DEFAULTS["segment_length"]
    assert args.data_dir == str(main.DEMO_DIR)


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_demo_uses_bf16_only_on_a_cpu_that_computes_it_in_hardware(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(utils, "cpu_has_half_instructions", lambda precision: has_bf16)
    args = main.parse_args(["--demo", "--device", "cpu"])
    assert utils.resolve_precision(args.precision, torch.device(args.device)) == expected


def test_bf16_on_a_cpu_without_bf16_instructions_warns_to_use_fp32(monkeypatch, caplog):
    monkeypatch.setattr(utils, "cpu_has_half_instructions", lambda precision: False)
    with caplog.at_level(logging.WARNING):
        utils.autocast_context(torch.device("cpu"), "bf16")
    assert "use --precision fp32" in caplog.text


def test_time_budget_stops_the_run_after_validating_and_saving(corpus, tmp_path):
    ckpt = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001")  # 60 ms of 200 updates
    assert 0 < ckpt["step"] < 200 and ckpt["train_seconds"] >= 0.06
    assert "--max-minutes budget (0.001) is used up" in (tmp_path / "train.log").read_text()
    assert ckpt["history"]["valid"][-1]["step"] == ckpt["step"]


def test_a_resumed_run_counts_the_time_already_spent(corpus, tmp_path):
    first = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001")
    again = train(corpus, tmp_path, "--epochs", "50", "--max-minutes", "0.001", "--resume")
    assert again["step"] == first["step"]  # the budget was already spent


def test_clock_saves_once_per_interval_and_continues_a_resumed_runs_count(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    progress = training.Progress(train_seconds=150.0)  # resumed 30 s into its third minute
    clock = training.TrainingClock(progress, max_minutes=10, save_every_minutes=1)
    due = []
    for second in range(0, 500, 10):
        now[0] = second
        clock.tick()
        due += [progress.train_seconds] if clock.save_due() else []
    assert due == [180.0, 240.0, 300.0, 360.0, 420.0, 480.0, 540.0, 600.0]
    assert clock.out_of_time and progress.train_seconds == 640.0


def collapse_watch(**config) -> training.CollapseWatch:
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=8, **config))
    return training.CollapseWatch(model, patience=100)


def test_a_loss_stuck_at_its_collapsed_value_warns_once_after_patience_updates():
    watch = collapse_watch()
    stuck = watch.collapsed_loss + 1e-4
    warnings = [watch.add(step, loss, updates=20) for step, loss in enumerate([3.40] + [stuck] * 4 + [3.0]
                                                                              + [stuck] * 12)]
    assert [i for i, w in enumerate(warnings) if w] == [10]  # 5 x 20 updates after the reset at 5
    assert "for 100 updates (step 10)" in warnings[10]


@pytest.mark.parametrize("config, named, not_named", [
    ({}, ["--loss-type infonce", "--warmup-updates"], ["--skip-connections"]),
    ({"skip_connections": False}, ["--skip-connections", "--loss-type infonce"], []),
    ({"loss_type": "infonce"}, ["--warmup-updates"], ["--loss-type infonce", "--skip-connections"]),
])
def test_the_collapse_warning_names_only_remedies_not_in_use(config, named, not_named):
    watch = collapse_watch(**config)
    warning = watch.add(0, watch.collapsed_loss, updates=100)
    assert all(flag in warning for flag in named) and not any(flag in warning for flag in not_named)


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


# ----- distributed and signals (separate processes) -----------------------------------------------

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


def start_training(out: Path, *flags: str, cwd: Path = REPO, script: tuple[str, ...] = ("main.py",),
                   env: dict | None = None) -> subprocess.Popen:
    """main.py in its own process group, as a terminal or a scheduler starts it; stderr to out/stderr.txt."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as stderr:
        return subprocess.Popen([sys.executable, *script, *flags], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=env or ONE_THREAD, start_new_session=True)


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


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_sigterm_to_the_process_group_saves_the_last_update_and_the_run_resumes(corpus, tmp_path, workers):
    # The loader workers get the signal too; a worker it kills used to fail the run without saving it.
    process = start_training(tmp_path, *tiny_flags(corpus, tmp_path, "--epochs", "1000", "--num-workers",
                                                   str(workers)))
    wait_for_line(process, tmp_path / "train.log", "INFO step 2 ")
    code, seconds = stop_group(process, signal.SIGTERM, timeout=30)
    assert code == 0 and seconds < 30, (tmp_path / "stderr.txt").read_text()[-3000:]
    log_text = (tmp_path / "train.log").read_text()
    ckpt = load(tmp_path / "latest.pt")
    last_update = max(entry["step"] for entry in ckpt["history"]["train"])
    assert ckpt["step"] == last_update == len(ckpt["history"]["train"]) >= 2
    assert f"INFO step {last_update + 1} " not in log_text  # no update ran after the one saved
    assert ckpt["epoch"] * 4 + ckpt["batch_in_epoch"] == ckpt["step"]  # a mid-epoch resume point
    assert f"Stopped by SIGTERM at step {ckpt['step']}" in log_text
    resumed = train(corpus, tmp_path, "--max-updates", str(ckpt["step"] + 1), "--resume")
    assert resumed["step"] == ckpt["step"] + 1


def test_one_ctrl_c_is_announced_once_not_once_per_loader_worker(corpus, tmp_path):
    flags = tiny_flags(corpus, tmp_path, "--epochs", "1000", "--num-workers", "2")
    process = start_training(tmp_path, *flags)
    wait_for_line(process, tmp_path / "train.log", "INFO step 5 ")  # after a validation: its workers exist
    assert stop_group(process, signal.SIGINT, timeout=30)[0] == 0
    assert (tmp_path / "train.log").read_text().count("SIGINT received") == 1


def test_ctrl_c_while_the_demo_corpus_is_synthesised_stops_at_once_and_leaves_no_run(tmp_path):
    out = tmp_path / "checkpoints"
    process = start_training(out, "--demo", "--output-dir", str(out), cwd=tmp_path,
                             script=(str(REPO / "main.py"),))
    wait_for_line(process, out / "train.log", "Synthesising the demo corpus")
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


def test_ctrl_c_while_the_corpus_is_packed_stops_at_once_and_leaves_no_run(corpus, tmp_path):
    result = run_script("-c", INTERRUPT_PACKING, *tiny_flags(corpus, tmp_path, "--packed-dir",
                                                             str(tmp_path / "packed")))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "SIGINT received before the first update" in result.stderr
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_update(corpus, tmp_path):
    # Before the vote, the signalled rank left at the epoch's end and the other waited for it forever.
    env = {**ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [start_training(tmp_path / f"rank{r}", "-c", SIGNAL_RANK_1_IN_VALIDATION,
                            *tiny_flags(corpus, tmp_path, "--epochs", "1000", "--batch-size", "1"),
                            script=(), env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    codes = []
    for process in ranks:
        try:
            codes.append(process.wait(timeout=60))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert codes == [0, 0], (tmp_path / "rank0" / "stderr.txt").read_text()[-3000:]
    ckpt = load(tmp_path / "latest.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["crops_in_epoch"]) == (4, 1, 0)  # the end of epoch 0
    assert "Stopped by a signal to another rank at step 4" in (tmp_path / "train.log").read_text()
    assert "SIGTERM received" in (tmp_path / "rank1" / "stderr.txt").read_text()


def test_the_same_signal_twice_in_a_second_is_one_stop_request_and_a_later_one_stops_at_once(monkeypatch):
    # killpg reaches a rank, then torchrun's agent forwards the same stop to it milliseconds later.
    now = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: now[0])
    with training.StopRequest() as stop:
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGTERM)
        now[0] += 0.05
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        now[0] += 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# ----- bad input ----------------------------------------------------------------------------------

def test_corrupt_latest_checkpoint_on_resume_is_one_clear_error_line(corpus, tmp_path):
    (tmp_path / "latest.pt").write_bytes(b"this is not a checkpoint")
    result = run_script("main.py", *tiny_flags(corpus, tmp_path, "--resume"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'latest.pt'} is corrupt")


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


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "10"], "fewer than one batch"),
    (["--accumulate-steps", "5"], "One update needs 5 batches"),
    (["--sample-rate", "8000"], "--sample-rate must be 16000"),
])
def test_impossible_settings_are_clear_errors(corpus, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(corpus, tmp_path, *flags)


def test_missing_data_folder_and_unwritable_output_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="Cannot write to the output folder"):
        train(tmp_path, tmp_path / "file" / "out")
    with pytest.raises(UserError, match="--data-dir DIR"):
        main.parse_args([])


# ----- helpers ------------------------------------------------------------------------------------

def test_learning_rate_warms_up_from_about_zero_then_follows_a_cosine_to_the_floor():
    factor = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.01)
    assert factor(0) < 0.1 and factor(9) < factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.505) and factor(110) == factor(500) == pytest.approx(0.01)
    assert lr_lambda("constant", warmup=0, total=110, min_ratio=0.01)(100) == 1.0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)

    def crash(payload, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    assert load(path) == {"step": 1}
