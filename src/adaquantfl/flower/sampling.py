"""Sampling the nodes of a round: a bounded wait, seeded choice, asking nodes their client id.

Used when :class:`~adaquantfl.flower.AdaQuant` samples the nodes itself
(``sample_nodes=True``, as :class:`~adaquantfl.flower.AdaQuantFedAvg` does):
the chosen nodes are then handed to the inner strategy through a
:class:`NodeView` of the grid, with the inner strategy's sampling set to take
all of them (:func:`take_all`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from logging import INFO, WARNING
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from adaquantfl.fl.server import select_clients
from adaquantfl.flower.layout import RecordError
from adaquantfl.flower.messages import Instruction, probe_message, read_probe_reply

__all__ = [
    "SAMPLING_ATTRIBUTES",
    "NodeView",
    "choose_nodes",
    "probe_client_ids",
    "sampled_messages",
    "take_all",
    "wait_for_nodes",
]

#: FedAvg's sampling settings, which ``sample_nodes=True`` reads from the inner strategy.
SAMPLING_ATTRIBUTES = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)


class NodeView(Grid):
    """A grid that lists only ``nodes``; everything else goes to the real grid."""

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self.grid = grid
        self.nodes = list(nodes)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


@contextmanager
def take_all(strategy: Any, count: int, *, train: bool) -> Iterator[None]:
    """Set a FedAvg-style strategy to sample exactly ``count`` of ``count`` nodes, then restore.

    FedAvg samples ``max(int(n * fraction), min_nodes)`` nodes after waiting,
    without limit, for ``max(min_available_nodes, that)``; on a
    :class:`NodeView` of the ``count`` chosen nodes this takes all of them.
    """
    fraction, minimum = (
        ("fraction_train", "min_train_nodes")
        if train
        else ("fraction_evaluate", "min_evaluate_nodes")
    )
    names = (fraction, minimum, "min_available_nodes")
    saved = {name: getattr(strategy, name) for name in names}
    setattr(strategy, fraction, 1.0)
    setattr(strategy, minimum, count)
    strategy.min_available_nodes = count
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(strategy, name, value)


def wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    """Connected node ids (sorted), after waiting at most ``wait_s`` for ``minimum`` of them.

    Flower's own strategies wait without limit; after ``wait_s`` the round
    goes on with the nodes that are there, or with none.
    """
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        remaining = deadline - time.monotonic()
        if len(nodes) >= minimum or remaining <= 0:
            break
        log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(min(1.0, remaining))
    if len(nodes) < minimum:
        log(
            WARNING,
            "only %d of the %d required nodes connected within %.0f s; going on with them",
            len(nodes),
            minimum,
            wait_s,
        )
    return nodes


def probe_client_ids(
    grid: Grid, nodes: Sequence[int], plan: Instruction, config_key: str, wait_s: float
) -> dict[int, int]:
    """Ask ``nodes`` for their client id (the mod answers without training): node -> id."""
    messages = [probe_message(plan, node, config_key) for node in nodes]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=wait_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "probe: node %d answered with an error (is %s?): %s", node,
                "adaquant_mod in its ClientApp", reply.error.reason)  # fmt: skip
            continue
        try:
            found[node] = read_probe_reply(reply.content)
        except RecordError as exc:
            log(WARNING, "probe: node %d: %s", node, exc)
    return found


def choose_nodes(
    grid: Grid,
    nodes: Sequence[int],
    round_idx: int,
    settings: Any,
    node_clients: MutableMapping[int, int],
    *,
    probe: Instruction | None = None,
) -> list[int]:
    """The nodes of round ``round_idx``, reproducibly from the run seed.

    With a ``probe`` plan (training) and ``settings.num_clients`` and
    ``clients_per_round`` set, the nodes whose client id
    :func:`~adaquantfl.fl.server.select_clients` picks, as in the simulator
    (nodes of unknown id are probed first, and ``node_clients`` learns their
    ids); otherwise ``select_clients`` over the sorted node ids: ``fraction``
    of them, at least the minimum (FedAvg's settings of ``settings.strategy``,
    for training with a probe plan, else for evaluation).
    """
    if not nodes:
        return []
    inner = settings.strategy
    train = probe is not None
    if probe is None or settings.num_clients is None or settings.clients_per_round is None:
        fraction = inner.fraction_train if train else inner.fraction_evaluate
        minimum = inner.min_train_nodes if train else inner.min_evaluate_nodes
        size = max(1, min(max(int(len(nodes) * fraction), minimum), len(nodes)))
        picked = select_clients(len(nodes), size, seed=settings.seed, round_idx=round_idx)
        return [nodes[i] for i in picked]
    unknown = [n for n in nodes if n not in node_clients]
    if unknown:
        config_key = getattr(inner, "configrecord_key", "config")
        node_clients.update(
            probe_client_ids(grid, unknown, probe, config_key, settings.node_wait_s)
        )
    wanted = set(
        select_clients(
            settings.num_clients,
            settings.clients_per_round,
            seed=settings.seed,
            round_idx=round_idx,
        )
    )
    return [n for n in nodes if node_clients.get(n) in wanted]


def sampled_messages(
    settings: Any,
    grid: Grid,
    round_idx: int,
    configure: Callable[[Grid], Iterable[Message]],
    *,
    probe: Instruction | None = None,
) -> list[Message]:
    """The inner strategy's messages for the nodes the wrapper chose (``sample_nodes=True``).

    Waits at most ``settings.node_wait_s`` for the inner strategy's
    ``min_available_nodes``, chooses with :func:`choose_nodes` (training with a
    ``probe`` plan, else evaluation), and calls ``configure`` with a
    :class:`NodeView` of the chosen nodes while the inner strategy is set to
    take all of them.
    """
    inner = settings.strategy
    train = probe is not None
    if (inner.fraction_train if train else inner.fraction_evaluate) == 0.0:
        return []
    nodes = wait_for_nodes(grid, inner.min_available_nodes, settings.node_wait_s)
    chosen = choose_nodes(grid, nodes, round_idx, settings, settings.node_clients, probe=probe)
    if not chosen:
        return []
    with take_all(inner, len(chosen), train=train):
        return list(configure(NodeView(grid, chosen)))
