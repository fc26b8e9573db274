"""tools/mutation_check.py (run by hand, not in CI: docs/cuda.md, "Mutation check") finds
its mutants in the current kernel sources: a value mutant whose text the kernels no
longer have would make the tool stop, so it is checked here, in seconds."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation_check)
# exchange.h's helpers that synchronise: their calls are mutants too, their definitions not.
HELPERS = ("init_cluster_exchange(", "arm_cluster_slot(", "wait_cluster_slices(", "wait_grid_rows(")


@pytest.mark.parametrize("source", sorted(mutation_check.VALUE_MUTANTS))
def test_every_mutant_is_found_once_and_changes_the_source(source):
    text = (ROOT / source).read_text()
    calls = mutation_check.call_sites(text)
    assert len(calls) >= 7 and all(call.startswith(("env.",) + HELPERS) and call.endswith(")") for _, _, call in calls)
    values = mutation_check.value_mutants(source, text)
    assert len(values) == len(mutation_check.VALUE_MUTANTS[source])
    for start, end, what, new in values:
        assert text[start:end] != new, what
        mutated = text[:start] + new + text[end:]
        assert mutated != text and mutated.count("\n") == text.count("\n"), what


def test_a_text_not_in_the_source_stops_the_tool(monkeypatch):
    monkeypatch.setitem(mutation_check.VALUE_MUTANTS, "x.h", [("nothing", "absent text", "y")])
    with pytest.raises(SystemExit, match="expects 'absent text' once, found it 0 times"):
        mutation_check.value_mutants("x.h", "int main() {}")


def test_the_exchange_helpers_are_mutated_where_called_not_where_defined():
    text = (ROOT / "csrc/cuda/exchange.h").read_text()
    calls = [call for _, _, call in mutation_check.call_sites(text)]
    # init_cluster_exchange arms both slots: its two calls of arm_cluster_slot are sites.
    assert [c.split("(")[0] for c in calls if c.startswith(HELPERS)] == ["arm_cluster_slot"] * 2
    for kernel in ("csrc/cuda/kernels_v2.h", "csrc/cuda/tc_kernels.h"):
        called = {c.split("(")[0] for _, _, c in mutation_check.call_sites((ROOT / kernel).read_text())}
        assert {h[:-1] for h in HELPERS} <= called, kernel
