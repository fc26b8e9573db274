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


@pytest.mark.parametrize("source", sorted(mutation_check.VALUE_MUTANTS))
def test_every_mutant_is_found_once_and_changes_the_source(source):
    text = (ROOT / source).read_text()
    calls = mutation_check.call_sites(text)
    assert len(calls) >= 10 and all(call.startswith("env.") and call.endswith(")") for _, _, call in calls)
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
