"""Heads on a backbone (heads.py): padding never counts, a finetuned.pt loads and predicts (or transcribes)
in two lines, directly or through torch.hub, and a causal recognizer transcribes a stream as it would the
whole file."""

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn as nn
from audio import noise
from scripts import REPO, run_finetune, run_recognition
from weights import fine_tuned, recognizer, recorded_load_locations

from heads import BiLSTM, Classifier, FineTuned, Pooling, Recognizer, greedy_paths, pad_frames
from model import UserError, Wav2Vec


@pytest.mark.parametrize("how", ["mean", "mean+std", "attentive"])
def test_padding_does_not_change_pooled_features(how):
    torch.manual_seed(0)
    pooling = Pooling(how, channels=6, hidden=4)
    short, long = torch.randn(6, 5), torch.randn(6, 9)
    padded, mask = pad_frames([short, long])  # short gets 4 frames of padding
    padded[0, :, 5:] = 100.0  # whatever sits in the padding
    alone, _ = pad_frames([short])
    assert torch.allclose(pooling(padded, mask)[0], pooling(alone, torch.ones(1, 5, dtype=torch.bool))[0],
                          atol=1e-6)


def test_finetuned_model_loads_with_weights_only_and_predicts_in_two_lines(tmp_path, tones):
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--max-folds", "1", "--epochs", "2")
    ckpt = torch.load(tmp_path / "run" / "finetuned.pt", weights_only=True)
    assert ckpt["head_config"]["labels"] == ["300", "1500"] and ckpt["args"]["epochs"] == 2
    model = Classifier.from_pretrained(tmp_path / "run" / "finetuned.pt")
    prediction = model.predict(tones / "300hz_ann_0.wav")
    assert prediction["label"] in ("300", "1500")
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0)


def test_a_finetuned_model_is_read_on_the_cpu_and_moved_to_map_location(tmp_path, monkeypatch):
    path = tmp_path / "finetuned.pt"
    torch.save(fine_tuned("classify").payload({}), path)
    loads = recorded_load_locations(monkeypatch)
    model = Classifier.from_pretrained(path, map_location="meta")  # "meta" stands in for "cuda"
    assert loads == ["cpu"] and {p.device.type for p in model.parameters()} == {"meta"}


def test_torch_hub_loads_a_classifier_and_a_pretrained_wav2vec(tmp_path, tones, checkpoint32):
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--max-folds", "1", "--epochs", "1")
    classifier = torch.hub.load(str(REPO), "classifier", checkpoint=str(tmp_path / "run" / "finetuned.pt"),
                                source="local")
    wav2vec = torch.hub.load(str(REPO), "wav2vec", checkpoint=str(checkpoint32), source="local")
    assert isinstance(classifier, Classifier) and isinstance(wav2vec, Wav2Vec)
    assert wav2vec.extract_features(torch.zeros(4000))["c"].shape[1] == 32


# ----- the CTC head -------------------------------------------------------------------------------

def test_the_bilstm_is_a_bidirectional_lstm_on_each_sequence_alone_whatever_the_padding():
    torch.manual_seed(0)
    ours = BiLSTM(6, 5, layers=2, dropout=0.0).eval()
    reference = nn.LSTM(6, 5, 2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for layer in range(2):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                forward = getattr(ours.forward_layers[layer], f"{name}_l0")
                getattr(reference, f"{name}_l{layer}").copy_(forward)
                getattr(reference, f"{name}_l{layer}_reverse").copy_(
                    getattr(ours.backward_layers[layer], f"{name}_l0"))
        x, lengths = torch.randn(3, 9, 6), torch.tensor([9, 5, 1])
        x[1, 5:] = 100.0  # whatever sits in the padding
        out = ours(x, lengths)
        for row, length in enumerate(lengths.tolist()):
            alone = reference(x[row:row + 1, :length])[0][0]
            torch.testing.assert_close(out[row, :length], alone, atol=1e-6, rtol=1e-5)


def test_greedy_decoding_merges_repeats_drops_blanks_and_stops_at_the_length():
    best = torch.tensor([[0, 1, 1, 0, 1, 2, 2, 0, 3, 3]])  # frame by frame argmax; 0 is the blank
    log_probs = nn.functional.one_hot(best, 4).float().log()
    assert greedy_paths(log_probs, torch.tensor([10])) == [[1, 1, 2, 3]]  # a blank between repeats keeps both
    assert greedy_paths(log_probs, torch.tensor([6])) == [[1, 1, 2]]


def test_a_causal_recognizer_transcribes_a_stream_as_it_would_the_whole_file():
    model = recognizer("wav2vec_tiny", head="linear", layer="c")
    rng = np.random.default_rng(0)
    t = np.arange(1600) / 16000
    wav = np.concatenate([rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
                          + 0.01 * rng.standard_normal(len(t)) for _ in range(10)]).astype(np.float32)
    with torch.no_grad():  # standardise with this audio's own statistics, so that its frames differ
        c = model.frames(model.latent(torch.from_numpy(wav)))
        model.feature_mean.copy_(c.mean(-1))
        model.feature_std.copy_(c.std(-1))
    offline = model.transcribe(wav)
    assert len(offline.split()) > 5  # a transcript worth comparing
    stream = model.streamer()
    emitted, sizes = [], [1, 37, 160, 465, 1000, 3]
    start = 0
    for i in range(10_000):
        size = sizes[i % len(sizes)]
        emitted += stream.push(wav[start:start + size])
        start += size
        if start >= len(wav):
            break
    assert " ".join(emitted) == stream.transcript == offline


@pytest.mark.parametrize("preset, head, layer", [("wav2vec", "linear", "c"), ("wav2vec_tiny", "bilstm", "c"),
                                                 ("wav2vec_tiny", "linear", "all")])
def test_a_recognizer_that_needs_the_whole_file_refuses_to_stream(preset, head, layer):
    with pytest.raises(UserError, match="Streaming recognition needs a causal model"):
        recognizer(preset, head=head, layer=layer).streamer()


def test_a_recognizer_loads_with_weights_only_transcribes_and_comes_through_torch_hub(tmp_path, transcribed):
    run_recognition(tmp_path, transcribed, "--epochs", "2", "--max-folds", "1")
    path = tmp_path / "ctc" / "finetuned.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["head_config"]["task"] == "ctc" and ckpt["head_config"]["labels"] == list("aeiosu")
    model = Recognizer.from_pretrained(path)
    assert isinstance(model.transcribe(transcribed / "speaker00" / "speaker00_000.wav"), str)
    hub = torch.hub.load(str(REPO), "recognizer", checkpoint=str(path), source="local")
    assert isinstance(hub, Recognizer) and isinstance(FineTuned.from_pretrained(path), Recognizer)
    with pytest.raises(UserError, match="a Recognizer \\(ctc\\): load it with Recognizer.from_pretrained"):
        Classifier.from_pretrained(path)


def test_predict_takes_a_file_or_a_waveform_at_its_own_rate_alike(tmp_path):
    model = fine_tuned("classify")
    wav = noise(0.5)[::2].copy()  # 8 kHz
    sf.write(tmp_path / "clip.wav", wav, 8000, subtype="FLOAT")
    from_file = model.predict(tmp_path / "clip.wav")
    for array in (wav, torch.from_numpy(wav)):
        assert model.predict(array, sample_rate=8000)["probabilities"] == from_file["probabilities"]
    with pytest.raises(UserError, match="The waveform is shorter than one frame"):
        model.predict(wav[:100])
