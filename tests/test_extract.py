"""extract.py and the wav2vec side of features.py: frame counts, pooling, output layouts, chunking."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from weights import save_weights

import extract
from features import chunk_windows, chunked_features, model_features, pool
from model import UserError, Wav2Vec, Wav2VecConfig

FIXTURES = Path(__file__).parent / "fixtures"
LENGTHS = {"a/one.wav": 16000, "a/two.wav": 16000, "b/deep/three.wav": 20800, "four.wav": 9000}


def tiny_model(norm: str = "group") -> Wav2Vec:
    torch.manual_seed(0)
    return Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=32, norm=norm)).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Noise files of different lengths in nested folders (two of equal length, to be batched)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, length in LENGTHS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, 0.1 * rng.standard_normal(length), 16000, subtype="FLOAT")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_model()
    return save_weights(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def test_npy_tree_mirrors_the_data_folder_with_one_frame_per_model_frame(corpus, checkpoint, tmp_path):
    out = tmp_path / "out"
    extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(corpus), "--output", str(out)])
    model = tiny_model()
    for name, length in LENGTHS.items():
        frames = np.load(out / Path(name).with_suffix(".npy"))
        assert frames.shape == (32, model.num_frames(length))


def test_npz_holds_pooled_vectors_in_file_order(corpus, checkpoint, tmp_path):
    out = tmp_path / "feats.npz"
    extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(corpus), "--output", str(out),
                  "--layer", "z", "--pool", "mean+std"])
    archive = np.load(out)
    assert list(archive["files"]) == sorted(LENGTHS)
    assert archive["features"].shape == (len(LENGTHS), 64)


def test_npz_frame_level_concatenates_frames_with_their_lengths(corpus, checkpoint, tmp_path):
    out = tmp_path / "frames.npz"
    extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(corpus), "--output", str(out)])
    archive = np.load(out)
    model = tiny_model()
    expected = [model.num_frames(LENGTHS[name]) for name in archive["files"]]
    assert list(archive["lengths"]) == expected
    assert archive["features"].shape == (32, sum(expected))


def test_fairseq_checkpoint_extracts_features(corpus, tmp_path):
    out = tmp_path / "fairseq.npz"
    fairseq = FIXTURES / "fairseq_style_checkpoint_tiny.pt"
    extract.main(["--checkpoint", str(fairseq), "--data-dir", str(corpus), "--output", str(out),
                  "--pool", "mean"])
    assert np.load(out)["features"].shape == (len(LENGTHS), 32)


def test_two_files_that_would_share_one_npy_are_refused(tmp_path):
    files = [tmp_path / "x.wav", tmp_path / "x.flac"]
    with pytest.raises(UserError, match="differ only in their extension"):
        extract.npy_paths(files, tmp_path, tmp_path / "out")


def test_pooling_shapes_and_values():
    frames = np.array([[1.0, 3.0], [2.0, 2.0]])  # (C=2, T=2)
    assert pool(frames, "none") is frames
    np.testing.assert_allclose(pool(frames, "mean"), [2.0, 2.0])
    np.testing.assert_allclose(pool(frames, "mean+std"), [2.0, 2.0, 1.0, 0.0])


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


def test_unreadable_and_too_short_files_are_skipped(checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sf.write(data / "good.wav", noise(0.5), 16000)
    sf.write(data / "blip.wav", noise(0.01), 16000)  # 160 samples: shorter than one 465-sample frame
    (data / "broken.wav").write_bytes(b"not a wav file")
    out = tmp_path / "feats.npz"
    extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(data), "--output", str(out),
                  "--pool", "mean"])
    assert list(np.load(out)["files"]) == ["good.wav"]
