"""Finding the nodes of a round: a bounded wait for them, and asking them for their client id."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from adaquantfl.flower.records import (
    CLIENT_ID_KEY,
    RecordError,
    RoundPlan,
    plan_config,
    single_metric_record,
)

__all__ = ["probe_client_ids", "wait_for_nodes"]


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
