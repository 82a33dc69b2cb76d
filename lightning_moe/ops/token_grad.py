"""One gradient of a layer's tokens handed from the experts' autograd node to the router's.

Shape legend: T tokens, D model dim.

An MoE layer's tokens ``x_TD`` feed two autograd nodes: the router's (its logits and routing,
:func:`lightning_moe.ops.router_topk_route`) and the experts' (permutation and first projection,
:func:`lightning_moe.ops.expert_mlp.expert_mlp`). Autograd adds their two gradients of ``x_TD``
with a pass of its own over (T, D), which reads both and writes the sum. With a
:class:`TokenGradSum` shared by the two nodes, the experts' node hands its gradient over instead
of returning it, and the router's node adds it in the epilogue of its own ``grad_x`` kernel: the
bits of autograd's bf16 addition, one pass over (T, D) fewer.

The experts' backward runs first: their node is made after the router's, and autograd runs the
later of two ready nodes first. The hand-over does not rely on that. If the router's node ran
first it would find nothing to add, mark the sum taken, and the experts' node would then return
its gradient to autograd as usual. A node whose backward never runs (a gradient asked only of the
experts' weights) leaves nothing half done: the tokens' gradient was not asked for.

The layer opens a sum around its router call (:func:`summing_token_grads`). The router's node joins
it (:func:`join_token_grad_sum`) only for the layer's tokens themselves, contiguous, not for a copy
or a function of them such as a jittered input, whose gradient reaches the tokens through further
nodes. The layer hands the sum to its experts only if the router joined and the experts take the
same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor


class TokenGradSum:
    """The meeting point of two autograd nodes' gradients of the same tokens for one forward.

    Args:
        tokens: The tokens both nodes take; held only until the router's node joins or the
            layer's router call ends.
    """

    def __init__(self, tokens: Tensor) -> None:
        self._tokens: Tensor | None = tokens
        self._grad: Tensor | None = None
        self._taken = False
        self.joined = False

    def join(self, x_TD: Tensor) -> bool:
        """Whether the router's node, which takes ``x_TD``, adds the other gradient into its own:
        only when ``x_TD`` is the layer's tokens themselves (and once)."""
        if self.joined or self._tokens is None or x_TD is not self._tokens or not x_TD.is_contiguous():
            return False
        self.joined, self._tokens = True, None
        return True

    def release_tokens(self) -> None:
        """Drop the reference to the tokens (the router call is over)."""
        self._tokens = None

    def give(self, grad_TD: Tensor) -> bool:
        """The experts' node: hand over ``grad_TD``. True if the router's node will add it (the
        caller then returns no gradient of its own); False if that node has run already."""
        if self._taken:
            return False
        self._grad = grad_TD
        return True

    def take(self) -> Tensor | None:
        """The router's node: the gradient handed over, if any, to add into its own; the sum is
        taken from then on (a later :meth:`give` is refused)."""
        grad, self._grad = self._grad, None
        self._taken = True
        return grad


_CURRENT: ContextVar[TokenGradSum | None] = ContextVar("lightning_moe_token_grad_sum", default=None)


@contextmanager
def summing_token_grads(token_grads: TokenGradSum | None) -> Iterator[None]:
    """Make ``token_grads`` the sum a router's node may join while the block runs (None: none)."""
    reset = _CURRENT.set(token_grads)
    try:
        yield
    finally:
        _CURRENT.reset(reset)
        if token_grads is not None:
            token_grads.release_tokens()


def join_token_grad_sum(x_TD: Tensor) -> TokenGradSum | None:
    """The open :class:`TokenGradSum` if the router's node taking ``x_TD`` joins it, else None."""
    token_grads = _CURRENT.get()
    return token_grads if token_grads is not None and token_grads.join(x_TD) else None
