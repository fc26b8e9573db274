"""The source distribution carries every file the build needs, and no build outputs.

Built from a copy of the tree (setup.py writes the build info when it runs), as `python -m build`
would; CI also installs that sdist into a fresh environment (.ci/run, leg 3).
"""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def test_sdist_carries_every_build_input(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        import pytest
        pytest.skip("needs the git checkout to know which files are sources")
    tree = tmp_path / "tree"
    for f in tracked_files():
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tree / f)
    env = dict(os.environ, NNRNN_CUDA="0")  # the file list does not depend on it; skips probing CUDA
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sdist, = (tmp_path / "dist").glob("nnrnn_fused-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}

    sources = {f for f in tracked_files() if f.startswith("csrc/")}
    assert sources and sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    package = {f for f in tracked_files() if f.startswith("nnrnn_fused/") and f.endswith(".py")}
    assert package <= names, f"missing from the sdist: {sorted(package - names)}"
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "CITATION.cff", "CHANGELOG.md", "MANIFEST.in"):
        assert f in names, f
    built = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py")]
    assert not built, f"build outputs in the sdist: {built}"
    assert not [n for n in names if n.startswith(("results/", "benchmarks/", "tests/", ".ci/"))]
