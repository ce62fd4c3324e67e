"""Functions that tests run in spawned processes: a small module, so each process starts quickly."""

import argparse
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import training
from model import UserError, Wav2Vec, Wav2VecConfig


def join(rank: int, port: int, world_size: int = 2, local_rank: int | None = None) -> training.Distributed:
    """Join a gloo job of `world_size` processes on this machine as torchrun would start this one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank if local_rank is None else local_rank), WORLD_SIZE=str(world_size))
    return training.setup_distributed("cpu")


def prepare_in_turn(rank: int, port: int, local_ranks: list[int], order_file: str) -> None:
    ddp = join(rank, port, len(local_ranks), local_ranks[rank])
    barrier = dist.barrier

    def barrier_off_the_default_group(group=None, **kwargs):
        # Under NCCL the default group's watchdog kills a wait longer than 10 minutes (packing a corpus).
        assert group is not None and group is not dist.group.WORLD, "a set-up wait on the default group"
        return barrier(group=group, **kwargs)

    dist.barrier = barrier_off_the_default_group
    with training.main_process_first(ddp):
        time.sleep(0.5 if ddp.is_main else 0)  # rank 0's preparation takes time; the others wait for it
        with open(order_file, "a") as f:
            f.write(f"{rank}\n")
    training.teardown_distributed()


def skip_a_non_finite_update(rank: int, port: int) -> None:
    """The same gradients on both ranks (as after DDP's all_reduce), a loss that is finite on rank 0 only."""
    join(rank, port)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    optimizer = training.build_optimizer(model, lr=0.1)
    scaler = training.make_grad_scaler(torch.device("cpu"), "fp32")
    loss_sum = torch.tensor(math.inf if rank == 1 else 1.0)
    _, skipped = training.optimizer_step(model, optimizer, scaler, clip_norm=1.0, loss_sum=loss_sum)
    assert skipped.item(), f"rank {rank} stepped while the other skipped"
    assert all(torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    training.teardown_distributed()


def report_the_slowest_loader(rank: int, port: int, output_dir: str) -> None:
    """Two logged intervals in which rank 1 waits for its loader all the time and rank 0 never does: rank 0,
    which writes the log, warns that the loader is the bottleneck."""
    ddp = join(rank, port)
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    training.log.addHandler(handler)
    progress, model = training.Progress(), Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=8))
    log = training.TrainingLog(Path(output_dir), progress, 10, 1.0, training.CollapseWatch(model), ddp)
    metrics = {"loss_bits": torch.tensor(1.0), "accuracy": torch.tensor(0.5),
               "accuracy_per_step": torch.zeros(3)}
    for _ in range(2):  # the first interval is left out: it includes the loader workers' start-up
        log.add_micro_batch(torch.tensor(1.0), metrics)
        log.add_update(torch.tensor(1.0), torch.tensor(False), lr=1e-3)
        log.add_data_wait(10.0 if rank == 1 else 0.0)
        progress.advance(2)
        log.write_train(progress, loss_scale=1.0)
    log.close()
    if rank == 0:
        assert any("the loader is the bottleneck" in warning for warning in warnings), warnings
    training.teardown_distributed()


def resume_from_each_nodes_own_folder(rank: int, port: int, folder: str) -> None:
    """Two nodes without a shared disk: rank 0's --output-dir holds the run at step 2, the other node's
    folder of the same name an older latest.pt, at step 1."""
    ddp = join(rank, port)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=8))
    optimizer = training.build_optimizer(model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda("constant", 0, 10, 1.0))
    scaler = training.make_grad_scaler(torch.device("cpu"), "fp32")
    args = argparse.Namespace(lr=1e-3, **dict.fromkeys(training.MACHINE_FLAGS))
    path = Path(folder) / f"node{rank}" / "latest.pt"
    path.parent.mkdir()
    progress = training.Progress(step=2 - rank)
    payload = training.checkpoint_payload(model, optimizer, scheduler, scaler, progress, args, world_size=2)
    training.save_checkpoint(payload, path)
    try:
        training.resume(path, model, optimizer, scheduler, scaler, args, ddp)
    except UserError as err:
        assert "put --output-dir on a disk that every node shares" in str(err), err
    else:
        raise AssertionError(f"rank {rank} resumed from its own folder's latest.pt")
    training.teardown_distributed()
