"""``python -m nnrnn_fused.train``: the same as the ``nnrnn-train`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
