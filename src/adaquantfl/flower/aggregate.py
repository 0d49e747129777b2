"""The new global model of a round: FedAvg's mean from FedServer, or the inner strategy's.

``accepted`` is a list of (node, :class:`~adaquantfl.flower.messages.TrainReply`,
reply message) of the replies :class:`~adaquantfl.fl.server.FedServer`
accepted, and ``metrics`` their metric records as the inner strategy sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from adaquantfl.compression.compressor import Compressor
from adaquantfl.fl.guard import aggregation_weights
from adaquantfl.fl.server import FedServer
from adaquantfl.flower.layout import ArrayLayout, RecordError
from adaquantfl.flower.messages import TrainReply, with_content

__all__ = ["fedavg_model", "inner_model", "uses_fedavg_math"]

Accepted = Sequence[tuple[int, TrainReply, Message]]


def uses_fedavg_math(strategy: object) -> bool:
    """Whether ``strategy`` aggregates with FedAvg's own ``aggregate_train`` (FedAvg, FedProx)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


def fedavg_model(
    strategy: Any,
    server: FedServer,
    layout: ArrayLayout,
    accepted: Accepted,
    metrics: Sequence[MetricRecord],
    weight_key: str,
) -> tuple[ArrayRecord, MetricRecord]:
    """FedAvg's model: FedServer's exact mean, and the side arrays' mean with the same ``p_i``.

    The metrics are aggregated with the strategy's ``train_metrics_aggr_fn``.
    """
    n = [int(tr.reply.num_examples) for _, tr, _ in accepted]
    weights = aggregation_weights(n, server.max_weight_share)  # FedServer's p_i
    side = layout.mean_side([tr.side for _, tr, _ in accepted], weights)
    params = server.params
    contents = [
        RecordDict({tr.metrics_name: m}) for (_, tr, _), m in zip(accepted, metrics, strict=True)
    ]
    try:
        aggregated: MetricRecord = strategy.train_metrics_aggr_fn(contents, weight_key)
    except (TypeError, ValueError, KeyError) as exc:  # e.g. lists of different lengths
        log(WARNING, "aggregate_train: could not aggregate the nodes' metrics: %s", exc)
        aggregated = MetricRecord()
    return layout.to_record(params, side), aggregated


def inner_model(
    strategy: Any,
    server_round: int,
    compressor: Compressor,
    layout: ArrayLayout,
    w_k: torch.Tensor,
    accepted: Accepted,
    metrics: Sequence[MetricRecord],
    levels: dict[int, int | None],
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """The inner strategy's aggregate of the models ``w_k + C(Delta_i)``, in the model's dtypes.

    Returns None for the model if the strategy aggregated nothing or
    returned arrays that do not fit the model (logged).
    """
    models = []
    for (_, tr, msg), m in zip(accepted, metrics, strict=True):
        update = compressor.decompress(
            tr.reply.payload, numel=layout.numel, levels=levels[tr.reply.client_id]
        )
        record = layout.to_record(w_k + update, tr.side)
        content = RecordDict({tr.arrays_name: record, tr.metrics_name: m})
        # A copy of the reply's metadata: the strategy sees each node as it replied.
        models.append(with_content(msg, content))
    arrays, aggregated = strategy.aggregate_train(server_round, models)
    if arrays is None:
        return None, aggregated
    try:
        return layout.adopt(arrays), aggregated
    except RecordError as exc:
        log(
            WARNING,
            "aggregate_train: round %d: the inner strategy's model is unusable, the model is "
            "unchanged: %s",
            server_round,
            exc,
        )
        return None, aggregated
