"""Export a pre-trained model for on-device use: ONNX or TorchScript, offline or streaming, fp32 or int8.

    python export.py --checkpoint CKPT --format onnx|torchscript [--streaming [--hops-per-call N]] \
                     --output FILE
    python export.py --checkpoint CKPT --format onnx [--streaming] --quantize int8 --calibration-dir DIR \\
                     --output FILE.int8.onnx

Offline: wav (B, L) -> z (B, C, T), c (B, C, T), any batch and length. --streaming (models with
norm="layer", e.g. --model wav2vec_tiny): one hop of 160 samples (or N hops) and the state in, the
frame (N frames) and the state out (see ondevice.py for the protocol). Every file written is loaded back,
run on random audio and compared with PyTorch (largest absolute difference printed).
A finetune.py model (--checkpoint runs/ft/finetuned.pt) exports with its head as one graph: wav (1, L) ->
logits and probabilities (classify) or value (regress), checked against Classifier.predict; a recognizer
(--task ctc) -> log_probs (1, T, symbols + 1), checked against Recognizer.transcribe (the greedy transcript
of the graph's log-probabilities is the same) and its log-probabilities.
--quantize int8 (ONNX): ONNX Runtime static quantization, per-channel int8 convolution weights and uint8
activations calibrated on --calibration-dir; the fp32 graph is kept beside it (FILE with .fp32.onnx), and
the size, speed (one thread) and cosine similarity of the features to fp32 on the calibration audio are
printed (for a classifier: how often int8 gives fp32's label, and the largest output difference; for a
recognizer: how often a frame's most likely symbol is fp32's).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import ondevice
from data import SAMPLE_RATE
from heads import Classifier, FineTuned, Recognizer, greedy_paths
from model import StreamingStep, Wav2Vec, read_checkpoint
from utils import (
    HelpFormatter,
    UserError,
    add_threads_argument,
    positive_int,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)

PARITY_LENGTHS = (465, 4000, 16007)  # one frame, a short crop, a second with a ragged end
STREAM_SECONDS = 1.0  # random audio streamed hop by hop for the streaming parity check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint of main.py (or fairseq's), or a finetuned.pt of finetune.py")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    parser.add_argument("--streaming", action="store_true",
                        help="the streaming step (one 10 ms hop, state in and out), not the offline graph")
    parser.add_argument("--hops-per-call", type=positive_int, default=1,
                        help="--streaming: 10 ms hops per call (more: fewer calls, and more latency)")
    parser.add_argument("--output", type=Path, required=True, help="the file to write")
    parser.add_argument("--quantize", choices=("int8",), help="post-training static quantization (ONNX only)")
    parser.add_argument("--calibration-dir", type=Path, help="audio to calibrate int8 activations on")
    parser.add_argument("--calibration-files", type=int, default=32,
                        help="files taken from --calibration-dir")
    parser.add_argument("--dynamo", action="store_true",
                        help="use PyTorch's torch.export-based ONNX exporter (minutes, not seconds)")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    add_threads_argument(parser, default=1)
    args = parser.parse_args(argv)
    if args.quantize and args.format != "onnx":
        parser.error("--quantize int8 works on ONNX graphs: use --format onnx")
    if args.quantize and args.calibration_dir is None:
        parser.error("--quantize int8 needs --calibration-dir DIR (speech like the audio the model will see)")
    return args


# ----- loading the written file back --------------------------------------------------------------

def torchscript_runner(path: Path) -> Callable[..., tuple]:
    module = torch.jit.load(str(path))

    @torch.no_grad()
    def run(*inputs: np.ndarray) -> tuple:
        return tuple(out.numpy() for out in module(*map(torch.from_numpy, inputs)))
    return run


def onnx_runner(path: Path) -> Callable[..., tuple]:
    session = ondevice.onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    return lambda *inputs: tuple(session.run(None, dict(zip(names, inputs, strict=True))))


def load_model(path: Path, streaming: bool) -> Wav2Vec | FineTuned:
    """The pre-trained model, or the fine-tuned one (backbone and head), in a checkpoint."""
    if "head_config" not in read_checkpoint(path):  # read again by the loader: small next to the export
        return Wav2Vec.from_pretrained(path)
    if streaming:
        raise UserError("A fine-tuned head pools over the whole file, so it exports as one offline graph: "
                        "drop --streaming (or stream the pre-trained checkpoint it was fine-tuned from).")
    return FineTuned.from_pretrained(path)


def classifier_pairs(model: Classifier, run: Callable[..., tuple],
                     rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(PyTorch, exported) pairs over several lengths: the head's raw outputs and what predict() returns."""
    pairs = []
    for length in PARITY_LENGTHS:
        wav = rng.standard_normal((1, length)).astype(np.float32)
        got = run(wav)
        predicted = model.predict(wav[0])
        if model.config.task == "classify":
            with torch.no_grad():
                pairs.append((model([torch.from_numpy(wav[0])]).numpy(), got[0]))
            pairs.append((np.array([list(predicted["probabilities"].values())]), got[1]))
        else:
            pairs.append((np.array([predicted["value"]]), got[0]))
    return pairs


def recognizer_pairs(model: Recognizer, run: Callable[..., tuple],
                     rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(PyTorch, exported) pairs over several lengths: the log-probabilities, and their greedy paths (the
    output ids of the transcript transcribe() gives)."""
    pairs = []
    for length in PARITY_LENGTHS:
        wav = rng.standard_normal((1, max(length, model.shortest_input))).astype(np.float32)
        exported = run(wav)[0]
        with torch.no_grad():
            reference = model([torch.from_numpy(wav[0])])
        frames = torch.tensor([exported.shape[1]])
        pairs += [(reference.numpy(), exported),
                  (np.array(greedy_paths(reference, frames)[0]),
                   np.array(greedy_paths(torch.from_numpy(exported), frames)[0]))]
    return pairs


def reference_and_exported(model: Wav2Vec | FineTuned, run: Callable[..., tuple], streaming: bool,
                           rng: np.random.Generator, stream_seconds: float = STREAM_SECONDS,
                           hops: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(PyTorch, exported) output pairs: offline over several lengths, or every call of a random stream."""
    if isinstance(model, Classifier):
        return classifier_pairs(model, run, rng)
    if isinstance(model, Recognizer):
        return recognizer_pairs(model, run, rng)
    if not streaming:
        pairs = []
        for length in PARITY_LENGTHS:
            wav = rng.standard_normal((2, length)).astype(np.float32)
            want = model.extract_features(torch.from_numpy(wav))
            pairs += list(zip((want["z"].numpy(), want["c"].numpy()), run(wav)[:2], strict=True))
        return pairs
    step = StreamingStep(model, hops).eval()
    state = step.initial_state()
    exported = [s.numpy() for s in state]
    wav = rng.standard_normal((1, int(stream_seconds * SAMPLE_RATE))).astype(np.float32)
    pairs, samples = [], hops * model.config.stride
    with torch.no_grad():
        for start in range(0, wav.shape[1] - samples + 1, samples):
            chunk = wav[:, start:start + samples]
            z, c, *state = step(torch.from_numpy(chunk), *state)
            out = run(chunk, *exported)
            exported = list(out[2:])  # the exported graph carries its own state from call to call
            pairs += [(z.numpy(), out[0]), (c.numpy(), out[1])]
    return pairs


def parity(model: Wav2Vec | FineTuned, path: Path, fmt: str, streaming: bool,
           stream_seconds: float = STREAM_SECONDS, hops: int = 1) -> float:
    """Largest |PyTorch - exported| over the parity inputs; raises if beyond rtol 1e-4 (a bug, not a user
    error)."""
    run = onnx_runner(path) if fmt == "onnx" else torchscript_runner(path)
    pairs = reference_and_exported(model, run, streaming, np.random.default_rng(0), stream_seconds, hops)
    for want, got in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return max(float(np.abs(want - got).max(initial=0.0)) for want, got in pairs)


# ----- int8 -------------------------------------------------------------------------------------------

def median_seconds(call: Callable[[], object], repeats: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def outputs_of(path: Path, wavs: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    session = ondevice.onnx_session(path)
    if session.get_modelmeta().custom_metadata_map["form"] == "streaming":
        return [ondevice.OnnxStreamer(session).frames(wav) for wav in wavs]
    return [ondevice.onnx_offline(session, wav) for wav in wavs]


def closeness(fp32: list[dict[str, np.ndarray]], int8: list[dict[str, np.ndarray]]) -> dict:
    """How far int8's outputs are from fp32's: per-frame cosine similarity of features; for a classifier, how
    often the label is the same and the largest probability difference; for a regressor, the largest value
    difference; for a recognizer, how often a frame's most likely symbol is the same."""
    report = {}
    if "log_probs" in fp32[0]:
        same = np.concatenate([a["log_probs"].argmax(-1).ravel() == b["log_probs"].argmax(-1).ravel()
                               for a, b in zip(fp32, int8, strict=True)])
        report["same_symbol_fraction"] = round(float(same.mean()), 4)
        return report
    if "z" in fp32[0]:
        for key in ("z", "c"):
            cos = np.concatenate([ondevice.cosine_similarity(a[key], b[key])
                                  for a, b in zip(fp32, int8, strict=True)])
            report[f"cosine_{key}_mean"] = round(float(cos.mean()), 4)
            report[f"cosine_{key}_min"] = round(float(cos.min()), 4)
        return report
    key = "probabilities" if "probabilities" in fp32[0] else "value"
    if key == "probabilities":
        same = [a[key].argmax() == b[key].argmax() for a, b in zip(fp32, int8, strict=True)]
        report["same_label_fraction"] = round(float(np.mean(same)), 4)
    report[f"max_abs_diff_{key}"] = round(max(float(np.abs(a[key] - b[key]).max())
                                              for a, b in zip(fp32, int8, strict=True)), 6)
    return report


def int8_report(fp32_path: Path, int8_path: Path, wavs: list[np.ndarray]) -> dict:
    """Size, one-thread speed and closeness (see closeness) of the int8 graph against the fp32 one."""
    report = {"fp32_bytes": fp32_path.stat().st_size, "int8_bytes": int8_path.stat().st_size}
    report["size_ratio"] = round(report["fp32_bytes"] / report["int8_bytes"], 2)
    report.update(closeness(outputs_of(fp32_path, wavs), outputs_of(int8_path, wavs)))
    second = np.resize(wavs[0], SAMPLE_RATE)
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        session = ondevice.onnx_session(path)
        if session.get_modelmeta().custom_metadata_map["form"] == "streaming":
            streamer = ondevice.OnnxStreamer(session)
            seconds = median_seconds(lambda s=streamer: s.step(second[:s.samples]), repeats=200)
            report[f"{name}_seconds_per_call"] = round(seconds, 6)
        else:
            seconds = median_seconds(lambda s=session: ondevice.onnx_offline(s, second))
            report[f"{name}_seconds_per_audio_second"] = round(seconds, 5)
    return report


def main(argv: list[str] | None = None) -> dict:
    """Export, check the written file against PyTorch, quantize if asked; print and return the report."""
    args = parse_args(argv)
    setup_logging()
    set_threads(args.threads)
    model = load_model(args.checkpoint, args.streaming)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    exported = args.output.with_suffix(".fp32.onnx") if args.quantize else args.output
    if args.format == "onnx":
        ondevice.export_onnx(model, exported, streaming=args.streaming, dynamo=args.dynamo,
                             hops=args.hops_per_call)
    else:
        ondevice.export_torchscript(model, exported, streaming=args.streaming, hops=args.hops_per_call)
    form = ("streaming" if args.streaming else "offline") if isinstance(model, Wav2Vec) else \
        model.export_graph().form
    report = {"output": str(args.output), "format": args.format, "form": form,
              "parameters": ondevice.extractor_parameters(model),
              "bytes": exported.stat().st_size,
              "max_abs_diff_to_pytorch": parity(model, exported, args.format, args.streaming,
                                                hops=args.hops_per_call)}
    if args.streaming:
        report["warmup_hops"], report["hops_per_call"] = StreamingStep(model).warmup_hops, args.hops_per_call
    if args.quantize:
        wavs = ondevice.calibration_audio(args.calibration_dir, args.calibration_files)
        ondevice.quantize_int8(exported, args.output, wavs)
        report.update(int8_report(exported, args.output, wavs))
    for name, value in report.items():
        print(f"{name:<34} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run_cli(main)
