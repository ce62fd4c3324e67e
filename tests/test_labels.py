"""Labels (labels.py): label sources, the labelled files of a run, folds, per-frame labels."""

import numpy as np
import pytest
from audio import write_tone

from labels import (
    cross_validation,
    detokenize,
    fsdd_test_mask,
    labelled_files,
    labels_at_centres,
    read_labels,
    recognition_metrics,
    tokenize,
    transcript_errors,
    unknown_symbols,
    vocabulary,
)
from model import UserError

# ----- label sources ------------------------------------------------------------------------------

def test_tsv_labels_and_group_column(tmp_path):
    (tmp_path / "labels.tsv").write_text("path\tlabel\tspeaker\nx/a.wav\tyes\tann\nb.wav\tno\tbob\n")
    labels, groups = read_labels(["x/a.wav", "b.wav", "c.wav"], "labels.tsv", tmp_path, "speaker")
    assert labels == ["yes", "no", None] and groups == ["ann", "bob", None]


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


# ----- the labelled files of a run ----------------------------------------------------------------

def test_label_column_names_the_tsv_column_the_labels_come_from(tmp_path):
    for name in ("a.wav", "b.wav"):
        write_tone(tmp_path / name, 200)
    (tmp_path / "meta.tsv").write_text("path\tage\tspeaker\na.wav\t7\tann\nb.wav\t31\tbob\n")
    assert labelled_files(tmp_path, "meta.tsv", label_column="age", task="regress").labels == ["7", "31"]


def test_unlabelled_files_are_skipped_and_counted(tmp_path):
    for k in range(3):
        write_tone(tmp_path / f"low{k}.wav", 200)
        write_tone(tmp_path / f"high{k}.wav", 3000)
    write_tone(tmp_path / "other.wav", 1000)
    rows = [f"low{k}.wav\tlow" for k in range(3)] + [f"high{k}.wav\thigh" for k in range(3)]
    (tmp_path / "labels.tsv").write_text("path\tlabel\n" + "\n".join(rows) + "\n")
    selection = labelled_files(tmp_path, "labels.tsv")
    assert selection.skipped == 1 and len(selection.paths) == 6
    assert tmp_path / "other.wav" not in selection.paths


# ----- folds --------------------------------------------------------------------------------------

def test_leave_one_group_out_tests_each_group_on_its_own():
    groups = np.array(["ann", "bob", "cy"] * 4)
    description, splits = cross_validation(np.array(["x", "y"] * 6), 5, seed=0, groups=groups)
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


def test_folds_shrink_to_the_smallest_class():
    y = np.array(["a"] * 3 + ["b"] * 10)
    assert len(cross_validation(y, 5, seed=0)[1]) == 3


def test_a_class_with_one_example_is_a_user_error():
    with pytest.raises(UserError, match="at least 2 examples"):
        cross_validation(np.array(["a"] + ["b"] * 10), 5, seed=0)


def test_fsdd_official_split_tests_repetitions_0_to_4(tmp_path):
    names = ["3_theo_0.wav", "3_theo_4.wav", "3_theo_5.wav", "7_jackson_49.wav"]
    assert list(fsdd_test_mask(names, tmp_path)) == [True, True, False, False]


# ----- per-frame labels ---------------------------------------------------------------------------

def test_feature_frames_take_the_label_at_their_centre():
    frame_labels = np.arange(10)  # label t covers samples [160 t, 160 t + 160)
    # wav2vec frame t covers [160 t, 160 t + 465): centre 160 t + 232 lies in label frame t + 1.
    assert list(labels_at_centres(frame_labels, 3, window=465)) == [1, 2, 3]
    # The last feature frames may reach past the labels: they take the last label.
    assert labels_at_centres(frame_labels, 12, window=465)[-1] == 9


# ----- transcripts --------------------------------------------------------------------------------

def test_tokens_are_the_space_separated_symbols():
    assert tokenize("  HH  AH L OW ", "tokens") == ["HH", "AH", "L", "OW"]
    assert detokenize(["HH", "AH"], "tokens") == "HH AH"


def test_chars_are_case_folded_letters_and_apostrophes_with_a_boundary_between_words():
    symbols = tokenize("We're  FINE, Bob-Smith!", "chars")
    assert "".join(symbols) == "we're|fine|bob|smith"
    assert detokenize(symbols, "chars") == "we're fine bob smith"
    assert detokenize(list("|a||b|"), "chars") == "a b"  # stray boundaries make no empty words


def test_the_vocabulary_is_every_symbol_once_and_unknown_ones_are_found_in_order():
    known = vocabulary([["b", "a"], ["a", "c"]])
    assert known == ("a", "b", "c")
    assert unknown_symbols(["a", "z", "y", "z"], known) == ["z", "y"]


def test_error_rates_are_corpus_level_edits_over_the_reference_length():
    # one deletion in 3 phones, one insertion in 2: 2 edits in 5, not the mean of 1/3 and 1/2
    metrics = recognition_metrics(["a b c", "d e"], ["a c", "d e f"], "tokens")
    assert metrics["per"] == pytest.approx(40.0)
    assert metrics["edits"] == 2 and metrics["reference_length"] == 5
    chars = recognition_metrics(["hi there", "ok"], ["hi ther", "ok"], "chars")
    assert chars["cer"] == pytest.approx(10.0)  # 1 edit in 10 characters, the space included
    assert chars["wer"] == pytest.approx(100 / 3)  # "there" is wrong: 1 word in 3
    assert transcript_errors("a b", "", "tokens") == (2, 2)  # an empty transcript deletes everything


def write_transcripts(folder, rows):
    for name in {row[0] for row in rows if row[0] != "gone.wav"}:
        write_tone(folder / name, 440, 0.1)
    (folder / "t.tsv").write_text("path\tspeaker\ttext\n" + "".join("\t".join(r) + "\n" for r in rows))
    return folder / "t.tsv"


def test_transcribed_files_skip_empty_transcripts_and_name_rows_without_audio(tmp_path, caplog):
    tsv = write_transcripts(tmp_path, [("a.wav", "ann", "HH AH"), ("b.wav", "bob", "  "),
                                       ("gone.wav", "cy", "OW")])
    data = labelled_files(tmp_path, str(tsv), "text", task="ctc")
    assert data.names == ["a.wav"] and data.targets[0] == ["HH", "AH"] and data.skipped == 1
    assert "1 files have an empty transcript (b.wav)" in caplog.text
    assert "1 rows of t.tsv name audio that is not under" in caplog.text and "gone.wav" in caplog.text


def test_a_missing_label_column_is_named_with_the_columns_there_are(tmp_path):
    tsv = write_transcripts(tmp_path, [("a.wav", "ann", "HH AH")])
    with pytest.raises(UserError, match="no column `phones` \\(it has path, speaker, text\\)"):
        labelled_files(tmp_path, str(tsv), "phones", task="ctc")


def test_test_groups_make_one_fixed_fold_and_must_exist(tmp_path):
    tsv = write_transcripts(tmp_path, [("a.wav", "ann", "A"), ("b.wav", "bob", "B"), ("c.wav", "cy", "C")])
    (tmp_path / "test.txt").write_text("# the test speakers\nbob cy\n")
    data = labelled_files(tmp_path, str(tsv), "text", "speaker", task="ctc",
                          test_groups=str(tmp_path / "test.txt"))
    assert data.test_mask.tolist() == [False, True, True]
    description, folds = cross_validation(data.targets, 5, 0, data.test_mask, fixed_split="fixed")
    assert description == "fixed" and [f[2].tolist() for f in folds] == [[1, 2]]
    assert labelled_files(tmp_path, str(tsv), "text", "speaker", task="ctc",
                          test_groups="ann").test_mask.tolist() == [True, False, False]
    with pytest.raises(UserError, match="dan are not among the groups"):
        labelled_files(tmp_path, str(tsv), "text", "speaker", task="ctc", test_groups="ann,dan")
