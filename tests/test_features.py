"""Frame features (features.py): MFCCs and their parts, the log-mel spectrogram, chunked extraction of
long audio, pooling, and the backbone grammar (random, random:CKPT)."""

import numpy as np
import pytest
import soundfile as sf
import torch
from audio import noise
from weights import save_weights, tiny_model

from data import FRAME_HOP, load_audio
from features import (
    MEL_BANDS,
    SPECTROGRAM_WINDOW,
    backbone_config,
    chunk_windows,
    chunked_features,
    deltas,
    featurizer,
    hz_to_mel,
    load_waveform,
    log_mel_spectrogram,
    mel_filterbank,
    mfcc,
    model_features,
    pool,
)
from model import UserError, Wav2Vec, Wav2VecConfig

# ----- MFCC and the log-mel spectrogram -----------------------------------------------------------

def test_mfcc_has_13_coefficients_and_13_deltas_per_10ms_frame():
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    feats = mfcc(wav)
    assert feats.shape == (26, 1 + (16000 - 400) // 160) and feats.dtype == np.float32
    assert np.isfinite(mfcc(np.zeros(1000, dtype=np.float32))).all()  # digital silence stays finite


def test_deltas_of_a_ramp_equal_its_slope_and_flatten_at_the_edges():
    ramp = np.arange(10.0)[None] * 3.0  # (D=1, T=10), slope 3 per frame
    d = deltas(ramp)[0]
    np.testing.assert_allclose(d[2:-2], 3.0)
    # Edge frames are repeated: at t = 0, (1 * (3 - 0) + 2 * (6 - 0)) / 10 = 1.5.
    assert d[0] == pytest.approx(1.5) and d[-1] == pytest.approx(1.5)


def test_a_tone_lands_in_the_mel_filter_centred_nearest_it():
    bank = mel_filterbank(40, 512, 16000)
    spectrum = np.zeros(257)
    spectrum[32] = 1.0  # bin 32 of a 512-point FFT at 16 kHz: 1000 Hz
    centres = np.argmax(bank, axis=1) * 16000 / 512
    assert np.argmax(bank @ spectrum) == np.argmin(np.abs(centres - 1000))
    assert bank.shape == (40, 257) and (bank.max(axis=1) > 0).all()  # no empty filter


def test_log_mel_spectrogram_puts_a_tone_in_its_band():
    seconds = np.arange(16000) / 16000
    mel = log_mel_spectrogram(np.sin(2 * np.pi * 1000 * seconds).astype(np.float32))  # (bands, T)
    assert mel.shape == (MEL_BANDS, 1 + (16000 - SPECTROGRAM_WINDOW) // FRAME_HOP)
    loudest_band = int(np.argmax(mel.mean(axis=1)))
    band_centre = (loudest_band + 1) / (MEL_BANDS + 1) * hz_to_mel(8000)  # equally spaced in mel
    assert abs(band_centre - hz_to_mel(1000)) < hz_to_mel(8000) / MEL_BANDS


# ----- chunking and pooling -----------------------------------------------------------------------

def test_chunked_equals_whole_file_for_a_layer_norm_model():
    model = tiny_model(norm="layer")
    wav = noise(3.0)
    whole = model.extract_features(torch.from_numpy(wav))
    for layer in ("z", "c"):
        # 4000-sample chunks: 5 output frames each after the 3345-sample left context, 60 chunks.
        chunked = chunked_features(model, wav, layer, chunk_samples=4000)
        np.testing.assert_allclose(chunked, whole[layer][0].numpy(), atol=1e-5, rtol=0)


def test_chunks_tile_every_frame_once_within_the_memory_bound():
    model = tiny_model()
    length, chunk_samples = 50_000, 6000
    kept = []
    for start, end, drop in chunk_windows(model, length, chunk_samples):
        assert start % 160 == 0 and end - start <= chunk_samples and end <= length
        first = start // 160 + drop
        kept += range(first, start // 160 + model.num_frames(end - start))
    assert kept == list(range(model.num_frames(length)))


def test_group_norm_audio_that_fits_is_processed_whole_and_batched_like_one_by_one():
    model = tiny_model(norm="group")
    wavs = [noise(1.0, seed=1), noise(0.7, seed=2), noise(1.0, seed=3)]  # the two 1 s files share a batch
    batched = model_features(model, wavs, "c", chunk_samples=40000)
    for wav, frames in zip(wavs, batched, strict=True):
        np.testing.assert_allclose(frames, model.extract_features(torch.from_numpy(wav))["c"][0].numpy(),
                                   atol=1e-5, rtol=0)


def test_pooling_shapes_and_values():
    frames = np.array([[1.0, 3.0], [2.0, 2.0]])  # (C=2, T=2)
    assert pool(frames, "none") is frames
    np.testing.assert_allclose(pool(frames, "mean"), [2.0, 2.0])
    np.testing.assert_allclose(pool(frames, "mean+std"), [2.0, 2.0, 1.0, 0.0])


# ----- the backbone grammar -----------------------------------------------------------------------

def test_random_features_are_seeded():
    wav = [np.random.default_rng(0).standard_normal(1600).astype(np.float32)]
    first, window = featurizer("random", "c", seed=3, device=torch.device("cpu"))
    second, _ = featurizer("random", "c", seed=3, device=torch.device("cpu"))
    np.testing.assert_array_equal(first(wav)[0], second(wav)[0])
    assert window == 465 and first(wav)[0].shape[0] == 512  # the base config, full width


def test_random_with_a_checkpoint_is_a_random_network_of_that_checkpoints_config(tmp_path):
    torch.manual_seed(1)
    trained = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16, norm="layer"))
    checkpoint = tmp_path / "tiny.pt"
    save_weights(trained, checkpoint)
    wav = [np.random.default_rng(0).standard_normal(1600).astype(np.float32)]
    random_of_it, _ = featurizer(f"random:{checkpoint}", "c", seed=3, device=torch.device("cpu"))
    torch.manual_seed(3)
    expected = Wav2Vec(trained.config).eval().extract_features(torch.from_numpy(wav[0]))["c"][0].numpy()
    np.testing.assert_array_equal(random_of_it(wav)[0], expected)
    assert backbone_config(f"random:{checkpoint}") == trained.config
    assert backbone_config("random") == Wav2VecConfig.preset("wav2vec")
    assert backbone_config("mfcc") is None


# ----- waveforms ----------------------------------------------------------------------------------

def test_load_waveform_takes_a_path_an_array_or_a_tensor_and_resamples_them_alike(tmp_path):
    wav = noise(0.5)[::3].copy()  # noise at 5333 Hz, a rate with no small ratio to 16 kHz
    sf.write(tmp_path / "clip.wav", wav, 5333, subtype="FLOAT")
    from_file = load_waveform(tmp_path / "clip.wav")
    assert from_file.dtype == np.float32 and np.array_equal(from_file, load_audio(tmp_path / "clip.wav"))
    for given in (wav, torch.from_numpy(wav), wav.astype(np.float64)):
        assert np.allclose(load_waveform(given, 5333), from_file, atol=1e-6)
    assert np.array_equal(load_waveform(wav), wav)  # 16 kHz unless told otherwise


def test_load_waveform_refuses_several_channels_in_one_sentence():
    with pytest.raises(UserError, match=r"one mono waveform of shape \(L,\), not \(2, 100\)"):
        load_waveform(np.zeros((2, 100)))
