"""suite.py fsdd: every row and the plot, the single probe's numbers, caches, order, checkpoints it cannot
use."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from audio import write_fsdd

import probe
import suite
from demo import make_demo_corpus
from model import UserError, Wav2Vec, Wav2VecConfig


def write_checkpoint(path: Path, train_seconds: float | None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16))
    payload = {"config": model.config.to_dict(), "model": model.state_dict(), "step": 10}
    if train_seconds is not None:
        payload["train_seconds"] = train_seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    write_fsdd(root / "fsdd")
    make_demo_corpus(root / "demo", num_speakers=2, files_per_speaker=2, seconds_per_file=1.0)
    write_checkpoint(root / "run" / "checkpoint_20.pt", 300.0, seed=2)  # written first, trained longer
    write_checkpoint(root / "run" / "checkpoint_10.pt", 60.0, seed=1)
    return root


def suite_args(workspace: Path, out: Path, *features: str, fsdd: Path | None = None) -> list[str]:
    return ["fsdd", "--data-dir", str(fsdd or workspace / "fsdd"), "--frames-dir",
            str(workspace / "demo"), "--checkpoint", *features, "--cache-dir", str(out / "cache"),
            "--output-dir", str(out), "--json", str(out / "suite.json"), "--max-frames", "200",
            "--folds", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def run_folder_result(workspace, tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("out")
    capture = []
    real_print = print
    suite.print = lambda text: capture.append(text)  # the table, without capsys in a module fixture
    try:
        suite.main(suite_args(workspace, out, str(workspace / "run")))
    finally:
        suite.print = real_print
    return json.loads((out / "suite.json").read_text()), capture[0], out


def test_the_suite_writes_every_row_and_the_learning_curve(run_folder_result):
    result, table, out = run_folder_result
    names = [row["name"] for row in result["rows"]]
    assert names == ["MFCC", "random z", "random c", "checkpoint_10.pt z", "checkpoint_10.pt c",
                     "checkpoint_20.pt z", "checkpoint_20.pt c"]
    full = set(suite.TASKS)
    assert [set(row["tasks"]) for row in result["rows"]] == [full] * 3 + [{"digits_loso"}] * 2 + [full] * 2
    assert all(0 <= task["accuracy"] <= 1 and task["fold_accuracies"] for row in result["rows"]
               for task in row["tasks"].values())
    assert (out / "learning_curve.png").stat().st_size > 0
    assert table.splitlines()[0].startswith("| features | digits, leave-one-speaker-out |")
    assert len(table.splitlines()) == 2 + len(names) and "| checkpoint_10.pt z |" in table


def test_the_learning_curve_orders_checkpoints_by_training_time(run_folder_result):
    curve = run_folder_result[0]["learning_curve"]
    assert [point["train_minutes"] for point in curve] == [1.0, 5.0]
    assert [Path(point["checkpoint"]).name for point in curve] == ["checkpoint_10.pt", "checkpoint_20.pt"]


def test_checkpoints_without_training_time_get_the_whole_table_and_come_last(workspace, tmp_path):
    untimed = write_checkpoint(tmp_path / "fairseq_like.pt", None)
    sources = suite.checkpoint_sources([untimed, workspace / "run" / "checkpoint_20.pt",
                                        workspace / "run" / "checkpoint_10.pt"])
    assert [Path(s.spec).name for s in sources] == ["checkpoint_10.pt", "checkpoint_20.pt", "fairseq_like.pt"]
    assert [len(s.tasks) for s in sources] == [1, 4, 4]


@pytest.mark.parametrize("task", ["digits_loso", "digits_official", "speaker_id", "frames"])
def test_a_suite_row_equals_the_single_probe(workspace, run_folder_result, tmp_path, task):
    result, _, _ = run_folder_result
    row = next(row for row in result["rows"] if row["name"] == "checkpoint_20.pt z")
    data_dir = workspace / ("demo" if task == "frames" else "fsdd")
    probe.main(["--data-dir", str(data_dir), *suite.TASKS[task][1], "--checkpoint",
                str(workspace / "run" / "checkpoint_20.pt"), "--layer", "z", "--pool", "mean+std",
                "--folds", "3", "--max-frames", "200", "--threads", "1", "--json",
                str(tmp_path / "single.json")])
    single = json.loads((tmp_path / "single.json").read_text())
    for key in ("accuracy", "macro_f1", "fold_accuracies", "fold_names", "n_examples"):
        assert row["tasks"][task][key] == single[key]


def test_cached_scores_are_reused_and_recomputed_when_their_inputs_change(workspace, tmp_path, monkeypatch):
    args = suite_args(workspace, tmp_path, str(workspace / "run" / "checkpoint_20.pt"),
                      fsdd=write_fsdd(tmp_path / "fsdd"))
    scored = []  # (task, examples) of each score computed; a stand-in result keeps the test fast
    monkeypatch.setattr(suite, "score", lambda args, task, examples: scored.append((task, len(examples.y)))
                        or {"accuracy": 0.5, "seconds": 0.0})
    suite.main(args)
    assert len(scored) == 5 * 4  # MFCC, random z and c, checkpoint z and c; four tasks each
    suite.main(args)
    rows = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert len(scored) == 5 * 4 and all(task["cached"] for row in rows for task in row["tasks"].values())
    wav, rate = sf.read(tmp_path / "fsdd" / "0_ann_0.wav")
    sf.write(tmp_path / "fsdd" / "0_ann_0.wav", wav[:-80], rate)  # the FSDD scores again, not the frames'
    suite.main(args)
    again = [task for task, _ in scored[5 * 4:]]
    assert sorted(set(again)) == ["digits_loso", "digits_official", "speaker_id"] and len(again) == 3 * 5


def test_a_folder_without_fsdd_names_is_one_clear_sentence(workspace, tmp_path):
    sf.write(tmp_path / "hello.wav", np.zeros(8000), 8000)
    with pytest.raises(UserError, match="No FSDD-named files"):
        suite.select(suite.parse_args(["fsdd", "--data-dir", str(tmp_path), "--checkpoint", "x.pt",
                                       "--json", str(tmp_path / "o.json")]))


def test_an_unreadable_checkpoint_is_one_clear_sentence(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt is corrupt or not a wav2vec checkpoint"):
        suite.checkpoint_sources(suite.checkpoint_paths([str(tmp_path / "bad.pt")]))


def test_a_folder_without_checkpoints_is_one_clear_sentence(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint_<step>.pt or latest.pt"):
        suite.checkpoint_paths([str(tmp_path)])


def test_the_old_features_flag_still_names_the_checkpoints_and_warns(tmp_path, capsys):
    args = suite.parse_args(["fsdd", "--data-dir", str(tmp_path), "--features", "a.pt", "b.pt"])
    assert args.checkpoint == ["a.pt", "b.pt"]
    assert "warning: --features is now --checkpoint" in capsys.readouterr().err
