"""The machinery of a training run (training.py): set-up in turns under torchrun, the schedule, atomic
checkpoints, the clock, the collapse warning and stop requests."""

import os
import signal

import cluster_workers
import pytest
import torch
from scripts import load, spawn_ranks

import training
from model import UserError, Wav2Vec, Wav2VecConfig
from training import lr_lambda, save_checkpoint

# ----- distributed set-up -------------------------------------------------------------------------

@pytest.mark.slow
def test_ranks_wait_for_the_preparation_outside_the_default_group_node_by_node(tmp_path):
    # Ranks 0 and 1 on one node, rank 2 alone (its local rank 0) on another without a shared disk.
    order = tmp_path / "order.txt"
    spawn_ranks(cluster_workers.prepare_in_turn, [0, 1, 0], str(order), nprocs=3)
    assert order.read_text().split() == ["0", "2", "1"]


@pytest.mark.slow
def test_resume_refuses_ranks_that_read_different_checkpoints(tmp_path):
    spawn_ranks(cluster_workers.resume_from_each_nodes_own_folder, str(tmp_path))


def test_resume_on_a_node_without_the_runs_folder_says_it_must_be_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"no checkpoint at .* \(rank 1\).* a disk that every node shares"):
        training.load_training_checkpoint(tmp_path / "latest.pt")


@pytest.mark.parametrize("name, index", [("cuda:1", 1), ("cuda", 0)])
def test_a_single_process_makes_its_gpu_the_current_device(monkeypatch, name, index):
    # Without torchrun, --device cuda:1 left GPU 0 current, where the pin-memory thread opened a context.
    made_current = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert training.setup_distributed(name).device == made_current[0] == torch.device("cuda", index)


# ----- optimisation and checkpoints ---------------------------------------------------------------

@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank():
    spawn_ranks(cluster_workers.skip_a_non_finite_update)


def test_learning_rate_warms_up_from_about_zero_then_follows_a_cosine_to_the_floor():
    factor = lr_lambda("cosine", warmup=10, total=110, min_ratio=0.01)
    assert factor(0) < 0.1 and factor(9) < factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.505) and factor(110) == factor(500) == pytest.approx(0.01)
    assert lr_lambda("constant", warmup=0, total=110, min_ratio=0.01)(100) == 1.0


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)

    def crash(payload, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2}, path)
    assert load(path) == {"step": 1}


# ----- the training log ---------------------------------------------------------------------------

@pytest.mark.slow
def test_the_loader_wait_is_the_slowest_ranks(tmp_path):
    spawn_ranks(cluster_workers.report_the_slowest_loader, str(tmp_path))


# ----- the clock, the collapse warning and stop requests ------------------------------------------

def test_clock_saves_once_per_interval_and_continues_a_resumed_runs_count(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    progress = training.Progress(train_seconds=150.0)  # resumed 30 s into its third minute
    clock = training.TrainingClock(progress, max_minutes=10, save_every_minutes=1)
    due = []
    for second in range(0, 500, 10):
        now[0] = second
        clock.tick()
        due += [progress.train_seconds] if clock.save_due(clock.boundaries_passed()) else []
    assert due == [180.0, 240.0, 300.0, 360.0, 420.0, 480.0, 540.0, 600.0]
    assert clock.out_of_time and progress.train_seconds == 640.0


def collapse_watch(**config) -> training.CollapseWatch:
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=8, **config))
    return training.CollapseWatch(model, patience=100)


def test_a_loss_stuck_at_its_collapsed_value_warns_once_after_patience_updates():
    watch = collapse_watch()
    stuck = watch.collapsed_loss + 1e-4
    warnings = [watch.add(step, loss, updates=20) for step, loss in enumerate([3.40] + [stuck] * 4 + [3.0]
                                                                              + [stuck] * 12)]
    assert [i for i, w in enumerate(warnings) if w] == [10]  # 5 x 20 updates after the reset at 5
    assert "for 100 updates (step 10)" in warnings[10]


@pytest.mark.parametrize("config, named, not_named", [
    ({}, ["--loss-type infonce", "--warmup-updates"], ["--skip-connections"]),
    ({"skip_connections": False}, ["--skip-connections", "--loss-type infonce"], []),
    ({"loss_type": "infonce"}, ["--warmup-updates"], ["--loss-type infonce", "--skip-connections"]),
])
def test_the_collapse_warning_names_only_remedies_not_in_use(config, named, not_named):
    watch = collapse_watch(**config)
    warning = watch.add(0, watch.collapsed_loss, updates=100)
    assert all(flag in warning for flag in named) and not any(flag in warning for flag in not_named)


@pytest.mark.slow
def test_the_same_signal_twice_in_a_second_is_one_stop_request_and_a_later_one_stops_at_once(monkeypatch):
    # killpg reaches a rank, then torchrun's agent forwards the same stop to it milliseconds later.
    now = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: now[0])
    with training.StopRequest() as stop:
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGTERM)
        now[0] += 0.05
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        now[0] += 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
