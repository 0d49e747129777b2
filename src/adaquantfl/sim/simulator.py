"""In-process simulator: N clients, one process, the shared client and server code.

Each round the simulator selects clients, runs :func:`adaquantfl.fl.client.client_update`
for each (in client-id order; the order does not affect any random draw), hands the
replies to :class:`adaquantfl.fl.server.FedServer`, and evaluates the new global
model on the test set.

Faults (:class:`ClientFaults`, all off by default) are seeded per (seed,
round, client), like every other draw of a run, so a fault pattern is
reproducible and the same under resume.

- Dropout: each selected client independently fails to reply with
  probability ``dropout`` (stream "dropout").
- Deadline: a client's simulated time for a round is
  ``client_time_s * exp(client_time_sigma * z_c + round_time_sigma * z_{c,k})``,
  a lognormal with a persistent per-client factor ``z_c`` (slow devices stay
  slow) and per-round jitter ``z_{c,k}`` (stream "straggler"). Clients whose
  time exceeds ``deadline_s`` miss the round.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from adaquantfl.compression.compressor import Compressor
from adaquantfl.compression.feedback import ClientCompressor
from adaquantfl.data import ClientData, FederatedData
from adaquantfl.fl.client import (
    ClientError,
    ClientReply,
    LocalTraining,
    compress_update,
    probe_noise,
    train_locally,
)
from adaquantfl.fl.client import evaluate as evaluate_model
from adaquantfl.fl.guard import aggregation_weights
from adaquantfl.fl.record import RoundRecord
from adaquantfl.fl.server import FedServer, accumulate64, mean_into, select_clients
from adaquantfl.models import FlatModel
from adaquantfl.rng import torch_generator
from adaquantfl.sim.vectorized import BatchedTrainer, can_vectorize
from adaquantfl.validation import check_int, check_real

__all__ = ["ClientFaults", "RoundAvailability", "Simulator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundAvailability:
    """Which selected clients reply in a round."""

    replying: list[int]
    dropped_out: list[int]
    missed_deadline: list[int]

    @property
    def dropped(self) -> int:
        return len(self.dropped_out) + len(self.missed_deadline)


@dataclass(frozen=True)
class ClientFaults:
    """Fault model of the simulator (all off by default).

    Parameters
    ----------
    dropout : float
        Probability in ``[0, 1]`` that a selected client does not reply.
    deadline_s : float or None
        Round deadline in simulated seconds; None waits for every client.
    client_time_s : float
        Median simulated time of a client's round.
    client_time_sigma, round_time_sigma : float
        Log-scale spread of the persistent per-client factor and of the per-round jitter.
    """

    dropout: float = 0.0
    deadline_s: float | None = None
    client_time_s: float = 1.0
    client_time_sigma: float = 0.5
    round_time_sigma: float = 0.25

    def __post_init__(self) -> None:
        check_real("dropout", self.dropout, 0.0, 1.0)
        if self.deadline_s is not None:
            check_real("deadline_s", self.deadline_s, 0.0, low_open=True)
        check_real("client_time_s", self.client_time_s, 0.0, low_open=True)
        check_real("client_time_sigma", self.client_time_sigma, 0.0)
        check_real("round_time_sigma", self.round_time_sigma, 0.0)

    def client_time_s_of(self, client_id: int, *, seed: int, round_idx: int) -> float:
        """Simulated time of ``client_id`` in round ``round_idx``."""
        device = _normal(torch_generator(seed, purpose="straggler", client_id=client_id))
        jitter = _normal(
            torch_generator(seed, purpose="straggler", round_idx=round_idx, client_id=client_id)
        )
        return self.client_time_s * math.exp(
            self.client_time_sigma * device + self.round_time_sigma * jitter
        )

    def availability(self, chosen: list[int], *, seed: int, round_idx: int) -> RoundAvailability:
        """Split the selected clients into those that reply and those that do not."""
        replying, dropped_out, late = [], [], []
        for cid in chosen:
            gen = torch_generator(seed, purpose="dropout", round_idx=round_idx, client_id=cid)
            if self.dropout > 0 and float(torch.rand((), generator=gen)) < self.dropout:
                dropped_out.append(cid)
            elif self.deadline_s is not None and (
                self.client_time_s_of(cid, seed=seed, round_idx=round_idx) > self.deadline_s
            ):
                late.append(cid)
            else:
                replying.append(cid)
        return RoundAvailability(replying, dropped_out, late)


def _normal(generator: torch.Generator) -> float:
    return float(torch.randn((), generator=generator))


class Simulator:
    """Runs the federated loop for all clients of ``data`` in this process.

    Parameters
    ----------
    model : FlatModel
    data : FederatedData
    server : FedServer
        Holds the global model and schedule; the simulator never touches them directly.
    compressor : Compressor
        Used by the clients to encode their updates.
    training : LocalTraining
    clients_per_round : int
    seed : int
        The run seed every random stream is derived from.
    vectorize : bool
        Train all participants of a round in one batched computation
        (:mod:`adaquantfl.sim.vectorized`) when the model allows it; otherwise,
        or when False, each client trains alone (:func:`~adaquantfl.fl.client.train_locally`).
        The batched path matches the per-client path to float tolerance.
    faults : ClientFaults, optional
        Simulated dropout and deadline; none by default.
    device : str or torch.device
        Where local training and evaluation run (``"cpu"`` or ``"cuda"``). The
        data are copied there once; the global model stays on the CPU with the
        server, and each update comes back to the CPU to be compressed (the
        codec's kernels are CPU code).
    noise_cost_every : int
        Every this many rounds, also evaluate the round's aggregate without
        the compression noise (:attr:`RoundRecord.test_loss_uncompressed`);
        0: never. It keeps the round's uncompressed updates until the round
        is aggregated, and changes nothing of the run itself.
    """

    def __init__(
        self,
        model: FlatModel,
        data: FederatedData,
        server: FedServer,
        compressor: Compressor,
        *,
        training: LocalTraining,
        clients_per_round: int,
        seed: int,
        vectorize: bool = False,
        faults: ClientFaults | None = None,
        device: str | torch.device = "cpu",
        noise_cost_every: int = 0,
    ) -> None:
        self.model = model
        self.data = data
        self.device = torch.device(device)
        #: The clients' shards and the test set on :attr:`device` (``data``'s own on the CPU).
        self.shards = [_to(shard, self.device) for shard in data.clients]
        self.test = _to(data.test, self.device)
        self.server = server
        self.compressor = compressor
        self.training = training
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.faults = faults or ClientFaults()
        self.noise_cost_every = check_int("noise_cost_every", noise_cost_every, 0)
        #: Each client's end of the compressor, which keeps what the client
        #: carries between its rounds (its error-feedback residual).
        self.client_compressors: dict[int, ClientCompressor] = {}
        select_clients(len(data.clients), clients_per_round, seed=seed, round_idx=0)  # validates
        self.trainer: BatchedTrainer | None = None
        if vectorize:
            ok, reason = can_vectorize(model, data.input_shape)
            if ok:
                self.trainer = BatchedTrainer(model, training)
                logger.info("simulator: batched training of all participants (%s)", reason)
            else:
                logger.warning(
                    "simulator: per-client training; the model cannot be vmapped (%s)", reason
                )

    @property
    def vectorized(self) -> bool:
        """Whether rounds run through the batched trainer."""
        return self.trainer is not None

    def run_round(self, *, evaluate: bool = True) -> RoundRecord:
        """Run the next round and return its record.

        ``evaluate=False`` skips the test set (the record's ``test_*`` are None).
        """
        start = time.perf_counter()
        round_idx = self.server.round_idx
        chosen = select_clients(
            len(self.data.clients), self.clients_per_round, seed=self.seed, round_idx=round_idx
        )
        plan = self.server.begin_round(chosen)
        params = plan.model.to(self.device)
        available = self.faults.availability(chosen, seed=self.seed, round_idx=round_idx)
        if available.dropped:
            logger.info(
                "round %d: %d dropped out, %d missed the deadline",
                round_idx,
                len(available.dropped_out),
                len(available.missed_deadline),
            )
        dropouts = [(c, "dropped out") for c in available.dropped_out] + [
            (c, "missed the deadline") for c in available.missed_deadline
        ]
        chosen = available.replying
        # In the rounds that measure what the compression noise costs, each
        # client's uncompressed update is kept until the round is aggregated.
        raw: dict[int, torch.Tensor] | None = None
        if self.noise_cost_every and (round_idx + 1) % self.noise_cost_every == 0:
            raw = {}
        if self.trainer is not None and chosen:
            local = self.trainer.train(params, self._batch_plan(self.trainer, chosen, round_idx))
            losses = self.trainer.initial_losses(params, [self.shards[c] for c in chosen])
        else:
            local, losses = None, None
        replies: list[ClientReply] = []
        failures: list[tuple[int, str]] = []
        for i, cid in enumerate(chosen):
            shard = self.shards[cid]
            if local is None or losses is None:
                trained, loss = train_locally(
                    self.model, params, shard.x, shard.y, training=self.training,
                    seed=self.seed, round_idx=round_idx, client_id=cid,
                )  # fmt: skip
            else:
                trained, loss = local[i], losses[i]
            update = trained - params
            try:
                sent = compress_update(
                    update,
                    levels=plan.levels.levels_of(cid),
                    compressor=self.client_compressor(cid),
                    seed=self.seed,
                    round_idx=round_idx,
                    client_id=cid,
                    # Nothing reads the update afterwards unless the noise cost or a
                    # probe is measured: under error feedback it becomes the residual.
                    consume=raw is None and not plan.levels.probe,
                )
            except ClientError as exc:
                logger.warning("round %d: client %d failed: %s", round_idx, cid, exc)
                failures.append((cid, str(exc)))
                continue
            if raw is not None:
                raw[cid] = update.detach().to("cpu", torch.float32)
            probe: tuple[tuple[int, float, float], ...] = ()
            if plan.levels.probe:
                probe = probe_noise(
                    self.model, params, update, shard.x, shard.y,
                    levels=plan.levels.probe, compressor=self.compressor,
                    scale=plan.levels.probe_scale, seed=self.seed, round_idx=round_idx,
                    client_id=cid,
                )  # fmt: skip
            replies.append(
                ClientReply(
                    cid,
                    sent.payload,
                    loss,
                    len(shard),
                    update_norm=sent.update_norm,
                    distortion=sent.distortion,
                    probe=probe,
                )
            )
        delivered = [(reply.client_id, self.transmit(reply, round_idx)) for reply in replies]
        before = self.server.params
        record = self.server.aggregate([r for _, r in delivered if r is not None])
        failures += [(cid, "the reply never arrived") for cid, r in delivered if r is None]
        test_loss: float | None = None
        test_accuracy: float | None = None
        if evaluate:
            test_loss, test_accuracy = evaluate_model(
                self.model, self.server.params.to(self.device), self.test.x, self.test.y
            )
        if raw is not None and record.participants:
            record = replace(
                record, test_loss_uncompressed=self._uncompressed_loss(before, record, raw)
            )
        return record.completed(
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            time_s=time.perf_counter() - start,
            failures=failures,
            dropouts=dropouts,
        )

    def _uncompressed_loss(
        self, before: torch.Tensor, record: RoundRecord, raw: Mapping[int, torch.Tensor]
    ) -> float:
        """Test loss of ``w_k + sum_i p_i Delta_i`` over the round's accepted clients.

        The same clients and weights as the server's aggregate (share cap
        included), with each client's update as it was before compression.
        """
        accepted = [cid for cid, _ in record.client_levels]
        weights = aggregation_weights(
            [len(self.shards[cid]) for cid in accepted], self.server.max_weight_share
        )
        total = torch.zeros(before.numel(), dtype=torch.float64)
        for cid, weight in zip(accepted, weights, strict=True):
            accumulate64(total, raw[cid], float(weight))
        model = mean_into(total, float(sum(weights)), before, torch.empty_like(before))
        del total
        loss, _ = evaluate_model(self.model, model.to(self.device), self.test.x, self.test.y)
        return loss

    def client_compressor(self, client_id: int) -> ClientCompressor:
        """Client ``client_id``'s end of the compressor (created on first use)."""
        client = self.client_compressors.get(client_id)
        if client is None:
            client = self.client_compressors[client_id] = ClientCompressor(self.compressor)
        return client

    def state_dict(self) -> dict[str, Any]:
        """The server's state and what every client keeps (for a checkpoint)."""
        clients = {
            cid: client.state_dict()
            for cid, client in sorted(self.client_compressors.items())
            if client.residual is not None
        }
        return {**self.server.state_dict(), "clients": clients}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict(state)
        self.client_compressors = {}
        for cid, client in state.get("clients", {}).items():
            self.client_compressor(int(cid)).load_state_dict(client)

    def transmit(self, reply: ClientReply, round_idx: int) -> ClientReply | None:
        """The uplink from a client to the server: delivers ``reply`` unchanged.

        Override to model a faulty network or a misbehaving client: return a
        modified reply, or None for a reply that never arrives (counted as
        rejected, like a client whose training failed).
        """
        return reply

    def _batch_plan(self, trainer: BatchedTrainer, chosen: list[int], round_idx: int) -> Any:
        """The batched trainer's layout of the round's minibatches (seed, round, client streams)."""
        gens = [
            torch_generator(self.seed, purpose="batch", round_idx=round_idx, client_id=cid)
            for cid in chosen
        ]
        return trainer.plan([self.shards[cid] for cid in chosen], gens)


def _to(shard: ClientData, device: torch.device) -> ClientData:
    if shard.x.device == device and shard.y.device == device:
        return shard
    return ClientData(shard.x.to(device), shard.y.to(device))
