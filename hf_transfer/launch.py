"""Make `accelerate launch --cpu --num_processes N scripts/train.py ...` start N processes.

On CPU, Accelerate's launcher starts one process and leaves the others to `mpirun`
(accelerate issue #2741), so the documented command would silently train alone. When a
training script finds itself started that way (CPU, a rendezvous address set, no rank of its
own), it re-reads the launch command with Accelerate's own parser and starts the N processes
with `torch.distributed.run`, as `accelerate launch --multi_gpu` does on GPUs. Each process then
joins a gloo process group through the usual Accelerate environment.
"""

from __future__ import annotations

import os
import sys

# variables that mean this process already belongs to a launched group
_RANK_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _accelerate_launch_arguments() -> list[str] | None:
    """The arguments of the `accelerate launch` command that started this process, if it was one."""
    import psutil  # an Accelerate dependency

    try:
        command = psutil.Process(os.getppid()).cmdline()
    except (psutil.Error, OSError):
        return None
    for index, part in enumerate(command):
        if part == "launch" or part.endswith(("accelerate-launch", "accelerate.commands.launch")):
            return command[index + 1:]
    return None


def requested_cpu_processes() -> int:
    """How many processes `accelerate launch --cpu` was asked for, when it started only this one; else 1."""
    if not _truthy(os.environ.get("ACCELERATE_USE_CPU")) or "MASTER_ADDR" not in os.environ:
        return 1  # the simple launcher sets MASTER_ADDR only when more than one process was asked for
    if any(name in os.environ for name in _RANK_VARIABLES):
        return 1
    arguments = _accelerate_launch_arguments()
    if arguments is None:
        return 1
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    try:  # resolve the count exactly as Accelerate did: flags, then its config file
        parsed, _, _ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    except (SystemExit, ValueError):
        return 1
    if (parsed.num_machines or 1) > 1:
        return 1  # several machines on CPU: mpirun's job (see README), not ours
    return int(parsed.num_processes or 1)


def run_cpu_processes(count: int) -> int:
    """Run this very command in `count` processes under torch.distributed.run; their exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    arguments = get_args_parser().parse_args([
        "--nproc_per_node", str(count),
        "--master_addr", os.environ["MASTER_ADDR"],
        "--master_port", os.environ.get("MASTER_PORT", "29500"),
        sys.argv[0], *sys.argv[1:],
    ])
    try:
        run(arguments)
    except ChildFailedError as failure:
        # the processes printed their own errors; pass on the first non-zero status
        statuses = [f.exitcode for f in failure.failures.values() if f.exitcode]
        return statuses[0] if statuses and statuses[0] > 0 else 1
    return 0
