"""extract.py: frame counts, pooled and frame-level output layouts, fairseq checkpoints, files it skips."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio import noise
from weights import save_weights, tiny_model

import extract
from model import UserError

FIXTURES = Path(__file__).parent / "fixtures"


LENGTHS = {"a/one.wav": 16000, "a/two.wav": 16000, "b/deep/three.wav": 20800, "four.wav": 9000}


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
