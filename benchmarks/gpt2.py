"""GPT-2-shaped models with random weights, and the cheap train function the scale benchmarks share.

Nothing is downloaded: the weights are drawn here (GPT-2's own init,
N(0, 0.02)). The shapes are GPT-2's (Radford et al. 2019): token and
position embeddings, ``n_layer`` pre-LayerNorm blocks of causal
self-attention and a 4x MLP, a final LayerNorm, and the LM head tied to the
token embedding (so the state_dict holds each parameter once):

- ``124m``: 12 layers, 768 wide, 12 heads, vocabulary 50257, context 1024
  (124,439,808 parameters);
- ``355m``: 24 layers, 1024 wide, 16 heads (354,823,168);
- ``270m``: 30 layers, 800 wide, 16 heads (271,738,400): a shape whose
  float32 update is over 1 GB (10^9 bytes and 1 GiB), for the gRPC benchmark;
- ``toy``: 2 layers, 512 wide, vocabulary 16384, context 256 (14,825,472),
  for smoke runs and tests.

The train function (:func:`train_step`) is the same for plain Flower and for
adaquantfl: it loads the received arrays, takes one SGD step on a few random
tokens (drawn from the node's partition id and the round, so every run
trains the same way), and replies with the model's state_dict, its loss
before the step as ``pre-train-loss`` (F_i(w_k) on the node's batch) and
``num-examples``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT2", "SHAPES", "GPT2Shape", "build", "meta_model", "train_step"]


@dataclass(frozen=True)
class GPT2Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int = 50257
    context: int = 1024

    @property
    def numel(self) -> int:
        d = self.n_embd
        norms = 2 * 2 * d
        block = norms + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return self.vocab * d + self.context * d + self.n_layer * block + 2 * d


SHAPES = {
    "toy": GPT2Shape(2, 512, 8, vocab=16384, context=256),
    "124m": GPT2Shape(12, 768, 12),
    "270m": GPT2Shape(30, 800, 16),
    "355m": GPT2Shape(24, 1024, 16),
}


class Block(nn.Module):
    def __init__(self, shape: GPT2Shape) -> None:
        super().__init__()
        d = shape.n_embd
        self.n_head = shape.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        heads = [z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, shape: GPT2Shape) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab, shape.n_embd)
        self.wpe = nn.Embedding(shape.context, shape.n_embd)
        self.h = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1])
        x = self.wte(idx) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # the LM head, tied


def build(shape: GPT2Shape, seed: int = 0) -> GPT2:
    """A GPT-2 of ``shape`` with GPT-2's init (weights N(0, 0.02), the projections
    into the residual stream N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm 1/0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = GPT2(shape)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in f".{name}":
                    p.fill_(1.0)
                elif name.endswith("proj.weight"):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * shape.n_layer))
                else:
                    p.normal_(0.0, 0.02)
    return model


def meta_model(shape: GPT2Shape) -> GPT2:
    """A GPT-2 of ``shape`` without storage, to receive a state_dict with ``assign=True``."""
    with torch.device("meta"):
        return GPT2(shape)


def train_step(
    model: GPT2,
    state: dict[str, torch.Tensor],
    *,
    partition: int,
    server_round: int,
    lr: float = 0.1,
    batch: int = 2,
    tokens: int = 32,
) -> tuple[dict[str, torch.Tensor], float, int]:
    """One SGD step from ``state`` on ``batch`` x ``tokens`` random tokens.

    ``state``'s tensors become the model's parameters (``assign=True``: no
    second copy), and each parameter takes its step as soon as its gradient
    is complete (PyTorch's "optimizer step in the backward pass"), so that no
    full set of gradients is ever held: the step needs the model once, as a
    memory-conscious train function would. Returns the new state_dict (the
    model's own tensors), the loss before the step and the number of tokens
    predicted (the node's ``num-examples``).
    """
    model.load_state_dict(state, assign=True)
    del state

    def sgd(p: torch.Tensor) -> None:
        with torch.no_grad():
            p.add_(p.grad, alpha=-lr)  # type: ignore[arg-type]
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(sgd) for p in model.parameters()]
    g = torch.Generator().manual_seed(1_000_003 * server_round + partition)
    idx = torch.randint(model.shape.vocab, (batch, tokens + 1), generator=g)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    for hook in hooks:
        hook.remove()
    return model.state_dict(), loss.item(), batch * tokens
