"""The offline ``flwr run`` routes of examples/flower-app/README.md, run as they are written.

The README's two ``bash`` blocks that start with ``# offline route`` are
taken from the file and run with bash, on a free port instead of 39091, with a
private ``FLWR_HOME`` and results directory; nothing else of them is changed.
Each must finish with the run completed (``check_run.py``'s exit status), the
results on disk, and no process left behind. Then a run that must fail (every
payload over the size limit) must end ``finished:failed`` with the strategy's
error, and ``check_run.py`` must exit 1. The wall time of each route is
printed (``-s``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_flower_deployment import APP, BIN, Deployment, free_port, pids_with

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not all((BIN / b).is_file() for b in ("flower-superlink", "flwr")),
        reason="Flower's executables are not next to this Python",
    ),
]

README = APP / "README.md"
REPO = APP.parents[1]
BLOCK_TIMEOUT_S = 400


def route(name: str) -> str:
    """The README's bash block that starts with ``# offline route <name>``."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if b.startswith(f"# offline route {name}:")]
    return block


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Deployment, dict[str, str], int]]:
    """A private FLWR_HOME and a free port for the ``local`` connection; teardown kills all."""
    dep = Deployment(tmp_path)
    port = free_port()
    env = dep.env("route")
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    try:
        yield dep, env, port
    finally:
        assert not dep.teardown(), "processes survived teardown"


def run_block(dep: Deployment, env: dict[str, str], port: int, block: str) -> tuple[float, str]:
    """Run ``block`` with bash -e (from a file: ``pgrep -f`` must not find this shell)."""
    results = dep.root / "results"
    script = dep.root / "route.sh"
    script.write_text(
        "set -e\n"
        + block.replace("39091", str(port))
        .replace("/tmp/aq-sim", str(results))
        .replace("/tmp/aq-superlink.log", str(dep.root / "superlink.log"))
    )
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S,
        start_new_session=True,  # teardown kills the process groups of marked processes
    )  # fmt: skip
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:] + dep.logs()
    return elapsed, output


def test_the_documented_offline_flwr_run_routes(
    local: tuple[Deployment, dict[str, str], int],
) -> None:
    dep, env, port = local
    marker = f"AQF_DEPLOYMENT_TEST={dep.marker}"
    times = {}
    for name in ("1", "2"):
        # Execute: the README's block, as written.
        times[name], output = run_block(dep, env, port, route(name))

        # Assert: the run completed and wrote its results; the block stopped what it
        # started (no SuperLink, SuperExec or simulation process of ours is left).
        assert "finished:completed" in output
        summary = json.loads((dep.root / "results" / "summary.json").read_text())
        assert summary["complete"] and summary["rounds"] == 3
        assert summary["final_test_accuracy"] > summary["initial_test_accuracy"]
        assert summary["strategy"] == ("fedadam" if name == "2" else "fedavg")
        deadline = time.monotonic() + 15
        while pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_with(marker), f"route {name} left processes behind"
        (dep.root / "results" / "summary.json").unlink()
    print(f"\noffline flwr run, 3 rounds, 4 SuperNodes: route 1 {times['1']:.1f} s, "
          f"route 2 {times['2']:.1f} s")  # fmt: skip


def test_a_failed_run_is_reported_as_failed(local: tuple[Deployment, dict[str, str], int]) -> None:
    # Prepare: route 2 with every payload over the size limit (no reply is accepted).
    dep, env, port = local
    block = route("2").replace("num-server-rounds=3", "num-server-rounds=1 max-message-bytes=1")
    block = block.replace("num-supernodes=4", "num-supernodes=2")
    block = block.replace("python check_run.py", "python check_run.py || echo check_run=$?")

    # Execute
    _, output = run_block(dep, env, port, block)

    # Assert: flwr run itself exits 0 (the block went on), the run failed with the
    # strategy's error, and check_run.py said so with exit status 1.
    assert "finished:failed" in output and "check_run=1" in output
    assert "no reply was accepted in the one training round" in output
    assert not (dep.root / "results" / "summary.json").exists()
