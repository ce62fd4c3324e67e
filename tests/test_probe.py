"""probe.py: the probe's core (logistic and ridge regression over folds), frame-level folds, the JSON, the
feature cache, a whole run on tones and on the demo corpus's frame labels."""

import json

import numpy as np
import pytest
import torch
from audio import write_tone
from scripts import TONE_LABELS, run_script
from weights import save_weights

import probe
from demo import make_demo_corpus
from model import Wav2Vec, Wav2VecConfig


def stratified(y: np.ndarray) -> list:
    return probe.folds(probe.Examples(np.zeros((len(y), 1)), y, np.arange(len(y))), 5, seed=0)[1]


# ----- the probe's core ---------------------------------------------------------------------------

def test_features_that_carry_the_label_score_near_perfect():
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c", "d"]), 50)
    X = rng.standard_normal((200, 8)) + 4.0 * np.eye(8)[np.searchsorted(["a", "b", "c", "d"], y)]
    result = probe.fit_and_score(X, y, stratified(y))
    assert result["accuracy"] > 0.97 and result["macro_f1"] > 0.97
    assert len(result["fold_accuracies"]) == 5


def test_shuffled_labels_score_near_chance():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.array(["a", "b", "c", "d"]), 100))
    result = probe.fit_and_score(rng.standard_normal((400, 8)), y, stratified(y))
    assert 0.1 < result["accuracy"] < 0.4  # chance is 0.25


def test_frame_folds_never_put_one_file_on_both_sides():
    file_index = np.repeat(np.arange(6), 10)
    examples = probe.Examples(np.zeros((60, 1)), np.array(["x", "y"] * 30), file_index)
    _, splits = probe.folds(examples, 5, seed=0, frame_level=True)
    assert len(splits) == 5
    for _, train, test in splits:
        assert not set(file_index[train]) & set(file_index[test])


@pytest.mark.parametrize("regressor", ["ridge", "hgb"])
def test_probe_regression_scores_a_continuous_target(regressor):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 6))
    y = 3 * X[:, 0] - 2 * X[:, 1] + 0.1 * rng.standard_normal(120)
    examples = probe.Examples(X, y, np.arange(120))
    _, splits = probe.folds(examples, 4, seed=0, regress=True)
    result = probe.fit_and_score_regression(X, y, splits, regressor)
    assert result["pearson_r"] > 0.9 and result["mae"] < 1.0
    assert set(result) >= {"mae", "rmse", "r2", "pearson_r", "spearman_rho"}


# ----- the command line ---------------------------------------------------------------------------

def test_the_json_records_the_config_of_the_network_probed(tmp_path):
    for k in range(3):
        write_tone(tmp_path / "data" / "low" / f"{k}.wav", 200 + 20 * k, seed=k)
        write_tone(tmp_path / "data" / "high" / f"{k}.wav", 2000 + 100 * k, seed=k)
    torch.manual_seed(0)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16))
    save_weights(model, tmp_path / "tiny.pt")
    for features, channels in ((f"random:{tmp_path / 'tiny.pt'}", 16), ("mfcc", None)):
        probe.main(["--data-dir", str(tmp_path / "data"), "--labels", "folder", "--checkpoint", features,
                    "--folds", "3", "--json", str(tmp_path / "p.json")])
        recorded = json.loads((tmp_path / "p.json").read_text())["features_config"]
        assert (recorded and recorded["context_layers"][-1][0]) == channels


def test_mfcc_probe_separates_low_and_high_tones(tmp_path):
    for k in range(6):
        write_tone(tmp_path / "data" / "low" / f"{k}.wav", 200 + 20 * k, seed=k)
        write_tone(tmp_path / "data" / "high" / f"{k}.wav", 2000 + 100 * k, seed=k)
    out = tmp_path / "probe.json"
    probe.main(["--data-dir", str(tmp_path / "data"), "--labels", "folder", "--checkpoint", "mfcc",
                "--pool", "mean+std", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert (result["n_examples"], result["n_classes"], len(result["fold_accuracies"])) == (12, 2, 5)
    assert result["settings"]["checkpoint"] == "mfcc"


def test_a_regression_probe_summary_counts_examples_and_names_no_classes(tones, capsys):
    probe.main(["--data-dir", str(tones), "--labels", TONE_LABELS, "--checkpoint", "mfcc", "--task",
                "regress", "--folds", "3"])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("all") and "48 examples, " in summary and "classes" not in summary


def test_cached_features_are_reused_for_other_labels_and_renewed_when_a_file_changes(tmp_path, monkeypatch):
    for k in range(6):
        write_tone(tmp_path / "data" / "low" / f"{k}.wav", 200 + 20 * k, seed=k)
        write_tone(tmp_path / "data" / "high" / f"{k}.wav", 2000 + 100 * k, seed=k)
    (tmp_path / "data" / "labels.tsv").write_text(
        "path\tlabel\n" + "".join(f"{band}/{k}.wav\t{k % 2}\n" for band in ("low", "high") for k in range(6)))

    def run(labels: str) -> dict:
        out = tmp_path / f"{labels}.json"
        probe.main(["--data-dir", str(tmp_path / "data"), "--labels", labels, "--checkpoint", "mfcc",
                    "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
        return json.loads(out.read_text())

    first = run("folder")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    computed = []
    real_featurizer = probe.featurizer
    monkeypatch.setattr(probe, "featurizer", lambda *a: computed.append(a) or real_featurizer(*a))
    assert run("folder")["accuracy"] == first["accuracy"] and not computed  # read back, not recomputed
    assert run("labels.tsv")["n_examples"] == 12 and not computed  # other labels, same features
    write_tone(tmp_path / "data" / "low" / "0.wav", 300, seconds=0.6)
    run("folder")
    assert len(computed) == 1 and len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_frame_level_probe_reads_the_demo_corpus_frame_labels(tmp_path):
    data = make_demo_corpus(tmp_path / "demo", num_speakers=2, files_per_speaker=3, seconds_per_file=1.0)
    out = tmp_path / "frames.json"
    probe.main(["--data-dir", str(data), "--frame-level", "--checkpoint", "mfcc", "--max-frames", "300",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["n_examples"] == 300 and result["evaluation"] == "5-fold by file"
    assert result["n_classes"] >= 3 and result["accuracy"] > 0.5  # silence, vowels, fricatives


# ----- renamed flags --------------------------------------------------------------------------------

def test_the_old_features_flag_still_names_the_checkpoint_and_warns(capsys):
    args = probe.parse_args(["--data-dir", ".", "--labels", "folder", "--features", "mfcc"])
    assert args.checkpoint == "mfcc"
    assert "warning: --features is now --checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_suite_still_runs_the_suite_and_warns():
    result = run_script("probe.py", "--suite", "fsdd", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: suite.py ")  # suite.py's own help
    assert "warning: probe.py --suite is now python suite.py" in result.stderr
