"""Test helpers for the Flower integration: an in-process Grid and a plain user ClientApp."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from adaquantfl.data import ClientData
from adaquantfl.fl.record import RoundRecord
from adaquantfl.flower import adaquant_mod
from adaquantfl.flower.messages import NUM_EXAMPLES_KEY, PRE_TRAIN_LOSS_KEY
from adaquantfl.runner.build import build_simulator
from adaquantfl.runner.config import Config

#: Rewrites a node's reply: (instruction, reply) -> new reply, or None: the reply is lost.
Tamper = Callable[[Message, Message], Message | None]


class InProcessGrid(Grid):
    """Delivers each message to a ClientApp in this process and returns its reply.

    A stand-in for the SuperLink with the same contract as Flower's grids
    (``send_and_receive`` returns the replies that arrived, in any order).
    ``drop`` holds nodes that never answer; ``tamper`` rewrites a node's reply
    before the server sees it (or loses it, by returning None); ``available``
    limits the nodes that are connected.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, first_node_id: int = 1000):
        # Message() reads the sender's identity from this process-wide record,
        # which a ServerApp process sets on start-up.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        # Node ids deliberately differ from the client ids (partition ids).
        self.app = client_app
        self.contexts = {
            first_node_id + 7 * i: Context(
                run_id=1,
                node_id=first_node_id + 7 * i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.drop: set[int] = set()
        self.tamper: dict[int, Tamper] = {}
        self.available: set[int] | None = None
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def node_of(self, client_id: int) -> int:
        return next(
            n for n, c in self.contexts.items() if c.node_config["partition-id"] == client_id
        )

    # --- the Grid interface
    def set_run(self, run: object) -> None:  # type: ignore[override]
        pass

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(  # type: ignore[override]
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.contexts)
        return nodes if self.available is None else [n for n in nodes if n in self.available]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            # As Flower's grids do when they push a message.
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.drop:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:
                reply = Message(raised_error(exc), reply_to=msg)
            if node in self.tamper:
                tampered = self.tamper[node](msg, reply)
                if tampered is None:
                    continue
                reply = tampered
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def raised_error(exc: Exception) -> Error:
    """The Error with which Flower's simulation engine answers for a ClientApp that raised.

    Word for word as flwr 1.42 builds it (``ray_actor.py`` wraps the exception in a
    ``ClientAppException``, ``vce_api.py`` formats the reason), so that the server
    sees the text a user of ``flwr run`` sees.
    """
    wrapped = ClientAppException(str(exc))
    reason = str(type(wrapped)) + ":<'" + str(wrapped) + "'>"
    return Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)


def forget_warnings() -> None:
    """Let the once-per-process warnings of adaquantfl.flower be logged again (per test)."""
    from adaquantfl.flower import mod

    mod._LOGGED.clear()


def simulate(config: Config) -> tuple[list[RoundRecord], torch.Tensor]:
    """Run ``config`` on the in-process simulator: its records (with digests), the final model."""
    sim = build_simulator(config)
    sim.server.record_digests = True
    records = [sim.run_round() for _ in range(config.train.rounds)]
    return records, sim.server.params


# --------------------------------------------------------------------------- a user's app


class TinyNet(nn.Module):
    def __init__(self, features: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


def tiny_shards(num_clients: int, seed: int = 0) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    shards = []
    for i in range(num_clients):
        n = 12 + 5 * i
        x = torch.randn(n, 5, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        shards.append(ClientData(x, y))
    return shards


def user_client_app(
    shards: list[ClientData],
    *,
    mods: list[Mod] | None = None,
    loss_key: str | None = PRE_TRAIN_LOSS_KEY,
) -> ClientApp:
    """A typical Flower train function (torch module, optimizer), plus the pre-train loss.

    ``loss_key`` names the metric the loss before training is reported under
    (None: not reported).
    """
    app = ClientApp(mods=[adaquant_mod] if mods is None else mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        shard = shards[int(context.node_config["partition-id"])]
        model = TinyNet()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        metrics: dict[str, float | int] = {NUM_EXAMPLES_KEY: len(shard), "train-steps": 3}
        with torch.no_grad():
            if loss_key is not None:
                metrics[loss_key] = float(F.cross_entropy(model(shard.x), shard.y))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(shard.x), shard.y).backward()
            opt.step()
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        shard = shards[int(context.node_config["partition-id"])]
        model = TinyNet()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        with torch.no_grad():
            loss = float(F.cross_entropy(model(shard.x), shard.y))
        metrics = MetricRecord({"eval-loss": loss, NUM_EXAMPLES_KEY: len(shard)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def initial_arrays(seed: int = 0) -> ArrayRecord:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ArrayRecord(TinyNet().state_dict())
