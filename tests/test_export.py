"""export.py and ondevice.py: ONNX and TorchScript equal PyTorch, offline and streaming; int8 stays close;
a fine-tuned model exports with its head."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from weights import fine_tuned, recognizer, save_weights

import export
import ondevice
from demo import make_demo_corpus
from heads import Classifier, HeadConfig, greedy_paths
from model import UserError, Wav2Vec, Wav2VecConfig


@pytest.fixture(scope="module")
def model() -> Wav2Vec:
    torch.manual_seed(0)
    return Wav2Vec(Wav2VecConfig.preset("wav2vec_tiny", channels=8, log_compression=True)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_weights(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def streaming_onnx(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "step.onnx"
    ondevice.export_onnx(model, path, streaming=True)
    return path


def offline(model: Wav2Vec, wav: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.extract_features(torch.from_numpy(wav)).items()}


# ----- offline and streaming graphs ---------------------------------------------------------------

def test_onnx_offline_graph_equals_pytorch_for_any_length(model, tmp_path):
    path = tmp_path / "offline.onnx"
    ondevice.export_onnx(model, path)
    session = ondevice.onnx_session(path)
    for length in (465, 1234, 8000):
        wav = np.random.default_rng(length).standard_normal((2, length)).astype(np.float32)
        got, want = ondevice.onnx_offline(session, wav), offline(model, wav)
        for key in ("z", "c"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hops", [1, 4])
def test_onnx_streaming_graph_carries_its_state_and_gives_offline_frames(model, tmp_path, hops):
    path = tmp_path / "step.onnx"
    ondevice.export_onnx(model, path, streaming=True, hops=hops)
    wav = np.random.default_rng(0).standard_normal(4000).astype(np.float32)
    streamer = ondevice.OnnxStreamer(ondevice.onnx_session(path))
    got = streamer.frames(wav)
    whole_calls = 4000 // (160 * hops)
    assert streamer.state["state_in_14"] == whole_calls * hops  # the hop counter came back out and in
    frames = got["z"].shape[-1]
    assert frames == model.num_frames(whole_calls * hops * 160)
    want = offline(model, wav)
    for key in ("z", "c"):
        np.testing.assert_allclose(got[key], want[key][..., :frames], rtol=1e-4, atol=1e-5)


def test_a_fresh_state_forgets_the_audio_before(model, streaming_onnx):
    # The same hop, after different histories, gives different frames: the output depends on the state fed in.
    session = ondevice.onnx_session(streaming_onnx)
    rng = np.random.default_rng(1)
    first, second = (ondevice.OnnxStreamer(session) for _ in range(2))
    for _ in range(3):
        first.step(rng.standard_normal(160).astype(np.float32))
        second.step(rng.standard_normal(160).astype(np.float32))
    hop = rng.standard_normal(160).astype(np.float32)
    assert not np.allclose(first.step(hop)[1], second.step(hop)[1])


def test_an_offline_graph_cannot_be_driven_as_a_stream(model, tmp_path):
    path = tmp_path / "offline.onnx"
    ondevice.export_onnx(model, path)
    with pytest.raises(UserError, match="--streaming"):
        ondevice.OnnxStreamer(ondevice.onnx_session(path))


@pytest.mark.parametrize("streaming", [False, True])
def test_torchscript_round_trip_equals_pytorch(model, tmp_path, streaming):
    path = tmp_path / "model.pt"
    ondevice.export_torchscript(model, path, streaming=streaming)
    assert export.parity(model, path, "torchscript", streaming, stream_seconds=0.3) < 1e-5  # 28 frames


def test_int8_export_stores_every_weight_in_int8_and_features_stay_within_cosine_0_98(checkpoint, tmp_path):
    make_demo_corpus(tmp_path / "calibration", num_speakers=1, files_per_speaker=4, seconds_per_file=1.0)
    report = export.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--quantize", "int8",
                          "--calibration-dir", str(tmp_path / "calibration"),
                          "--output", str(tmp_path / "tiny.int8.onnx")])
    assert (tmp_path / "tiny.int8.fp32.onnx").is_file()
    weights = onnx.load(str(tmp_path / "tiny.int8.onnx")).graph.initializer
    kernels = {onnx.TensorProto.DataType.Name(w.data_type) for w in weights if len(w.dims) == 3}
    assert kernels == {"INT8"}  # the first convolution's too: only its input, the waveform, stays float
    assert sum(len(w.dims) == 3 for w in weights) == 5 + 9
    assert all(w.data_type != onnx.TensorProto.INT32 for w in weights)  # biases stay float, no int32 copies
    assert report["cosine_z_mean"] >= 0.98 and report["cosine_c_mean"] >= 0.98


def test_missing_export_packages_are_named_with_the_install_command(monkeypatch):
    def not_installed(name):
        raise ImportError(name)

    monkeypatch.setattr(ondevice.importlib, "import_module", not_installed)
    with pytest.raises(UserError, match=r"onnxruntime is not installed: .*requirements-device.txt"):
        ondevice.onnx_session(Path("any.onnx"))


# ----- fine-tuned models --------------------------------------------------------------------------

@pytest.mark.parametrize("task, head", [("classify", {"layer": "c", "pool": "mean", "head": "linear"}),
                                        ("classify", {"layer": "all", "pool": "attentive", "head": "mlp"}),
                                        ("regress", {"layer": "z", "pool": "mean+std", "head": "linear"})])
def test_a_fine_tuned_head_exports_with_its_backbone_as_one_graph_equal_to_predict(tmp_path, task, head):
    model, path = fine_tuned(task, **head), tmp_path / "classifier.onnx"
    ondevice.export_onnx(model, path)
    session = ondevice.onnx_session(path)
    for length in (465, 3001, 8000):  # the graph's length is dynamic
        wav = np.random.default_rng(length).standard_normal(length).astype(np.float32)
        got, want = ondevice.onnx_offline(session, wav), model.predict(wav)
        if task == "classify":
            want_probabilities = list(want["probabilities"].values())
            np.testing.assert_allclose(got["probabilities"][0], want_probabilities, rtol=1e-4)
        else:
            np.testing.assert_allclose(got["value"], [want["value"]], rtol=1e-4)


@pytest.mark.parametrize("head", [{"head": "linear", "layer": "z"},
                                  {"head": "bilstm", "layer": "all", "subsample": 2}])
def test_a_recognizer_exports_as_one_graph_whose_log_probabilities_and_transcript_equal_pytorch(tmp_path,
                                                                                                 head):
    model, path = recognizer(**head), tmp_path / "recognizer.onnx"
    ondevice.export_onnx(model, path)
    session = ondevice.onnx_session(path)
    assert session.get_modelmeta().custom_metadata_map["form"] == "recognizer"
    for length in (model.shortest_input, 3001, 8000):  # the graph's length is dynamic
        wav = np.random.default_rng(length).standard_normal(length).astype(np.float32)
        got = ondevice.onnx_offline(session, wav)["log_probs"]
        want, transcript = model.recognize(wav)
        np.testing.assert_allclose(got[0], want.numpy(), rtol=1e-4, atol=1e-4)
        path_ids = greedy_paths(torch.from_numpy(got), torch.tensor([got.shape[1]]))[0]
        assert " ".join(model.symbols(path_ids)) == transcript


def test_export_cli_checks_a_recognizer_against_pytorch(tmp_path):
    checkpoint = tmp_path / "finetuned.pt"
    torch.save(recognizer(head="bilstm").payload({}), checkpoint)  # what finetune.py --task ctc writes
    report = export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "r.onnx")])
    assert report["form"] == "recognizer" and report["max_abs_diff_to_pytorch"] < 1e-4


def test_int8_quantization_logs_no_advice_that_does_not_apply(model, tmp_path, caplog):
    ondevice.export_onnx(model, tmp_path / "fp32.onnx")
    calibration = [np.random.default_rng(0).standard_normal(4000).astype(np.float32)]
    with caplog.at_level("WARNING"):
        ondevice.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration)
    assert "pre-processing" not in caplog.text and "Expected bias" not in caplog.text
    assert (tmp_path / "int8.onnx").is_file()


def test_export_cli_writes_a_fine_tuned_model_as_onnx_torchscript_and_int8(tmp_path):
    checkpoint = tmp_path / "finetuned.pt"
    torch.save(fine_tuned("classify").payload({}), checkpoint)  # what finetune.py writes
    calibration = tmp_path / "calibration"
    make_demo_corpus(calibration, num_speakers=1, files_per_speaker=4, seconds_per_file=1.0)
    for fmt, quantize in (("onnx", []), ("torchscript", []),
                          ("onnx", ["--quantize", "int8", "--calibration-dir", str(calibration)])):
        report = export.main(["--checkpoint", str(checkpoint), "--format", fmt, *quantize,
                              "--output", str(tmp_path / f"out.{fmt}{len(quantize)}")])
        assert report["form"] == "classifier" and report["max_abs_diff_to_pytorch"] < 1e-4
    assert report["same_label_fraction"] >= 0.75
    labels = json.loads(ondevice.onnx_session(tmp_path / "out.onnx4").get_modelmeta()
                        .custom_metadata_map["head_config"])["labels"]
    assert labels == ["no", "yes", "stop"]


def test_an_mfcc_head_is_refused_with_the_reason():
    model = Classifier(HeadConfig(labels=("a", "b"), backbone="mfcc", channels=26), None)
    with pytest.raises(UserError, match="MFCCs.*NumPy"):
        ondevice.export_onnx(model, Path("never-written.onnx"))
