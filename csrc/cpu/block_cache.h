// Big CPU outputs of the recurrence ops, from a cache of the blocks they freed.
//
// Why: a (T, B, N) output of tens of MB is above glibc's largest mmap threshold
// (32 MiB), so without a cache every call maps fresh memory, which the kernel then
// faults in and zeroes one 4 KiB page at a time while the time loop writes it: at
// N=512 B=100 T=220 (45 MB) that cost about 44 µs a step, for the forward's output
// and again for the backward's grad_x. Blocks of at least 1 MiB freed by tensors
// from empty_from_cache are kept, up to a cap (NNRNN_CPU_CACHE_MB, default 1024,
// read at every call; 0 turns the cache off), and handed to the next request of
// the same size class (whole 2 MiB pages up to 8 MiB, then four classes per power
// of two: at most a quarter unused). docs/cpu.md, "Memory: the outputs' cache".
#pragma once

#include <ATen/ATen.h>

namespace nnrnn::cpu {

// An uninitialized CPU tensor like at::empty(sizes, dtype), whose storage comes
// from the cache when it is big enough (and goes back to it when freed).
at::Tensor empty_from_cache(at::IntArrayRef sizes, c10::ScalarType dtype);

}  // namespace nnrnn::cpu
