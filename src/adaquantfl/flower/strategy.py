"""``AdaQuantFedAvg``: the simple case, :class:`~adaquantfl.flower.AdaQuant` around ``FedAvg``.

Swap ``FedAvg(...)`` for ``AdaQuantFedAvg(policy, seed=..., ...)`` in a ServerApp
and add :data:`~adaquantfl.flower.adaquant_mod` to the ClientApp. It is
``AdaQuant(FedAvg(...), sample_nodes=True, ...)``: the nodes are sampled
reproducibly from the seed (FedAvg's ``fraction_train`` / ``min_train_nodes``,
or by client id with ``num_clients`` / ``clients_per_round``, as the
simulator does), the wait for nodes is bounded by ``node_wait_s``, and the
model is FedAvg's weighted mean computed by :class:`~adaquantfl.fl.server.FedServer`,
so a run sends the simulator's bytes and ends with its model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from adaquantfl.compression.compressor import Compressor
from adaquantfl.flower.checks import check_policy, positional_error
from adaquantfl.flower.layout import BATCHNORM_BUFFERS
from adaquantfl.flower.messages import NUM_EXAMPLES_KEY
from adaquantfl.flower.rounds import FlowerRound
from adaquantfl.flower.wrapper import AdaQuant
from adaquantfl.policy import LevelPolicy, LevelSchedule

__all__ = ["AdaQuantFedAvg", "FlowerRound"]

USAGE = (
    "AdaQuantFedAvg(AdaQuantLevels(2), QSGDCompressor(), seed=0, fraction_train=1.0, "
    "min_available_nodes=2, ...)"
)


class AdaQuantFedAvg(AdaQuant):
    """FedAvg whose nodes send quantized, encoded updates at the policy's levels.

    Parameters
    ----------
    policy : LevelPolicy or LevelSchedule
        The level policy (``FullPrecision()``, ``FixedLevels(s)``,
        ``AdaQuantLevels(s0)``, ...); the only positional argument besides
        ``compressor``.
    compressor : Compressor, optional
        Default: QSGD, packed, one bucket, l2 norm.
    seed : int
        Required, keyword only: the run seed (see :class:`AdaQuant`).
    num_clients, clients_per_round, node_wait_s, record_digests, \
max_message_bytes, max_weight_share, downlink, downlink_levels, uncompressed
        As in :class:`AdaQuant`.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
train_metrics_aggr_fn, evaluate_metrics_aggr_fn
        As in Flower's ``FedAvg`` (keywords); the inner FedAvg is ``.strategy``.
    """

    def __init__(
        self,
        policy: LevelPolicy | LevelSchedule,
        compressor: Compressor | None = None,
        *args: object,
        seed: int,
        num_clients: int | None = None,
        clients_per_round: int | None = None,
        node_wait_s: float = 60.0,
        record_digests: bool = True,
        max_message_bytes: int | None = None,
        max_weight_share: float | None = None,
        downlink: Compressor | None = None,
        downlink_levels: int | None = None,
        uncompressed: Collection[str] = BATCHNORM_BUFFERS,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = NUM_EXAMPLES_KEY,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if args:
            raise positional_error(
                type(self).__name__, USAGE, ("policy", "compressor"), len(args),
                ", FedAvg's options included,",
            )  # fmt: skip
        # The first argument first: FedAvg-style positional arguments
        # (AdaQuantFedAvg(0.5, ...)) land here.
        check_policy(policy, f"{type(self).__name__}'s first argument (policy)")
        _check_fedavg(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        inner = FedAvg(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        super().__init__(
            inner,
            policy=policy,
            seed=seed,
            compressor=compressor,
            downlink=downlink,
            downlink_levels=downlink_levels,
            uncompressed=uncompressed,
            sample_nodes=True,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            node_wait_s=node_wait_s,
            record_digests=record_digests,
            max_message_bytes=max_message_bytes,
            max_weight_share=max_weight_share,
        )

    def __repr__(self) -> str:
        return f"AdaQuantFedAvg(policy={self.policy!r}, compressor={self.compressor!r})"


def _check_fedavg(**values: Any) -> None:
    for name in ("fraction_train", "fraction_evaluate"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    for name in ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
