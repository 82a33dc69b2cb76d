"""lightning_moe.MoE in plain PyTorch: no Lightning, just a module and a training loop.

A tiny byte-level language model (embedding, one MoE feed-forward with a residual, output head)
learns to predict the next byte of a repeated sentence. Read it top to bottom:

    python examples/plain_pytorch.py --steps 60

The MoE layer's load-balancing loss needs no wiring: it reaches the router's gradient by itself,
so the loop backpropagates the task loss only.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe import MoE

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

# --- Data: (input, target) pairs of bytes, the target one byte ahead. ---------------------------
text = b"Mixture-of-Experts layers send each token to a few of many small feed-forward networks. " * 20
data = torch.tensor(list(text), dtype=torch.long)
block_size, batch_size = 32, 16


def random_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) inputs and (B, S) next-byte targets at random offsets."""
    starts = torch.randint(0, len(data) - block_size - 1, (batch_size,))
    inputs = torch.stack([data[s : s + block_size] for s in starts])
    targets = torch.stack([data[s + 1 : s + block_size + 1] for s in starts])
    return inputs, targets


# --- Model: the MoE layer is an ordinary nn.Module taking (..., d_model). ----------------------
class TinyMoEModel(nn.Module):
    def __init__(self, vocab_size: int = 256, d_model: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.moe = MoE(d_model, num_experts=4, top_k=2, d_hidden=128, router="topk")
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)  # (B, S, D)
        x = x + self.moe(self.norm(x))  # (B, S, D): every token goes to 2 of the 4 experts
        return self.head(x)  # (B, S, V)


model = TinyMoEModel()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

# --- Training loop. ----------------------------------------------------------------------------
for step in range(1, args.steps + 1):
    inputs, targets = random_batch()
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    optimizer.zero_grad()
    loss.backward()  # also backpropagates the MoE balance loss, attached inside the layer
    optimizer.step()
    if step % 10 == 0 or step == 1 or step == args.steps:
        print(f"step {step:4d}  loss {loss.item():.3f}")

# --- Routing statistics of the last forward pass. -----------------------------------------------
stats = model.moe.routing_stats
print("tokens per expert:", stats["tokens_per_expert"].tolist())
print(f"balance loss: {stats['aux_loss'].item():.4f}  dropped assignments: {stats['dropped'].item()}")
