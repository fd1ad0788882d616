"""``python -m emtransfer.integrations.sglang ...``: the launcher (:mod:`.launch`).

Re-executed as ``-m emtransfer.integrations.sglang.launch``: multiprocessing's spawned
children re-import their parent's main module unless it is a package's ``__main__``, and the
launcher relies on that to register in every SGLang process.
"""

import os
import sys

os.execv(
    sys.executable, [sys.executable, "-m", "emtransfer.integrations.sglang.launch", *sys.argv[1:]]
)
