"""probe.py and the MFCC baseline of features.py: the probe's core, splits, label sources, the CLI edge."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from weights import save_weights

import probe
from demo import make_demo_corpus
from features import backbone_config, deltas, featurizer, mel_filterbank, mfcc
from labels import cross_validation, fsdd_test_mask, labels_at_centres, read_labels
from model import UserError, Wav2Vec, Wav2VecConfig

REPO = Path(__file__).resolve().parents[1]


def write_tone(path: Path, hz: float, seconds: float = 0.5, seed: int = 0) -> None:
    t = np.arange(int(16000 * seconds)) / 16000
    wav = 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav, 16000)


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


def test_leave_one_group_out_tests_each_group_on_its_own():
    groups = np.array(["ann", "bob", "cy"] * 4)
    examples = probe.Examples(np.zeros((12, 1)), np.array(["x", "y"] * 6), np.arange(12), groups=groups)
    description, splits = probe.folds(examples, 5, seed=0)
    assert description == "leave-one-group-out"
    for name, train, test in splits:
        assert set(groups[test]) == {name} and name not in set(groups[train])
    assert sorted(name for name, _, _ in splits) == ["ann", "bob", "cy"]


def test_fewer_group_folds_than_groups_keep_each_group_on_one_side():  # finetune.py --folds 2 --group-column
    groups = np.array(["ann", "bob", "cy", "dee"] * 3)
    description, splits = cross_validation(np.array(["x", "y"] * 6), 2, seed=0, groups=groups, group_folds=2)
    assert description == "2-fold by group" and len(splits) == 2
    for _, train, test in splits:
        assert not set(groups[train]) & set(groups[test])


def test_frame_folds_never_put_one_file_on_both_sides():
    file_index = np.repeat(np.arange(6), 10)
    examples = probe.Examples(np.zeros((60, 1)), np.array(["x", "y"] * 30), file_index)
    _, splits = probe.folds(examples, 5, seed=0, frame_level=True)
    assert len(splits) == 5
    for _, train, test in splits:
        assert not set(file_index[train]) & set(file_index[test])


def test_folds_shrink_to_the_smallest_class():
    y = np.array(["a"] * 3 + ["b"] * 10)
    assert len(stratified(y)) == 3


def test_a_class_with_one_example_is_a_user_error():
    with pytest.raises(UserError, match="at least 2 examples"):
        stratified(np.array(["a"] + ["b"] * 10))


def test_fsdd_official_split_tests_repetitions_0_to_4(tmp_path):
    names = ["3_theo_0.wav", "3_theo_4.wav", "3_theo_5.wav", "7_jackson_49.wav"]
    assert list(fsdd_test_mask(names, tmp_path)) == [True, True, False, False]


def test_feature_frames_take_the_label_at_their_centre():
    frame_labels = np.arange(10)  # label t covers samples [160 t, 160 t + 160)
    # wav2vec frame t covers [160 t, 160 t + 465): centre 160 t + 232 lies in label frame t + 1.
    assert list(labels_at_centres(frame_labels, 3, window=465)) == [1, 2, 3]
    # The last feature frames may reach past the labels: they take the last label.
    assert labels_at_centres(frame_labels, 12, window=465)[-1] == 9


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


# ----- label sources ------------------------------------------------------------------------------

def test_tsv_labels_and_group_column(tmp_path):
    (tmp_path / "labels.tsv").write_text("path\tlabel\tspeaker\nx/a.wav\tyes\tann\nb.wav\tno\tbob\n")
    labels, groups = read_labels(["x/a.wav", "b.wav", "c.wav"], "labels.tsv", tmp_path, "speaker")
    assert labels == ["yes", "no", None] and groups == ["ann", "bob", None]


def test_label_column_names_the_tsv_column_the_labels_come_from(tmp_path):
    for name in ("a.wav", "b.wav"):
        write_tone(tmp_path / name, 200)
    (tmp_path / "meta.tsv").write_text("path\tage\tspeaker\na.wav\t7\tann\nb.wav\t31\tbob\n")
    args = probe.parse_args(["--data-dir", str(tmp_path), "--labels", "meta.tsv", "--label-column", "age",
                             "--task", "regress", "--checkpoint", "mfcc",
                             "--json", str(tmp_path / "out.json")])
    assert probe.select_files(args).labels == ["7", "31"]


def test_folder_labels_are_the_parent_folder_names(tmp_path):
    labels, groups = read_labels(["dog/1.wav", "cat/deep/2.wav"], "folder", tmp_path)
    assert labels == ["dog", "deep"] and groups is None


def test_folder_labels_refuse_a_group_column(tmp_path):
    with pytest.raises(UserError, match="TSV or a pattern"):
        read_labels(["dog/1.wav"], "folder", tmp_path, "speaker")


def test_pattern_labels_and_groups_come_from_named_groups(tmp_path):
    labels, groups = read_labels(["up_ann.wav", "down_bob.wav", "noise.wav"],
                                       r"pattern:(?P<label>[a-z]+)_(?P<who>[a-z]+)\.wav", tmp_path, "who")
    assert labels == ["up", "down", None] and groups == ["ann", "bob", None]


def test_fsdd_shortcuts_read_digit_and_speaker(tmp_path):
    names = ["7_jackson_12.wav", "0_theo_3.wav"]
    assert read_labels(names, "fsdd-digit", tmp_path, "speaker") == (["7", "0"], ["jackson", "theo"])
    assert read_labels(names, "fsdd-speaker", tmp_path)[0] == ["jackson", "theo"]


# ----- MFCC ---------------------------------------------------------------------------------------

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


# ----- the command line ---------------------------------------------------------------------------

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


def test_unlabelled_files_are_skipped_and_counted(tmp_path):
    for k in range(3):
        write_tone(tmp_path / f"low{k}.wav", 200)
        write_tone(tmp_path / f"high{k}.wav", 3000)
    write_tone(tmp_path / "other.wav", 1000)
    rows = [f"low{k}.wav\tlow" for k in range(3)] + [f"high{k}.wav\thigh" for k in range(3)]
    (tmp_path / "labels.tsv").write_text("path\tlabel\n" + "\n".join(rows) + "\n")
    args = probe.parse_args(["--data-dir", str(tmp_path), "--labels", "labels.tsv", "--checkpoint", "mfcc",
                             "--json", str(tmp_path / "out.json")])
    selection = probe.select_files(args)
    assert selection.skipped == 1 and len(selection.paths) == 6
    assert tmp_path / "other.wav" not in selection.paths


def test_frame_level_probe_reads_the_demo_corpus_frame_labels(tmp_path):
    data = make_demo_corpus(tmp_path / "demo", num_speakers=2, files_per_speaker=3, seconds_per_file=1.0)
    out = tmp_path / "frames.json"
    probe.main(["--data-dir", str(data), "--frame-level", "--checkpoint", "mfcc", "--max-frames", "300",
                "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["n_examples"] == 300 and result["evaluation"] == "5-fold by file"
    assert result["n_classes"] >= 3 and result["accuracy"] > 0.5  # silence, vowels, fricatives


def test_a_folder_with_one_class_exits_with_a_clear_error(tmp_path):
    write_tone(tmp_path / "only" / "a.wav", 440)
    write_tone(tmp_path / "only" / "b.wav", 880)
    run = subprocess.run([sys.executable, "probe.py", "--data-dir", str(tmp_path), "--labels", "folder",
                          "--checkpoint", "mfcc", "--json", str(tmp_path / "out.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and "needs at least two classes" in run.stderr
    assert "Traceback" not in run.stderr
