"""Finding the nodes of a round: a bounded wait for them, and asking them for their client id."""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence
from dataclasses import replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from adaquantfl.fl.server import select_clients
from adaquantfl.flower.records import (
    CLIENT_ID_KEY,
    RecordError,
    RoundPlan,
    plan_config,
    single_metric_record,
)

__all__ = ["choose_train_nodes", "probe_client_ids", "wait_for_nodes"]


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
    grid: Grid, nodes: Sequence[int], plan: RoundPlan, config_key: str, wait_s: float
) -> dict[int, int]:
    """Ask ``nodes`` for their client id (the mod answers without training): node -> id."""
    probe = replace(plan, probe=True)
    messages = [
        Message(
            content=RecordDict({config_key: plan_config(ConfigRecord(), probe)}),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
        )
        for node in nodes
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=wait_s):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "probe: node %d answered with an error: %s", node, reply.error.reason)
            continue
        try:
            client_id = single_metric_record(reply.content, "a probe reply").get(CLIENT_ID_KEY)
        except RecordError as exc:
            log(WARNING, "probe: node %d: %s", node, exc)
            continue
        if isinstance(client_id, int) and not isinstance(client_id, bool):
            found[node] = client_id
    return found


def choose_train_nodes(
    grid: Grid,
    nodes: Sequence[int],
    plan: RoundPlan,
    strategy: Any,
    node_clients: MutableMapping[int, int],
) -> list[int]:
    """The nodes that train in ``plan``'s round.

    With ``strategy.num_clients`` and ``clients_per_round`` set, the nodes
    whose client id :func:`~adaquantfl.fl.server.select_clients` picks, as in
    the simulator (nodes of unknown id are probed first, and ``node_clients``
    learns their ids); otherwise a Flower-style sample of ``fraction_train``
    of the nodes, at least ``min_train_nodes``.
    """
    if not nodes:
        return []
    if strategy.num_clients is None or strategy.clients_per_round is None:
        size = max(int(len(nodes) * strategy.fraction_train), strategy.min_train_nodes)
        size = max(1, min(size, len(nodes)))
        picked = select_clients(len(nodes), size, seed=strategy.seed, round_idx=plan.round_idx)
        return [nodes[i] for i in picked]
    unknown = [n for n in nodes if n not in node_clients]
    if unknown:
        node_clients.update(
            probe_client_ids(grid, unknown, plan, strategy.configrecord_key, strategy.node_wait_s)
        )
    wanted = set(
        select_clients(
            strategy.num_clients,
            strategy.clients_per_round,
            seed=strategy.seed,
            round_idx=plan.round_idx,
        )
    )
    return [n for n in nodes if node_clients.get(n) in wanted]
