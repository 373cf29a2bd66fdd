"""`python -m tinyllm.serve`: the OpenAI-compatible HTTP server. The server itself is the
package tinyllm/server/ (its docstring gives the reading order); this module is its entry point."""
import sys

from .server.main import main


def __getattr__(name):
    # `from tinyllm.serve import Server`: loaded when asked for, since it needs the `serve`
    # extra (starlette), which main() checks for with a one-line error.
    if name == "Server":
        from .server.app import Server

        return Server
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
