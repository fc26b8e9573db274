"""The README's usage example runs as written."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_usage_example_runs():
    text = open(README).read()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md (Usage)", "exec"), namespace)
    assert namespace["output"].shape == (220, 32, 128)
    assert namespace["out"].shape == (220, 32, 128)
    namespace["loss"].backward()  # the recipe's loss trains every parameter group
    assert namespace["layer"].layers[0].recurrent.log_P.grad is not None


def test_demo_runs_and_says_which_backend(capsys):
    from nnrnn_fused import demo

    demo.main()
    out = capsys.readouterr().out
    assert "backend: fused on " in out
    diff = float(out.split("max |fused - reference| = ")[1].split()[0])
    assert diff < 1e-3
