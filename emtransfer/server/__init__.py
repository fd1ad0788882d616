"""HTTP servers for both roles (``python -m emtransfer serve``).

``options``  the ``serve`` command line (one flag per setting) -> :class:`ServeOptions`
``common``   errors and status codes, /health, /metrics, access log
``encode_app`` / ``language_app``  the role's FastAPI app around its node
``pool``     the language side's encode nodes: round-robin, down detection, reconnection
``run``      uvicorn on uvloop, every log line in one format

The web stack is imported by the submodules, not here, so ``demo`` stays light.
"""

from .options import ServeOptions, add_serve_parser, resolve_serve

__all__ = ["ServeOptions", "add_serve_parser", "resolve_serve"]
