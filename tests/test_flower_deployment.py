"""A real Flower deployment on 127.0.0.1: SuperLink + SuperNodes over TLS, driven by ``flwr run``.

The test starts one ``flower-superlink`` and two ``flower-supernode``
processes with certificates it generates itself, runs the example app of
examples/flower-app with AdaQuantFL for 3 rounds, kills one SuperNode after
the second round, and judges the run by the results the ServerApp wrote (``flwr run``
can exit 0 when the run failed). Every process it starts carries a marker in
its environment, and teardown kills every process with that marker (the
SuperLink's SuperExec and the ``flwr-serverapp`` it starts run in sessions of
their own, and can outlive both ``flwr run`` and the SuperLink).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adaquantfl.codec import message_bytes
from adaquantfl.schedule import adaquant_levels

pytestmark = pytest.mark.deployment
pytest.importorskip("flwr", reason="the Flower extra is not installed")
pytest.importorskip("cryptography", reason="the dev extra (cryptography) is not installed")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-app"
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
ROUNDS = 3
NODES = 2
#: Fixed limits: the whole test must end within these, whatever breaks.
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 240.0
ROUND_TIMEOUT_S = 30.0
NODE_WAIT_S = 10.0


# --------------------------------------------------------------------------- certificates


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_valid_before": now - datetime.timedelta(minutes=5),
             "not_valid_after": now + datetime.timedelta(hours=2)}  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adaquantfl test CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder(
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]),
            issuer_name=ca_name,
            **valid,
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def marked_pids(marker: str) -> list[int]:
    """Pids of this user's processes whose environment carries ``marker``."""
    found = []
    needle = f"AQF_DEPLOYMENT_TEST={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


@dataclass
class Deployment:
    """Processes of one test deployment; :meth:`teardown` ends all of them."""

    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AQF_DEPLOYMENT_TEST=self.marker,
            FLWR_HOME=str(self.root / "flwr-home"),  # never the user's ~/.flwr
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # flower-superexec, flwr-serverapp
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        for pid in _children_of(proc.pid):
            _signal_group(pid, signal.SIGKILL)
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"----- {log.name} (last 3000 chars)\n{text[-3000:]}")
        return "\n".join(parts)

    def teardown(self) -> list[int]:
        """SIGTERM then SIGKILL every marked process; returns the pids still alive after."""
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        for pid in marked_pids(self.marker):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while marked_pids(self.marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in marked_pids(self.marker):
            _signal_group(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        time.sleep(0.5)
        return marked_pids(self.marker)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def wait_for(condition: Any, timeout: float, what: str, deployment: Deployment) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{deployment.logs()}")
        time.sleep(0.25)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the test


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        survivors = dep.teardown()
        assert not survivors, f"processes survived teardown: {survivors}"


@pytest.mark.skipif(
    not all((BIN / b).is_file() for b in ("flower-superlink", "flower-supernode", "flwr")),
    reason="Flower's executables are not next to this Python",
)
def test_adaquantfl_on_a_tls_deployment(deployment: Deployment) -> None:
    started = time.monotonic()
    root = deployment.root
    ca, cert, key = write_certificates(root / "certs")
    results = root / "results"
    link_port = free_port()

    # Prepare: the SuperLink (TLS, no runtime dependency installation: offline) ...
    deployment.start(
        "superlink", "flower-superlink",
        "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
        "--host", LOOPBACK, "--port", str(link_port),
        "--disable-runtime-dependency-installation",
    )  # fmt: skip
    wait_for(lambda: port_open(link_port), START_TIMEOUT_S, "the SuperLink", deployment)
    # ... two SuperNodes, each with its partition of the data ...
    for i in range(NODES):
        deployment.start(
            f"supernode-{i}", "flower-supernode",
            "--root-certificates", str(ca),
            "--superlink", f"{LOOPBACK}:{link_port}",
            "--host", LOOPBACK, "--port", str(free_port()),
            "--node-config", f"partition-id={i} num-partitions={NODES}",
            "--max-retries", "5", "--max-wait-time", "60",
        )  # fmt: skip
    # ... and a connection for `flwr` in a private FLWR_HOME.
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "{LOOPBACK}:{link_port}"\nroot-certificates = "{ca}"\n'
    )

    # Execute: `flwr run` submits the run; the ServerApp writes the results.
    run_config = (
        f"num-server-rounds={ROUNDS} method='adaquantfl' levels=2 min-nodes={NODES} "
        f"node-wait-s={NODE_WAIT_S} round-timeout-s={ROUND_TIMEOUT_S} local-steps=20 "
        f"results-dir='{results}'"
    )
    submit = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "test", "--run-config", run_config],
        cwd=root, env=deployment.env, capture_output=True, text=True, timeout=START_TIMEOUT_S,
    )  # fmt: skip
    assert "Successfully started run" in submit.stdout, submit.stdout + submit.stderr
    # Lose a node after the second round: the run must go on without it.
    wait_for(lambda: len(read_rows(results / "metrics.jsonl")) >= 2, RUN_TIMEOUT_S,
             "two rounds", deployment)  # fmt: skip
    deployment.kill(f"supernode-{NODES - 1}")
    wait_for(lambda: (results / "summary.json").is_file(), RUN_TIMEOUT_S, "the results",
             deployment)  # fmt: skip

    # Assert: judged by what the ServerApp wrote, not by exit codes.
    summary = json.loads((results / "summary.json").read_text())
    rows = read_rows(results / "metrics.jsonl")
    assert summary["complete"] and summary["rounds"] == ROUNDS and len(rows) == ROUNDS
    assert (results / "model.pt").is_file()
    assert summary["final_test_loss"] < summary["initial_test_loss"]
    assert summary["final_test_accuracy"] > summary["initial_test_accuracy"]
    # AdaQuantFL's levels: s_0 = 2, then the rule on the logged losses.
    assert rows[0]["levels"] == 2
    f0 = rows[0]["train_loss"]
    for prev, row in itertools.pairwise(rows):
        assert row["levels"] == adaquant_levels(f0, prev["train_loss"], 2, 1, 2**16)
    assert max(r["levels"] for r in rows) > 2
    # Bits: each reply is exactly one packed codec message of the MLP's 15,010 entries.
    d = 64 * 200 + 200 + 200 * 10 + 10
    for r in rows:
        s = r["levels"]
        assert r["participants"] > 0 and r["rejected"] == 0
        assert r["wire_bits"] == r["participants"] * 8 * message_bytes(d, s)
        assert r["formula_bits"] == r["participants"] * (d * s.bit_length() + d + 32)
    # The lost node: both nodes in the first two rounds, the survivor alone at the end.
    assert [r["participants"] for r in rows[:2]] == [NODES, NODES]
    assert (rows[-1]["participants"], rows[-1]["dropped"]) == (NODES - 1, 1)
    assert rows[-1]["time_s"] < ROUND_TIMEOUT_S + 15  # waited for the lost node, then went on
    print(f"\ndeployment test: {time.monotonic() - started:.1f} s for {ROUNDS} rounds; "
          f"per round {[round(r['time_s'], 1) for r in rows]} s")  # fmt: skip
