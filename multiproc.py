"""Launch a distributed run: ``python -m multiproc [--nproc N] main.py ARGS`` starts one worker per process.

Each worker runs ``python SCRIPT ARGS --world_size N --rank i`` (with MASTER_ADDR/MASTER_PORT, a
free local port, in its environment). N is ``--nproc`` (or torchrun's name, ``--nproc_per_node``)
when given, else the number of visible GPUs, else 1 (on a CPU-only machine pass ``--nproc`` for
several processes). ``pip install .`` installs this module, so it runs from any directory.
Rank 0 writes to this terminal; rank i > 0 to ``distributed_logs/<--save stem>/<i>.log``, as the
original. When a worker fails the others are stopped; the exit status is the first failure's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def save_stem(args: list[str], default: str = "lang_model.pt") -> str:
    """The stem of the script's ``--save`` (also ``-save``, ``--save=X``), which names the log folder."""
    save = default
    for i, arg in enumerate(args):
        if arg in ("--save", "-save") and i + 1 < len(args):
            save = args[i + 1]
        elif arg.startswith(("--save=", "-save=")):
            save = arg.split("=", 1)[1]
    return Path(save).stem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_args: list[str], nproc: int) -> int:
    """Run ``nproc`` workers of ``script_args`` (script then its flags); wait; the first failure's status."""
    log_dir = Path("distributed_logs") / save_stem(script_args[1:])
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [None] + [(log_dir / f"{rank}.log").open("w") for rank in range(1, nproc)]
    workers = [
        subprocess.Popen(
            [sys.executable, *script_args, "--world_size", str(nproc), "--rank", str(rank)],
            env=env,
            stdout=log,
            stderr=log and subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    codes = [w.poll() for w in workers]
    try:
        # stop at the first failure: it would leave the others waiting for it in a collective
        while None in codes and not any(codes):
            time.sleep(0.2)
            codes = [w.poll() for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            w.wait()
        for log in logs[1:]:
            log.close()
    failed = [(rank, code) for rank, code in enumerate(codes) if code]
    for rank, code in failed:
        where = "above" if rank == 0 else f"in {log_dir / f'{rank}.log'}"
        print(f"multiproc: rank {rank} exited with status {code} (output {where})", file=sys.stderr)
    if failed and len(failed) < nproc:
        print("multiproc: stopped the other ranks", file=sys.stderr)
    return (failed[0][1] if failed[0][1] > 0 else 1) if failed else 0


USAGE = "usage: python -m multiproc [--nproc N | --nproc_per_node N] SCRIPT [ARGS...]"
NPROC_FLAGS = ("--nproc", "--nproc_per_node")


def parse_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """The leading ``--nproc N`` / ``--nproc_per_node N`` (or ``=N``), if any, and the script's argv."""
    flag, eq, value = argv[0].partition("=") if argv else ("", "", "")
    if flag not in NPROC_FLAGS:
        return None, argv
    rest = argv[1:]
    if not eq:
        if not rest:
            raise ValueError(f"{flag} needs a number of processes")
        value, rest = rest[0], rest[1:]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{flag} {value}: expected a number of processes >= 1")
    return int(value), rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\n" + __doc__)
        return 0
    try:
        nproc, argv = parse_nproc(argv)
    except ValueError as e:
        print(f"multiproc: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    if nproc is None:
        import torch

        nproc = max(torch.cuda.device_count(), 1)
    return launch(argv, nproc)


if __name__ == "__main__":
    sys.exit(main())
