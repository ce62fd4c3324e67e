"""batching.py: what a head is fed: statistics from the whole fold, batches of similar lengths."""

import numpy as np
import pytest
import torch

import batching
from heads import Classifier, HeadConfig


def test_feature_statistics_come_from_files_spread_over_the_fold(monkeypatch):
    monkeypatch.setattr(batching, "STATS_FILES", 4)
    config = HeadConfig(labels=("a", "b"), backbone="mfcc", channels=1)
    model = Classifier(config, None)
    frames = [torch.full((1, 10), float(i >= 50)) for i in range(100)]  # sorted: zeros first, then ones
    batching.set_feature_statistics(model, frames, "frames", torch.device("cpu"))
    assert model.feature_mean.item() == pytest.approx(0.5)


def test_bucketed_batches_hold_every_row_once_in_batches_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 100)
    rows = np.arange(100)
    batches = batching.bucketed_batches(rows, lengths, 10, rng)
    assert sorted(np.concatenate(batches).tolist()) == rows.tolist()
    spread = np.mean([np.ptp(lengths[batch]) for batch in batches])
    assert spread < np.ptp(lengths) / 5  # random batches of 10 would span most of the range
    again = batching.bucketed_batches(rows, lengths, 10, np.random.default_rng(1))
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # the order changes with the draw


def test_cached_inputs_are_computed_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return [torch.full((2, 3), float(len(calls)))]

    key = {"checkpoint": "a.pt", "stage": "frames", "layer": "c"}
    first = batching.cached_inputs(tmp_path, key, compute)
    again = batching.cached_inputs(tmp_path, key, compute)
    other = batching.cached_inputs(tmp_path, {**key, "layer": "z"}, compute)
    assert len(calls) == 2 and torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    assert batching.cached_inputs(None, key, compute) and len(calls) == 3  # no folder: no cache
