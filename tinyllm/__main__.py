"""`python -m tinyllm run ...`, `python -m tinyllm serve ...`: the same as the `tinyllm` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
