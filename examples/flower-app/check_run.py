"""Exit with the outcome of the latest Flower run: 0 if it completed, 1 if it failed.

``flwr run`` (Flower 1.42) exits 0 once it has submitted a run and, with
``--stream``, shown its logs, whatever became of the run. Run this after it
for an exit status (CI, scripts)::

    flwr run . --stream && python check_run.py [CONNECTION]
"""

from __future__ import annotations

import json
import subprocess
import sys


def main() -> int:
    listing = subprocess.run(
        ["flwr", "ls", *sys.argv[1:], "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    runs = json.loads(listing[listing.index("{") :])["runs"]
    if not runs:
        print("no run found", file=sys.stderr)
        return 1
    run = max(runs, key=lambda r: (r["pending-at"], r["run-id"]))
    print(f"run {run['run-id']}: {run['status']} {run.get('status-details', '')}".rstrip())
    return 0 if run["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
