"""Functions that tests run in spawned processes: a small module, so each process starts quickly."""

import math
import os
import time

import torch
import torch.distributed as dist

import training


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
