"""On-device forms of a wav2vec model: ONNX and TorchScript graphs (offline or streaming), int8 quantization,
and the drivers that run them. export.py and bench.py stand on this module.

Offline graph: wav (B, L) -> z (B, C, T), c (B, C, T), any B and L (at least the receptive field).
Classifier graph (a finetune.py model, backbone and head): wav (1, L) -> `logits` and `probabilities`
(1, classes), or `value` (1,) for a regressor; every frame of the file is pooled, as Classifier.predict does.
Recognizer graph (a finetune.py --task ctc model): wav (1, L) -> `log_probs` (1, T, symbols + 1), CTC
log-probabilities per frame, the blank first (the symbols are in the metadata's head_config).
Streaming graph (model.StreamingStep, norm="layer" models only): inputs `hop` (1, 160 H) and `state_in_0..N`,
outputs `z` (1, C, H), `c` (1, C, H) and `state_out_0..N`, for H = `hops_per_call` (in the ONNX metadata; 1
by default). Start from zeros of the declared state shapes (the last state is the int64 hop counter, a
scalar), feed each call's state_out back as the next state_in, and drop the first `warmup_hops` frames out
(in the metadata; 2 for the presets): the j-th frame out then is frame j - warmup_hops of extract_features.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data import SAMPLE_RATE, find_audio_files, load_audio
from model import StreamingStep, Wav2Vec
from utils import UserError

# A fine-tuned model (heads.Classifier, heads.Recognizer) is exported through its own export_graph(): backbone
# and head as one module with `form`, `output_names` and `output_axes` (its dynamic output axes); this
# module needs nothing else of it but `backbone`, `config` and parameters.
FineTuned = nn.Module

log = logging.getLogger(__name__)


def optional_package(name: str):
    """Import one of the export packages (onnx, onnxruntime), or say in one sentence how to install them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name} is not installed: on-device export needs `pip install -r "
                        "requirements-device.txt`.") from None

OPSET = 17  # LayerNormalization is an ONNX op from 17 on


class OfflineExtractor(nn.Module):
    """wav (B, L) -> (z, c): extract_features without its input checks, as one traceable graph."""

    def __init__(self, model: Wav2Vec):
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.encoder(wav)
        return z, self.model.context(z)




def extractor_parameters(model: Wav2Vec | FineTuned) -> int:
    """Parameters of what is exported: encoder and context network (the prediction head trains only), and a
    fine-tuned model's head."""
    if not isinstance(model, Wav2Vec):
        head = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("backbone."))
        return extractor_parameters(model.backbone) + head
    return sum(p.numel() for part in (model.encoder, model.context) for p in part.parameters())


def graph_form(model: Wav2Vec | FineTuned, streaming: bool,
               hops: int = 1) -> tuple[nn.Module, tuple, list[str], list[str]]:
    """(module, example inputs, input names, output names) of the offline, classifier or streaming graph (of
    `hops` hops per call)."""
    model = model.eval()
    if not isinstance(model, Wav2Vec):  # a fine-tuned model
        graph = model.export_graph()
        return graph, (torch.zeros(1, SAMPLE_RATE),), ["wav"], graph.output_names
    if not streaming:
        return OfflineExtractor(model), (torch.zeros(1, SAMPLE_RATE),), ["wav"], ["z", "c"]
    step = StreamingStep(model, hops).eval()
    state = step.initial_state()
    names = range(len(state))
    return (step, (torch.zeros(1, hops * model.config.stride), *state),
            ["hop", *(f"state_in_{i}" for i in names)], ["z", "c", *(f"state_out_{i}" for i in names)])


def graph_metadata(model: Wav2Vec | FineTuned, streaming: bool, hops: int = 1) -> dict[str, str]:
    """What a runtime needs beside the graph: the form, stride, warm-up hops, the model config (and a
    classifier's head config, with its label names)."""
    if not isinstance(model, Wav2Vec):
        return {**graph_metadata(model.backbone, False), "form": model.export_graph().form,
                "head_config": json.dumps(model.config.to_dict())}
    meta = {"form": "streaming" if streaming else "offline", "stride": str(model.config.stride),
            "receptive_field": str(model.receptive_field), "config": json.dumps(model.config.to_dict())}
    if streaming:
        meta["warmup_hops"], meta["hops_per_call"] = str(StreamingStep(model).warmup_hops), str(hops)
    return meta


def export_onnx(model: Wav2Vec | FineTuned, path: Path, streaming: bool = False, dynamo: bool = False,
                hops: int = 1) -> None:
    """Write the offline (dynamic batch and length), classifier (dynamic length) or streaming (`hops` hops per
    call) graph of `model` as ONNX to `path`."""
    module, example, inputs, outputs = graph_form(model, streaming, hops)
    classifier = not isinstance(model, Wav2Vec)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but exports this model in seconds where the dynamo one
        # takes minutes; its tracer warns about Python ints from shapes, which are fixed by design here.
        warnings.simplefilter("ignore")
        if dynamo:
            backbone = model.backbone if classifier else model
            samples = torch.export.Dim("samples", min=backbone.receptive_field)
            dims = {"wav": {1: samples} if classifier else {0: torch.export.Dim("batch"), 1: samples}}
            torch.onnx.export(module, example, dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=None if streaming else dims).save(str(path))
        else:
            axes = ({"wav": {1: "samples"}, **module.output_axes} if classifier else
                    {"wav": {0: "batch", 1: "samples"}, "z": {0: "batch", 2: "frames"},
                     "c": {0: "batch", 2: "frames"}})
            torch.onnx.export(module, example, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=None if streaming else axes, opset_version=OPSET, dynamo=False)
    write_onnx_metadata(path, graph_metadata(model, streaming, hops))


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Store `metadata` in the file, share repeated constants and shorten internal names (see share_constants,
    compact_names)."""
    onnx = optional_package("onnx")
    model = onnx.load(str(path))
    share_constants(model.graph)
    compact_names(model.graph)
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def share_constants(graph) -> None:
    """Keep one Constant node per value: the exporter writes one per use (160 in the tiny streaming step, 18
    distinct values, 8 KB of a 232 KB int8 file). The first of each value comes before every later one's
    consumers, so the node order stays topological."""
    first: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    outputs = {output.name for output in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        value = b"".join(attribute.SerializeToString() for attribute in node.attribute)
        if value in first and node.output[0] not in outputs:
            alias[node.output[0]] = first[value]
            graph.node.remove(node)
        else:
            first[value] = node.output[0]
    for node in graph.node:
        node.input[:] = [alias.get(name, name) for name in node.input]


def compact_names(graph) -> None:
    """Rename internal tensors and nodes t0, t1, ... and n0, n1, ...; drop the inferable value_info.
    The exporters' names (`/context/layers.0/Constant_3_output_0`, `..._quantized_scale`) took 77 KB of a
    283 KB int8 tiny model; the graph's inputs and outputs keep theirs."""
    public = {value.name for value in (*graph.input, *graph.output)}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        return name if not name or name in public else short.setdefault(name, f"t{len(short)}")

    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        node.name, node.doc_string = f"n{i}", ""
    del graph.value_info[:]


def export_torchscript(model: Wav2Vec | FineTuned, path: Path, streaming: bool = False,
                       hops: int = 1) -> None:
    """Write the offline, classifier or streaming graph as a traced TorchScript module (torch.jit.load reads
    it)."""
    module, example, _, _ = graph_form(model, streaming, hops)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about shape ints, fixed by design here
        # No re-run check by the tracer (most of a minute under load): export.py compares the written file.
        traced = torch.jit.trace(module, example, check_trace=False)
    metadata = json.dumps(graph_metadata(model, streaming, hops))
    torch.jit.save(traced, str(path), _extra_files={"metadata.json": metadata})


# ----- running ONNX graphs ------------------------------------------------------------------------

def onnx_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session on `threads` intra-op threads (one by default: the device case)."""
    ort = optional_package("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # no warnings about unused initializers on quantized graphs
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_offline(session, wav: np.ndarray) -> dict[str, np.ndarray]:
    """wav (L,) or (B, L) through an offline graph -> {"z": (B, C, T), "c": (B, C, T)}; through a classifier
    graph (B = 1) -> {"logits", "probabilities"} or {"value"}; through a recognizer graph -> {"log_probs"}."""
    wav = np.ascontiguousarray(np.atleast_2d(wav), dtype=np.float32)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"wav": wav}), strict=True))


class OnnxStreamer:
    """Drives a streaming graph: keeps its state between calls, drops the warm-up frames."""

    def __init__(self, session):
        meta = session.get_modelmeta().custom_metadata_map
        if meta.get("form") != "streaming":
            raise UserError("This ONNX file is not a streaming graph: export it with --streaming.")
        self.session, self.warmup_hops = session, int(meta["warmup_hops"])
        self.samples = int(meta["stride"]) * int(meta.get("hops_per_call", 1))  # per call
        types = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
        self.state = {i.name: np.zeros(i.shape, types[i.type])
                      for i in session.get_inputs() if i.name != "hop"}
        self.frames_out = 0

    def step(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """chunk (samples,) -> its frames (z (1, C, t), c (1, C, t)) without the warm-up ones, or None if
        they all were."""
        outputs = self.session.run(None, self.inputs(chunk))
        self.state = dict(zip(self.state, outputs[2:], strict=True))
        z, c = outputs[:2]
        warmup = max(0, self.warmup_hops - self.frames_out)
        self.frames_out += z.shape[-1]
        return None if warmup >= z.shape[-1] else (z[..., warmup:], c[..., warmup:])

    def inputs(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        """The feed of the next step: what calibration records."""
        return {"hop": chunk.reshape(1, -1).astype(np.float32, copy=False), **self.state}

    def frames(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """Every frame that the whole chunks of wav (L,) complete, {"z": (1, C, T), "c": (1, C, T)}."""
        starts = range(0, len(wav) - self.samples + 1, self.samples)
        out = [frame for frame in (self.step(wav[i:i + self.samples]) for i in starts) if frame is not None]
        return {"z": np.concatenate([z for z, _ in out], 2), "c": np.concatenate([c for _, c in out], 2)}


# ----- int8 -----------------------------------------------------------------------------------------

def calibration_audio(folder: Path, max_files: int = 32, seconds: float = 3.0) -> list[np.ndarray]:
    """Up to `max_files` waveforms (16 kHz, at most `seconds` each) spread evenly over a folder's audio."""
    files = find_audio_files(folder)
    if not files:
        raise UserError(f"No audio files under {folder}: give --calibration-dir a folder of speech like the "
                        "audio the model will see.")
    spread = np.linspace(0, len(files) - 1, min(max_files, len(files))).round().astype(int)
    chosen = [files[i] for i in spread]
    return [load_audio(path, num_samples=None)[:int(seconds * SAMPLE_RATE)] for path in dict.fromkeys(chosen)]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray],
                  max_hops: int = 2000) -> None:
    """ONNX Runtime static quantization (QDQ): per-channel int8 weights for every convolution, uint8
    activations calibrated on `calibration` waveforms (L,) at every convolution's input but the waveform's;
    biases, LayerNorm and the state plumbing stay float."""
    quantization = optional_package("onnxruntime.quantization")
    session = onnx_session(fp32_path)
    form = session.get_modelmeta().custom_metadata_map
    if form.get("form") == "streaming":  # calibrate on the states a real stream goes through
        feeds = []
        for wav in calibration:
            streamer = OnnxStreamer(session)
            for start in range(0, len(wav) - streamer.samples + 1, streamer.samples):
                feeds.append(streamer.inputs(wav[start:start + streamer.samples]))
                streamer.step(wav[start:start + streamer.samples])
        feeds = feeds[:: max(1, len(feeds) // max_hops)]
    else:
        feeds = [{"wav": wav[None].astype(np.float32)} for wav in calibration
                 if len(wav) >= int(form["receptive_field"])]
    if not feeds:
        raise UserError("The calibration audio is shorter than one frame: give longer files.")

    class Feeds(quantization.CalibrationDataReader):
        def __init__(self):
            self.rest = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.rest, None)

    with without_quantizer_advice():
        quantization.quantize_static(
            str(fp32_path), str(int8_path), Feeds(), quant_format=quantization.QuantFormat.QDQ,
            per_channel=True, weight_type=quantization.QuantType.QInt8,
            activation_type=quantization.QuantType.QUInt8, op_types_to_quantize=["Conv"],
            nodes_to_exclude=[first_convolution(fp32_path)],
            extra_options={"QuantizeBias": False})  # int32 biases came with int32 zero points, float scales
    shrink_int8(int8_path)
    write_onnx_metadata(int8_path, form)


class QuantizerAdvice(logging.Filter):
    """Drops the advice ONNX Runtime's quantizer logs on the root logger that does not apply here: run its
    pre-processing (said twice per call; its shape inference the quantizer runs anyway, its graph fusions
    serve the fused operators of larger networks, and export.py measures the int8 graph as it is), and, per
    convolution, that a bias is not an initializer (biases stay float on purpose: QuantizeBias False)."""

    ADVICE = ("Please consider to run pre-processing", "Please consider pre-processing", "Expected bias")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.ADVICE)


@contextlib.contextmanager
def without_quantizer_advice() -> Iterator[None]:
    """QuantizerAdvice on the root logger for the block."""
    advice = QuantizerAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def shrink_int8(path: Path) -> None:
    """Store at 8 bits what the static quantizer left wider: a convolution weight it skipped (the first one,
    whose input stays float: see first_convolution) becomes int8 per output channel, dequantized in the graph;
    the int8 weights' zero points, all 0 (symmetric) and DequantizeLinear's default, are dropped."""
    onnx = optional_package("onnx")
    model = onnx.load(str(path))
    graph, tensor = model.graph, onnx.numpy_helper
    stored = {t.name: t for t in graph.initializer}
    for node in graph.node:
        zero_point = stored.get(node.input[-1]) if node.op_type == "DequantizeLinear" else None
        if len(node.input) == 3 and zero_point is not None and zero_point.data_type == onnx.TensorProto.INT8 \
                and not tensor.to_array(zero_point).any():
            del node.input[2]
    for i, node in enumerate(list(graph.node)):
        weight = stored.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        w = tensor.to_array(weight)
        scale = np.maximum(np.abs(w).reshape(len(w), -1).max(1), 1e-12).astype(np.float32) / 127
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
        graph.initializer.extend([tensor.from_array(q, f"{weight.name}_q"),
                                  tensor.from_array(scale, f"{weight.name}_scale")])
        dequantize = onnx.helper.make_node("DequantizeLinear", [f"{weight.name}_q", f"{weight.name}_scale"],
                                           [weight.name], axis=0)
        graph.node.insert(i, dequantize)
        graph.initializer.remove(weight)
    used = {name for node in graph.node for name in node.input}
    for unused in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(unused)
    onnx.save(model, str(path))


def first_convolution(path: Path) -> str:
    """The name of the convolution on the raw waveform (nodes are stored in topological order): its input
    stays float, because 8-bit audio loses quiet speech that per-frame LayerNorm then scales up (cosine to
    fp32 0.90 with it quantized, 0.99 without, z of a random tiny model); shrink_int8 stores its weight in
    int8."""
    onnx = optional_package("onnx")
    return next(node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Conv")


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame cosine similarity of two (..., C, T) feature arrays, flattened over frames."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-2) * np.linalg.norm(b, axis=-2)
    cosine = (a * b).sum(-2) / np.maximum(norms, 1e-30)
    both_zero = (np.abs(a).max(-2) == 0) & (np.abs(b).max(-2) == 0)  # silence after a ReLU: identical
    return np.where(both_zero, 1.0, cosine).ravel()
