"""Fine-tuning: the language model and a classifier head trained together on labelled texts (ULMFiT).

The head reads the same features as transfer.py (``readout.FeatureSpec``: pooling of the cell or
hidden state, last layer or all layers), computed differentiably from the model's per-step states
(``FeatureSpec.pool``): standardise ``(x - mean) / scale`` (mean and scale of the training split's
features under the initial model, then frozen) -> dropout -> linear. Two classes: one logit and a
sigmoid; more: a softmax over K logits. The head is stored as a ``readout.Readout`` (K > 2: weight
[K, F], bias [K] and the class names), so classifier.py, generate.py and ``Encoder.predict_proba``
read a fine-tuned checkpoint as they read a transferred one.

Batches: texts are padded on the right to a multiple of ``SEQ_MULTIPLE`` steps (few distinct product
shapes: each new shape costs a library calibration, matmul.py); each epoch sorts them into length
buckets with a seeded random order inside a bucket and shuffles the batches. Pooling reads real bytes
only (``lengths``), so padding never changes a feature.

Runs like main.py: a lock on ``--save``, checkpoints (model, head, optimizer, schedule, RNG, position)
written atomically every ``save_interval`` steps and at epoch ends, SIGINT/SIGTERM save and stop, and
``--load`` of such a checkpoint resumes the run exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import SAVE_DTYPES, load_checkpoint, save_checkpoint
from .cli import Interrupted, pick_seed
from .errors import CheckpointError, DataError, UsageError
from .featurize import default_device
from .matmul import autocast, reduced_dtype
from .model import RNNModel
from .preprocess import encode
from .readers import ReadOptions, given_path, read_records
from .readout import FeatureSpec, Readout, check_state, parse_pooling, top_neurons
from .regression import c_sweep, fit_l1_regression, standardizer
from .runfiles import SaveLock, check_save_path, move_aside, sibling
from .train import StopRequest, rng_state, set_rng_state

SEQ_MULTIPLE = 32  # batches are padded to a multiple of this many steps
INIT_HEADS = ("random", "zero", "transfer", "checkpoint")
PROGRESS_SECONDS = 10.0  # plain progress lines (stderr not a terminal) at most this often


@dataclass
class FinetuneOptions:
    """Everything a fine-tuning run needs besides the model and the data (finetune_classifier.py flags)."""

    pooling: str = "mean,max,last"
    state: str = "cell"
    all_layers: bool = False
    lr: float = 1e-4  # the top layer's rate; lower layers get lr * lr_decay_per_layer^depth
    head_lr: float = 1e-3
    lr_decay_per_layer: float = 1.0  # ULMFiT's discriminative rates use 1 / 2.6
    warmup: float = 0.1  # fraction of all steps with the rate rising linearly from 0
    unfreeze: int = 0  # steps (or epochs) per unfreezing stage: head only, then top layer, ..., embedding
    unfreeze_unit: str = "steps"
    dropout: float = 0.1  # on the standardised features
    aux_lm_weight: float = 0.0  # weight of the language-model loss on the same texts
    weight_decay: float = 0.01  # AdamW, on matrices (not biases, embeddings excepted, or weight-norm gains)
    clip: float = 1.0  # gradient-norm clipping; 0 = off
    epochs: int = 3
    train_iters: int = 0  # stop after this many steps (0: epochs x batches)
    batch_size: int = 32
    eval_batch_size: int = 128
    max_bytes: int = 1024  # longer texts keep their first and last max_bytes/2 bytes; 0 = no cut
    patience: int = 0  # evaluations without a better validation accuracy before stopping; 0 = never stop
    eval_interval: int = 0  # steps between validations besides epoch ends; 0 = epoch ends only
    save_interval: int = 500  # steps between checkpoints besides epoch ends; 0 = epoch ends only
    init_head: str = "random"
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    save: str = "finetuned.pt"
    save_dtype: str = "fp32"  # the final checkpoint's weights (resumable ones are always float32)
    neurons: int = 1  # top features recorded in the stored classifier (generate.py's heatmap: the first)
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FinetuneOptions:
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})

    @property
    def spec(self) -> FeatureSpec:
        """The features the head reads (pooling and state resolved: ``_resolve_features``)."""
        return FeatureSpec.parse(self.pooling, self.state, self.all_layers)

    def check(self) -> None:
        """Values that argparse cannot check alone (pooling and state may still be unset: None)."""
        if self.pooling is not None:
            parse_pooling(self.pooling)
        if self.state is not None:
            check_state(self.state)
        if self.init_head not in INIT_HEADS:
            raise UsageError(f"--init_head must be one of {', '.join(INIT_HEADS)}, got {self.init_head!r}")
        if self.unfreeze_unit not in ("steps", "epochs"):
            raise UsageError(f"--unfreeze_unit must be steps or epochs, got {self.unfreeze_unit!r}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"--warmup {self.warmup}: a fraction of the steps, 0 <= warmup < 1")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.max_bytes and self.max_bytes < 2:
            raise UsageError(f"--max_bytes {self.max_bytes}: at least 2 (or 0: no cut)")
        if self.fp16 and self.bf16:
            raise UsageError("--fp16 and --bf16 both given: choose one")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"--save_dtype must be one of {', '.join(SAVE_DTYPES)}")


# --------------------------------------------------------------------------------------------
# Data: labelled splits as byte arrays, batched by length
# --------------------------------------------------------------------------------------------


@dataclass
class LabelledSplit:
    name: str
    path: str
    tokens: list[np.ndarray]  # preprocessed bytes, cut to max_bytes
    labels: np.ndarray  # class index 0 .. K-1 per text

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


def cut_middle(tokens: np.ndarray, max_bytes: int) -> np.ndarray:
    """The first and last ``max_bytes // 2`` bytes of a longer text (its opening and its verdict)."""
    if not max_bytes or len(tokens) <= max_bytes:
        return tokens
    head = max_bytes // 2
    return np.concatenate([tokens[:head], tokens[len(tokens) - (max_bytes - head) :]])


def read_split(
    name: str, path: str, args: argparse.Namespace, preprocess: str, max_bytes: int, classes: list[int] | None
) -> tuple[LabelledSplit, list[int]]:
    """``path`` read with transfer.py's data flags; labels mapped to class indices (``classes``: the
    training split's label values, None when reading the training split itself)."""
    try:
        records = read_records(
            path, ReadOptions.from_args(args), need_labels=True, multiclass=not args.binarize_labels
        )
    except DataError as e:
        raise DataError(f"{name} split: {e}") from None
    values = records.labels
    if classes is None:
        classes = sorted(int(v) for v in np.unique(values))
        if len(classes) < 2:
            raise DataError(
                f"{name} split: {records.path}: every label is {classes[0]}: a classifier needs two classes "
                "or more"
            )
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({int(v) for v in values} - set(index))
    if unknown:
        raise DataError(
            f"{name} split: {records.path}: label {unknown[0]} is not one of the training split's classes "
            f"{classes}"
        )
    labels = np.array([index[int(v)] for v in values], dtype=np.int64)
    tokens = [cut_middle(encode(text, preprocess), max_bytes) for text in records.texts]
    return LabelledSplit(name, records.path, tokens, labels), classes


def length_batches(lengths: np.ndarray, batch_size: int, seed: int | None) -> list[np.ndarray]:
    """Index batches of texts of similar length. ``seed`` None: longest first, in order (evaluation);
    otherwise sorted by length bucket (``SEQ_MULTIPLE`` bytes) with a seeded random order inside each
    bucket, and the batches shuffled."""
    n = len(lengths)
    if seed is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    buckets = (lengths + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE
    order = np.lexsort((rng.permutation(n), buckets))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_batch(tokens: list[np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """``tokens [T, B]`` (right-padded with zeros to a multiple of ``SEQ_MULTIPLE``) and ``lengths [B]``."""
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    steps = int(-(-lengths.max() // SEQ_MULTIPLE) * SEQ_MULTIPLE)
    out = np.zeros((steps, len(tokens)), dtype=np.int64)
    for j, t in enumerate(tokens):
        out[: len(t), j] = t
    return torch.from_numpy(out).to(device), torch.from_numpy(lengths).to(device)


# --------------------------------------------------------------------------------------------
# Features and head
# --------------------------------------------------------------------------------------------


def pooled_features(
    model: RNNModel, tokens: Tensor, lengths: Tensor, spec: FeatureSpec, lm_logits: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Differentiable features ``[B, F]`` of right-padded ``tokens [T, B]`` (numbered as featurize numbers
    them: ``FeatureSpec.pool``) and, with ``lm_logits``, the model's next-byte logits ``[T, B, 256]``."""
    if lm_logits:
        logits, _, steps = model(tokens, return_states=True)
    else:
        hidden, cell, _ = model.forward_states(tokens)
        logits, steps = None, (hidden, cell)
    layers = steps[1] if spec.state == "cell" else steps[0]
    layers = layers if spec.all_layers else layers[-1:]
    real = torch.arange(tokens.shape[0], device=tokens.device)[:, None] < lengths[None, :]  # [T, B]
    return spec.pool(torch.stack([seq.float() for seq in layers]), real), logits


class Head(nn.Module):
    """standardise (frozen mean/scale) -> dropout -> linear: one logit for two classes, else K."""

    def __init__(self, n_features: int, n_classes: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(n_features, 1 if n_classes == 2 else n_classes)
        self.n_classes = n_classes

    def forward(self, features: Tensor) -> Tensor:
        """Logits: ``[B]`` for two classes, ``[B, K]`` for more."""
        logits = self.linear(self.drop((features - self.mean) / self.scale))
        return logits[:, 0] if self.n_classes == 2 else logits

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy."""
        if self.n_classes == 2:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels)

    def predict(self, logits: Tensor) -> Tensor:
        return (logits > 0).long() if self.n_classes == 2 else logits.argmax(1)

    def probs(self, logits: Tensor) -> Tensor:
        """P(class 1) ``[B]`` for two classes, the softmax ``[B, K]`` for more."""
        return torch.sigmoid(logits) if self.n_classes == 2 else torch.softmax(logits, 1)

    def to_readout(self, options: FinetuneOptions, classes: list[int]) -> Readout:
        """The head as the readout every checkpoint stores (K > 2: weight [K, F], bias [K], class names)."""
        weight = self.linear.weight.detach().float().cpu().clone()
        bias = self.linear.bias.detach().float().cpu().clone()
        binary = self.n_classes == 2
        weight, bias = (weight[0], bias[0]) if binary else (weight, bias)
        strength = weight.abs() if binary else weight.abs().amax(0)
        return Readout(
            weight,
            bias,
            options.spec,
            torch.as_tensor(top_neurons(strength.numpy(), options.neurons)),
            self.mean.detach().float().cpu().clone(),
            self.scale.detach().float().cpu().clone(),
            classes=None if binary else tuple(str(c) for c in classes),
        )

    def load_readout(self, readout: Readout) -> None:
        """Start from a stored readout of the same features (weights, bias, standardisation)."""
        with torch.no_grad():
            self.linear.weight.copy_(readout.weight.reshape(self.linear.weight.shape))
            self.linear.bias.copy_(readout.bias.reshape(-1))
            for key in ("mean", "scale"):
                if getattr(readout, key) is not None:
                    getattr(self, key).copy_(getattr(readout, key))


# --------------------------------------------------------------------------------------------
# Parameter groups: discriminative rates and gradual unfreezing
# --------------------------------------------------------------------------------------------


def _decays(name: str, p: nn.Parameter, embedding: bool) -> bool:
    """Weight decay on matrices only: not on biases, the embedding or weight norm's per-row gains
    (torch's parametrization names the gain ``original0``)."""
    return p.dim() >= 2 and not name.endswith("original0") and not embedding


def make_optimizers(
    model: RNNModel, head: Head, opt: FinetuneOptions
) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """AdamW for the model and AdamW for the head (``head_lr``). The model's has one group per parameter,
    in the model's own order (a resumable checkpoint's optimizer lists the model's parameters in that
    order: formats.check_train_state), at ``lr * lr_decay_per_layer ** depth`` of its layer group; matrices
    with ``weight_decay``, the rest without."""

    def group(name: str, p: nn.Parameter, lr: float, label: str, embedding: bool = False) -> dict:
        decay = opt.weight_decay if _decays(name, p, embedding) else 0.0
        return {"params": [p], "lr": lr, "weight_decay": decay, "name": label}

    by_depth = model.layer_groups()
    depth_of = {id(p): depth for depth, named in enumerate(by_depth) for _, p in named}
    embedding = len(by_depth) - 1
    lm_groups = [
        group(n, p, opt.lr * opt.lr_decay_per_layer ** depth_of[id(p)], f"lm{depth_of[id(p)]}",
              depth_of[id(p)] == embedding)
        for n, p in model.named_parameters()
    ]  # fmt: skip
    head_groups = [group(n, p, opt.head_lr, "head") for n, p in head.named_parameters()]
    return torch.optim.AdamW(lm_groups), torch.optim.AdamW(head_groups)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Every group's rate rises linearly over the first ``warmup`` of the steps, then falls to 0."""
    warm = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_groups(step: int, opt: FinetuneOptions, n_groups: int, steps_per_epoch: int) -> int:
    """How many of the model's layer groups (top-down) train at ``step``: all without ``unfreeze``,
    else none for the first stage (the head alone), one more per stage after."""
    if not opt.unfreeze:
        return n_groups
    per_stage = opt.unfreeze * (steps_per_epoch if opt.unfreeze_unit == "epochs" else 1)
    return min(n_groups, step // per_stage)


def set_trainable(groups: list[list[tuple[str, nn.Parameter]]], n: int) -> None:
    for depth, group in enumerate(groups):
        for _, p in group:
            p.requires_grad_(depth < n)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def split_outputs(
    model: RNNModel,
    split: LabelledSplit,
    opt: FinetuneOptions,
    device: torch.device,
    head: Head | None = None,
) -> np.ndarray:
    """Eval mode, in batches by length: the features ``[N, F]`` (``head`` None) or the head's logits."""
    model.eval()
    if head is not None:
        head.eval()
    dtype = reduced_dtype(device, opt.fp16, opt.bf16)
    spec = opt.spec
    outputs: list[np.ndarray | None] = [None] * len(split)
    for idx in length_batches(split.lengths, opt.eval_batch_size, None):
        tokens, lengths = pad_batch([split.tokens[i] for i in idx], device)
        with autocast(device, dtype):
            features, _ = pooled_features(model, tokens, lengths, spec)
        out = features.float() if head is None else head(features.float()).float()
        for i, row in zip(idx, out.cpu().numpy()):
            outputs[i] = row
    return np.stack(outputs)


def evaluate(
    model: RNNModel, head: Head, split: LabelledSplit, opt: FinetuneOptions, device: torch.device
) -> dict:
    """loss (mean cross-entropy), accuracy and the probabilities of ``split``."""
    logits = torch.from_numpy(split_outputs(model, split, opt, device, head))
    labels = torch.from_numpy(split.labels)
    loss = float(head.loss(logits, labels))
    accuracy = float((head.predict(logits) == labels).float().mean())
    return {"loss": loss, "accuracy": accuracy, "probs": head.probs(logits).numpy()}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class EpochTally:
    """Training loss/accuracy and speed of the epoch so far (checkpointed: a resumed epoch reports the
    same numbers as an uninterrupted one, its speed aside)."""

    loss_sum: float = 0.0
    correct: int = 0
    texts: int = 0
    real_bytes: int = 0
    seconds: float = 0.0
    steps: int = 0

    def add(self, loss: float, correct: int, texts: int, real_bytes: int, seconds: float) -> None:
        self.loss_sum += loss * texts
        self.correct += correct
        self.texts += texts
        self.real_bytes += real_bytes
        self.seconds += seconds
        self.steps += 1


@dataclass
class RunState:
    """Position and history of a run, beyond optimizer and schedule."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    bytes_seen: int = 0
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_step: int = -1
    evals_since_best: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)
    tally: EpochTally = field(default_factory=EpochTally)


class Finetuner:
    """One fine-tuning run (or the resumption of one)."""

    def __init__(
        self,
        model: RNNModel,
        head: Head,
        classes: list[int],
        splits: dict[str, LabelledSplit],
        opt: FinetuneOptions,
        device: torch.device,
        seed: int,
        train_state: dict | None = None,
        load: str = "",
    ):
        self.model, self.head = model.to(device), head.to(device)
        self.classes, self.splits, self.opt, self.device, self.seed = classes, splits, opt, device, seed
        self.train = splits["train"]
        self.dtype = reduced_dtype(device, opt.fp16, opt.bf16)
        self.spec = opt.spec
        self.steps_per_epoch = -(-len(self.train) // opt.batch_size)
        self.groups = model.layer_groups()
        self.optimizers = make_optimizers(model, head, opt)  # (model's, head's)
        self.total_steps = opt.train_iters or opt.epochs * self.steps_per_epoch
        if train_state is not None:
            self.total_steps = train_state["total_steps"]
        self.schedulers = [warmup_linear_decay(o, self.total_steps, opt.warmup) for o in self.optimizers]
        self.state = RunState()
        self.best_path = sibling(opt.save, ".best.pt")
        self.results_path = sibling(opt.save, ".results.json")
        self.plot_path = sibling(opt.save, ".curves.png")
        self.stop_request = StopRequest()
        self.resumed = train_state is not None
        if train_state is not None:
            self._restore(train_state)
            # resumed into another --save: the best model so far comes along
            if (
                load
                and Path(load).resolve() != Path(opt.save).resolve()
                and sibling(load, ".best.pt").is_file()
            ):
                shutil.copy2(sibling(load, ".best.pt"), self.best_path)
        else:  # a new run: the previous run's checkpoint and outputs are moved aside, never overwritten
            for path in (Path(opt.save), self.best_path, self.results_path, self.plot_path):
                moved = move_aside(path)
                if moved is not None:
                    self.log(f"{path} is another run's: moved it aside to {moved}")
        self.progress = sys.stderr.isatty() if opt.progress is None else opt.progress

    # -- state ---------------------------------------------------------------------------------

    def train_state(self) -> dict:
        s = self.state
        return {  # the keys checkpoint.check_train_state asks of every resumable state, then ours
            "step": s.step,
            "total_steps": self.total_steps,
            "epoch": s.epoch,
            "batch": s.batch,
            "rows": len(self.train),
            "batches_per_epoch": self.steps_per_epoch,
            "bytes_seen": s.bytes_seen,
            "best_val_bpc": s.best_val_loss,
            "optimizer": self.optimizers[0].state_dict(),
            "scheduler": self.schedulers[0].state_dict(),
            "hidden": None,
            "rng": rng_state(),
            "finetune": {
                "seed": self.seed,
                "classes": list(self.classes),
                "options": asdict(self.opt),
                "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
                "head_optimizer": self.optimizers[1].state_dict(),
                "head_scheduler": self.schedulers[1].state_dict(),
                "run": {**asdict(s), "tally": asdict(s.tally)},
            },
        }

    def _restore(self, state: dict) -> None:
        ours = state["finetune"]
        if (state["rows"], state["batches_per_epoch"]) != (len(self.train), self.steps_per_epoch):
            raise CheckpointError(
                f"cannot resume: the checkpoint was trained on {state['rows']} texts in "
                f"{state['batches_per_epoch']} batches per epoch; these data/flags give {len(self.train)} in "
                f"{self.steps_per_epoch} (use the same --data and --batch_size)"
            )
        if list(ours["classes"]) != list(self.classes):
            raise CheckpointError(
                f"cannot resume: the checkpoint's classes {ours['classes']} are not {self.classes}"
            )
        self.head.load_state_dict(ours["head"])
        set_trainable(
            self.groups, trainable_groups(state["step"], self.opt, len(self.groups), self.steps_per_epoch)
        )
        self.optimizers[0].load_state_dict(state["optimizer"])  # checked with the checkpoint
        self.schedulers[0].load_state_dict(state["scheduler"])
        try:
            self.optimizers[1].load_state_dict(ours["head_optimizer"])
            self.schedulers[1].load_state_dict(ours["head_scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot resume: the checkpoint's head optimizer does not fit ({type(e).__name__}: {e})"
            ) from None
        run = dict(ours["run"])
        run["tally"] = EpochTally(**run["tally"])
        self.state = RunState(**run)
        set_rng_state(state["rng"])

    def save(self) -> None:
        save_checkpoint(
            self.opt.save,
            self.model,
            classifier=self.head.to_readout(self.opt, self.classes),
            train_state=self.train_state(),
            extra={"finetune": "in progress"},
        )

    def log(self, message: str) -> None:
        tqdm.write(message, file=sys.stdout)

    # -- loop ----------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        # the order of an epoch depends on (seed, epoch) only: a resumed run sees the same batches
        return length_batches(self.train.lengths, self.opt.batch_size, self.seed * 1000003 + epoch)

    def train_step(self, idx: np.ndarray) -> tuple[float, int, int]:
        """One update on the texts ``idx``; (loss, correct predictions, real bytes)."""
        self.model.train()
        self.head.train()
        tokens, lengths = pad_batch([self.train.tokens[i] for i in idx], self.device)
        labels = torch.from_numpy(self.train.labels[idx]).to(self.device)
        lm_trains = any(p.requires_grad for p in self.model.parameters())
        with_aux = self.opt.aux_lm_weight > 0 and lm_trains
        with autocast(self.device, self.dtype):
            features, logits_lm = pooled_features(self.model, tokens, lengths, self.spec, lm_logits=with_aux)
            aux = None
            if with_aux:
                logits_lm = logits_lm[:-1].float()  # predicts bytes 1 .. T-1
                targets = tokens[1:].masked_fill(
                    torch.arange(1, tokens.shape[0], device=self.device)[:, None] >= lengths[None, :], -100
                )
                aux = F.cross_entropy(logits_lm.reshape(-1, logits_lm.shape[-1]), targets.reshape(-1))
        logits = self.head(features.float())
        loss = self.head.loss(logits, labels)
        total = loss if aux is None else loss + self.opt.aux_lm_weight * aux
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.opt.clip > 0:
            groups = [group for o in self.optimizers for group in o.param_groups]
            params = [p for group in groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.opt.clip)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            scheduler.step()
        correct = int((self.head.predict(logits.detach()) == labels).sum())
        return loss.item(), correct, int(lengths.sum())

    def validate(self) -> dict | None:
        """Validation loss/accuracy; a better accuracy (ties: lower loss) writes the best checkpoint."""
        if "val" not in self.splits:
            return None
        s = self.state
        result = evaluate(self.model, self.head, self.splits["val"], self.opt, self.device)
        better = (result["accuracy"], -result["loss"]) > (s.best_val_accuracy, -s.best_val_loss)
        if better:
            s.best_val_accuracy, s.best_val_loss, s.best_step = result["accuracy"], result["loss"], s.step
            s.evals_since_best = 0
            save_checkpoint(
                self.best_path,
                self.model,
                classifier=self.head.to_readout(self.opt, self.classes),
                extra={"finetune": {"step": s.step, "val_accuracy": result["accuracy"]}},
            )
        else:
            s.evals_since_best += 1
        return result

    def run(self) -> dict:
        self.stop_request.install()
        try:
            return self._run()
        finally:
            self.stop_request.uninstall()

    def _progress_line(self, began: float, done_at_start: int) -> str:
        s = self.state
        elapsed = time.perf_counter() - began
        rate = (s.step - done_at_start) / max(elapsed, 1e-9)
        left = (self.total_steps - s.step) / max(rate, 1e-9)
        t = s.tally
        loss, acc, speed = (
            t.loss_sum / max(t.texts, 1),
            t.correct / max(t.texts, 1),
            t.real_bytes / max(t.seconds, 1e-9),
        )
        return (
            f"| epoch {s.epoch + 1} | step {s.step}/{self.total_steps} | loss {loss:.4f} | "
            f"acc {100 * acc:.2f}% | {speed:,.0f} chars/s | {_duration(left)} left"
        )

    def _group_lr(self, name: str) -> float | None:
        groups = (g for o in self.optimizers for g in o.param_groups)
        return next((g["lr"] for g in groups if g["name"] == name), None)

    def _end_epoch(self, val: dict | None) -> None:
        s = self.state
        t = s.tally
        row = {
            "epoch": s.epoch + 1,
            "step": s.step,
            "train_loss": t.loss_sum / max(t.texts, 1),
            "train_accuracy": t.correct / max(t.texts, 1),
            "val_loss": None if val is None else val["loss"],
            "val_accuracy": None if val is None else val["accuracy"],
            "lr": self._group_lr("lm0"),
            "head_lr": self._group_lr("head"),
            "chars_per_s": t.real_bytes / max(t.seconds, 1e-9),
            "train_seconds": t.seconds,
        }
        s.history.append(row)
        val_text = (
            "" if val is None else f" | val loss {val['loss']:.4f} | val acc {100 * val['accuracy']:.2f}%"
        )
        self.log(
            f"| end of epoch {s.epoch + 1} | step {s.step} | train loss {row['train_loss']:.4f} | "
            f"train acc {100 * row['train_accuracy']:.2f}%{val_text} | {row['chars_per_s']:,.0f} chars/s"
        )
        s.epoch, s.batch, s.tally = s.epoch + 1, 0, EpochTally()

    def _run(self) -> dict:
        opt, s = self.opt, self.state
        if self.resumed:
            self.log(f"resuming at step {s.step}/{self.total_steps} (epoch {s.epoch + 1}, batch {s.batch})")
        bar = tqdm(
            total=self.total_steps, initial=s.step, desc="finetune", unit="batch", disable=not self.progress
        )
        began, done_at_start, last_line = time.perf_counter(), s.step, time.perf_counter()
        n_groups = len(self.groups)
        trainable = trainable_groups(s.step, opt, n_groups, self.steps_per_epoch)
        set_trainable(self.groups, trainable)
        last_save = s.step if self.resumed else None
        while s.step < self.total_steps and not s.stopped_early:
            batches = self.epoch_batches(s.epoch)
            now = trainable_groups(s.step, opt, n_groups, self.steps_per_epoch)
            if now != trainable:
                trainable = now
                set_trainable(self.groups, trainable)
                self.log(
                    f"step {s.step}: training the head and the top {trainable} of {n_groups} layer groups"
                )
            idx = batches[s.batch]
            started = time.perf_counter()
            loss, correct, real = self.train_step(idx)
            s.tally.add(loss, correct, len(idx), real, time.perf_counter() - started)
            s.step, s.batch, s.bytes_seen = s.step + 1, s.batch + 1, s.bytes_seen + real
            bar.update(1)
            bar.set_postfix(loss=f"{s.tally.loss_sum / max(s.tally.texts, 1):.3f}")
            if not self.progress and time.perf_counter() - last_line >= PROGRESS_SECONDS:
                print(self._progress_line(began, done_at_start), file=sys.stderr, flush=True)
                last_line = time.perf_counter()
            epoch_done = s.batch == len(batches) or s.step == self.total_steps
            evaluated = False
            if epoch_done or (opt.eval_interval and s.step % opt.eval_interval == 0):
                val = self.validate()
                evaluated = True
                if val is not None and not epoch_done:
                    self.log(
                        f"| step {s.step} | val loss {val['loss']:.4f} | val acc {100 * val['accuracy']:.2f}%"
                    )
                if epoch_done:
                    self._end_epoch(val)
                if opt.patience and s.evals_since_best >= opt.patience:
                    s.stopped_early = True
                    self.log(
                        f"early stop at step {s.step}: no better validation accuracy in {opt.patience} "
                        "evaluations"
                    )
            if evaluated or epoch_done or (opt.save_interval and s.step % opt.save_interval == 0):
                self.save()
                last_save = s.step
            if self.stop_request.signum is not None and s.step < self.total_steps and not s.stopped_early:
                bar.close()
                if last_save != s.step:
                    self.save()
                raise Interrupted(
                    f"stopped at step {s.step}/{self.total_steps}: saved {opt.save}; resume with the same "
                    f"command and --load {opt.save}",
                    self.stop_request.signum,
                )
        bar.close()
        return self._finish()

    def _finish(self) -> dict:
        """The best model on validation (else the last) evaluated on every split and saved as --save."""
        opt, s = self.opt, self.state
        if s.best_step >= 0 and self.best_path.exists():
            best = load_checkpoint(self.best_path)
            self.model.load_state_dict(best.model.state_dict())
            self.head.load_readout(best.classifier)
            self.log(
                f"best validation accuracy {100 * s.best_val_accuracy:.2f}% at step {s.best_step}: keeping it"
            )
        final = {}
        probs = {}
        for name, split in self.splits.items():
            result = evaluate(self.model, self.head, split, opt, self.device)
            final[name] = {"loss": result["loss"], "accuracy": result["accuracy"]}
            probs[name] = result["probs"]
        self.log(
            "final: "
            + ", ".join(
                f"{name} acc {100 * r['accuracy']:.2f}% (loss {r['loss']:.4f})" for name, r in final.items()
            )
        )
        results = {
            "options": asdict(opt),
            "seed": self.seed,
            "classes": self.classes,
            "steps": s.step,
            "total_steps": self.total_steps,
            "stopped_early": s.stopped_early,
            "best_step": s.best_step,
            "history": s.history,
            "final": final,
            "data": {name: split.path for name, split in self.splits.items()},
        }
        classifier = self.head.to_readout(opt, self.classes)
        save_checkpoint(
            opt.save,
            self.model,
            classifier=classifier,
            dtype=SAVE_DTYPES[opt.save_dtype],
            extra={"finetune": {k: results[k] for k in ("seed", "steps", "best_step", "final")}},
        )
        self.results_path.write_text(json.dumps(results, indent=1))
        plot_curves(s.history, final, self.plot_path)
        self.log(f"saved {opt.save} (results {self.results_path}, plot {self.plot_path})")
        results["probs"] = probs
        return results


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def plot_curves(history: list[dict], final: dict, path: Path) -> None:
    """Train/val loss and accuracy per epoch (headless PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train", ms=4)
        val = [(r["epoch"], r[f"val_{key}"]) for r in history if r[f"val_{key}"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation", ms=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    test = final.get("test")
    fig.suptitle("fine-tuning" + (f": test accuracy {100 * test['accuracy']:.2f}%" if test else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# finetune_classifier.py
# --------------------------------------------------------------------------------------------


def _resolve_features(opt: FinetuneOptions, args: argparse.Namespace, classifier: Readout | None) -> None:
    """Unset --pooling/--state follow the loaded classifier with --init_head checkpoint, else the defaults."""
    if opt.init_head == "checkpoint":
        if classifier is None:
            raise UsageError(f"--init_head checkpoint: {args.load_model} holds no classifier to start from")
        for key in ("pooling", "state", "all_layers"):
            stored = getattr(classifier.spec, key)
            given = getattr(args, key, None)
            if given not in (None, False) and given != stored:
                raise UsageError(
                    f"--init_head checkpoint: --{key} {given} differs from the stored classifier's {stored}"
                )
            setattr(opt, key, stored)
    opt.pooling = ",".join(parse_pooling(opt.pooling or "mean,max,last"))
    opt.state = opt.state or "cell"


def init_head(
    head: Head,
    opt: FinetuneOptions,
    model: RNNModel,
    splits: dict[str, LabelledSplit],
    device: torch.device,
    classifier: Readout | None,
    seed: int,
) -> str:
    """Standardisation from the training split's features under the initial model, and the head's start
    (``opt.init_head``); returns what was done, for the log."""
    if opt.init_head == "checkpoint":
        stored_classes = len(classifier.classes or (0, 1))
        if stored_classes != head.n_classes:
            raise UsageError(
                f"--init_head checkpoint: the stored classifier has {stored_classes} classes, the data "
                f"{head.n_classes}"
            )
        head.load_readout(classifier)
        return "head from the loaded checkpoint's classifier"
    features = {"train": split_outputs(model, splits["train"], opt, device)}
    mean, scale = standardizer(features["train"])
    with torch.no_grad():
        head.mean.copy_(torch.from_numpy(mean))
        head.scale.copy_(torch.from_numpy(scale))
        if opt.init_head == "zero":
            head.linear.weight.zero_()
            head.linear.bias.zero_()
    if opt.init_head != "transfer":
        return f"{opt.init_head} head; standardisation from {len(splits['train'])} training texts"
    std = {"train": (features["train"] - mean) / scale}
    if "val" in splits:
        std["val"] = (split_outputs(model, splits["val"], opt, device) - mean) / scale
    y = {name: splits[name].labels for name in std}
    if head.n_classes == 2:
        reg = fit_l1_regression(std["train"], y["train"], std.get("val"), y.get("val"), c_sweep(), seed=seed)
        weight, bias, what = reg.weight[None, :], np.array([reg.bias]), f"L1 regression, C = {reg.C:g}"
    else:
        from sklearn.linear_model import LogisticRegression

        reg = LogisticRegression(max_iter=200, random_state=seed).fit(std["train"], y["train"])
        weight, bias, what = reg.coef_, reg.intercept_, "multinomial logistic regression"
    with torch.no_grad():
        head.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return f"head from a {what} on the initial features"


def run_finetune(args: argparse.Namespace) -> dict:
    """Everything finetune_classifier.py does after parsing its flags."""
    opt = FinetuneOptions.from_args(args)
    opt.check()
    check_save_path(opt.save)
    with SaveLock(opt.save) as lock:
        lock.acquire_on_main()  # removes a killed save's temp files too
        return _run_finetune(args, opt)


def _run_finetune(args: argparse.Namespace, opt: FinetuneOptions) -> dict:
    ckpt = load_checkpoint(args.load_model)
    model = ckpt.model
    state = ckpt.train_state
    resume = (
        state is not None and isinstance(state.get("finetune"), dict) and state["step"] < state["total_steps"]
    )
    if resume:
        # a resumed run continues with the options it was started with (data flags and --save aside)
        stored = state["finetune"]["options"]
        for key in ("save", "progress"):
            stored[key] = getattr(opt, key)
        opt = FinetuneOptions(
            **{k: v for k, v in stored.items() if k in FinetuneOptions.__dataclass_fields__}
        )
        seed = int(state["finetune"]["seed"])
    else:
        _resolve_features(opt, args, ckpt.classifier)
        seed = pick_seed(opt.seed)
    print(
        f"seed {seed}; model {args.load_model}: {model.config.model}, nhid {model.config.nhid}, "
        f"{model.config.nlayers} layer(s), {model.num_parameters():,} parameters"
    )
    torch.manual_seed(seed)
    preprocess = model.config.preprocess
    splits: dict[str, LabelledSplit] = {}
    splits["train"], classes = read_split("train", args.data, args, preprocess, opt.max_bytes, None)
    for name, path in (("val", given_path(args.valid)), ("test", given_path(args.test))):
        if path is not None:
            splits[name], _ = read_split(name, path, args, preprocess, opt.max_bytes, classes)
    for name, split in splits.items():
        lengths = split.lengths
        print(
            f"{name}: {len(split)} texts from {split.path}, {int(lengths.sum()):,} bytes "
            f"(longest {int(lengths.max())}{f', cut to {opt.max_bytes}' if opt.max_bytes else ''})"
        )
    print(
        f"classes {classes}"
        + (" (binary: one logit)" if len(classes) == 2 else f" ({len(classes)}-way softmax)")
    )
    device = default_device() if not getattr(args, "cpu", False) else torch.device("cpu")
    model.to(device)
    head = Head(opt.spec.num_features(model.config), len(classes), opt.dropout)
    if not resume:
        print(init_head(head, opt, model, splits, device, ckpt.classifier, seed))
    finetuner = Finetuner(
        model, head, classes, splits, opt, device, seed, state if resume else None, str(args.load_model)
    )
    print(
        f"features: {opt.pooling} of the {opt.state} state "
        f"({'all layers' if opt.all_layers else 'last layer'}), "
        f"{head.linear.in_features}; {finetuner.total_steps} steps of batch {opt.batch_size}"
        + (f"; {str(finetuner.dtype).removeprefix('torch.')} products" if finetuner.dtype else "")
    )
    return finetuner.run()
