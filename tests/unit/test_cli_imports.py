"""The command line starts without importing what only some commands use: every
`pgjobs jobs …`, `token …` or `stats` call (and every test that runs one) would pay for
the worker (its health server pulls in uvicorn, its metrics prometheus_client) and the
migrations (yoyo) at each start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cli_imports_the_worker_and_the_migrations_only_for_their_commands() -> None:
    probe = (
        "import json, sys; import pgjobs.cli; "
        "print(json.dumps(sorted(m for m in ('pgjobs.worker', 'pgjobs.migrate', 'yoyo',"
        " 'uvicorn') if m in sys.modules)))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == []
