"""Parity with fairseq's own wav2vec 1.0 code, from outputs it produced (tests/fixtures/)."""

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch

from model import UserError, Wav2Vec, fairseq_config, fairseq_state_dict

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "fairseq_wav2vec_large_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    return Wav2Vec.from_pretrained(FIXTURES / "fairseq_style_checkpoint_tiny.pt")


def assert_close_to_fp32_rounding(ours, theirs):
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_fairseq_checkpoint_gives_fairseqs_z_and_c(model, reference):
    feats = model.extract_features(reference["wav"])
    assert_close_to_fp32_rounding(feats["z"], reference["z"])
    assert_close_to_fp32_rounding(feats["c"], reference["c"])


def test_fairseq_checkpoint_gives_fairseqs_loss_with_its_distractors(model, reference):
    assert model.config.resolved_offset == reference["auto_offset"]
    loss, _ = model(reference["wav"], negatives=reference["negative_frames"])
    expected = reference["loss_sum"] / reference["num_positives"]
    assert torch.isclose(loss, expected.float(), rtol=1e-5)


def test_converted_config_matches_the_fixture_description(model, reference):
    assert model.config == fairseq_config(reference["fairseq_cfg"])
    assert model.config.skip_connections and model.config.log_compression


def test_released_large_layout_converts_with_no_missing_or_unexpected_keys():
    layout = json.loads((FIXTURES / "keys_wav2vec_large.json").read_text())
    state = {name: torch.randn(shape) for name, shape in layout["state_dict"].items()}
    config = fairseq_config(layout["overrides_on_Wav2VecConfig_defaults"] | {
        "conv_feature_layers": layout["conv_feature_layers"],
        "conv_aggregator_layers": layout["conv_aggregator_layers"]})
    model = Wav2Vec(config)
    result = model.load_state_dict(fairseq_state_dict(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model.num_parameters() == layout["num_params"] == 32_537_088


def write_fairseq_checkpoint(path: Path, **args) -> None:
    reference = torch.load(FIXTURES / "fairseq_style_checkpoint_tiny.pt", weights_only=False)
    merged = vars(reference["args"]) | args
    torch.save({"args": argparse.Namespace(**merged), "model": reference["model"]}, path)


def test_vq_wav2vec_checkpoint_is_refused_naming_the_option(tmp_path):
    write_fairseq_checkpoint(tmp_path / "vq.pt", vq_type="gumbel")
    with pytest.raises(UserError, match="vq-wav2vec"):
        Wav2Vec.from_pretrained(tmp_path / "vq.pt")


def test_gru_aggregator_is_refused_naming_the_option(tmp_path):
    write_fairseq_checkpoint(tmp_path / "gru.pt", aggregator="gru")
    with pytest.raises(UserError, match="aggregator"):
        Wav2Vec.from_pretrained(tmp_path / "gru.pt")


class Payload:
    """Unpickling this would run code; a safe loader must refuse it instead."""

    def __reduce__(self):
        return (Path.touch, (Path("/tmp/wav2vec_pickle_payload_ran"),))


def test_pickled_arbitrary_class_is_refused_without_executing_it(tmp_path):
    marker = Path("/tmp/wav2vec_pickle_payload_ran")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"args": Payload(), "model": {}}, f, protocol=2)
    with pytest.raises(UserError, match="can load safely [(]it pickles Python code") as refused:
        Wav2Vec.from_pretrained(path)
    assert not marker.exists()
    assert "weights_only" not in str(refused.value)  # torch's advice to load it unsafely stays out
