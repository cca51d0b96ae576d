"""Launch a distributed run: ``python -m multiproc [--nproc N] main.py ARGS`` starts one worker per process.

Each worker runs ``python SCRIPT ARGS --world_size N --rank i`` (with MASTER_ADDR/MASTER_PORT, a
free local port, in its environment). N is ``--nproc`` (or torchrun's name, ``--nproc_per_node``)
when given, else the number of visible GPUs, else 1 (on a CPU-only machine pass ``--nproc`` for
several processes). ``pip install .`` installs this module, so it runs from any directory.
Rank 0 writes to this terminal; rank i > 0 to ``distributed_logs/<--save stem>/<i>.log``, as the
original (each log starts with the command it ran and ends with its exit status). When a worker
fails the others are stopped; the exit status is the first failure's. SIGINT/SIGTERM to the launcher
(Ctrl-C, kill) are forwarded to every worker, which writes its checkpoint and exits; the launcher
waits for them and exits with their status (130 or 143). A second signal makes them abort at once.
"""

from __future__ import annotations

import os
import shlex
import signal
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


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM it if the launcher dies (even by SIGKILL), Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(script_args: list[str], nproc: int) -> int:
    """Run ``nproc`` workers of ``script_args`` (script then its flags); wait; the first failure's status.

    SIGINT/SIGTERM to the launcher (Ctrl-C, kill) go to every worker, which saves a checkpoint and
    exits; the launcher waits for them and exits with their status. Workers run in their own process
    group, so that a terminal's Ctrl-C reaches them once (through the launcher), not twice: a second
    signal makes them abort at once, without a checkpoint (send it for that).
    """
    log_dir = Path("distributed_logs") / save_stem(script_args[1:])
    log_dir.mkdir(parents=True, exist_ok=True)
    # unbuffered: a rank's lines reach its log as they are printed, also when it is killed
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    logs = [None] + [(log_dir / f"{rank}.log").open("w") for rank in range(1, nproc)]
    commands = [
        [sys.executable, *script_args, "--world_size", str(nproc), "--rank", str(rank)]
        for rank in range(nproc)
    ]
    for rank, log in enumerate(logs[1:], 1):  # only rank 0 prints progress: say in each log what ran
        log.write(f"multiproc: rank {rank} of {nproc}: {shlex.join(commands[rank])}\n")
        log.flush()
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    workers: list[subprocess.Popen] = []
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank, log in enumerate(logs):
            workers.append(
                subprocess.Popen(
                    commands[rank],
                    env=env,
                    stdout=log,
                    stderr=log and subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
        codes = [w.poll() for w in workers]
        # stop at the first failure (it would leave the others waiting for it in a collective); after a
        # forwarded signal, wait for every worker's checkpoint instead
        while None in codes and (received or not any(codes)):
            time.sleep(0.2)
            codes = [w.poll() for w in workers]
    finally:
        for w in workers:
            if w.poll() is None and not received:
                w.terminate()
        for w in workers:
            w.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    final = [w.returncode for w in workers]
    for rank, log in enumerate(logs[1:], 1):
        log.write(f"multiproc: rank {rank} exited with status {final[rank]}\n")
        log.close()
    if received:  # every worker ran to its checkpoint: report them all
        codes = final
    failed = [(rank, code) for rank, code in enumerate(codes) if code]
    if received:
        name = signal.Signals(received[0]).name
        print(
            f"multiproc: {name} forwarded to the {nproc} workers; they exited with {codes}", file=sys.stderr
        )
    else:
        for rank, code in failed:
            where = "above" if rank == 0 else f"in {log_dir / f'{rank}.log'}"
            print(f"multiproc: rank {rank} exited with status {code} (output {where})", file=sys.stderr)
        if failed and len(failed) < nproc:
            print("multiproc: stopped the other ranks", file=sys.stderr)
    if not failed:
        return 0
    code = failed[0][1]
    return code if code > 0 else 128 - code  # killed by signal N: the shell's 128 + N


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
