"""The static check of the CUDA kernels (benchmarks/static_check.py, docs/cuda.md): compiled for
sm_90 without a GPU, no kernel spills and kernel v2's inner loop stays within its bound of shared
loads per FMA. Needs nvcc and cuobjdump (the CUDA toolkit; cuobjdump also ships with triton):
skipped without them. The parsers are tested on made-up input as well, so that a check that
can no longer fail does not pass unnoticed."""
import json

import pytest

from benchmarks import static_check


def test_static_check_passes(tmp_path):
    if static_check.find_nvcc() is None or static_check.find_cuobjdump() is None:
        pytest.skip("needs nvcc and cuobjdump")
    out = tmp_path / "static_check"
    assert static_check.run(str(out)) == 0
    result = json.loads((tmp_path / "static_check.json").read_text())
    labels = {k["kernel"] for k in result["kernels"]}
    for dtype in ("float32", "float64"):
        for exchange in ("block", "cluster", "grid"):
            assert f"v2 forward {dtype} {exchange}" in labels and f"v2 backward {dtype} {exchange}" in labels
    for exchange in ("block", "cluster", "grid"):  # the tensor-core path (docs/tensor_cores.md)
        for kt in (8, 16):
            assert f"tc forward bfloat16 {exchange} KT{kt}" in labels and f"tc backward bfloat16 {exchange} KT{kt}" in labels
    for k in result["kernels"]:
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        if k["kernel"].startswith("tc"):
            assert k["inner_mma"] == int(k["kernel"].rsplit("KT", 1)[1]) and k["shared_loads_per_mma"] == 2, k
            assert k["local_memory"] == 0, k
            continue
        if k["kernel"].startswith("v2"):
            assert 0 < k["shared_loads_per_fma"] <= static_check.MAX_SHARED_LOADS_PER_FMA, k
            assert k["inner_lds128"] == k["inner_shared_loads"], k  # 16-byte loads only
            assert k["inner_rows"] == 2 and 0 < k["inner_other"] <= static_check.v2_constant("kV2PairOverhead"), k
            dtype = k["kernel"].split()[2]
            assert 1 < k["finish_per_chunk"] <= static_check.v2_finish_per_chunk(dtype), k  # as modelled
    assert "PASSED" in (tmp_path / "static_check.md").read_text()


PTXAS = """\
ptxas info    : Compiling entry function '_Z1av' for 'sm_90'
ptxas info    : Function properties for _Z1av
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z1bv' for 'sm_90'
ptxas info    : Function properties for _Z1bv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers
"""


def test_ptxas_report_is_read():
    kernels = static_check.parse_ptxas(PTXAS)
    assert kernels["_Z1av"] == {"stack": 8, "spill_stores": 4, "spill_loads": 4, "registers": 128}
    assert kernels["_Z1bv"] == {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 40}


def test_inner_and_step_loops_are_found():
    sass = [(0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "BAR.SYNC.DEFER_BLOCKING 0x0"),       # step loop starts
            (0x20, "LDS.128 R4, [R2]"),                   # inner loop: 2 loads, 4 FMAs
            (0x30, "FFMA R8, R4, R9, R8"),
            (0x40, "FFMA R8, R5, R10, R8"),
            (0x50, "LDS.128 R4, [R2+0x10]"),
            (0x60, "FFMA R8, R4, R11, R8"),
            (0x70, "FFMA R8, R5, R12, R8"),
            (0x80, "@!P0 BRA 0x20"),
            (0x90, "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R3+URZ], R6"),
            (0xa0, "@P1 CCTL.IVALL"),
            (0xb0, "MEMBAR.ALL.GPU"),
            (0xc0, "@P2 BRA 0x10"),
            (0xd0, "EXIT")]
    a = static_check.analyse(sass)
    assert a["inner_loop"] == ["0x20", "0x80"] and a["step_loop"] == ["0x10", "0xc0"]
    assert (a["inner_fma"], a["inner_shared_loads"], a["shared_loads_per_fma"]) == (4, 2, 0.5)
    assert a["inner_other"] == 1  # the branch
    assert a["step_sync_instructions"] == {"BAR.SYNC.DEFER_BLOCKING": 1, "CCTL.IVALL": 1, "MEMBAR.ALL.GPU": 1,
                                           "SYNCS.PHASECHK.TRANS64.TRYWAIT": 1}
    assert a["finish_per_chunk"] is None  # no loop of adds in this step


def test_finish_sum_of_partials_is_found():
    sass = [(0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "BAR.SYNC.DEFER_BLOCKING 0x0"),       # step loop starts
            (0x20, "LDS.128 R4, [R2]"),                   # inner loop: 1 load, 2 FMAs
            (0x30, "FFMA R8, R4, R9, R8"),
            (0x40, "FFMA R8, R5, R10, R8"),
            (0x50, "@!P0 BRA 0x20"),
            (0x60, "LDS R11, [R3]"),                      # the finish's sum: 2 chunks a pass
            (0x70, "LDS R12, [R3+0x40]"),
            (0x80, "IMAD R3, R13, 0x80, R3"),
            (0x90, "FADD R14, R14, R11"),
            (0xa0, "FADD R14, R14, R12"),
            (0xb0, "@!P1 BRA 0x60"),
            (0xc0, "@P2 BRA 0x10"),
            (0xd0, "EXIT")]
    a = static_check.analyse(sass)
    assert a["inner_loop"] == ["0x20", "0x50"] and a["step_loop"] == ["0x10", "0xc0"]
    assert a["finish_per_chunk"] == 3.0  # 6 instructions, 2 adds


def test_tensor_core_inner_loop_is_found():
    sass = [(0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3+URZ], R6"),  # step loop starts
            (0x20, "LDS R8, [R2]"),                                      # inner loop: an n-tile, KT = 2
            (0x30, "LDS R9, [R2+0x10]"),
            (0x40, "HMMA.16816.F32.BF16 R12, R16, R8, RZ"),
            (0x50, "LDS R8, [R2+0x20]"),
            (0x60, "LDS R9, [R2+0x30]"),
            (0x70, "HMMA.16816.F32.BF16 R20, R24, R8, RZ"),
            (0x80, "@!P1 BRA 0x20"),
            (0x90, "BAR.SYNC.DEFER_BLOCKING 0x0"),
            (0xa0, "STL [R1], R4"),
            (0xb0, "@P2 BRA 0x10"),
            (0xc0, "EXIT")]
    a = static_check.analyse_mma(sass)
    assert a["inner_loop"] == ["0x20", "0x80"] and a["step_loop"] == ["0x10", "0xb0"]
    assert (a["inner_mma"], a["inner_shared_loads"], a["shared_loads_per_mma"]) == (2, 4, 2.0)
    assert a["mma_instruction"] == "HMMA.16816.F32.BF16" and a["local_memory"] == 1
    assert a["step_sync_instructions"] == {"BAR.SYNC.DEFER_BLOCKING": 1, "SYNCS.PHASECHK.TRANS64.TRYWAIT": 1}
    assert static_check.kernel_label(
        "_ZN5nnrnn4kern9tc_kernelINS0_12TcTeamKernelILNS0_7MmaKindE1ELi16ENS0_10BackwardV2I13__nv_bfloat16fEELNS0_8"
        "ExchangeE1EEEEEvT_y") == "tc backward bfloat16 cluster KT16"
