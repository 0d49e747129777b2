"""What a node keeps between messages, in its ``Context.state``, and its warnings.

A node's state survives the rounds it sits out: Flower's simulation and a
SuperNode hand the same ``Context`` (and its ``state`` RecordDict) to every
message of a run, even where each message runs in a new ``flwr-clientapp``
process. Kept there:

- ``aq-client-state`` (ArrayRecord): ``residual``, the error-feedback residual
  ``e_i``; ``replica``, the downlink model ``x_k`` the node holds;
- ``aq-node-state`` (ConfigRecord): ``replica-round`` and ``layout`` of that
  replica, and which warnings the node has already logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log

from adaquantfl.compression.feedback import ClientCompressor
from adaquantfl.flower.layout import ArrayLayout

__all__ = [
    "CLIENT_STATE_RECORD",
    "NODE_STATE_RECORD",
    "Replica",
    "load_client_state",
    "load_replica",
    "store_client_state",
    "store_replica",
    "warn_once",
]

CLIENT_STATE_RECORD = "aq-client-state"
NODE_STATE_RECORD = "aq-node-state"
RESIDUAL_KEY = "residual"
REPLICA_KEY = "replica"

#: Warnings this process has logged (a node of a simulation shares the process
#: with others; a deployment's node starts a process per message).
_WARNED: set[str] = set()


def warn_once(context: Context | None, key: str, message: str, *args: object) -> None:
    """Log ``message`` at WARNING once per process and once per node.

    The node's ``Context.state`` remembers it, so a SuperNode that starts a
    new process for every message still logs it once.
    """
    if key in _WARNED:
        return
    _WARNED.add(key)
    if context is not None:
        node = _node_config(context)
        if node.get(f"warned-{key}"):
            return
        node[f"warned-{key}"] = True
        context.state[NODE_STATE_RECORD] = node
    log(logging.WARNING, message, *args)


def _node_config(context: Context) -> ConfigRecord:
    return context.state.config_records.get(NODE_STATE_RECORD, ConfigRecord())


def _arrays(context: Context) -> ArrayRecord:
    return context.state.array_records.get(CLIENT_STATE_RECORD, ArrayRecord())


def _tensor(array: Array) -> torch.Tensor:
    return torch.from_numpy(array.numpy().astype(np.float32, copy=True)).reshape(-1)


def load_client_state(context: Context, client: ClientCompressor) -> None:
    """Restore what the node's end of the compressor kept (its error-feedback residual)."""
    record = _arrays(context)
    residual = _tensor(record[RESIDUAL_KEY]) if RESIDUAL_KEY in record else None
    client.load_state_dict({"residual": residual})


def store_client_state(context: Context, client: ClientCompressor) -> None:
    """Keep what the node's end of the compressor must carry into its next round."""
    residual = client.state_dict()["residual"]
    if residual is None:
        return
    record = _arrays(context)
    record[RESIDUAL_KEY] = Array(residual.detach().cpu().numpy())
    context.state[CLIENT_STATE_RECORD] = record


@dataclass(frozen=True)
class Replica:
    """The downlink model ``x_k`` a node holds, the round it is of, and the model's layout."""

    params: torch.Tensor
    round_idx: int
    layout: ArrayLayout


def load_replica(context: Context) -> Replica | None:
    record = _arrays(context)
    node = _node_config(context)
    if REPLICA_KEY not in record or "replica-round" not in node or "layout" not in node:
        return None
    return Replica(
        _tensor(record[REPLICA_KEY]),
        int(node["replica-round"]),  # type: ignore[arg-type]
        ArrayLayout.from_json(str(node["layout"])),
    )


def store_replica(context: Context, replica: Replica) -> None:
    record = _arrays(context)
    record[REPLICA_KEY] = Array(replica.params.detach().cpu().numpy())
    context.state[CLIENT_STATE_RECORD] = record
    node = _node_config(context)
    node["replica-round"] = replica.round_idx
    node["layout"] = replica.layout.to_json()
    context.state[NODE_STATE_RECORD] = node
