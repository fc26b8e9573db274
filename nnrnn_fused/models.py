"""Sequence models of the paper's comparisons: an (optional) embedding, one
recurrent layer and a linear read-out, either at every step or of the last state.

    nnrnn    nnRNN, W = P (Lambda + T*M) P^T, modReLU
    exprnn   expRNN, W = P = matrix_exp(skew(log_P)), modReLU; log_P at lr_orth
    orthrnn  orthogonal RNN: the same orthogonal W, but log_P trained at the main
             learning rate (no separate small step) from a random orthogonal init
    rnn      vanilla RNN: a free W (orthogonal init), tanh
    lstm     torch.nn.LSTM baseline

The read-out (and embedding) initialisation follows the authors' scripts per task
(``readout_init``): "xavier", Xavier-normal read-out weight (their copy and adding
tasks); "default", PyTorch's nn.Linear init (their sMNIST); "uniform", embedding and
read-out weight U(-0.1, 0.1) and read-out bias 0 (their language model).
"""
from __future__ import annotations

from torch import nn

from .layer import NNRNN

RECURRENT = {"nnrnn": "nnrnn", "exprnn": "orthogonal", "orthrnn": "orthogonal", "rnn": "free"}
MODELS = tuple(RECURRENT) + ("lstm",)
READOUT_INITS = ("xavier", "default", "uniform")


class SequenceModel(nn.Module):
    """[embedding ->] recurrent layer -> linear read-out.

    forward(x, state=None) -> (logits, state): x (T, B, input_size) floats, or (T, B)
    symbol ids when ``vocab_size`` is given; logits (T, B, output_size) with
    readout="every", (B, output_size) with readout="last"; state is the layer's
    final state (h_n, or (h_n, c_n) for the LSTM), to carry into the next chunk.
    """

    def __init__(self, model: str, input_size: int, hidden_size: int, output_size: int, *,
                 readout: str = "every", vocab_size: int | None = None, nonlinearity: str = "modrelu",
                 init: str = "cayley", input_init: str = "xavier", exact_spectrum: bool = False,
                 backend: str = "fused", readout_init: str = "xavier"):
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if readout not in ("every", "last"):
            raise ValueError(f"readout must be 'every' or 'last', got {readout!r}")
        if readout_init not in READOUT_INITS:
            raise ValueError(f"readout_init must be one of {READOUT_INITS}, got {readout_init!r}")
        self.kind, self.readout = model, readout
        self.embed = nn.Embedding(vocab_size, input_size) if vocab_size else None
        if model == "lstm":
            self.rnn = nn.LSTM(input_size, hidden_size)
        else:
            self.rnn = NNRNN(input_size, hidden_size, recurrent=RECURRENT[model], nonlinearity=nonlinearity,
                             init=init, input_init=input_init, exact_spectrum=exact_spectrum, backend=backend)
        self.out = nn.Linear(hidden_size, output_size)
        if readout_init == "xavier":
            nn.init.xavier_normal_(self.out.weight)
        elif readout_init == "uniform":
            for weight in (self.out.weight,) + ((self.embed.weight,) if self.embed is not None else ()):
                nn.init.uniform_(weight, -0.1, 0.1)
            nn.init.zeros_(self.out.bias)

    def forward(self, x, state=None):
        if self.embed is not None:
            x = self.embed(x)
        out, state = self.rnn(x, state)
        if self.readout == "last":
            out = out[-1]
        return self.out(out), state

    def recurrent_matrix(self):
        """W of the recurrent layer (row convention), None for the LSTM."""
        return None if self.kind == "lstm" else self.rnn.recurrent_matrix(0)
