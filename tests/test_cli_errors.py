"""What every entry script owes a user at its error edge: flags and outputs checked before the work starts
(values, combinations, locations), and one sentence with exit code 2 instead of a trace."""

from pathlib import Path

import pytest
import torch
from audio import write_tone
from scripts import TONE_LABELS, run_script, short_run_flags, tiny_flags, train
from weights import fine_tuned

import bench
import export
import extract
import finetune
import main
import probe
import suite
import vis
from model import UserError


def blocked(tmp_path: Path) -> Path:
    """A folder that cannot be created (its parent is a file), whoever runs the tests (root included)."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


# ----- main.py ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "0"], "argument --lr: must be more than 0"),
    (["--lr", "-1"], "argument --lr: must be more than 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number"),
    (["--weight-decay", "-1"], "argument --weight-decay: must be 0 or more"),
    (["--clip-norm", "-1"], "argument --clip-norm: must be 0 or more"),
    (["--min-lr=-1e-6"], "argument --min-lr: must be 0 or more"),
    (["--valid-fraction", "1"], "argument --valid-fraction: must be at least 0 and below 1"),
    (["--valid-fraction=-0.1"], "argument --valid-fraction: must be at least 0 and below 1"),
])
def test_a_numeric_flag_out_of_range_is_refused_at_parse_time(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main.parse_args(["--data-dir", "d", *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_min_lr_above_the_lr_is_refused_naming_both():
    with pytest.raises(UserError, match="--min-lr 0.01 is above --lr 0.001"):
        main.parse_args(["--data-dir", "d", "--min-lr", "1e-2"])
    assert main.parse_args(["--data-dir", "d", "--min-lr", "1e-3"]).min_lr == 1e-3


@pytest.mark.parametrize("flags, minimum", [([], 945), (["--offset", "1"], 625)])
def test_a_crop_shorter_than_the_model_can_learn_from_is_refused_naming_the_minimum(flags, minimum):
    # 465 samples of receptive field, then a target frame at the offset (3 by default) and a distractor.
    with pytest.raises(UserError, match=f"--segment-length {minimum - 1} is .* {minimum} samples"):
        main.parse_args(["--data-dir", "d", "--segment-length", str(minimum - 1), "--num-steps", "1", *flags])
    main.parse_args(["--data-dir", "d", "--segment-length", str(minimum), "--num-steps", "1", *flags])


def test_more_prediction_steps_than_the_crop_has_frames_are_refused_with_both_remedies():
    with pytest.raises(UserError, match="raise --segment-length to 2705 or lower --num-steps to 7"):
        main.parse_args(["--data-dir", "d", "--segment-length", "2000"])  # 10 frames, offset 3, K = 12
    main.parse_args(["--data-dir", "d", "--segment-length", "2705"])


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "10"], "fewer than one batch"),
    (["--accumulate-steps", "5"], "One update needs 5 batches"),
    (["--sample-rate", "8000"], "--sample-rate must be 16000"),
])
def test_impossible_settings_are_clear_errors(demo_corpus, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        train(demo_corpus, tmp_path, *flags)


def test_missing_data_folder_and_unwritable_output_folder_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(UserError, match="Cannot write to the output folder"):
        train(tmp_path, blocked(tmp_path))
    with pytest.raises(UserError, match="--data-dir DIR"):
        main.parse_args([])


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_a_run_refused_for_its_data_leaves_no_output_folder(tmp_path, data):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="does not exist|No audio files"):
        train(tmp_path / data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_warmup_warning_comes_after_the_data_is_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No audio files"):
        train(tmp_path / "empty", tmp_path / "out", "--max-updates", "5", "--warmup-updates", "50")
    assert "--warmup-updates" not in "".join(capsys.readouterr())  # the log, on stdout or stderr


def test_an_unwritable_packed_folder_is_refused_before_the_corpus_is_scanned(demo_corpus, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(main, "build_manifest", None)  # scanning would raise a TypeError
    args = main.parse_args(short_run_flags(demo_corpus, tmp_path / "run", "--packed-dir",
                                           str(blocked(tmp_path))))
    with pytest.raises(UserError, match="packed-corpus folder.*--packed-dir"):
        main.train(args)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_on_resume_is_one_clear_error_line(demo_corpus, tmp_path):
    (tmp_path / "latest.pt").write_bytes(b"this is not a checkpoint")
    result = run_script("main.py", *tiny_flags(demo_corpus, tmp_path, "--resume"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'latest.pt'} is corrupt")


# ----- probe.py and suite.py ----------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--json", "--cache-dir"])
def test_probe_refuses_an_unwritable_json_or_cache_before_any_feature(demo_corpus, tmp_path, flag,
                                                                     monkeypatch):
    monkeypatch.setattr(probe, "select_files", lambda args: pytest.fail("the work started"))
    outputs = {"--json": str(tmp_path / "p.json"), flag: str(blocked(tmp_path))}
    with pytest.raises(UserError, match=f"Cannot write to the output folder .*{flag}"):
        probe.main(["--data-dir", str(demo_corpus), "--labels", "folder", "--checkpoint", "mfcc",
                    *[item for pair in outputs.items() for item in pair]])


def test_probe_refuses_a_json_path_that_is_a_folder(demo_corpus, tmp_path):
    with pytest.raises(UserError, match="--json .* is a folder"):
        probe.main(["--data-dir", str(demo_corpus), "--labels", "folder", "--checkpoint", "mfcc",
                    "--json", str(tmp_path)])


def test_an_invalid_label_pattern_is_one_sentence_not_a_trace(demo_corpus, tmp_path):
    with pytest.raises(UserError, match=r"The label pattern '\(\?P<label>\\d' is not a valid regular "
                                        r"expression \(missing \), unterminated subpattern"):
        probe.main(["--data-dir", str(demo_corpus), "--checkpoint", "mfcc", "--labels",
                    r"pattern:(?P<label>\d", "--json", str(tmp_path / "p.json")])


@pytest.mark.slow
def test_a_folder_with_one_class_exits_with_a_clear_error(tmp_path):
    write_tone(tmp_path / "only" / "a.wav", 440)
    write_tone(tmp_path / "only" / "b.wav", 880)
    run = run_script("probe.py", "--data-dir", str(tmp_path), "--labels", "folder", "--checkpoint", "mfcc",
                     "--json", str(tmp_path / "out.json"))
    assert run.returncode == 2
    assert run.stderr.startswith("error:") and "needs at least two classes" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_missing_data_folder_is_one_clear_sentence_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="No folder .*nowhere: give --data-dir"):
        suite.main(["fsdd", "--data-dir", str(tmp_path / "nowhere"), "--checkpoint", "x.pt",
                    "--json", str(tmp_path / "o.json"), "--output-dir", str(tmp_path / "out")])
    assert sorted(tmp_path.iterdir()) == []


# ----- finetune.py --------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_command_line_prints_one_line_and_exits_2(tmp_path, tones):
    result = run_script("finetune.py", "--checkpoint", "mfcc", "--data-dir", str(tones), "--labels", "folder",
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: None of the 48 audio files") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_label_column_that_does_not_exist_is_one_sentence_naming_the_columns(tmp_path, transcribed):
    result = run_script("finetune.py", "--task", "ctc", "--checkpoint", "mfcc", "--data-dir",
                        str(transcribed), "--labels", str(transcribed / "transcripts.tsv"),
                        "--label-column", "phones", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "has no column `phones` (it has path, speaker, text, " \
        "letters): choose one of them with --label-column" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--task", "ctc", "--head", "mlp"], "--task ctc takes --head linear or bilstm, not mlp"),
    (["--head", "bilstm"], "--task classify takes --head linear or mlp, not bilstm"),
    (["--split", "fsdd-official", "--test-groups", "a,b"], "alternatives"),
])
def test_a_head_the_task_cannot_use_is_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        finetune.parse_train_args(["--checkpoint", "mfcc", "--data-dir", str(tmp_path), "--labels", "folder",
                                   *flags])


def test_a_missing_checkpoint_leaves_no_output_folder(tmp_path, tones):
    with pytest.raises(UserError, match="nope.pt"):
        finetune.main(["--checkpoint", str(tmp_path / "nope.pt"), "--data-dir", str(tones), "--labels",
                       TONE_LABELS, "--output-dir", str(tmp_path / "ft")])
    assert not (tmp_path / "ft").exists()


# ----- extract.py ---------------------------------------------------------------------------------

def test_extract_refuses_an_unwritable_output_before_loading_the_model(demo_corpus, tmp_path):
    missing = str(tmp_path / "missing.pt")  # were the model loaded first, this would be the error
    for output in (blocked(tmp_path), blocked(tmp_path).with_suffix(".npz")):
        with pytest.raises(UserError, match="Cannot write to the output folder .*--output"):
            extract.main(["--checkpoint", missing, "--data-dir", str(demo_corpus), "--output", str(output)])


@pytest.mark.parametrize("output", ["feats", "out/feats.npz"])
def test_extract_with_a_missing_checkpoint_leaves_no_output(demo_corpus, tmp_path, output):
    with pytest.raises(UserError, match="missing.pt"):
        extract.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data-dir", str(demo_corpus),
                      "--output", str(tmp_path / output)])
    assert sorted(tmp_path.iterdir()) == []


def test_extract_refuses_an_npy_output_instead_of_making_a_folder_of_that_name(demo_corpus, checkpoint16,
                                                                              tmp_path):
    with pytest.raises(UserError, match=r"one \.npy file.*--output .*feats\.npz"):
        extract.main(["--checkpoint", str(checkpoint16), "--data-dir", str(demo_corpus),
                      "--output", str(tmp_path / "feats.npy")])
    assert not (tmp_path / "feats.npy").exists()


# ----- vis.py -------------------------------------------------------------------------------------

def test_an_unwritable_output_folder_is_refused_before_any_work(demo_corpus, tmp_path):
    with pytest.raises(UserError, match="Cannot write to the output folder .*--output-dir"):
        vis.main(["--checkpoint", str(tmp_path / "missing.pt"),  # not loaded yet
                  "--data-dir", str(demo_corpus), "--output-dir", str(blocked(tmp_path)), "--device", "cpu"])


def test_vis_with_a_missing_checkpoint_leaves_no_output_folder(demo_corpus, tmp_path):
    with pytest.raises(UserError, match="missing.pt"):
        vis.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data-dir", str(demo_corpus),
                  "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()


def test_vis_with_one_readable_file_writes_nothing(demo_corpus, checkpoint16, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.wav").write_bytes((next(demo_corpus.rglob("*.wav"))).read_bytes())
    (data / "b.wav").write_bytes(b"not audio")
    with pytest.raises(UserError, match="Only 1 of 2 audio files"):
        vis.main(["--checkpoint", str(checkpoint16), "--data-dir", str(data), "--output-dir",
                  str(tmp_path / "out"), "--device", "cpu", "--no-random-reference"])
    assert not (tmp_path / "out").exists()


def test_an_invalid_label_pattern_is_one_sentence(demo_corpus, checkpoint16, tmp_path):
    with pytest.raises(UserError, match="is not a valid regular expression"):
        vis.main(["--checkpoint", str(checkpoint16), "--data-dir", str(demo_corpus), "--output-dir",
                  str(tmp_path / "out"), "--device", "cpu", "--labels", r"pattern:(?P<label>\d"])


@pytest.mark.slow
def test_missing_checkpoint_exits_2_with_one_error_line(demo_corpus, tmp_path):
    result = run_script("vis.py", "--checkpoint", str(tmp_path / "missing.pt"), "--data-dir",
                        str(demo_corpus), "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


# ----- export.py and bench.py ---------------------------------------------------------------------

def test_int8_without_calibration_audio_is_refused(checkpoint16, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--checkpoint", str(checkpoint16), "--quantize", "int8",
                     "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--calibration-dir" in capsys.readouterr().err


def test_a_fine_tuned_model_cannot_be_exported_as_a_stream(tmp_path):
    checkpoint = tmp_path / "finetuned.pt"
    torch.save(fine_tuned("classify").payload({}), checkpoint)
    with pytest.raises(UserError, match="drop --streaming"):
        export.main(["--checkpoint", str(checkpoint), "--streaming", "--output", str(tmp_path / "x.onnx")])


@pytest.mark.slow
def test_loader_without_a_data_folder_is_one_error_line_and_exit_code_2():
    run = run_script("bench.py", "--what", "loader", timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "--data-dir" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_chunk_size_that_is_not_whole_hops_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--what", "stream", "--chunk-ms", "10,25"])
    assert exit_info.value.code == 2
