"""Launch SGLang with emtransfer as its encoder transfer backend.

    python -m emtransfer.integrations.sglang.launch <SGLang's launch_server arguments>

Takes SGLang's own arguments, with ``--encoder-transfer-backend emtransfer`` (or none: the
launcher always means emtransfer), registers emtransfer (:func:`register`), and runs SGLang's
``launch_server`` entry point as ``python -m sglang.launch_server`` would. SGLang's transfer
backend becomes ``zmq_to_scheduler``, the flow emtransfer rides on.

Every process SGLang spawns (schedulers, encoder ranks: multiprocessing's spawn) re-imports
this module as its ``__mp_main__``, which registers there too, so no process runs unpatched.
The launcher also sets ``EMTRANSFER_SGLANG=1`` for processes that load SGLang's plugins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import ENABLE_ENV, register

FLAG = "--encoder-transfer-backend"
BACKEND = "emtransfer"
#: the SGLang backend whose control flow emtransfer uses
CARRIER = "zmq_to_scheduler"


def translate_argv(argv: Sequence[str]) -> list[str]:
    """SGLang's arguments with ``--encoder-transfer-backend emtransfer`` turned into the
    carrier backend (added when absent). Another backend is refused (ValueError)."""
    out: list[str] = []
    seen = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == FLAG:
            if i + 1 >= len(argv):
                raise ValueError(f"{FLAG} needs a value")
            value, i = argv[i + 1], i + 2
        elif arg.startswith(FLAG + "="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if value not in (BACKEND, CARRIER):
            raise ValueError(
                f"{FLAG} {value}: this launcher runs SGLang with emtransfer; use "
                f"{FLAG} {BACKEND}, or python -m sglang.launch_server for {value}"
            )
        seen = True
        out += [FLAG, CARRIER]
    if not seen:
        out += [FLAG, CARRIER]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Register, then run SGLang's launch_server with the translated arguments."""
    try:
        args = translate_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        raise SystemExit(f"emtransfer.integrations.sglang.launch: {exc}") from None
    os.environ[ENABLE_ENV] = "1"
    register()
    from sglang.launch_server import run_server  # type: ignore[import-untyped]
    from sglang.srt.plugins import load_plugins  # type: ignore[import-untyped]
    from sglang.srt.server_args import prepare_server_args  # type: ignore[import-untyped]
    from sglang.srt.utils import kill_process_tree  # type: ignore[import-untyped]

    load_plugins()
    server_args = prepare_server_args(args)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":  # a process SGLang spawned from the launcher
    register()
