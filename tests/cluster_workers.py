"""Functions that tests run in spawned processes: a small module, so each process starts quickly."""

import os
import time

import torch.distributed as dist

import training


def prepare_in_turn(rank: int, port: int, local_ranks: list[int], order_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(local_ranks[rank]), WORLD_SIZE=str(len(local_ranks)))
    ddp = training.setup_distributed("cpu")
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
