"""The GPU check: every CUDA path of this repository, through its real entry points, in one table.

    python tools/gpu_check.py [--work-dir DIR]

No GPU has run this code yet (docs/TRAINING.md, "What was tested where"); this is the script for the day one
is lent. Each step runs an entry point in a subprocess, in --work-dir (a new temporary folder by default),
as a user would, and checks what it left behind:

  demo, demo-stop, demo-resume   main.py --demo on CUDA, --precision auto (bf16 on compute capability 8.0+),
        200 updates; the same run stopped at update 100 and resumed: its losses after 100 against the first's
  torchrun     torchrun --nproc_per_node 1 main.py --demo in fp16 with its loss scale, --accumulate-steps 2
               and --compile (DDP on NCCL, then torch.compile)
  large-bf16, large-fp16, large-fp32   bench.py --what train on wav2vec_large at fairseq's 10 x 150,000
               samples: step time, audio-s/s, MFU, peak memory, host syncs in a step (set_sync_debug_mode)
  stream       model.streamer() and StreamingStep on the GPU against extract_features
  extract, vis, finetune   the demo's checkpoint with --device cuda (finetune.py --freeze none: the backbone
               trains too)

It prints one table (step, status, seconds, what it found) and exits with 1 when any step failed, each
step's output in <work-dir>/<step>.log; without a GPU it says so in one sentence and exits with 2.

Python rather than bash: the checks compare numbers (losses read from two checkpoints, bench.py's JSON) and
print one table; the work itself is the entry points, run as subprocesses.

Time on one H100, estimated and not measured (no GPU here): about 6 minutes. A demo update is ~21 GFLOP
(8 crops of 1 s, 3 x forward_flops): launch-bound, a few ms, so each demo run is start-up, cuDNN autotuning
and validation, ~30 s, plus ~10 s for the corpus; torchrun's torch.compile of the forward and backward,
~2 minutes cold; a wav2vec_large step is 5.8 TFLOP, ~20-60 ms at 10-30% of the H100's dense bf16/TF32 peak,
so each bench.py run is ~25 s of start-up and autotuning; stream, extract, vis (t-SNE on the CPU) and
finetune ~1.5 minutes together. The timeouts below are 2-3 times each estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESUME_TOLERANCE = 0.05  # relative, per logged loss: on CUDA a resume is close, not exact (cuDNN autotuning)
STREAM_TOLERANCE = 1e-4  # streamed against offline frames, in true fp32


class CheckFailed(Exception):
    """A step ran but left a wrong result; its message goes into the table."""


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: int  # seconds
    measure: Callable[[Path, str], str]  # (work dir, stdout) -> what the table reports; raises CheckFailed


def python(script: str, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / script), *flags]


def history(work: Path, run: str) -> list[dict]:
    return torch.load(work / run / "latest.pt", map_location="cpu", weights_only=True)["history"]["train"]


def precision_used(work: Path, run: str) -> str:
    """The precision main.py logged for `run` ("bf16 on cuda:0 x 1")."""
    found = re.search(r"(fp32|fp16|bf16) on cuda:\d+ x \d+", (work / run / "train.log").read_text())
    if not found:
        raise CheckFailed(f"{run}/train.log names no precision on cuda")
    return found.group(1)


def demo_trained(work: Path, _: str) -> str:
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp32"
    precision = precision_used(work, "straight")
    losses = [entry["loss"] for entry in history(work, "straight")]
    if precision != expected or not all(map(math.isfinite, losses)):
        raise CheckFailed(f"{precision} (expected {expected} here), losses {losses[0]} -> {losses[-1]}")
    return f"{precision} chosen by auto; loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def demo_stopped(work: Path, _: str) -> str:
    step = torch.load(work / "resumed" / "latest.pt", map_location="cpu", weights_only=True)["step"]
    if step != 100:
        raise CheckFailed(f"latest.pt is at step {step}, not 100")
    return "latest.pt at step 100"


def demo_resumed(work: Path, _: str) -> str:
    straight = [entry for entry in history(work, "straight") if entry["step"] > 100]
    resumed = [entry for entry in history(work, "resumed") if entry["step"] > 100]
    if [(e["step"], e["lr"]) for e in straight] != [(e["step"], e["lr"]) for e in resumed]:
        raise CheckFailed("the resumed run logged other steps or learning rates than the straight one")
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(straight, resumed, strict=True))
    if worst > RESUME_TOLERANCE:
        raise CheckFailed(f"losses after the resume differ by up to {worst:.1%} from the straight run's")
    return f"{len(resumed)} logged losses after the resume within {worst:.2%} of the straight run's"


def torchrun_trained(work: Path, _: str) -> str:
    ckpt = torch.load(work / "compiled" / "latest.pt", map_location="cpu", weights_only=True)
    losses = [entry["loss"] for entry in ckpt["history"]["train"]]
    precision = precision_used(work, "compiled")
    if precision != "fp16" or not ckpt["scaler"] or not all(map(math.isfinite, losses)):
        raise CheckFailed(f"{precision}, scaler state {ckpt['scaler']}, losses {losses}")
    skipped = re.findall(r"skipped (\d+)", (work / "compiled" / "train.log").read_text())
    return (f"fp16, loss scale {ckpt['scaler']['scale']:g}, {skipped[-1] if skipped else '?'} skipped; "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def large_measured(precision: str) -> Callable[[Path, str], str]:
    def measure(work: Path, _: str) -> str:
        result = json.loads((work / f"large_{precision}.json").read_text())
        syncs = ", ".join(result["host_syncs"]) or "none"
        return (f"{result['seconds_per_step_median']:.3f} s/step, {result['audio_seconds_per_second']:.0f} "
                f"audio-s/s, MFU {result['mfu']:.2f}, peak {result['cuda_peak_memory_gb']:.1f} GiB, "
                f"{result['host_syncs_per_step']} host syncs ({syncs})")
    return measure


STREAM = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from model import StreamingStep, Wav2Vec, Wav2VecConfig
torch.backends.cudnn.allow_tf32 = False  # true fp32 on both sides: the check is of devices, not of TF32
torch.manual_seed(0)
model = Wav2Vec(Wav2VecConfig.preset("wav2vec_tiny")).cuda().eval()
wav = torch.randn(16000, device="cuda")
with torch.no_grad():
    offline = model.extract_features(wav)["c"]
    streamer = model.streamer()
    pushed = torch.cat([streamer.push(wav[i:i + 1000])["c"] for i in range(0, len(wav), 1000)], dim=2)
    step = StreamingStep(model)
    state, outs = step.initial_state(), []
    for i in range(0, len(wav) - 159, 160):
        _, c, *state = step(wav[None, i:i + 160], *state)
        outs.append(c)
    stepped = torch.cat(outs, dim=2)[..., step.warmup_hops:]
print((pushed - offline).abs().max().item(), (stepped - offline[..., :stepped.shape[-1]]).abs().max().item())
"""


def streamed(_: Path, stdout: str) -> str:
    pushed, stepped = map(float, stdout.split()[-2:])
    if max(pushed, stepped) > STREAM_TOLERANCE:
        raise CheckFailed(f"streamed frames differ from offline ones by {max(pushed, stepped):.2e}")
    return f"max |streamed - offline|: streamer {pushed:.1e}, step {stepped:.1e}"


def extracted(work: Path, _: str) -> str:
    features = np.load(work / "features.npz")["features"]
    return f"{features.shape[0]} files x {features.shape[1]} pooled features"


def drawn(work: Path, _: str) -> str:
    if not (work / "vis" / "index.html").is_file():
        raise CheckFailed("vis.py wrote no index.html")
    return f"{len(list((work / 'vis').glob('*.png')))} figures and index.html"


def finetuned(work: Path, _: str) -> str:
    metrics = json.loads((work / "finetune" / "metrics.json").read_text())
    before = torch.load(work / "straight" / "latest.pt", map_location="cpu", weights_only=True)["model"]
    after = torch.load(work / "finetune" / "finetuned.pt", map_location="cpu", weights_only=True)["model"]
    name = "encoder.layers.0.conv.weight"
    if torch.equal(before[name], after[f"backbone.{name}"]):
        raise CheckFailed("--freeze none left the backbone's weights as they were")
    return f"speaker accuracy {metrics['accuracy']:.3f}; the backbone trained"


def steps() -> list[Step]:
    """The check, in order (later steps use the demo's corpus and checkpoint)."""
    demo = ["--demo", "--device", "cuda", "--lr-schedule", "constant"]
    checkpoint = ["--checkpoint", "straight/latest.pt", "--data-dir", "data/demo", "--device", "cuda"]
    large = ["--what", "train", "--model", "wav2vec_large", "--batch-size", "10", "--segment-length",
             "150000", "--device", "cuda"]
    return [
        Step("demo", python("main.py", *demo, "--max-updates", "200", "--output-dir", "straight"), 120,
             demo_trained),
        Step("demo-stop", python("main.py", *demo, "--max-updates", "100", "--output-dir", "resumed"), 90,
             demo_stopped),
        Step("demo-resume", python("main.py", *demo, "--max-updates", "200", "--output-dir", "resumed",
                                   "--resume"), 90, demo_resumed),
        Step("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          "1", str(REPO / "main.py"), *demo, "--precision", "fp16", "--accumulate-steps", "2",
                          "--compile", "--max-updates", "60", "--output-dir", "compiled"], 300,
             torchrun_trained),
        *[Step(f"large-{precision}", python("bench.py", *large, "--precision", precision, "--json",
                                            f"large_{precision}.json"), 90, large_measured(precision))
          for precision in ("bf16", "fp16", "fp32")],
        Step("stream", [sys.executable, "-c", STREAM], 60, streamed),
        Step("extract", python("extract.py", *checkpoint, "--output", "features.npz", "--pool", "mean"), 60,
             extracted),
        Step("vis", python("vis.py", *checkpoint, "--labels", "folder", "--output-dir", "vis"), 120, drawn),
        Step("finetune", python("finetune.py", *checkpoint, "--labels", "folder", "--freeze", "none",
                                "--freeze-updates", "10", "--max-updates", "60", "--max-folds", "1",
                                "--output-dir", "finetune"), 120, finetuned),
    ]


def run(step: Step, work: Path) -> tuple[str, float, str]:
    """(status, seconds, what it found or why it failed); the step's output goes to <work>/<name>.log."""
    start, timed_out = time.monotonic(), False
    with subprocess.Popen(step.command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
            stdout, stderr = process.communicate()
            timed_out = True
    seconds = time.monotonic() - start
    (work / f"{step.name}.log").write_text(f"$ {' '.join(step.command)}\n{stdout}\n{stderr}")
    if timed_out:
        return "FAIL", seconds, f"still running after {step.timeout} s"
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return "FAIL", seconds, f"exit code {process.returncode}: {last}"
    try:
        return "ok", seconds, step.measure(work, stdout)
    except (CheckFailed, OSError, KeyError, ValueError, IndexError) as err:
        return "FAIL", seconds, f"{type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA GPU and this machine has none (torch.cuda.is_available() is "
              "False): run it where a GPU is lent.", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | work in {work}")
    print(f"{'step':<12} {'status':<6} {'seconds':>7}  result")
    failed = 0
    for step in steps():
        status, seconds, found = run(step, work)
        failed += status != "ok"
        print(f"{step.name:<12} {status:<6} {seconds:>7.1f}  {found}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
