"""The command-line edge shared by every script (utils.py): precision chosen by the hardware, one set of
backend flags, --threads."""

import io
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import threadpoolctl
import torch

import bench
import export
import extract
import finetune
import main
import probe
import suite
import utils
import vis

# ----- precision and backend flags ----------------------------------------------------------------

def never_asked(including_emulation: bool = True) -> bool:
    raise AssertionError("torch.cuda.is_bf16_supported() counts emulation: the compute capability decides")


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_demo_uses_bf16_only_on_a_gpu_that_computes_it_in_hardware(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() counts emulation: True on a V100 (7.0) or T4 (7.5).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", never_asked)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert utils.fast_precision(torch.device("cuda")) == expected


def test_bf16_on_a_gpu_that_emulates_it_warns_to_use_fp16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", never_asked)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with caplog.at_level(logging.WARNING):
        utils.autocast_context(torch.device("cuda"), "bf16")
    assert "no bf16 hardware" in caplog.text and "--precision fp16" in caplog.text


def test_bf16_on_a_cpu_without_bf16_instructions_warns_to_use_fp32(monkeypatch, caplog):
    monkeypatch.setattr(utils, "cpu_has_half_instructions", lambda precision: False)
    with caplog.at_level(logging.WARNING):
        utils.autocast_context(torch.device("cpu"), "bf16")
    assert "use --precision fp32" in caplog.text


def test_on_cuda_convolutions_may_use_tf32_but_the_objectives_matmuls_stay_fp32(backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = True  # as main.py used to set it
    torch.backends.cudnn.allow_tf32 = False
    utils.configure_backends(torch.device("cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32  # step projections and scores
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark


@pytest.mark.slow
def test_on_cpu_freed_memory_stays_in_the_process_so_the_next_step_faults_no_pages_in():
    # In a process of its own: the setting is process-wide and, once made, cannot be undone. The heap takes a
    # few allocations to settle (freed blocks next to small live ones are not reused at once).
    code = ("import resource, torch, utils\n"
            "utils.configure_backends(torch.device('cpu'))\n"
            "for _ in range(20): torch.ones(2**24)\n"  # 64 MiB (above glibc's mmap threshold), freed at once
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(3): torch.ones(2**24)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    if not utils.keep_freed_memory():
        pytest.skip("not Linux with glibc")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=utils.__file__.rsplit("/", 1)[0])
    assert int(run.stdout) < 1000  # without it, each time 16,384 pages of 4 KiB are faulted in again


# ----- --threads ----------------------------------------------------------------------------------

def test_every_entry_script_takes_threads(demo_corpus, checkpoint16, tmp_path):
    torch.set_num_threads(2)
    extract.main(["--checkpoint", str(checkpoint16), "--data-dir", str(demo_corpus), "--output",
                  str(tmp_path / "f.npz"), "--pool", "mean", "--threads", "1", "--device", "cpu"])
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    probe.main(["--data-dir", str(demo_corpus), "--labels", "folder", "--checkpoint", str(checkpoint16),
                "--folds", "2", "--json", str(tmp_path / "p.json"), "--threads", "1", "--device", "cpu"])
    assert torch.get_num_threads() == 1
    assert {pool["num_threads"] for pool in threadpoolctl.threadpool_info()} == {1}  # NumPy's BLAS too
    for script in (vis, main):
        assert script.parse_args(["--data-dir", str(demo_corpus), "--threads", "1"]).threads == 1


def test_loader_workers_default_to_the_cpus_available_less_one(monkeypatch):
    for cpus, workers in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert utils.default_num_workers() == workers


# ----- the log and progress bars (#26) ------------------------------------------------------------

DATED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def test_log_lines_go_to_stdout_dated_one_event_per_line_warnings_among_them(capsys):
    utils.setup_logging()
    logging.getLogger("test").info("first event")
    warnings.warn("a library's\nwarning", UserWarning, stacklevel=1)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and len(lines) == 2 and all(DATED.match(line) for line in lines)
    assert lines[0].endswith("INFO first event") and "UserWarning: a library's warning" in lines[1]


@pytest.mark.parametrize("mode, terminal, drawn", [("auto", False, False), ("auto", True, True),
                                                   ("always", False, True), ("never", True, False)])
def test_progress_bars_draw_on_a_terminal_unless_told_otherwise(monkeypatch, mode, terminal, drawn):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    utils.setup_logging(progress=mode)
    assert utils.progress_bar(range(3)).disable is not drawn
    assert utils.progress_bar(range(3), hidden=True).disable  # a DDP rank other than 0 never draws


def test_a_log_line_never_shares_a_row_with_a_progress_bar():
    screen = io.StringIO()  # a terminal: the bar and the log lines share it
    utils.setup_logging(progress="always")
    logging.getLogger().handlers[0].setStream(screen)
    with utils.progress_bar(range(3), file=screen, desc="work") as bar:
        for _ in bar:
            logging.getLogger("test").info("an event")
    rows = [row.rsplit("\r", 1)[-1] for row in screen.getvalue().split("\n")]  # what each row shows last
    events = [row for row in rows if "an event" in row]
    assert len(events) == 3 and all(DATED.match(row) for row in events)


def test_lines_logged_before_the_log_file_opens_start_it(tmp_path):
    utils.setup_logging()
    logging.getLogger("test").info("checked the data")
    assert not (tmp_path / "out").exists()
    utils.start_log_file(tmp_path / "out" / "train.log")
    logging.getLogger("test").info("training")
    lines = (tmp_path / "out" / "train.log").read_text().splitlines()
    assert [line.split(" INFO ")[1] for line in lines] == ["checked the data", "training"]


def test_every_script_that_draws_a_bar_takes_progress(tmp_path):
    data = ["--data-dir", str(tmp_path)]
    parsed = [main.build_parser().parse_args([*data, "--progress", "never"]),
              vis.parse_args([*data, "--progress", "never"]),
              extract.parse_args([*data, "--checkpoint", "mfcc", "--output", "o", "--progress", "never"]),
              probe.parse_args([*data, "--checkpoint", "mfcc", "--labels", "folder", "--progress", "never"]),
              suite.parse_args(["fsdd", *data, "--checkpoint", "c.pt", "--progress", "never"]),
              bench.parse_args(["--progress", "never"]),
              finetune.parse_train_args([*data, "--checkpoint", "mfcc", "--labels", "folder", "--progress",
                                         "never"]),
              finetune.parse_predict_args([*data, "--model", "m.pt", "--progress", "never"])]
    assert [args.progress for args in parsed] == ["never"] * len(parsed)


@pytest.mark.parametrize("script", ["bench", "export"])
def test_threads_caps_torch_and_blas_in_bench_and_export(script, checkpoint16, tmp_path):
    torch.set_num_threads(2)
    threadpoolctl.threadpool_limits(2)
    if script == "bench":
        bench.main(["--what", "train", "--channels", "8", "--batch-size", "1", "--segment-length", "2000",
                    "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--device", "cpu",
                    "--threads", "1"])
    else:
        export.main(["--checkpoint", str(checkpoint16), "--output", str(tmp_path / "f.onnx"),
                     "--threads", "1"])
    assert torch.get_num_threads() == 1
    assert {pool["num_threads"] for pool in threadpoolctl.threadpool_info()} == {1}
