"""The task adapters of nnrnn-train: each task's training batches (a step's batch depends on the seed and
the step alone, so a resumed run draws what an uninterrupted one would) and its evaluation."""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .. import tasks
from ..layer import reuse_recurrent_matrices


class Data:
    """A task's training stream and evaluation. train_batch(step) gives the global
    batch of that step, the same whatever happened before (exact resume)."""

    steps_per_epoch = None  # generated tasks have no epochs
    carries_state = False
    baseline = None

    def __init__(self, cfg):
        self.cfg = cfg

    def generator(self, *key):
        """A generator seeded from (seed, key) alone, the same in every process."""
        digest = hashlib.sha256(repr((self.cfg["seed"],) + key).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def evaluate(self, model, split, device):
        return {}

    def prepare(self, x, device):
        """Inputs on the device, floats in the model's dtype (cfg["dtype"])."""
        return x.to(device, getattr(torch, self.cfg["dtype"])) if x.is_floating_point() else x.to(device)


class CopyData(Data):
    input_size, output_size, readout = tasks.COPY_INPUTS, tasks.COPY_CLASSES, "every"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.baseline = tasks.copy_baseline(cfg["T"])

    def train_batch(self, step):
        x, y, _ = tasks.copy_batch(self.cfg["batch"], self.cfg["T"], self.generator("copy", step))
        return x, y

    @staticmethod
    def loss(logits, y):
        # the classes along dim 1, as (1, C, T, B): the same mean, and about 3x faster on the CPU than
        # over (T * B, C), where torch's log_softmax over a last dimension of 9 runs nearly scalar
        loss = nn.functional.cross_entropy(logits.permute(2, 0, 1).unsqueeze(0), y.unsqueeze(0))
        n = tasks.synthetic.COPY_LENGTH
        return loss, (logits[-n:].argmax(-1) == y[-n:]).float().mean()


class AddingData(Data):
    input_size, output_size, readout = 2, 1, "last"
    baseline = tasks.ADDING_BASELINE

    def train_batch(self, step):
        return tasks.adding_batch(self.cfg["batch"], self.cfg["T"], self.generator("adding", step))

    @staticmethod
    def loss(out, y):
        err = out.squeeze(-1) - y
        return err.square().mean(), (err.abs() < 0.04).float().mean()  # accuracy: |error| < 0.04


class MnistData(Data):
    input_size, output_size, readout = 1, 10, "last"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg["data_dir"]:
            self.splits = tasks.load_mnist(cfg["data_dir"])
        elif cfg.get("dataset", "digits8x8") == "digits8x8":  # checkpoints from before mnist5k: 8x8 digits
            self.splits = tasks.load_digits()
        else:
            self.splits = tasks.load_mnist5k()
        self.perm = tasks.permutation(self.splits["train"][0].shape[1])
        self.steps_per_epoch = len(self.splits["train"][1]) // cfg["batch"]
        if self.steps_per_epoch == 0:
            raise SystemExit(f"nnrnn-train: batch {cfg['batch']} exceeds the {len(self.splits['train'][1])} "
                             "training images")

    def train_batch(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        X, y = self.splits["train"]
        if getattr(self, "_order", (None,))[0] != epoch:  # this epoch's shuffle, from (seed, epoch) alone
            self._order = (epoch, torch.randperm(len(y), generator=self.generator("mnist", epoch)))
        idx = self._order[1][i * self.cfg["batch"]:(i + 1) * self.cfg["batch"]]
        return tasks.as_sequence(X[idx], self.perm), y[idx]

    @staticmethod
    def loss(logits, y):
        return nn.functional.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    @torch.no_grad()
    def evaluate(self, model, split, device):
        X, y = self.splits[split]
        total = correct = 0.0
        with reuse_recurrent_matrices(model):  # W once, not once per batch
            for s in range(0, len(y), self.cfg["eval_batch"]):
                stop = s + self.cfg["eval_batch"]
                xb, yb = self.prepare(tasks.as_sequence(X[s:stop], self.perm), device), y[s:stop].to(device)
                logits, _ = model(xb)
                total += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(-1) == yb).sum().item()
        return {"loss": total / len(y), "accuracy": correct / len(y)}


class TextData(Data):
    readout, carries_state = "every", True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vocab, self.splits = (tasks.load_ptb(cfg["data_dir"]) if cfg["data_dir"]
                                   else tasks.load_stdlib_text(cfg.get("max_chars")))
        self.input_size, self.output_size, self.vocab_size = cfg["emb"], len(self.vocab), len(self.vocab)
        self.columns = tasks.batchify(self.splits["train"], cfg["batch"])
        self.steps_per_epoch = tasks.n_chunks(self.columns, cfg["bptt"])

    def train_batch(self, step):
        return tasks.bptt_chunk(self.columns, step % self.steps_per_epoch, self.cfg["bptt"])

    @staticmethod
    def loss(logits, y):
        return (nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()),
                (logits.argmax(-1) == y).float().mean())

    @torch.no_grad()
    def evaluate(self, model, split, device):
        columns = tasks.batchify(self.splits[split], self.cfg["eval_batch"]).to(device)
        state, total, correct, count = None, 0.0, 0.0, 0
        with reuse_recurrent_matrices(model):  # W once, not once per chunk
            for i in range(tasks.n_chunks(columns, self.cfg["bptt"])):
                x, y = tasks.bptt_chunk(columns, i, self.cfg["bptt"])
                logits, state = model(x, state)
                total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                correct += (logits.argmax(-1) == y).sum().item()
                count += y.numel()
        return {"loss": total / count, "accuracy": correct / count, "bpc": total / count / math.log(2)}


DATA = {"copy": CopyData, "adding": AddingData, "psmnist": MnistData, "ptb": TextData}
