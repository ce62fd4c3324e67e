"""The entry scripts as tests run them: main.py with tiny flags in this process, finetune.py on the tones
corpus (conftest.py), and any script in a process of its own."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

import finetune
import main

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TONE_LABELS = r"pattern:(?P<label>\d+)hz_(?P<speaker>[a-z]+)_\d+\.wav"  # conftest.py's tones


def tool(name: str) -> object:
    """tools/NAME.py (a script, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository, on one thread; its exit code and output."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=ONE_THREAD)


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, *args: object, nprocs: int = 2) -> None:
    """worker(rank, port, *args) in `nprocs` processes (a job on this machine, cluster_workers.join); fails
    with what any rank raised."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs)


def tiny_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """main.py flags for a 32-channel model on 6000-sample crops, 2 epochs, a log line every update."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--channels", "32", "--segment-length",
            "6000", "--batch-size", "2", "--epochs", "2", "--log-every", "1", "--num-workers", "0",
            "--valid-fraction", "0.2", "--save-every", "0", "--device", "cpu", "--warmup-updates", "0",
            "--precision", "fp32", *extra]  # fp32: exact resumes and loss comparisons (auto is bf16 on AMX)


def short_run_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """main.py flags for a 16-channel model on 4000-sample crops, no validation, the manifest under out."""
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--cache-dir", str(out / "cache"),
            "--channels", "16", "--segment-length", "4000", "--batch-size", "2", "--num-workers", "0",
            "--valid-fraction", "0", "--device", "cpu", "--threads", "1", "--warmup-updates", "0", *extra]


def train(data_dir: Path, out: Path, *extra: str) -> dict:
    """Train in this process; the checkpoint it leaves in latest.pt."""
    main.train(main.parse_args(tiny_flags(data_dir, out, *extra)))
    return load(out / "latest.pt")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_finetune(tmp_path: Path, data_dir: Path, *flags: str, checkpoint: str = "mfcc",
                 labels: str = TONE_LABELS) -> dict:
    """finetune.py in this process; returns its metrics.json."""
    out = tmp_path / "run"
    finetune.main(["--checkpoint", checkpoint, "--data-dir", str(data_dir), "--labels", labels,
                   "--output-dir", str(out), "--threads", "1", *flags])
    return json.loads((out / "metrics.json").read_text())


def run_recognition(tmp_path: Path, data_dir: Path, *flags: str, checkpoint: str = "mfcc",
                    out: str = "ctc") -> dict:
    """finetune.py --task ctc on conftest.py's transcribed corpus (its `letters` as tokens, one speaker held
    out per fold), in this process; returns its metrics.json."""
    finetune.main(["--task", "ctc", "--checkpoint", checkpoint, "--data-dir", str(data_dir),
                   "--labels", str(data_dir / "transcripts.tsv"), "--label-column", "letters",
                   "--group-column", "speaker", "--folds", "0", "--valid-fraction", "0", "--batch-size", "8",
                   "--threads", "1", "--output-dir", str(tmp_path / out), *flags])
    return json.loads((tmp_path / out / "metrics.json").read_text())
