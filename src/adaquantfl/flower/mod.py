"""``adaquant_mod``: the client half of AdaQuantFL for any Flower ClientApp.

    app = ClientApp(mods=[adaquant_mod])

The user's train function stays as it is: it receives the global arrays,
trains, and replies with its local arrays and metrics. Around it, the mod

1. reads the node's plan (levels, seed, round, compressor, which arrays
   travel uncompressed) from the ``aq-*`` keys that
   :class:`~adaquantfl.flower.AdaQuant` added to the train ConfigRecord
   (:mod:`adaquantfl.flower.messages`), and takes the received model ``w_k``;
   with a compressed downlink it first rebuilds ``x_k`` from the change
   messages and the replica it keeps in ``Context.state``, and hands the
   train function ``x_k`` in the model's arrays
   (:mod:`adaquantfl.flower.downlink`);
2. calls the train function (``call_next``);
3. forms ``Delta_i = w_i - w_k`` of the compressed arrays, quantizes it at
   ``s_k`` with the noise stream (seed, round, client id, "quantize") and
   encodes it with :func:`adaquantfl.fl.client.compress_update` (DESIGN §2,
   step 3), exactly as the simulator does;
4. replies with the encoded bytes (a uint8 Array), the arrays that travel
   beside the update (BatchNorm statistics, integer buffers) as the train
   function returned them, and the train function's metrics plus the
   mod's ``aq-*`` keys (:mod:`adaquantfl.flower.messages`).

Messages without an AdaQuantFL plan (evaluate, query, or a plain FedAvg's
train) pass through untouched.

Notes
-----
The level policy's input is the pre-training loss ``F_i(w_k)``: the mean loss
of the *received* model on the node's training data, measured before
training. The mod cannot measure it itself (it knows neither the model nor
the data), and it cannot call the app's evaluate function instead: Flower
wraps each registered function separately with the app's mods
(``flwr.clientapp.client_app._get_decorator``), so ``call_next`` inside a
train message always leads to the train function. The mod therefore reads it
from the train reply's MetricRecord:

- ``pre-train-loss`` (``loss_key``) when the reply has it: the exact rule.
  The example app and the experiment runner's Flower engine report it.
- Otherwise ``train_loss`` (``fallback_loss_key``), the training loss that
  Flower's app templates already report and that Flower's own ``QFedAvg``
  reads as a client's loss. A stock train function then works unchanged, but
  the policy follows the loss *during* local training (typically below
  ``F_i(w_k)``), not the paper's ``F(w_k)``; the mod logs a warning once
  per node and sets ``aq-loss-proxy``. ``make_adaquant_mod(fallback_loss_key=None)``
  turns this off.

Either way the value is sent as ``aq-loss``; the user's own metrics are
never changed. A reply with neither is an error (the strategy drops that node
for the round) rather than a silently invented loss.

A node's state lives in its ``Context.state``, which Flower's simulation and
a SuperNode hand to every message of a run (even where each message runs in
a new ``flwr-clientapp`` process), so it survives the rounds the node sits
out. This module alone reads and writes it:

- ``aq-client-state`` (ArrayRecord): ``residual``, the error-feedback residual
  ``e_i``; ``replica``, the downlink model ``x_k`` the node holds;
- ``aq-node-state`` (ConfigRecord): ``replica-round`` and ``layout`` of that
  replica, and ``warned-<key>`` for each warning the node has logged.
"""

from __future__ import annotations

import math
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.logger import log

from adaquantfl.compression.feedback import ClientCompressor
from adaquantfl.fl.client import compress_update
from adaquantfl.flower.downlink import Replica, receive_model
from adaquantfl.flower.layout import ArrayLayout, RecordError
from adaquantfl.flower.messages import (
    CLIENT_STATE_RECORD,
    FLOWER_TRAIN_LOSS_KEY,
    NODE_STATE_RECORD,
    NUM_EXAMPLES_KEY,
    PRE_TRAIN_LOSS_KEY,
    PREFIX,
    Instruction,
    client_id_of,
    probe_reply_content,
    single_array_record,
    single_metric_record,
    train_reply_content,
    with_content,
)
from adaquantfl.validation import as_int

__all__ = ["adaquant_mod", "log_once", "make_adaquant_mod"]


def make_adaquant_mod(
    *,
    loss_key: str = PRE_TRAIN_LOSS_KEY,
    fallback_loss_key: str | None = FLOWER_TRAIN_LOSS_KEY,
) -> Mod:
    """Build the client mod; ``loss_key`` names the train reply's pre-training loss metric.

    Parameters
    ----------
    loss_key : str
        Metric of the user's train reply that holds ``F_i(w_k)``.
    fallback_loss_key : str or None
        Metric used instead when the reply has no ``loss_key`` (with a warning,
        once per node); None makes a missing ``loss_key`` an error. See the module notes.

    Returns
    -------
    Mod
        ``(msg, context, call_next) -> msg``, for ``ClientApp(mods=[...])``.
    """
    for name, key in (("loss_key", loss_key), ("fallback_loss_key", fallback_loss_key)):
        if key is not None and (not isinstance(key, str) or not key or key.startswith(PREFIX)):
            raise ValueError(f"{name} must be the name of a metric of the train reply, got {key!r}")

    def read_loss(metrics: MetricRecord, context: Context) -> tuple[float, bool]:
        """The loss to report, and whether it is the fallback."""
        if loss_key in metrics or fallback_loss_key is None or fallback_loss_key not in metrics:
            # The exact rule, or the error that names both keys.
            return _loss(metrics, loss_key, fallback_loss_key), False
        log_once(
            "loss-proxy",
            WARNING,
            "adaquant_mod: the train reply has no %r metric; the AdaQuantFL policy is fed %r "
            "(the loss during local training) instead of the received model's loss before "
            "training. Report %r for the exact rule. (Logged once per node.)",
            loss_key,
            fallback_loss_key,
            loss_key,
            context=context,
        )
        return _loss(metrics, fallback_loss_key, None), True

    def adaquant_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        plan = Instruction.of(msg)
        if plan is None:
            return call_next(msg, context)
        client_id = client_id_of(context)
        if plan.probe:
            # The strategy only wants to know which client this node is.
            return Message(probe_reply_content(client_id), reply_to=msg)
        name, received = single_array_record(msg.content, "the train instruction")
        if plan.downlink is not None:
            model, replica = receive_model(
                received, plan.downlink, plan.round_idx, load_replica(context)
            )
            store_replica(context, replica)
            params, layout = replica.params, replica.layout
            # The train function gets x_k in the model's arrays (a copy: the
            # instruction itself stays as the server sent it).
            train_msg = with_content(msg, RecordDict({**dict(msg.content.items()), name: model}))
        else:
            layout = ArrayLayout.of(received, plan.uncompressed)
            params = layout.flatten(received)
            train_msg = msg

        reply = call_next(train_msg, context)
        if reply.has_error():
            return reply
        _, local_record = single_array_record(reply.content, "the train function's reply")
        metrics_name, metrics = single_metric_record(reply.content, "the train function's reply")
        local = layout.flatten(local_record)
        side = layout.side_arrays(local_record)
        loss, proxy = read_loss(metrics, context)
        _num_examples(metrics)  # the server's weight n_i: fail here, with the reason

        client = ClientCompressor(plan.compressor)
        load_client_state(context, client)
        encoded = compress_update(
            local - params,
            levels=plan.levels,
            compressor=client,
            seed=plan.seed,
            round_idx=plan.round_idx,
            client_id=client_id,
        )
        store_client_state(context, client)
        content = train_reply_content(
            (name, metrics_name),
            encoded.payload,
            side,
            metrics,
            client_id=client_id,
            loss=loss,
            loss_proxy=proxy,
            update_norm=encoded.update_norm,
            distortion=encoded.distortion,
        )
        return Message(content, reply_to=msg)

    adaquant_mod.__doc__ = __doc__
    return adaquant_mod


#: The mod with the default ``pre-train-loss`` convention (see the module notes).
adaquant_mod: Mod = make_adaquant_mod()


def _loss(metrics: MetricRecord, key: str, fallback: str | None) -> float:
    if key not in metrics:
        also = f" (nor the fallback {fallback!r})" if fallback is not None else ""
        raise RecordError(
            f"the train function's reply has no {key!r} metric{also}. adaquant_mod needs "
            "F_i(w_k), the mean loss of the received model on the local training data before "
            f"training (the AdaQuantFL policy's input): add it to the reply's MetricRecord as "
            f"{key!r}, or build the mod with make_adaquant_mod(loss_key=...) to name the metric "
            "that holds it"
        )
    value = metrics[key]
    if isinstance(value, list) or not math.isfinite(float(value)) or float(value) < 0:
        raise RecordError(f"metric {key!r} must be a finite non-negative number, got {value!r}")
    return float(value)


def _num_examples(metrics: MetricRecord) -> int:
    value = metrics.get(NUM_EXAMPLES_KEY)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    n = as_int(value)
    if n is None or n < 1:
        raise RecordError(
            f"the train function's reply must report {NUM_EXAMPLES_KEY!r} as a positive integer "
            f"(the client's aggregation weight n_i), got {value!r}"
        )
    return n


# --------------------------------------------------------------------------- node state

# The entries of the aq-client-state (arrays) and aq-node-state (config) records.
_RESIDUAL = "residual"
_REPLICA = "replica"
_REPLICA_ROUND = "replica-round"
_REPLICA_LAYOUT = "layout"


def load_client_state(context: Context, client: ClientCompressor) -> None:
    """Restore what the node's end of the compressor kept (its error-feedback residual)."""
    record = _state_arrays(context)
    residual = _tensor(record[_RESIDUAL]) if _RESIDUAL in record else None
    client.load_state_dict({"residual": residual})


def store_client_state(context: Context, client: ClientCompressor) -> None:
    """Keep what the node's end of the compressor must carry into its next round."""
    residual = client.state_dict()["residual"]
    if residual is None:
        return
    record = _state_arrays(context)
    record[_RESIDUAL] = Array(residual.detach().cpu().numpy())
    context.state[CLIENT_STATE_RECORD] = record


def load_replica(context: Context) -> Replica | None:
    """The downlink model the node holds, if any."""
    record = _state_arrays(context)
    node = _state_config(context)
    if _REPLICA not in record or _REPLICA_ROUND not in node or _REPLICA_LAYOUT not in node:
        return None
    return Replica(
        _tensor(record[_REPLICA]),
        int(node[_REPLICA_ROUND]),  # type: ignore[arg-type]
        ArrayLayout.from_json(str(node[_REPLICA_LAYOUT]), "the node's stored downlink layout"),
    )


def store_replica(context: Context, replica: Replica) -> None:
    """Keep ``replica`` as the node's downlink model."""
    record = _state_arrays(context)
    record[_REPLICA] = Array(replica.params.detach().cpu().numpy())
    context.state[CLIENT_STATE_RECORD] = record
    node = _state_config(context)
    node[_REPLICA_ROUND] = replica.round_idx
    node[_REPLICA_LAYOUT] = replica.layout.to_json()
    context.state[NODE_STATE_RECORD] = node


#: Messages this process has logged (a simulation's nodes share the process
#: with each other and with the ServerApp; a deployment's node starts a process per message).
_LOGGED: set[str] = set()


def log_once(
    key: str, level: int, message: str, *args: object, context: Context | None = None
) -> None:
    """Log ``message`` through Flower's logger once per process, and once per node.

    With the node's ``context``, its ``Context.state`` remembers the warning,
    so a SuperNode that starts a new process for every message still logs it
    once. The strategy calls it without one (once per ServerApp process).
    """
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    if context is not None:
        node = _state_config(context)
        if node.get(f"warned-{key}"):
            return
        node[f"warned-{key}"] = True
        context.state[NODE_STATE_RECORD] = node
    log(level, message, *args)


def _state_config(context: Context) -> ConfigRecord:
    return context.state.config_records.get(NODE_STATE_RECORD, ConfigRecord())


def _state_arrays(context: Context) -> ArrayRecord:
    return context.state.array_records.get(CLIENT_STATE_RECORD, ArrayRecord())


def _tensor(array: Array) -> torch.Tensor:
    return torch.from_numpy(array.numpy().astype(np.float32, copy=True)).reshape(-1)
