"""What every entry script owes a user at its command line: flags checked before the work starts (values,
combinations, output locations), --threads, and one sentence instead of a trace."""

import logging
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
import torch
from weights import save_weights

import extract
import main
import probe
import vis
from demo import make_demo_corpus
from model import UserError, Wav2Vec, Wav2VecConfig


@pytest.fixture(autouse=True)
def keep_threads_and_logging():
    """The scripts set torch's thread count and reconfigure the root logger: give the next test both back."""
    threads, root = torch.get_num_threads(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    torch.set_num_threads(threads)
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """6 files of 1 s from 2 speakers, with per-frame labels."""
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2, files_per_speaker=3,
                            seconds_per_file=1.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16))
    return save_weights(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def blocked(tmp_path: Path) -> Path:
    """A folder that cannot be created (its parent is a file), whoever runs the tests (root included)."""
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "out"


# ----- main.py: numeric flags at parse time --------------------------------------------------------

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


@pytest.mark.parametrize("offset", ["auto", 1])
def test_the_shortest_crop_allowed_gives_a_finite_loss(offset):
    args = main.parse_args(["--data-dir", "d", "--channels", "16", "--num-steps", "1", "--offset",
                            str(offset), "--segment-length", "945" if offset == "auto" else "625"])
    model = Wav2Vec(main.build_config(args))
    loss, _ = model(torch.randn(2, args.segment_length))
    assert torch.isfinite(loss)


def test_a_warm_up_longer_than_the_run_is_warned_of():
    args = main.parse_args(["--data-dir", "d", "--max-updates", "10", "--warmup-updates", "50"])
    (warning,) = main.flag_warnings(args)
    assert warning.startswith("--warmup-updates 50 is longer than --max-updates 10")
    assert not main.flag_warnings(main.parse_args(["--data-dir", "d", "--max-updates", "50"]))


def test_the_default_loader_workers_fit_the_machine(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert main.build_parser().parse_args([]).num_workers == 1  # 2 CPUs: no "might freeze" warning


# ----- outputs that cannot be written are refused before the work ---------------------------------

def test_extract_refuses_an_unwritable_output_before_loading_the_model(corpus, tmp_path):
    missing = str(tmp_path / "missing.pt")  # were the model loaded first, this would be the error
    for output in (blocked(tmp_path), blocked(tmp_path).with_suffix(".npz")):
        with pytest.raises(UserError, match="Cannot write to the output folder .*--output"):
            extract.main(["--checkpoint", missing, "--data-dir", str(corpus), "--output", str(output)])


def test_extract_refuses_an_npy_output_instead_of_making_a_folder_of_that_name(corpus, checkpoint, tmp_path):
    with pytest.raises(UserError, match=r"one \.npy file.*--output .*feats\.npz"):
        extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(corpus),
                      "--output", str(tmp_path / "feats.npy")])
    assert not (tmp_path / "feats.npy").exists()


@pytest.mark.parametrize("flag", ["--json", "--cache-dir"])
def test_probe_refuses_an_unwritable_json_or_cache_before_any_feature(corpus, tmp_path, flag, monkeypatch):
    monkeypatch.setattr(probe, "select_files", lambda args: pytest.fail("the work started"))
    outputs = {"--json": str(tmp_path / "p.json"), flag: str(blocked(tmp_path))}
    with pytest.raises(UserError, match=f"Cannot write to the output folder .*{flag}"):
        probe.main(["--data-dir", str(corpus), "--labels", "folder", "--checkpoint", "mfcc",
                    *[item for pair in outputs.items() for item in pair]])


def test_probe_refuses_a_json_path_that_is_a_folder(corpus, tmp_path):
    with pytest.raises(UserError, match="--json .* is a folder"):
        probe.main(["--data-dir", str(corpus), "--labels", "folder", "--checkpoint", "mfcc",
                    "--json", str(tmp_path)])


# ----- labels -------------------------------------------------------------------------------------

def test_an_invalid_label_pattern_is_one_sentence_not_a_trace(corpus, tmp_path):
    with pytest.raises(UserError, match=r"The label pattern '\(\?P<label>\\d' is not a valid regular "
                                        r"expression \(missing \), unterminated subpattern"):
        probe.main(["--data-dir", str(corpus), "--checkpoint", "mfcc", "--labels", r"pattern:(?P<label>\d",
                    "--json", str(tmp_path / "p.json")])


# ----- --threads ----------------------------------------------------------------------------------

def test_every_entry_script_takes_threads(corpus, checkpoint, tmp_path):
    torch.set_num_threads(2)
    extract.main(["--checkpoint", str(checkpoint), "--data-dir", str(corpus), "--output",
                  str(tmp_path / "f.npz"), "--pool", "mean", "--threads", "1", "--device", "cpu"])
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    probe.main(["--data-dir", str(corpus), "--labels", "folder", "--checkpoint", str(checkpoint),
                "--folds", "2", "--json", str(tmp_path / "p.json"), "--threads", "1", "--device", "cpu"])
    assert torch.get_num_threads() == 1
    assert {pool["num_threads"] for pool in threadpoolctl.threadpool_info()} == {1}  # NumPy's BLAS too
    for script in (vis, main):
        assert script.parse_args(["--data-dir", str(corpus), "--threads", "1"]).threads == 1


def test_extract_features_accepts_numpy_as_well_as_tensors():
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16)).eval()
    wav = np.random.default_rng(0).standard_normal(4000)  # float64, as numpy makes it
    from_numpy = model.extract_features(wav)["c"]
    assert torch.equal(from_numpy, model.extract_features(torch.from_numpy(wav).float())["c"])

