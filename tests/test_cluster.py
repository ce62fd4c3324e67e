"""What a GPU cluster meets first, tested on CPU: set-up waits outside NCCL, bf16 only in hardware, fp32
matmuls in the objective, one set of backend flags, the data-wait share, and short runs' history."""

import logging
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from cluster_workers import prepare_in_turn

import bench
import data
import main
import plots
import utils
import vis
from data import CropDataset
from demo import make_demo_corpus
from model import UserError, Wav2VecConfig

# ----- start-up preparation under torchrun ----------------------------------------------------------


def test_ranks_wait_for_the_preparation_outside_the_default_group_node_by_node(tmp_path):
    # Ranks 0 and 1 on one node, rank 2 alone (its local rank 0) on another without a shared disk.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    order = tmp_path / "order.txt"
    mp.spawn(prepare_in_turn, args=(port, [0, 1, 0], str(order)), nprocs=3)
    assert order.read_text().split() == ["0", "2", "1"]


# ----- precision and backend flags --------------------------------------------------------------------

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


@pytest.fixture
def backend_flags():
    """Give the next test back the process-wide backend flags."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:3]
    torch.set_num_threads(saved[3])


def test_on_cuda_convolutions_may_use_tf32_but_the_objectives_matmuls_stay_fp32(backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = True  # as main.py used to set it
    torch.backends.cudnn.allow_tf32 = False
    utils.configure_backends(torch.device("cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32  # step projections and scores
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark


def test_main_and_bench_set_the_backend_flags_through_one_function(backend_flags, monkeypatch, tmp_path):
    calls = []
    for module in (main, bench):
        monkeypatch.setattr(module, "configure_backends", lambda device, threads=None: calls.append(device))
    bench.main(["--what", "train", "--channels", "8", "--batch-size", "1", "--segment-length", "4000",
                "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--device", "cpu"])
    corpus = make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=4, seconds_per_file=1.0)
    main.train(main.parse_args(short_run_flags(corpus, tmp_path / "run", "--max-updates", "1")))
    assert calls == [torch.device("cpu")] * 2


def test_mfu_peak_is_taken_in_the_precision_the_convolutions_use(backend_flags):
    utils.configure_backends(torch.device("cuda"))
    assert bench.peak_precision(torch.device("cuda"), "fp32") == "tf32"
    assert bench.peak_precision(torch.device("cuda"), "bf16") == "bf16"
    assert bench.peak_precision(torch.device("cpu"), "fp32") == "fp32"


def test_bench_names_its_flags_as_main_does():
    args = bench.parse_args(["--model", "wav2vec_large", "--packed-dir", "packed"])
    assert (args.model, args.packed_dir) == ("wav2vec_large", Path("packed"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "wav2vec"])


# ----- main.py: data wait, short runs, manifest and packed folders ----------------------------------------

def short_run_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--cache-dir", str(out / "cache"),
            "--channels", "16", "--segment-length", "4000", "--batch-size", "2", "--num-workers", "0",
            "--valid-fraction", "0", "--device", "cpu", "--threads", "1", "--warmup-updates", "0", *extra]


@pytest.fixture
def corpus(tmp_path) -> Path:
    return make_demo_corpus(tmp_path / "audio", num_speakers=2, files_per_speaker=4, seconds_per_file=1.0)


class SlowCrops(CropDataset):
    def _read(self, item: int, start: int, length: int):
        time.sleep(0.1)  # a loader far slower than the tiny model's step
        return super()._read(item, start, length)


def test_a_loader_slower_than_the_step_is_measured_and_named_with_its_remedies(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CropDataset", SlowCrops)
    main.train(main.parse_args(short_run_flags(corpus, tmp_path / "run", "--max-updates", "4",
                                               "--log-every", "1")))
    text = (tmp_path / "run" / "train.log").read_text()
    shares = [int(line.split("data wait ")[1].split("%")[0]) for line in text.splitlines()
              if "data wait" in line]
    assert len(shares) == 4 and min(shares[:3]) > 50  # the 4th update ends the epoch: nothing to fetch
    assert text.count("the loader is the bottleneck") == 1
    assert "--packed-dir" in text and "--num-workers (now 0" in text


def test_a_run_shorter_than_log_every_keeps_its_history_and_draws_loss_curves(corpus, tmp_path):
    main.train(main.parse_args(short_run_flags(corpus, tmp_path / "run", "--max-updates", "3")))
    history = vis.load_history(str(tmp_path / "run" / "latest.pt"))
    assert [entry["step"] for entry in history["train"]] == [3]
    plots.plot_loss_curves(history, Wav2VecConfig.preset("wav2vec", channels=16),
                           tmp_path / "loss_curves.png")
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def test_the_manifest_goes_to_cache_dir_and_never_into_the_data_folder(corpus, tmp_path):
    main.train(main.parse_args(short_run_flags(corpus, tmp_path / "run", "--max-updates", "1")))
    assert list((tmp_path / "run" / "cache").glob("*.tsv"))
    assert not list(corpus.rglob(".wav2vec_manifest*"))
    assert main.parse_args(["--data-dir", "x"]).cache_dir == str(Path.home() / ".cache" / "wav2vec")


def test_an_unwritable_packed_folder_is_refused_before_the_corpus_is_scanned(corpus, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")  # a folder under a file cannot be made, even by root
    monkeypatch.setattr(main, "build_manifest", None)  # scanning would raise a TypeError
    args = main.parse_args(short_run_flags(corpus, tmp_path / "run", "--packed-dir",
                                           str(tmp_path / "file" / "packed")))
    with pytest.raises(UserError, match="packed-corpus folder.*--packed-dir"):
        main.train(args)
