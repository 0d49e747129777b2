"""ClientApp: a standard Flower train function, with adaquant_mod added.

The mod computes the update against the received arrays, quantizes it at the
levels the server asked for and replies with the codec's bytes. The train
function reports ``pre-train-loss`` (F_i(w_k), the mean loss of the received
model on the local training data, before training) next to the usual
``num-examples``, so that the schedule follows the exact rule (without it the
mod falls back to ``train_loss``, see docs/flower.md).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from task import load_data, make_model, mean_loss, train

from adaquantfl.flower import adaquant_mod

app = ClientApp(mods=[adaquant_mod])


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    run = context.run_config
    partition_id = int(context.node_config["partition-id"])
    data = load_data(
        str(run["dataset"]), int(context.node_config["num-partitions"]), int(run["seed"])
    )
    shard = data.clients[partition_id]
    model = make_model(data, int(run["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    pre_train_loss, _ = mean_loss(model, shard)
    train_loss = train(
        model,
        shard,
        steps=int(run["local-steps"]),
        batch_size=int(run["batch-size"]),
        lr=float(run["lr"]),
        seed=int(run["seed"]),
        server_round=int(msg.content["config"]["server-round"]),
        partition_id=partition_id,
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {"pre-train-loss": pre_train_loss, "train-loss": train_loss, "num-examples": len(shard)}
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    run = context.run_config
    partition_id = int(context.node_config["partition-id"])
    data = load_data(
        str(run["dataset"]), int(context.node_config["num-partitions"]), int(run["seed"])
    )
    model = make_model(data, int(run["seed"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = mean_loss(model, data.clients[partition_id])
    metrics = MetricRecord(
        {
            "eval-loss": loss,
            "eval-accuracy": accuracy,
            "num-examples": len(data.clients[partition_id]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
