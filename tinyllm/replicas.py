"""`python -m tinyllm.replicas --replicas N`: the OpenAI-compatible server as N replicas on Ray
Serve, behind one endpoint. The code is tinyllm/server/replicas.py (its docstring tells how a
request travels); this module is its entry point, and `main(argv)` what a CLI wires."""
import sys

from .server.replicas import main

if __name__ == "__main__":
    sys.exit(main())
