"""Process plumbing for jobs that run APOLLO: the launcher's environment (torchrun, deepspeed, mpirun),
a clean end of a distributed run, and the optimizer state a rank holds.

Used by launch/ (the training job), tools/ and tests; it knows no engine beyond what it duck-types
(DeepSpeed's optimizer wrappers by their ``.optimizer``) and imports neither deepspeed nor launch/.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist

MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

__all__ = [
    "MPI_RANK_VARS",
    "MPI_SIZE_VARS",
    "launched_by_mpi",
    "env_rank",
    "env_world_size",
    "free_port",
    "mpi_discovery",
    "shutdown",
    "host_peak_rss_gib",
    "unwrap",
    "state_bytes",
]


# -- the launcher's environment -----------------------------------------------------------------
def launched_by_mpi() -> bool:
    """True under mpirun / mpiexec (and not under torchrun or the deepspeed launcher)."""
    return "RANK" not in os.environ and any(v in os.environ for v in MPI_RANK_VARS)


def env_rank() -> int:
    """This process's global rank as the launcher's environment tells it (0 without a launcher)."""
    for v in ("RANK",) + MPI_RANK_VARS:
        if v in os.environ:
            return int(os.environ[v])
    return 0


def env_world_size() -> int:
    """World size from the launcher's environment, read before any process group exists."""
    for v in ("WORLD_SIZE",) + MPI_SIZE_VARS:
        if v in os.environ:
            return int(os.environ[v])
    return 1


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpi_discovery() -> None:
    """Under mpirun: set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from MPI.COMM_WORLD,
    so that torch.distributed's env:// rendezvous (and DeepSpeed's) works as under torchrun."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    one_node = node.Get_size() == world
    # One node: loopback always works. Several: rank 0's address as its hostname resolves.
    addr = "127.0.0.1" if one_node else socket.gethostbyname(socket.gethostname())
    addr, port = comm.bcast((addr, free_port()) if rank == 0 else None, root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(node.Get_rank()))
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(port))


# -- the end of a run ---------------------------------------------------------------------------
def shutdown() -> None:
    """End a distributed run: wait for every rank, then tear the process group down. Under gloo this
    leaves without destructors (exit code 0): torch 2.13's gloo teardown sometimes aborts ("terminate
    called without an active exception") after all work is done, which would fail a finished job."""
    if not dist.is_initialized():
        return
    dist.barrier()
    _unlink_deepspeed_cpu_buffer(dist.get_rank())
    if dist.get_backend() == "gloo":
        sys.stdout.flush()
        sys.stderr.flush()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()  # Open MPI's mpirun fails a job whose ranks exit without it (mpich does not)
        os._exit(0)
    dist.destroy_process_group()


def _unlink_deepspeed_cpu_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) gives every rank a 66 MB shared-memory
    segment, /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never
    unlinks it: RAM lost per rank and launch until reboot. After the final barrier no rank reads it."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
        except FileNotFoundError:
            pass


# -- what a rank holds --------------------------------------------------------------------------
def host_peak_rss_gib() -> float:
    """This process's peak resident set size so far (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or ``optimizer`` itself)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state tensors this rank holds (each storage counted once; DTensors' local part)."""
    optimizer = unwrap(optimizer)
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                v = getattr(v, "_local_tensor", v)
                s = v.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())
