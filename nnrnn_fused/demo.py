"""A short demo that needs no data and no GPU: build a layer, run it forward and
backward, check it against the reference loop and say which backend ran.

    python -m nnrnn_fused.demo
"""
import time

import torch

import nnrnn_fused


def main():
    st = nnrnn_fused.status()
    print("nnrnn_fused", nnrnn_fused.__version__, "on torch", st["torch"])
    if not st["extension_loaded"]:
        print("fused op unavailable:", st["load_error"])
        print("running the reference loop (backend='reference') instead")
    backend = "fused" if st["extension_loaded"] else "reference"
    device = "cuda" if torch.cuda.is_available() and st["cuda_kernels_compiled"] else "cpu"
    torch.manual_seed(0)
    layer = nnrnn_fused.NNRNN(10, 128, backend=backend, device=device)
    x = torch.randn(220, 10, 10, device=device)
    times = []
    for _ in range(6):  # the first call pays one-time set-up costs; report the median of the rest
        start = time.perf_counter()
        out, h_n = layer(x)
        out.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    elapsed = sorted(times[1:])[2]
    print(f"backend: {backend} on {device}; output {tuple(out.shape)}, h_n {tuple(h_n.shape)}; "
          f"layer forward+backward {elapsed * 1e3:.1f} ms (T=220, B=10, N=128, median of 5 after a warm-up)")
    if backend == "fused":
        ref = nnrnn_fused.NNRNN(10, 128, backend="reference", device=device)
        ref.load_state_dict(layer.state_dict())
        diff = (ref(x)[0] - out).abs().max().item()
        print(f"max |fused - reference| = {diff:.2e}")


if __name__ == "__main__":
    main()
