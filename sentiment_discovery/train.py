"""Language-model pre-training: the truncated-BPTT loop (``Trainer``), linear lr decay, evaluation,
checkpoints, metrics, signals, and main.py's body (``pretrain``); the run's files are runfiles.py.

Resume semantics: a checkpoint written during or at the end of training carries ``train_state``
(optimizer, lr schedule, step, data position, carried hidden state, RNG states, best validation
BPC). Loading it continues the run exactly where it stopped, including the schedule length and a
validation or final test evaluation a signal cut short; a checkpoint whose run has finished (last step
taken, test split evaluated) or that has no ``train_state`` starts a new run from its weights.

Distributed (distributed.py): the model is wrapped in DistributedDataParallel, each process trains
its own block of rows (``--batch_size`` rows per process, as the original), and the loss is
normalised by the bytes of all processes' rows, so one step equals a single-process step on the
union of the rows. Validation/test BPC are summed over the processes; the schedule is the same
everywhere; rank 0 alone logs and writes checkpoints, metrics and the plot. A checkpoint holds the
carried state of every row (gathered), so resuming needs the same rows in all, not the same
number of processes.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .batching import PAD_TARGET, Batch, LMSplits, TBPTTBatches
from .checkpoint import SAVE_DTYPES, CheckpointError, copy_checkpoint, save_checkpoint
from .cli import Interrupted, pick_seed
from .errors import UsageError
from .estimate import RunCost
from .matmul import autocast, reduced_dtype
from .model import RNNModel
from .progress import progress_bar
from .recurrent import State
from .runfiles import MetricsLog, RunFiles, SaveLock, check_save_path, prune_snapshots, snapshot_path
from .safe_io import save_figure

LN2 = math.log(2.0)


@dataclass
class TrainOptions:
    optim: str = "Adam"
    lr: float = 5e-4
    clip: float = 0.0  # gradient-norm clipping; 0 = off
    epochs: int = 1
    train_iters: int = 0  # 0: epochs x batches per epoch
    log_interval: int = 100
    save: str = "lang_model.pt"
    save_iters: int = 2000  # batches between checkpoints (with a validation); 0 = only at the end
    keep_checkpoints: int = 0  # also keep the last K checkpoints as <stem>.step<N>.pt; 0 = none
    progress: bool = True  # a bar on a terminal, progress lines in a log (progress.py)
    fp16: bool = False  # float16 products with loss scaling on GPU; on CPU the same as bf16
    bf16: bool = False  # bfloat16 operands for every matrix product (matmul.py); no loss scaling
    loss_scale: float = 1.0  # static loss scale (with fp16)
    save_dtype: str = "fp32"  # dtype of the weights in the checkpoints written (checkpoint.SAVE_DTYPES)
    dynamic_loss_scale: bool = False  # torch.amp.GradScaler instead of the static scale
    load: str = ""  # the checkpoint a resumed run came from (its best model and metrics continue)

    @classmethod
    def from_args(cls, args, **settings) -> TrainOptions:
        """From main.py's flags; ``settings`` give what no flag does (``progress``)."""
        given = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        return cls(**{**given, **settings})


# --------------------------------------------------------------------------------------------
# Interruption: SIGINT/SIGTERM stop after the current step with a checkpoint
# --------------------------------------------------------------------------------------------


class StopRequest:
    """While installed, the first SIGINT/SIGTERM asks the training loop to stop after its current step
    (it then writes a checkpoint); a second one aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __call__(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: aborting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"\n{name}: stopping after the current step to write a checkpoint (again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {s: signal.signal(s, self) for s in self.SIGNALS}

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


# LBFGS needs a closure that re-evaluates the loss at every step, SparseAdam sparse gradients: neither
# fits one truncated-BPTT batch per step
UNSUITABLE_OPTIMIZERS = ("LBFGS", "SparseAdam")


def optimizer_names() -> list[str]:
    """The torch.optim classes ``--optim`` accepts."""
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type)
        and issubclass(c, torch.optim.Optimizer)
        and c is not torch.optim.Optimizer
        and n not in UNSUITABLE_OPTIMIZERS
    )


def check_optimizer(name: str) -> None:
    if name not in optimizer_names():
        why = " (it cannot train on one batch per step)" if name in UNSUITABLE_OPTIMIZERS else ""
        raise UsageError(f"--optim {name!r}{why}: choose one of {', '.join(optimizer_names())}")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    check_optimizer(name)
    return getattr(torch.optim, name)(params, lr=lr)


def run_finished(state: dict) -> bool:
    """Whether the run of a stored training state has ended (last step taken, test evaluated); a
    checkpoint of an earlier version, without the mark, ended with its last step."""
    return bool(state.get("finished", state["step"] >= state["total_steps"]))


def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate falls linearly from its initial value to 0 at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))


def detach(hidden: State | None) -> State | None:
    return None if hidden is None else (hidden[0].detach(), hidden[1].detach())


def batch_loss(model: RNNModel, batch: Batch, hidden: State | None) -> tuple[torch.Tensor, State]:
    """Summed cross-entropy (nats) over the batch's real targets, and the final state."""
    logits, hidden = model(batch.input, hidden, batch.reset)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch.target.reshape(-1),
        ignore_index=PAD_TARGET,
        reduction="sum",
    )
    return loss, hidden


@torch.no_grad()
def evaluate(
    model: RNNModel,
    batches: TBPTTBatches,
    device: torch.device,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """Bits per byte over one pass of ``batches``, state carried across batches as in training.

    Distributed: each process evaluates its own rows and the sums are reduced over all processes.
    ``stop`` (single process only): checked between batches; when it says so, the pass ends and None
    is returned.
    """
    was_training = model.training
    model.eval()
    hidden, nats, count = None, 0.0, 0
    if batches.rows:  # a process may hold no rows of a split with fewer shards than processes
        bar = progress_bar(batches, desc=f"{batches.name} BPC", unit="batch", leave=False, enabled=progress)
        for batch in bar:
            if stop is not None and stop():
                model.train(was_training)
                return None
            batch = batch.to(device)
            loss, hidden = batch_loss(model, batch, hidden)
            nats += loss.item()
            count += batch.num_targets
    model.train(was_training)
    nats, count = distributed.all_sum(nats, count)
    return nats / max(count, 1) / LN2


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_bpc(metrics_path: Path, png_path: Path) -> None:
    """BPC against bytes seen: training (line) and validation (points), test BPC in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    train = [(r["bytes_seen"], r["train_bpc"]) for r in rows if r["train_bpc"] is not None]
    val = [(r["bytes_seen"], r["val_bpc"]) for r in rows if r["val_bpc"] is not None]
    test = [r["test_bpc"] for r in rows if r["test_bpc"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=4)
    ax.set_xlabel("bytes seen")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"test BPC {test[-1]:.3f}" if test else "BPC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    plt.close(fig)


class Trainer:
    """Runs (or resumes) one pre-training run of ``model`` on ``splits``."""

    def __init__(
        self,
        model: RNNModel,
        splits: LMSplits,
        options: TrainOptions,
        device: torch.device,
        train_state: dict | None = None,
    ):
        self.model = model.to(device)
        self.world_size, self.rank = distributed.get_world_size(), distributed.get_rank()
        self.is_main = self.rank == 0
        # the forward pass goes through DDP (it all-reduces the gradients); everything else uses the model
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
            if self.world_size > 1
            else self.model
        )
        self.splits, self.opt, self.device = splits, options, device
        self.train = splits.train
        if self.train is None:
            raise UsageError("no training split")
        self.optimizer = make_optimizer(options.optim, self.model.parameters(), options.lr)
        resume = train_state is not None and not run_finished(train_state)
        self.total_steps = (
            train_state["total_steps"]
            if resume
            else (options.train_iters or options.epochs * len(self.train))
        )
        self.scheduler = linear_decay(self.optimizer, self.total_steps)
        self.save_dtype = SAVE_DTYPES[options.save_dtype]
        dynamic = options.fp16 and options.dynamic_loss_scale
        self.scaler = torch.amp.GradScaler(device.type) if dynamic else None
        self.step, self.epoch, self.batch_index, self.bytes_seen = 0, 0, 0, 0
        self.hidden: State | None = None
        self.best_val = math.inf
        # training loss since the last log line (nats of all processes, bytes, steps): checkpointed,
        # so that a resumed run logs the same losses as an uninterrupted one
        self.interval_nats, self.interval_bytes, self.interval_steps = 0.0, 0, 0
        self.resumed = resume
        self.tested = False  # the final test evaluation is done (a run is finished only then)
        self.val_pending = False  # a signal cut this step's validation short: a resume runs it first
        self.stop_request = StopRequest()
        if resume:
            self._restore(train_state)
        self.dtype = reduced_dtype(device, options.fp16, options.bf16)
        self.files = RunFiles(options.save)
        self.metrics = None
        if self.is_main:
            self.files.take_over(options.load, resume, self.log)
            self.metrics = MetricsLog(self.files.metrics, self.step if resume else None)

    # -- state ---------------------------------------------------------------------------------

    def train_state(self) -> dict:
        """The run's state; distributed, every process must call it (it gathers each one's rows)."""
        hidden = None if self.hidden is None else [t.detach().cpu() for t in self.hidden]
        gathered = distributed.all_gather((hidden, rng_state()))
        if hidden is not None:  # every row's carried state, in global row order
            hidden = [torch.cat(parts, dim=1) for parts in zip(*(h for h, _ in gathered))]
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "batch": self.batch_index,
            "rows": self.train.total_rows,
            "batches_per_epoch": len(self.train),
            "bytes_seen": self.bytes_seen,
            "best_val_bpc": self.best_val,
            "finished": self.finished,
            "val_pending": self.val_pending,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "hidden": hidden,
            "rng": gathered[0][1],
            "rank_rng": [rng for _, rng in gathered] if self.world_size > 1 else None,
            "interval": {
                "nats": distributed.all_sum(self.interval_nats)[0],
                "bytes": self.interval_bytes,
                "steps": self.interval_steps,
            },
        }

    @property
    def finished(self) -> bool:
        """The last step is taken and the test split (if any) evaluated: a checkpoint written before
        that resumes (to finish the test), one written after it starts a new run from its weights."""
        return self.step >= self.total_steps and (self.splits.test is None or self.tested)

    def _restore(self, state: dict) -> None:
        if (state["rows"], state["batches_per_epoch"]) != (self.train.total_rows, len(self.train)):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained on {state['rows']} rows x "
                f"{state['batches_per_epoch']} batches per epoch, these data/flags give "
                f"{self.train.total_rows} x {len(self.train)} (use the same --data, --batch_size x "
                "processes, --seq_length, --num_shards, --split)"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch"]
        self.bytes_seen, self.best_val = state["bytes_seen"], state["best_val_bpc"]
        self.val_pending = bool(state.get("val_pending", False))
        if state["hidden"] is not None:
            rows = slice(*self.train.row_range)
            self.hidden = tuple(t[:, rows].to(self.device) for t in state["hidden"])
        rank_rng = state.get("rank_rng")
        set_rng_state(rank_rng[self.rank] if rank_rng and len(rank_rng) == self.world_size else state["rng"])
        interval = state.get("interval") or {}  # absent in checkpoints of earlier versions
        # the loss summed over all processes: rank 0 carries it, the others add from zero
        self.interval_nats = float(interval.get("nats", 0.0)) if self.is_main else 0.0
        self.interval_bytes, self.interval_steps = (
            int(interval.get("bytes", 0)),
            int(interval.get("steps", 0)),
        )

    def save(self) -> None:
        """Distributed: every process calls it (train_state gathers), rank 0 writes.

        With ``keep_checkpoints`` K the checkpoint also goes to ``<stem>.step<N>.pt``, and only the
        last K of that series stay.
        """
        train_state = self.train_state()
        if self.is_main:
            save_checkpoint(self.opt.save, self.model, train_state=train_state, dtype=self.save_dtype)
            if self.opt.keep_checkpoints > 0:
                copy_checkpoint(self.opt.save, snapshot_path(self.opt.save, self.step))
                prune_snapshots(self.opt.save, self.step, self.opt.keep_checkpoints)

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def record(self, **values) -> None:
        if self.metrics is not None:
            self.metrics.write(**values)

    # -- loop ----------------------------------------------------------------------------------

    def stop_requested(self) -> bool:
        """A signal asked to stop (on any process: every process must stop at the same step)."""
        asked = float(self.stop_request.signum is not None)
        if self.world_size > 1:
            (asked,) = distributed.all_sum(asked)
        return asked > 0

    def evaluate(self, split: TBPTTBatches) -> float | None:
        """BPC of ``split``; single process: a signal cuts it short (None: then it is not recorded)."""
        stop = self.stop_requested if self.world_size == 1 else None
        return evaluate(self.model, split, self.device, self.opt.progress and self.is_main, stop)

    def validate(self) -> float | None:
        if self.splits.val is None:
            return None
        began = time.perf_counter()
        bpc = self.evaluate(self.splits.val)
        seconds = time.perf_counter() - began
        self.val_pending = bpc is None
        if bpc is None:
            return None
        self.record(step=self.step, epoch=self.epoch, bytes_seen=self.bytes_seen, val_bpc=bpc)
        better = bpc < self.best_val  # the same on every process: bpc is reduced over all of them
        if better:
            self.best_val = bpc
            if self.is_main:
                save_checkpoint(self.files.best, self.model, dtype=self.save_dtype)
        speed = self.splits.val.num_targets / max(seconds, 1e-9)
        self.log(
            f"| step {self.step} | val BPC {bpc:.4f} | {seconds:.1f} s, {speed:,.0f} chars/s"
            + (f" | best, saved {self.files.best}" if better else "")
        )
        return bpc

    def train_step(self, batch: Batch, total_targets: int | None = None) -> float:
        """One update on ``batch``; returns its summed loss in nats.

        ``total_targets``: the bytes predicted in this step by all processes (default: this batch's).
        """
        batch = batch.to(self.device)
        with autocast(self.device, self.dtype):
            loss, hidden = batch_loss(self.ddp, batch, detach(self.hidden))
        self.hidden = detach(hidden)
        self.optimizer.zero_grad(set_to_none=True)
        total = batch.num_targets if total_targets is None else total_targets
        # DDP averages the gradients over the processes: x world_size makes them the mean over all bytes
        mean_loss = loss * self.world_size / max(total, 1)
        static_scale = self.opt.loss_scale if self.opt.fp16 and self.scaler is None else 1.0
        if self.scaler is not None:
            self.scaler.scale(mean_loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            (mean_loss * static_scale).backward()
            if static_scale != 1.0:
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.div_(static_scale)
        if self.opt.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opt.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def run(self) -> dict:
        """Train to ``total_steps``; then final checkpoint, validation, test BPC, metrics plot.

        SIGINT/SIGTERM: the run stops after its current step, writes a resumable checkpoint and raises
        Interrupted (a second signal aborts at once).
        """
        self.stop_request.install()
        try:
            return self._run()
        finally:
            self.stop_request.uninstall()

    def _log_interval(self, elapsed: float) -> float:
        """Record and print the training BPC since the last log line; returns it."""
        (nats,) = distributed.all_sum(self.interval_nats)
        bpc = nats / max(self.interval_bytes, 1) / LN2
        lr = self.scheduler.get_last_lr()[0]
        speed = self.interval_bytes / max(elapsed, 1e-9)
        self.record(
            step=self.step,
            epoch=self.epoch,
            bytes_seen=self.bytes_seen,
            train_bpc=bpc,
            lr=lr,
            chars_per_s=speed,
        )
        self.log(
            f"| epoch {self.epoch} | step {self.step}/{self.total_steps} | loss {bpc * LN2:.4f} | "
            f"BPC {bpc:.4f} | lr {lr:.3g} | {1000 * elapsed / max(self.interval_steps, 1):.1f} ms/batch | "
            f"{speed:,.0f} chars/s"
        )
        self.interval_nats, self.interval_bytes, self.interval_steps = 0.0, 0, 0
        return bpc

    def _run(self) -> dict:
        opt = self.opt
        self.model.train()
        if self.resumed:
            where = f"epoch {self.epoch}, batch {self.batch_index}"
            self.log(f"resuming at step {self.step}/{self.total_steps} ({where})")
            if self.val_pending:  # the validation a signal cut short, at the step it belongs to
                self.validate()
                if self.stop_requested():
                    self._stop(self.step)  # nothing new to save
        bar = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="batch",
            enabled=opt.progress and self.is_main,
        )
        cost = RunCost(self.model.config, len(self.train), self.total_steps - self.step, self.device.type)
        interval_start = time.perf_counter()
        # a checkpoint is written after its step's validation: a resumed run has both for its step
        last_val_step = last_save_step = self.step if self.resumed else None
        while self.step < self.total_steps:
            n = self.train.targets_in_batch(self.batch_index)  # of all processes' rows
            began = time.perf_counter()
            self.interval_nats += self.train_step(self.train.batch(self.batch_index), n)
            for line in cost.add_step(time.perf_counter() - began):
                self.log(line)
            self.interval_bytes += n
            self.bytes_seen += n
            self.step += 1
            self.interval_steps += 1
            self.batch_index += 1
            bar.update(1)
            if self.step % opt.log_interval == 0 or self.step == self.total_steps:
                bpc = self._log_interval(time.perf_counter() - interval_start)
                bar.set_postfix(bpc=f"{bpc:.3f}")
                interval_start = time.perf_counter()
            epoch_done = self.batch_index == len(self.train)
            if epoch_done:
                self.epoch, self.batch_index = self.epoch + 1, 0
            if epoch_done or (opt.save_iters and self.step % opt.save_iters == 0):
                paused = time.perf_counter()
                self.validate()
                self.save()
                last_val_step = last_save_step = self.step
                interval_start += time.perf_counter() - paused  # the training rate leaves these out
            if self.step < self.total_steps and self.stop_requested():
                bar.close()
                self._stop(last_save_step)
        bar.close()
        if self.world_size > 1:
            distributed.check_replicas_identical(self.model)
            self.log(f"parameters identical on all {self.world_size} processes")
        if last_val_step != self.step:
            self.validate()
        if last_save_step != self.step:
            self.save()
            last_save_step = self.step
        result = {"step": self.step, "bytes_seen": self.bytes_seen, "best_val_bpc": self.best_val_or_none()}
        if self.splits.test is not None:
            test_bpc = self.evaluate(self.splits.test)
            if test_bpc is None or self.stop_requested():
                self._stop(last_save_step)
            self.record(step=self.step, epoch=self.epoch, bytes_seen=self.bytes_seen, test_bpc=test_bpc)
            self.log(f"| end of training | test BPC {test_bpc:.4f}")
            result["test_bpc"] = test_bpc
            self.tested = True
            self.save()  # now marked finished: --load of it starts a new run
        if self.metrics is not None:
            plot_bpc(self.metrics.path, self.files.plot)
            self.log(f"saved {opt.save}, metrics {self.metrics.path}, plot {self.files.plot}")
        return result

    def _stop(self, last_save_step: int | None) -> None:
        """Write the resumable checkpoint of an interrupted run and raise Interrupted."""
        if last_save_step != self.step:
            self.save()
        signum = self.stop_request.signum or signal.SIGTERM  # another process got the signal
        name = signal.Signals(signum).name
        if self.step >= self.total_steps:
            message = (
                f"{name} during the final evaluation: saved {self.opt.save}; finish it with the same command "
                f"and --load {self.opt.save}"
            )
        else:
            message = (
                f"{name} at step {self.step}/{self.total_steps}: saved {self.opt.save}; resume with the same "
                f"command and --load {self.opt.save}"
            )
        raise Interrupted(message, signum)

    def best_val_or_none(self) -> float | None:
        return None if math.isinf(self.best_val) else self.best_val


def pretrain(args) -> dict:
    """Everything ``main.py`` does after parsing its flags (``args``: its argparse namespace).

    One process of a distributed run when torchrun's environment or ``--world_size``/``--rank`` say so.
    """
    from .batching import LMDataOptions, lm_splits
    from .checkpoint import load_checkpoint
    from .model import ModelConfig, check_size_flags, device_memory

    if args.preprocess and not args.lazy:
        raise UsageError("--preprocess rebuilds the --lazy cache: pass --lazy with it")
    if (args.dynamic_loss_scale or args.loss_scale != 1) and not args.fp16:
        raise UsageError("--loss_scale and --dynamic_loss_scale only apply to --fp16 training: add --fp16")
    if args.fp16 and args.bf16:
        raise UsageError("--fp16 and --bf16 both given: choose one")
    if args.eval_only and not args.load:
        raise UsageError("--eval_only evaluates the model of --load: give a checkpoint")
    options = TrainOptions.from_args(args)
    if not args.eval_only:
        check_optimizer(args.optim)
        check_save_path(args.save)
    lock = SaveLock(args.save)
    group = distributed.process_group(args.world_size, args.rank, args.distributed_backend, args.cpu)
    with group as device, lock:
        if not args.eval_only:
            lock.acquire_on_main()
        world_size, rank = distributed.get_world_size(), distributed.get_rank()
        say = print if rank == 0 else lambda *values: None  # rank 0 logs the run
        progress = rank == 0  # a bar on a terminal, progress lines in a log (progress.py)
        seed = distributed.broadcast(pick_seed(args.seed))
        say(f"seed {seed}" + (f", {world_size} processes" if world_size > 1 else ""))
        torch.manual_seed(seed)

        train_state = None
        if args.load:
            checkpoint = load_checkpoint(args.load)
            model, train_state = checkpoint.model, checkpoint.train_state
            if not args.eval_only:
                memory = device_memory(device)
                check_size_flags(model.config, args.batch_size, args.seq_length, memory, loaded=True)
            what = f"{model.config.model}, nhid {model.config.nhid}"
            say(f"loaded {args.load} ({what}); architecture flags ignored")
        else:
            config = ModelConfig.from_args(args)
            check_size_flags(config, args.batch_size, args.seq_length, device_memory(device))
            model = RNNModel(config)

        # with --lazy, rank 0 builds (or rebuilds) the caches, then the others map them
        with distributed.main_process_first() if args.lazy else nullcontext():
            data = LMDataOptions.from_args(
                args, preprocess=model.config.preprocess, rebuild_cache=args.preprocess and rank == 0
            )
            splits = lm_splits(data, progress=progress, world_size=world_size, rank=rank)
        if world_size > 1:
            torch.manual_seed(seed + rank)  # the same initial weights (seeded above), distinct dropout masks
        processes = f", across {world_size} processes" if world_size > 1 else ""
        for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if part is None:
                continue
            say(f"{name}: {part.num_targets:,} bytes in {part.total_rows} rows x {len(part)} batches of "
                f"{part.seq_length} steps{processes}")  # fmt: skip
            if name == "train" and part.total_rows < args.batch_size * world_size:
                # every row needs at least two bytes: a tiny corpus fills fewer rows than asked for
                say(f"  note: the training split fills only {part.total_rows} rows of a batch of "
                    f"{args.batch_size * world_size}")  # fmt: skip
        if rank > 0 and splits.train is not None:
            # rank 0 logs the run; the others say once what they hold, so that their logs (multiproc.py:
            # distributed_logs/<stem>/<rank>.log) show they ran, and end with a line when they finish
            first, last = splits.train.row_range
            print(f"rank {rank} of {world_size} on {device}: training rows {first}-{last - 1} of each batch; "
                  "rank 0 logs the run", flush=True)  # fmt: skip
        dtype = reduced_dtype(device, args.fp16, args.bf16)
        products = (
            f", {str(dtype).removeprefix('torch.')} matrix products" if dtype and not args.eval_only else ""
        )
        say(f"model: {model.config.model}, {model.num_parameters():,} parameters, on {device}{products}")

        if args.eval_only:
            if splits.val is None and splits.test is None:
                raise UsageError(
                    "--eval_only needs evaluation data: --valid/--test or a --split with val/test"
                )
            model.to(device)
            result = {}
            for name, part in (("val", splits.val), ("test", splits.test)):
                if part is not None:
                    result[f"{name}_bpc"] = evaluate(model, part, device, progress=progress)
                    say(f"{name} BPC {result[f'{name}_bpc']:.4f}")
            return result
        result = Trainer(model, splits, options, device, train_state).run()
        if rank > 0:
            print(f"rank {rank} of {world_size}: finished, {result['step']} updates", flush=True)
        return result
