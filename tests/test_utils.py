"""The command-line edge shared by every script (utils.py): precision chosen by the hardware, one set of
backend flags, --threads."""

import logging
import subprocess
import sys

import pytest
import threadpoolctl
import torch

import bench
import export
import extract
import main
import probe
import utils
import vis

# ----- precision and backend flags ----------------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                  ((9, 0), "bf16")])
def test_demo_uses_bf16_only_on_a_gpu_that_computes_it_in_hardware(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() counts emulation: True on a V100 (7.0) or T4 (7.5).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert utils.fast_precision(torch.device("cuda")) == expected


def test_bf16_on_a_gpu_that_emulates_it_warns_to_use_fp16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
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
