"""Tasks of the paper (SPEC section 4), each with an offline default.

    copy_batch, copy_baseline, adding_batch     generated tasks
    load_mnist, load_mnist5k, load_digits, ...  permuted sequential MNIST: IDX files / offline digits
    load_ptb, load_stdlib_text, batchify, ...   character-level language modelling
"""
from .mnist import (as_sequence, load_digits, load_mnist, load_mnist5k, mnist5k_path, permutation,
                    read_idx, read_mnist_csv)
from .synthetic import (ADDING_BASELINE, COPY_CLASSES, COPY_INPUTS, adding_batch, copy_baseline,
                        copy_batch)
from .text import (batchify, bptt_chunk, load_ptb, load_stdlib_text, n_chunks, read_ptb_char,
                   stdlib_docstrings)

__all__ = [
    "copy_batch", "copy_baseline", "adding_batch", "ADDING_BASELINE", "COPY_CLASSES", "COPY_INPUTS",
    "load_mnist", "load_mnist5k", "mnist5k_path", "read_mnist_csv", "load_digits", "permutation", "read_idx",
    "as_sequence",
    "load_ptb", "load_stdlib_text", "read_ptb_char", "stdlib_docstrings", "batchify", "bptt_chunk", "n_chunks",
]
