"""Heads on a backbone (heads.py): padding never counts, and a finetuned.pt loads and predicts in two lines,
directly or through torch.hub."""

import pytest
import soundfile as sf
import torch
from audio import noise
from scripts import REPO, run_finetune
from weights import fine_tuned, recorded_load_locations

from heads import Classifier, Pooling, pad_frames
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


def test_predict_takes_a_file_or_a_waveform_at_its_own_rate_alike(tmp_path):
    model = fine_tuned("classify")
    wav = noise(0.5)[::2].copy()  # 8 kHz
    sf.write(tmp_path / "clip.wav", wav, 8000, subtype="FLOAT")
    from_file = model.predict(tmp_path / "clip.wav")
    for array in (wav, torch.from_numpy(wav)):
        assert model.predict(array, sample_rate=8000)["probabilities"] == from_file["probabilities"]
    with pytest.raises(UserError, match="The waveform is shorter than one frame"):
        model.predict(wav[:100])
