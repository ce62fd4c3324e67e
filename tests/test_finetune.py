"""finetune.py: the head learns what the features carry, saved models predict what they predicted in
training, the saved fold is the best one, freezing freezes, and label mistakes end in one sentence.
Synthetic audio only."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from audio import write_tone
from scripts import REPO, run_finetune, run_recognition
from weights import fine_tuned

import finetune
from heads import Classifier, HeadConfig
from model import UserError, read_checkpoint


def write_table(folder: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = folder / "labels.tsv"
    path.write_text("path\tlabel\tspeaker\n" + "".join("\t".join(row) + "\n" for row in rows))
    return path


# ----- learning -----------------------------------------------------------------------------------

def test_a_head_on_frozen_features_learns_a_task_with_a_known_answer(tmp_path, tones):
    metrics = run_finetune(tmp_path, tones, "--group-column", "speaker", "--folds", "0", "--epochs", "20",
                           "--batch-size", "8", "--lr", "1e-2")
    assert metrics["evaluation"] == "leave-one-group-out" and metrics["n_tested"] == 48
    assert metrics["accuracy"] >= 0.95
    assert set(metrics["per_class_recall"]) == {"300", "1500"}


def test_shuffled_labels_score_near_chance(tmp_path):
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(np.repeat(list("abcd"), 20))  # four classes, independent of the audio
    for i in range(80):
        write_tone(tmp_path / "audio" / f"{i}.wav", rng.uniform(200, 2000), 0.25, rng)
    labels = write_table(tmp_path / "audio", [(f"{i}.wav", shuffled[i], "x") for i in range(80)])
    metrics = run_finetune(tmp_path, tmp_path / "audio", "--epochs", "20", "--folds", "4", labels=str(labels))
    assert 0.05 < metrics["accuracy"] < 0.5  # chance is 0.25


def test_regression_on_a_continuous_target_reaches_a_high_correlation(tmp_path):
    rng = np.random.default_rng(2)
    rows = []
    for i in range(60):
        hz = rng.uniform(200, 2000)
        write_tone(tmp_path / "audio" / f"{i}.wav", hz, 0.25, rng)
        rows.append((f"{i}.wav", f"{hz:.1f}", "x"))
    labels = write_table(tmp_path / "audio", rows)
    metrics = run_finetune(tmp_path, tmp_path / "audio", "--task", "regress", "--epochs", "60",
                           "--folds", "3", "--head", "mlp", labels=str(labels))
    assert metrics["pearson_r"] > 0.9 and metrics["r2"] > 0.7
    assert (tmp_path / "run" / "scatter.png").is_file()


# ----- saved models -------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_csv_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_tsv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_predict_on_a_saved_model_reproduces_its_own_predictions(tmp_path, tones, checkpoint32):
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--folds", "0", "--max-folds", "1", "--epochs",
                 "3", "--layer", "all", "--pool", "attentive", checkpoint=str(checkpoint32))
    saved = read_checkpoint(tmp_path / "run" / "finetuned.pt")
    trained = {row["path"]: row for row in read_csv(tmp_path / "run" / "predictions.csv")}
    assert set(trained) == set(saved["test_files"])
    output = tmp_path / "new.csv"
    finetune.main(["predict", "--model", str(tmp_path / "run" / "finetuned.pt"), "--data-dir", str(tones),
                   "--output", str(output)])
    predicted = {row["path"]: row for row in read_csv(output) if row["path"] in trained}
    assert set(predicted) == set(trained)
    for name, row in predicted.items():
        assert row["predicted"] == trained[name]["predicted"]
        assert float(row["p_300"]) == pytest.approx(float(trained[name]["p_300"]), abs=1e-4)


def test_predict_skips_and_names_unreadable_and_too_short_files_and_writes_the_rest(tmp_path, capsys):
    model = tmp_path / "finetuned.pt"
    torch.save(fine_tuned("classify").payload({}), model)
    data = tmp_path / "data"
    for name, seconds in (("a.wav", 0.3), ("b/c.wav", 0.3), ("short.wav", 0.01)):
        write_tone(data / name, 440, seconds)
    (data / "broken.wav").write_bytes(b"RIFF, but not audio")
    output = tmp_path / "out" / "predictions.csv"
    finetune.main(["predict", "--model", str(model), "--data-dir", str(data), "--output", str(output)])
    assert [row["path"] for row in read_csv(output)] == ["a.wav", "b/c.wav"]
    log = capsys.readouterr().out
    assert "broken.wav" in log and "short.wav is shorter than one frame" in log
    assert "2 of 4 files unreadable or too short, skipped" in log


def fold_result(name: str, accuracy: float | None) -> tuple:
    metrics = {} if accuracy is None else {"valid": {"accuracy": accuracy, "loss": 1.0}}
    model = Classifier(HeadConfig(labels=("a", "b"), backbone="mfcc", channels=2), None)
    return name, np.arange(2), finetune.FoldResult(model, [], metrics)


def test_the_saved_model_is_the_fold_best_on_its_validation_files():
    tested = [fold_result(name, accuracy) for name, accuracy in [("ann", 0.6), ("bob", 0.9), ("cy", 0.9)]]
    assert finetune.saved_fold(tested)[0] == "bob"  # the first of equals


def test_without_validation_files_the_saved_model_is_the_last_folds():
    assert finetune.saved_fold([fold_result("ann", None), fold_result("bob", None)])[0] == "bob"


def test_metrics_name_the_fold_that_finetuned_pt_holds(tmp_path, tones):
    metrics = run_finetune(tmp_path, tones, "--group-column", "speaker", "--folds", "0", "--epochs", "2")
    saved = torch.load(tmp_path / "run" / "finetuned.pt", weights_only=True)
    best = max(metrics["folds"].values(), key=lambda fold: fold["valid"]["accuracy"])["valid"]["accuracy"]
    assert metrics["saved_model"]["fold"] == saved["fold"]
    assert metrics["saved_model"]["chosen_by"] == "best validation score"
    assert metrics["folds"][saved["fold"]]["valid"]["accuracy"] == best


def test_a_fairseq_checkpoint_is_a_backbone_too(tmp_path, tones):
    fairseq = REPO / "tests" / "fixtures" / "fairseq_style_checkpoint_tiny.pt"
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--max-folds", "1", "--epochs", "1", "--layer",
                 "all", checkpoint=str(fairseq))
    model = Classifier.from_pretrained(tmp_path / "run" / "finetuned.pt")
    assert model.backbone.config.log_compression and model.layer_weights.shape == (12,)  # wav2vec large


@pytest.mark.parametrize("freeze, frozen, trained", [("all", ("encoder", "context"), ()),
                                                     ("encoder", ("encoder",), ("context",)),
                                                     ("none", (), ("encoder", "context"))])
def test_freezing_really_freezes(tmp_path, tones, checkpoint32, freeze, frozen, trained):
    # --augment turns the feature cache off, so the frozen parts run every update and only freezing
    # keeps them as they were.
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--max-folds", "1", "--max-updates", "4",
                 "--augment", "--freeze", freeze, "--freeze-updates", "1", "--backbone-lr", "1e-2",
                 "--warmup-updates", "0", checkpoint=str(checkpoint32))
    before = torch.load(checkpoint32, weights_only=True)["model"]
    after = torch.load(tmp_path / "run" / "finetuned.pt", weights_only=True)["model"]

    def unchanged(part: str) -> bool:
        return all(torch.equal(value, after[f"backbone.{key}"]) for key, value in before.items()
                   if key.startswith(part))
    assert all(unchanged(part) for part in frozen)
    assert not any(unchanged(part) for part in trained)


def test_random_checkpoint_trains_the_checkpoints_network_from_new_weights(tmp_path, tones, checkpoint32):
    # The tiny checkpoint is itself a network initialised from seed 0: another seed tells the two apart.
    run_finetune(tmp_path, tones, "--group-column", "speaker", "--max-folds", "1", "--max-updates", "2",
                 "--seed", "1", checkpoint=f"random:{checkpoint32}")
    saved = torch.load(tmp_path / "run" / "finetuned.pt", weights_only=True)
    pretrained = torch.load(checkpoint32, weights_only=True)
    assert saved["backbone_config"] == pretrained["config"]
    assert not torch.equal(saved["model"]["backbone.encoder.layers.0.conv.weight"],
                           pretrained["model"]["encoder.layers.0.conv.weight"])


# ----- label mistakes -----------------------------------------------------------------------------

def test_one_class_is_a_clear_error(tmp_path, tones):
    with pytest.raises(UserError, match="at least two classes"):
        run_finetune(tmp_path, tones, labels=r"pattern:(?P<label>300)hz_.*\.wav")


def test_files_outside_class_folders_are_a_clear_error(tmp_path):
    write_tone(tmp_path / "audio" / "a.wav", 300, 0.2, np.random.default_rng(0))
    with pytest.raises(UserError, match="sub-folder named after it"):
        run_finetune(tmp_path, tmp_path / "audio", labels="folder")


def test_non_numeric_labels_for_regression_are_a_clear_error(tmp_path, tones):
    with pytest.raises(UserError, match="needs numeric labels.*hz_"):
        run_finetune(tmp_path, tones, "--task", "regress", labels=r"pattern:(?P<label>\d+hz)_.*\.wav")


# ----- renamed flags --------------------------------------------------------------------------------

def test_the_old_min_lr_ratio_flag_still_sets_the_floor_and_warns(capsys):
    args = finetune.parse_train_args(["--checkpoint", "mfcc", "--data-dir", "d", "--labels", "folder",
                                      "--lr", "1e-2", "--min-lr-ratio", "0.1"])
    assert args.min_lr == pytest.approx(1e-3)
    assert "warning: --min-lr-ratio R is now --min-lr" in capsys.readouterr().err


# ----- speech recognition (--task ctc) ------------------------------------------------------------

def test_ctc_on_frozen_features_transcribes_unseen_speakers_far_better_than_chance(tmp_path, transcribed):
    metrics = run_recognition(tmp_path, transcribed, "--lr", "3e-2", "--epochs", "100")
    assert metrics["n_tested"] == 48 and set(metrics["folds"]) == {"speaker00", "speaker01"}
    assert metrics["per"] < 60  # saying nothing scores 100, guessing more
    rows = read_csv(tmp_path / "ctc" / "predictions.csv")
    assert list(rows[0]) == ["path", "fold", "reference", "errors", "length", "transcript"]
    assert sum(int(r["errors"]) for r in rows) / sum(int(r["length"]) for r in rows) == pytest.approx(
        metrics["per"] / 100)
    assert (tmp_path / "ctc" / "posteriorgram.png").stat().st_size > 10_000


def test_a_test_symbol_no_training_file_has_is_an_error_naming_it_or_skipped(tmp_path, transcribed):
    rows = read_csv_tsv(transcribed / "transcripts.tsv")
    rows[-1]["letters"] += " x"  # the last file, a test file of speaker01's fold
    labels = write_tsv(tmp_path / "t.tsv", rows)
    flags = ["--labels", str(labels), "--epochs", "1"]
    with pytest.raises(UserError, match=r"speaker01_023.wav has the symbol 'x', which no training file of "
                                        r"fold speaker01 has \(1 test files"):
        run_recognition(tmp_path, transcribed, *flags)
    metrics = run_recognition(tmp_path, transcribed, *flags, "--skip-unknown")
    assert metrics["n_tested"] == 47


def test_files_too_short_for_their_transcripts_are_named_and_left_out(tmp_path, transcribed, capsys):
    rows = read_csv_tsv(transcribed / "transcripts.tsv")
    rows[0]["letters"] = " ".join(["a", "e"] * 40)  # 80 symbols, no repeats
    rows[1]["letters"] = " ".join(["a"] * 75)  # 75 symbols and 74 repeats
    metrics = run_recognition(tmp_path, transcribed, "--labels", str(write_tsv(tmp_path / "t.tsv", rows)),
                              "--epochs", "1", "--subsample", "2")  # 148 frames of 1.5 s: 74 outputs
    assert metrics["n_tested"] == 46
    log = capsys.readouterr().out
    assert "2 files are too short for their transcripts" in log
    assert "speaker00_000.wav (74 frames, 80 needed), speaker00/speaker00_001.wav (74 frames, 149" in log


def test_predict_transcribes_as_the_trained_model_did(tmp_path, transcribed):
    run_recognition(tmp_path, transcribed, "--epochs", "3", "--head", "bilstm", "--hidden", "8", "--layers",
                    "1", "--subsample", "2", "--max-folds", "1")
    trained = {row["path"]: row["transcript"] for row in read_csv(tmp_path / "ctc" / "predictions.csv")}
    finetune.main(["predict", "--model", str(tmp_path / "ctc" / "finetuned.pt"), "--data-dir",
                   str(transcribed), "--output", str(tmp_path / "new.csv")])
    predicted = {row["path"]: row["transcript"] for row in read_csv(tmp_path / "new.csv")}
    assert len(predicted) == 48 and {name: predicted[name] for name in trained} == trained


def test_resume_takes_the_finished_folds_and_runs_only_the_rest(tmp_path, transcribed, monkeypatch):
    first = run_recognition(tmp_path, transcribed, "--epochs", "1", "--max-folds", "1")
    trained = []
    real = finetune.train_fold
    monkeypatch.setattr(finetune, "train_fold", lambda args, name, *rest: trained.append(name) or real(
        args, name, *rest))
    both = run_recognition(tmp_path, transcribed, "--epochs", "1", "--resume")
    assert trained == ["speaker01"]  # speaker00's fold was on disk
    assert both["folds"]["speaker00"] == first["folds"]["speaker00"]
    with pytest.raises(UserError, match=r"other settings \(--epochs differ\): drop --resume"):
        run_recognition(tmp_path, transcribed, "--epochs", "2", "--resume")
    trained.clear()
    run_recognition(tmp_path, transcribed, "--epochs", "1", "--max-folds", "1")  # no --resume: start over
    assert trained == ["speaker00"]


def test_a_cache_dir_computes_the_frozen_frames_once_for_every_head(tmp_path, transcribed, monkeypatch):
    cache = str(tmp_path / "cache")
    first = run_recognition(tmp_path, transcribed, "--epochs", "1", "--max-folds", "1", "--cache-dir", cache)
    monkeypatch.setattr(finetune, "prepare_inputs", lambda *args: pytest.fail("computed again"))
    again = run_recognition(tmp_path, transcribed, "--epochs", "1", "--max-folds", "1", "--cache-dir", cache,
                            "--head", "bilstm", "--hidden", "4", "--layers", "1", out="bilstm")  # same frames
    assert again["n_tested"] == first["n_tested"] and len(list((tmp_path / "cache").iterdir())) == 1
