"""plots.py: the smoothed loss curve weighs each record by the updates it covers, and a t-SNE of too few
points says so."""

import numpy as np
import pytest

from plots import TSNE_PERPLEXITY, smooth, tsne_caution


def test_a_record_of_one_update_moves_the_smoothed_curve_as_little_as_one_update_should():
    values, updates = [2.0] * 20 + [10.0], [20] * 20  # a run's records every 20 updates, then an outlier
    after_one = smooth(values, updates + [1])[-1]  # ...recorded over a single update (a run's last flush)
    after_twenty = smooth(values, updates + [20])[-1]  # ...or over twenty
    assert after_one < 2.5 < 6.0 < after_twenty


def test_records_of_equal_length_give_a_debiased_average():
    assert smooth([3.0, 3.0, 3.0], [5, 5, 5]) == pytest.approx([3.0, 3.0, 3.0])
    rising = smooth(list(np.arange(100.0)), [1] * 100)
    assert np.all(np.diff(rising) > 0) and rising[-1] < 99


def test_a_tsne_of_too_few_points_for_its_perplexity_is_flagged():
    enough = int(3 * TSNE_PERPLEXITY) + 1
    assert tsne_caution(enough) is None
    assert "t-SNE of 40 points ran at perplexity 13" in tsne_caution(40)
