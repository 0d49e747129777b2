"""Real Flower deployments on 127.0.0.1: SuperLink + SuperNodes over TLS, driven by ``flwr``.

Two tests, each with its own SuperLink, SuperNodes and certificates, run the
example app of examples/flower-app with AdaQuantFL and judge the run by the
results the ServerApp wrote (``flwr run`` can exit 0 when the run failed):

- a healthy run: 2 SuperNodes admitted by Flower's node authentication (their
  public keys registered with ``flwr supernode register``), plus a SuperNode
  whose key is not registered, which the SuperLink must turn away;
- a node failure: 3 SuperNodes, a minimum of 2 available and training nodes,
  a round timeout, and one SuperNode killed (SIGKILL to every process it
  started) after the first round; the run must finish with the other two.

Every process a test starts carries markers in its environment (inherited by
everything it starts), and teardown kills the process group of every marked
process: the SuperLink's SuperExec, the ``flwr-serverapp`` it starts and a
SuperNode's SuperExec and ``flwr-clientapp`` processes run in sessions of
their own, and can outlive whoever started them.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from benchmarks._common import LOOPBACK, free_port, pids_with, port_open

from adaquantfl.compression.codec import message_bytes
from adaquantfl.compression.qsgd_compressor import DEFAULT_BUCKET_SIZE
from adaquantfl.policy import adaquant_levels

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(
        not all(
            (Path(sys.executable).parent / b).is_file()
            for b in ("flower-superlink", "flower-supernode", "flwr")
        ),
        reason="Flower's executables are not next to this Python",
    ),
]
pytest.importorskip("flwr", reason="the Flower extra is not installed")
pytest.importorskip("cryptography", reason="the dev extra (cryptography) is not installed")

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower-app"
BIN = Path(sys.executable).parent
CONNECTION = "test"  # the `flwr` connection name in the test's private FLWR_HOME
ROUNDS = 3
#: Fixed limits: each test ends within these, whatever breaks. A round of the
#: example app takes 10-20 s on a 2-core machine: every message starts a
#: `flwr-clientapp` process (torch, flwr, the data), and the SuperNodes and
#: the ServerApp poll the SuperLink every 3 s.
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0
NODE_WAIT_S = 10.0
#: Longest wait for a round's replies. A killed SuperNode stays "online" on the
#: SuperLink until it misses its heartbeats (one every 17.5-22.5 s in Flower
#: 1.42; the node is given up 60 s after the last one); then the SuperLink
#: answers its pending message with NODE_UNAVAILABLE.
#: Waiting this long keeps healthy rounds far from the limit on a slow machine
#: and costs nothing more: the lost node's round ends when Flower gives it up.
ROUND_TIMEOUT_S = 60.0
POLL_S = 0.25
#: The digits MLP of examples/flower-app/task.py: 64-200-10.
NUMEL = 64 * 200 + 200 + 200 * 10 + 10


# --------------------------------------------------------------------------- keys


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


def write_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair, as ``ssh-keygen -t ecdsa -b 384`` writes it.

    Flower 1.42 reads the private key in OpenSSH format
    (``flower-supernode --auth-supernode-private-key``) and the public key as
    an OpenSSH public key line (``flwr supernode register``), on a NIST curve.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


# --------------------------------------------------------------------------- processes


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows.append(json.loads(line))
    return rows


@dataclass
class Deployment:
    """The processes of one test deployment on 127.0.0.1; :meth:`teardown` ends all of them."""

    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    port: int = 0
    ca: Path = Path()

    # ----------------------------------------------------------------- plumbing

    def env(self, name: str = "") -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AQF_DEPLOYMENT_TEST=self.marker,
            AQF_DEPLOYMENT_PROC=f"{self.marker}:{name}",
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
            env=self.env(name),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
        self.procs[name] = proc
        return proc

    def pids_of(self, name: str) -> list[int]:
        """``name``'s process and every process it started (they inherit its marker)."""
        return pids_with(f"AQF_DEPLOYMENT_PROC={self.marker}:{name}")

    def kill(self, name: str) -> None:
        """SIGKILL the process groups of ``name`` and of everything it started; wait till gone."""

        def gone() -> bool:
            pids = self.pids_of(name)  # again and again: one may start another meanwhile
            for pid in pids:
                _signal_group(pid, signal.SIGKILL)
            return not pids

        _signal_group(self.procs[name].pid, signal.SIGKILL)
        self.wait_for(gone, 10, f"{name}'s processes to die")
        self.procs[name].wait(timeout=10)

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace")
            parts.append(f"----- {log.name} (last 3000 chars)\n{text[-3000:]}")
        return "\n".join(parts)

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(POLL_S)

    def teardown(self) -> list[int]:
        """SIGTERM then SIGKILL every marked process group; returns the pids still alive."""
        marker = f"AQF_DEPLOYMENT_TEST={self.marker}"
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGTERM)
        for pid in pids_with(marker):
            _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pids_with(marker) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for pid in pids_with(marker):
            _signal_group(pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while pids_with(marker) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        return pids_with(marker)

    # ----------------------------------------------------------------- Flower

    def start_superlink(self, *, node_auth: bool = False) -> None:
        """The SuperLink on a free loopback port, with TLS; a `flwr` connection to it."""
        self.ca, cert, key = write_certificates(self.root / "certs")
        self.port = free_port()
        self.start(
            "superlink", "flower-superlink",
            "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--host", LOOPBACK, "--port", str(self.port),
            # No `uv sync` of the app's dependencies at run time: offline.
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if node_auth else []),
        )  # fmt: skip
        home = self.root / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{LOOPBACK}:{self.port}"\nroot-certificates = "{self.ca}"\n'
        )
        self.wait_for(lambda: port_open(self.port), START_TIMEOUT_S, "the SuperLink")

    def start_supernode(
        self, name: str, partition: int, partitions: int, *extra: str
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name, "flower-supernode",
            "--root-certificates", str(self.ca), "--superlink", f"{LOOPBACK}:{self.port}",
            "--host", LOOPBACK, "--port", str(free_port()),
            "--node-config", f"partition-id={partition} num-partitions={partitions}",
            *extra,
        )  # fmt: skip

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.root, env=self.env("flwr"), capture_output=True, text=True,
            timeout=START_TIMEOUT_S,
        )  # fmt: skip

    def flwr_json(self, *args: str) -> dict[str, Any]:
        done = self.flwr(*args, "--format", "json")
        text = done.stdout
        try:
            result: dict[str, Any] = json.loads(text[text.index("{") :])
        except ValueError:
            pytest.fail(f"`flwr {' '.join(args)}` printed no JSON:\n{text}\n{done.stderr}")
        return result

    def online_nodes(self) -> set[int]:
        listing = self.flwr_json("supernode", "list", CONNECTION)
        return {int(n["node-id"]) for n in listing.get("nodes", []) if n["status"] == "online"}

    def wait_for_online_nodes(self, count: int) -> set[int]:
        nodes: set[int] = set()

        def enough() -> bool:
            nodes.clear()
            nodes.update(self.online_nodes())
            return len(nodes) >= count

        self.wait_for(enough, START_TIMEOUT_S, f"{count} SuperNodes online")
        return nodes

    def run_app(self, **config: object) -> Path:
        """Submit the example app with ``flwr run``; the ServerApp's results directory."""
        results = self.root / "results"
        config = {"num-server-rounds": ROUNDS, "method": "'adaquantfl'", "levels": 2,
                  "local-steps": 20, "node-wait-s": NODE_WAIT_S,
                  "results-dir": f"'{results}'", **config}  # fmt: skip
        run_config = " ".join(f"{k}={v}" for k, v in config.items())
        done = self.flwr("run", str(APP), CONNECTION, "--run-config", run_config)
        assert "Successfully started run" in done.stdout, done.stdout + done.stderr
        return results

    def wait_for_rows(self, results: Path, count: int) -> list[dict[str, Any]]:
        path = results / "metrics.jsonl"
        self.wait_for(lambda: len(read_rows(path)) >= count, RUN_TIMEOUT_S, f"{count} rounds")
        return read_rows(path)

    def results(self, results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        summary = results / "summary.json"
        self.wait_for(summary.is_file, RUN_TIMEOUT_S, "the run's summary")
        return json.loads(summary.read_text()), read_rows(results / "metrics.jsonl")


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        survivors = dep.teardown()
        assert not survivors, f"processes survived teardown: {survivors}"


def check_run(summary: dict[str, Any], rows: list[dict[str, Any]], results: Path) -> None:
    """What every complete AdaQuantFL run of the example app must show."""
    assert summary["complete"] and summary["rounds"] == ROUNDS and len(rows) == ROUNDS
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert (results / "model.pt").is_file()
    assert summary["final_test_loss"] < summary["initial_test_loss"]
    assert summary["final_test_accuracy"] > summary["initial_test_accuracy"]
    # AdaQuantFL's levels: s_0 = 2, then the rule on the logged losses.
    assert rows[0]["levels"] == 2
    f0 = rows[0]["train_loss"]
    for prev, row in itertools.pairwise(rows):
        assert row["levels"] == adaquant_levels(f0, prev["train_loss"], 2, 1, 2**16)
    assert max(r["levels"] for r in rows) > 2
    # Bits: each accepted reply is exactly one packed codec message of the MLP,
    # in the default compressor's max-norm buckets of 512.
    norms = -(-NUMEL // DEFAULT_BUCKET_SIZE)
    for r in rows:
        s = r["levels"]
        assert r["participants"] > 0 and r["rejected"] == 0
        size = message_bytes(NUMEL, s, bucket_size=DEFAULT_BUCKET_SIZE)
        assert r["wire_bits"] == r["participants"] * 8 * size
        assert r["formula_bits"] == r["participants"] * (
            NUMEL * s.bit_length() + NUMEL + 32 * norms
        )


# --------------------------------------------------------------------------- the tests


def test_a_tls_deployment_with_node_authentication(deployment: Deployment) -> None:
    started = time.monotonic()
    nodes = 2
    keys = deployment.root / "keys"

    # Prepare: a SuperLink that admits only SuperNodes whose public key is registered ...
    deployment.start_superlink(node_auth=True)
    registered = set()
    for i in range(nodes):
        _, public = write_node_key(keys, f"supernode-{i}")
        answer = deployment.flwr_json("supernode", "register", str(public), CONNECTION)
        assert answer.get("success"), answer
        registered.add(int(answer["node-id"]))
    # ... two SuperNodes that sign with the registered keys, and one whose key is not.
    for i in range(nodes):
        deployment.start_supernode(
            f"supernode-{i}", i, nodes, "--auth-supernode-private-key", str(keys / f"supernode-{i}")
        )
    stranger_key, _ = write_node_key(keys, "stranger")
    stranger = deployment.start_supernode(
        "stranger", 0, nodes, "--auth-supernode-private-key", str(stranger_key),
        "--max-retries", "1", "--max-wait-time", "5",
    )  # fmt: skip
    assert deployment.wait_for_online_nodes(nodes) == registered

    # Execute
    results = deployment.run_app(**{"min-nodes": nodes, "round-timeout-s": ROUND_TIMEOUT_S})
    summary, rows = deployment.results(results)

    # Assert: the run, and only the registered nodes took part in it.
    check_run(summary, rows, results)
    assert [(r["participants"], r["dropped"]) for r in rows] == [(nodes, 0)] * ROUNDS
    assert stranger.poll() not in (None, 0)  # turned away, and gave up
    assert deployment.online_nodes() == registered
    print(f"\nauthenticated deployment: {time.monotonic() - started:.1f} s for {ROUNDS} rounds; "
          f"per round {[round(r['time_s'], 1) for r in rows]} s")  # fmt: skip


def test_a_lost_supernode_does_not_stop_the_run(deployment: Deployment) -> None:
    started = time.monotonic()
    nodes, lost = 3, "supernode-2"

    # Prepare: three SuperNodes, all connected before the run starts; two suffice.
    deployment.start_superlink()
    for i in range(nodes):
        deployment.start_supernode(f"supernode-{i}", i, nodes)
    deployment.wait_for_online_nodes(nodes)

    # Execute: kill one SuperNode, and everything it started, after the first round.
    results = deployment.run_app(**{"min-nodes": nodes - 1, "round-timeout-s": ROUND_TIMEOUT_S})
    first = deployment.wait_for_rows(results, 1)
    killed_at = time.monotonic()
    deployment.kill(lost)
    summary, rows = deployment.results(results)

    # Assert: the run finished all rounds with the survivors, and the model improved.
    check_run(summary, rows, results)
    participants = [r["participants"] for r in rows]
    assert len(first) == 1 and participants == [nodes] + [nodes - 1] * (ROUNDS - 1)
    assert rows[0]["dropped"] == 0 and rows[1]["dropped"] == 1  # the lost node's round
    assert all(r["time_s"] < ROUND_TIMEOUT_S + 15 for r in rows)  # bounded, not forever
    assert not deployment.pids_of(lost)
    assert not deployment.teardown()  # and nothing is left behind
    print(f"\nnode-failure deployment: {time.monotonic() - started:.1f} s for {ROUNDS} rounds "
          f"({time.monotonic() - killed_at:.1f} s after the kill); participants {participants}, "
          f"dropped {[r['dropped'] for r in rows]}, "
          f"per round {[round(r['time_s'], 1) for r in rows]} s")  # fmt: skip
