"""The Mixture-of-Experts feed-forward layer.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K top-k, N assignments.

The forward pass is five steps, each a method: :meth:`MoE.route` asks the router for assignments,
:meth:`MoE.apply_capacity` drops what exceeds each expert's capacity, :meth:`MoE.permute` sorts the
surviving assignments into expert-contiguous rows, :meth:`MoE.compute_experts` runs the experts
(through a dispatcher when experts live on other devices), and :meth:`MoE.unpermute` sums the
weighted outputs back into token order. The balance and z losses are attached to the output so
that they reach the router's gradient without the user adding them to the training loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_moe import ops
from lightning_moe.layers.activations import check_activation
from lightning_moe.layers.capacity import capacity_mask, expert_capacity
from lightning_moe.layers.experts import GroupedExperts, ModuleListExperts
from lightning_moe.ops.token_grad import TokenGradSum, summing_token_grads
from lightning_moe.routers import Router, Routing, build_router


class TokenDispatcher(Protocol):
    """Moves expert-sorted rows to the devices that hold their experts, and back.

    The single-device layer uses none. Expert parallelism (``lightning_moe.parallel``) supplies one
    that exchanges rows between ranks; the layer itself never touches a process group.
    """

    def dispatch(self, x_ND: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor]:
        """Send rows sorted by global expert; return the rows for the local experts, grouped by
        local expert, and (local E,) their counts."""
        ...

    def combine(self, y_MD: Tensor) -> Tensor:
        """Return the local experts' outputs to the ranks and order that :meth:`dispatch` took
        them from."""
        ...


class _AttachLosses(torch.autograd.Function):
    """Identity on ``output`` whose backward also feeds the gradient of ``sum_i weight_i * loss_i``
    times ``scale`` to each ``loss_i``: the constant ``scale * weight_i``.

    The weighted sum itself is never formed: nothing reads its value, and each term would cost a
    kernel launch forward and backward.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, scale: float, weights: tuple[float, ...], *losses: Tensor) -> Tensor:
        ctx.grads = [(scale * weight, loss.shape) for weight, loss in zip(weights, losses, strict=True)]
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        device = grad_output.device
        grad_losses = (torch.full(shape, grad, dtype=torch.float32, device=device) for grad, shape in ctx.grads)
        return grad_output, None, None, *grad_losses


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer usable in any PyTorch model.

    Args:
        d_model: Model dimension D of the input and output.
        num_experts: Global number of routed experts E.
        top_k: Experts per token K.
        d_hidden: Expert hidden dimension F; defaults to ``4 * d_model``.
        activation: "gelu", "gelu_tanh", "relu", "silu", "swiglu" or "geglu".
        router: A router name ("topk", "noisy_topk", "switch", "gshard", "sigmoid",
            "expert_choice") or a :class:`~lightning_moe.routers.Router` instance.
        capacity_factor: ``None`` for dropless routing; otherwise each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` assignments, the lowest-priority ones dropped.
        num_shared_experts: Always-on experts whose outputs are added to every token's output.
        bias: Give the built-in experts biases ``b1`` (E, F) and ``b2`` (E, D).
        experts: A callable returning one expert module (called E times), or a list of E modules.
            Each maps (N, D) to (N, D). Replaces the built-in experts.
        aux_loss_weight: Weight of the router's balance loss in the gradient.
        z_loss_weight: Weight of the router z-loss in the gradient.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        d_hidden: int | None = None,
        activation: str = "gelu",
        router: str | Router = "topk",
        capacity_factor: float | None = None,
        num_shared_experts: int = 0,
        bias: bool = False,
        experts: Callable[[], nn.Module] | Sequence[nn.Module] | None = None,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        _validate(d_model, num_experts, top_k, d_hidden, activation, capacity_factor, num_shared_experts)
        _validate_weights(aux_loss_weight, z_loss_weight)
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.d_hidden = d_hidden
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight
        # Multiplies the losses' gradient; a training loop sets it to match its loss scaling
        # (1 / accumulation steps, times an fp16 loss scale) before the forward pass, which reads it.
        # MoELightningModule does so itself.
        self.aux_loss_scale = 1.0
        self.dispatcher: TokenDispatcher | None = None
        # Two draws from the global CPU RNG, before anything else, seed every expert: expert e's
        # initial weights then depend neither on how many experts this process holds nor on
        # whether the layer is built on the meta device (where parameter init draws nothing).
        expert_seed, shared_seed = torch.randint(0, 2**62, (2,), device="cpu").tolist()
        self.router = _make_router(router, d_model, num_experts, top_k, capacity_factor)
        self.experts = _make_experts(experts, num_experts, d_model, d_hidden, activation, bias, expert_seed)
        self.shared_experts = None
        if num_shared_experts:
            self.shared_experts = GroupedExperts(num_shared_experts, d_model, d_hidden, activation, bias, shared_seed)
        self.routing_stats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Route each token to its experts and sum their weighted outputs.

        Args:
            x: (..., D) tokens of any floating dtype and leading shape.

        Returns:
            Tensor of the shape and dtype of ``x``.
        """
        self._check_input(x)
        # Tokens already (T, D) are taken as they are: a reshape would still add a view and its
        # autograd node, host time at every step for nothing.
        x_TD, rows_TD = self._fork_tokens(x if x.dim() == 2 else x.reshape(-1, self.d_model))
        token_grads = self._token_grad_sum(x_TD, rows_TD)
        if token_grads is None:
            routing = self.route(x_TD)
        else:
            with summing_token_grads(token_grads):
                routing = self.route(x_TD)
        kept_routing = self.apply_capacity(routing, num_tokens=x_TD.shape[0])
        # Without shared experts to add, the combine writes the output dtype directly.
        out_dtype = torch.float32 if self.shared_experts is not None else x.dtype
        if self._all_tokens_to_one_expert(kept_routing, x_TD.shape[0]):
            out_TD = self._single_expert_forward(x_TD, kept_routing, out_dtype)
            tokens_per_kept_expert = kept_routing.token_ids.new_full((1,), x_TD.shape[0])
        else:
            token_offsets = kept_routing.token_offsets
            if token_offsets is None:
                token_offsets = ops.token_offsets(kept_routing.token_ids, x_TD.shape[0])
            rows_TD = self._rows_for_experts(x_TD) if rows_TD is None else rows_TD
            if self._fused_experts_apply(rows_TD, kept_routing):
                assert isinstance(self.experts, GroupedExperts)
                order: Tensor | None
                order, inverse, tokens_per_kept_expert, expert_ends = ops.sort_by_expert_with_ends(
                    kept_routing.expert_ids, self.num_experts
                )
                # The order serves only a token-choice layout with one assignment per token; else it
                # is dropped here rather than held through the experts (peak memory).
                if kept_routing.token_offsets is None or inverse.shape[0] != x_TD.shape[0]:
                    order = None
                joined = token_grads if token_grads is not None and token_grads.joined else None
                out_TD = self.experts.forward_and_combine(
                    rows_TD, inverse, token_offsets, kept_routing.weights, expert_ends, out_dtype, order, joined
                )
            else:
                x_ND, inverse, tokens_per_kept_expert = self.permute(rows_TD, kept_routing, token_offsets)
                y_ND = self.compute_experts(x_ND, tokens_per_kept_expert)
                out_TD = self.unpermute(y_ND, kept_routing, inverse, token_offsets, out_dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self._shared_forward(x_TD)
        out = out_TD.to(x.dtype)
        out = out if out.shape == x.shape else out.reshape(x.shape)
        # Dropless, the sort has counted the router's assignments already; with a capacity, the
        # router's own counts (when it made them) are those before the drop.
        tokens_per_expert = tokens_per_kept_expert
        if kept_routing is not routing:
            tokens_per_expert = (
                routing.tokens_per_expert
                if routing.tokens_per_expert is not None
                else ops.expert_histogram(routing.expert_ids, self.num_experts)
            )
        self._record_stats(routing, kept_routing, tokens_per_expert)
        return self._attach_losses(out, routing)

    def route(self, x_TD: Tensor) -> Routing:
        """Assignments of tokens ``x_TD`` (T, D) to experts, from the router."""
        return self.router(x_TD)

    def apply_capacity(self, routing: Routing, num_tokens: int) -> Routing:
        """Drop the assignments beyond each expert's capacity; dropless when no capacity is set."""
        if self.capacity_factor is None:
            return routing
        capacity = expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)
        kept = capacity_mask(routing.expert_ids, routing.priorities, routing.token_ids, self.num_experts, capacity)
        return routing.select(kept)

    def permute(self, x_TD: Tensor, routing: Routing, token_offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gather one row per assignment, sorted (stably) by expert.

        Args:
            x_TD: (T, D) tokens.
            routing: Token-major assignments.
            token_offsets: (T + 1,) start of each token's assignments.

        Returns:
            ``x_ND`` (N, D) rows, ``inverse`` (N,) the row of each assignment, and
            ``tokens_per_expert`` (E,) the row count of each expert.
        """
        _, inverse, tokens_per_expert = ops.sort_by_expert(routing.expert_ids, self.num_experts)
        return ops.permute(x_TD, routing.token_ids, inverse, token_offsets), inverse, tokens_per_expert

    def compute_experts(self, x_ND: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Run the experts on expert-sorted rows, through the dispatcher when there is one."""
        if self.dispatcher is None:
            return self.experts(x_ND, tokens_per_expert)
        x_local, tokens_per_local_expert = self.dispatcher.dispatch(x_ND, tokens_per_expert)
        return self.dispatcher.combine(self.experts(x_local, tokens_per_local_expert))

    def unpermute(
        self, y_ND: Tensor, routing: Routing, inverse: Tensor, token_offsets: Tensor, out_dtype: torch.dtype
    ) -> Tensor:
        """Sum the weighted expert outputs back into token order (accumulated in float32); (T, D)."""
        return ops.unpermute(
            y_ND, routing.token_ids, inverse, routing.weights, token_offsets.shape[0] - 1, out_dtype, token_offsets
        )

    def _fused_experts_apply(self, rows_TD: Tensor, routing: Routing) -> bool:
        """Whether :meth:`permute`, :meth:`compute_experts` and :meth:`unpermute` may run as
        :meth:`GroupedExperts.forward_and_combine`, fewer autograd nodes with the same results:
        built-in grouped experts (not a subclass) that take these rows
        (:meth:`GroupedExperts.can_forward_and_combine`), called without hooks, no dispatcher, and
        none of the three methods overridden by a subclass."""
        experts = self.experts
        if self.dispatcher is not None or type(experts) is not GroupedExperts or _has_hooks(experts):
            return False
        cls = type(self)
        if (cls.permute, cls.compute_experts, cls.unpermute) != (MoE.permute, MoE.compute_experts, MoE.unpermute):
            return False
        return experts.can_forward_and_combine(rows_TD, routing.expert_ids.shape[0])

    def _fork_tokens(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """The tokens for the router, and the tokens for the experts (:meth:`_rows_for_experts`).

        When the experts compute in a narrower dtype, :func:`lightning_moe.ops.fork_cast` makes
        both, so that the backward sums the two gradients in one pass. With one expert the second
        is None: that layer may skip the permutation, and the cast with it.
        """
        if self.num_experts == 1:
            return x_TD, None
        dtype = self._narrower_expert_dtype(x_TD)
        return (x_TD, x_TD) if dtype is None else ops.fork_cast(x_TD, dtype)

    def _token_grad_sum(self, x_TD: Tensor, rows_TD: Tensor | None) -> TokenGradSum | None:
        """Eager, where the router and the experts take the same tokens (which need a gradient): a
        sum of their gradients that the router's autograd node may join, to add the experts'
        gradient of the tokens into its own (:mod:`lightning_moe.ops.token_grad`)."""
        if rows_TD is not x_TD or not x_TD.requires_grad or torch.compiler.is_compiling():
            return None
        return TokenGradSum(x_TD)

    def _rows_for_experts(self, x_TD: Tensor) -> Tensor:
        """The tokens in the dtype the built-in experts compute in, when that is narrower.

        Under autocast the tokens usually arrive in float32 while the expert GEMMs run in bf16:
        casting the T tokens before the permutation, rather than the T*K rows after it, halves the
        bytes the permutation (and its backward) moves and skips a cast of the rows, as an
        ``nn.Linear`` under autocast casts its input once. The values are the same either way.
        """
        dtype = self._narrower_expert_dtype(x_TD)
        return x_TD if dtype is None else ops.cast(x_TD, dtype)

    def _narrower_expert_dtype(self, x_TD: Tensor) -> torch.dtype | None:
        """The dtype the built-in experts compute in, when it is narrower than the tokens'."""
        if not isinstance(self.experts, GroupedExperts):
            return None
        dtype = self.experts.compute_dtype(x_TD)
        return dtype if torch.finfo(dtype).bits < torch.finfo(x_TD.dtype).bits else None

    def _all_tokens_to_one_expert(self, routing: Routing, num_tokens: int) -> bool:
        """Whether the assignments are exactly token t -> the only expert, for every t in order."""
        return self.num_experts == 1 and self.dispatcher is None and routing.token_ids.numel() == num_tokens

    def _single_expert_forward(self, x_TD: Tensor, routing: Routing, out_dtype: torch.dtype) -> Tensor:
        """One expert, one assignment per token, in token order: no sort, gather or combine needed,
        so a 1-expert layer runs the dense FFN it replaces plus the router."""
        if isinstance(self.experts, GroupedExperts):
            # The plain GEMMs of one expert run faster than a grouped GEMM of one group.
            # Autocast casts for the matmuls itself; otherwise compute in the weights' dtype.
            autocast = torch.is_autocast_enabled(x_TD.device.type)
            y_TD = self.experts.single_expert_forward(x_TD if autocast else x_TD.to(self.experts.w1.dtype))
        else:
            y_TD = self.experts(x_TD, routing.token_ids.new_full((1,), x_TD.shape[0]))
        if self.router.single_expert_weight_is_one:
            return y_TD.to(out_dtype)  # scaling by exactly 1, whose gradient is exactly 0
        if y_TD.dtype == out_dtype:
            return y_TD * routing.weights.to(out_dtype).unsqueeze(-1)
        return (y_TD.float() * routing.weights.unsqueeze(-1)).to(out_dtype)

    def _shared_forward(self, x_TD: Tensor) -> Tensor:
        assert self.shared_experts is not None
        x_in = x_TD.to(self.shared_experts.w1.dtype)
        outputs = [expert(x_in) for expert in self.shared_experts.expert_functions()]
        return torch.stack(outputs).float().sum(dim=0)

    def _attach_losses(self, out: Tensor, routing: Routing) -> Tensor:
        if not torch.is_grad_enabled():
            return out
        terms = [(self.aux_loss_weight, routing.aux_loss), (self.z_loss_weight, routing.z_loss)]
        terms = [(weight, loss) for weight, loss in terms if weight != 0 and loss.requires_grad]
        if not terms:
            return out
        weights, losses = zip(*terms, strict=True)
        return _AttachLosses.apply(out, self.aux_loss_scale, weights, *losses)

    def _record_stats(self, routing: Routing, kept: Routing, tokens_per_expert: Tensor) -> None:
        assignments = routing.expert_ids.numel()
        # 0-d int64 CPU tensors, as torch.tensor(int) makes them, at a third of its host time.
        self.routing_stats = {
            "tokens_per_expert": tokens_per_expert.detach(),
            "dropped": torch.scalar_tensor(assignments - kept.expert_ids.numel(), dtype=torch.int64),
            "assignments": torch.scalar_tensor(assignments, dtype=torch.int64),
            "aux_loss": routing.aux_loss.detach(),
            "z_loss": routing.z_loss.detach(),
        }

    def _check_input(self, x: Tensor) -> None:
        if not torch.is_floating_point(x):
            raise TypeError(f"MoE expects a floating-point input, got dtype {x.dtype}; cast it, e.g. x.float().")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"MoE expects inputs of shape (..., d_model={self.d_model}), got {tuple(x.shape)}; "
                f"pass tokens whose last dimension is {self.d_model}, or build the layer for your model's width."
            )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"d_hidden={self.d_hidden}, capacity_factor={self.capacity_factor}"
        )


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks, its own or global ones."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    return any(own) or any(global_hooks)


def _make_router(
    router: str | Router, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None
) -> Router:
    if isinstance(router, str):
        # Expert choice is defined by its capacity; dropless has no meaning there, so None means 1.0.
        kwargs = {"capacity_factor": capacity_factor or 1.0} if router == "expert_choice" else {}
        return build_router(router, d_model, num_experts, top_k, **kwargs)
    if not isinstance(router, Router):
        raise TypeError(f"router must be a router name or a Router instance, got {type(router).__name__}.")
    mismatched = {
        name: (getattr(router, name), value)
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k))
        if getattr(router, name) != value
    }
    if mismatched:
        details = ", ".join(f"router.{k}={got} but MoE {k}={want}" for k, (got, want) in mismatched.items())
        raise ValueError(f"The router does not match the layer: {details}; build both with the same values.")
    return router


def _make_experts(
    experts: Callable[[], nn.Module] | Sequence[nn.Module] | None,
    num_experts: int,
    d_model: int,
    d_hidden: int,
    activation: str,
    bias: bool,
    seed: int,
) -> GroupedExperts | ModuleListExperts:
    if experts is None:
        return GroupedExperts(num_experts, d_model, d_hidden, activation, bias, seed)
    if isinstance(experts, nn.Module) and not isinstance(experts, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            "experts= takes a callable that returns a new module, or a list of modules; got a single "
            f"{type(experts).__name__}. Pass `experts=lambda: MyExpert(...)`."
        )
    if isinstance(experts, Sequence) or isinstance(experts, (nn.ModuleList, nn.Sequential)):
        modules = list(experts)
        if len(modules) != num_experts:
            raise ValueError(
                f"experts= lists {len(modules)} modules but num_experts={num_experts}; give one per expert."
            )
        return ModuleListExperts(modules)
    if callable(experts):
        return ModuleListExperts.from_factory(experts, num_experts, seed)
    raise TypeError(f"experts= must be a callable or a list of modules, got {type(experts).__name__}.")


def _validate(
    d_model: int,
    num_experts: int,
    top_k: int,
    d_hidden: int,
    activation: str,
    capacity_factor: float | None,
    num_shared_experts: int,
) -> None:
    for name, value in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k), ("d_hidden", d_hidden)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}; choose top_k <= num_experts.")
    check_activation(activation)
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}; use None for dropless routing.")
    if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
        raise ValueError(f"num_shared_experts must be a non-negative int, got {num_shared_experts!r}.")


def _validate_weights(aux_loss_weight: float, z_loss_weight: float) -> None:
    for name, value in (("aux_loss_weight", aux_loss_weight), ("z_loss_weight", z_loss_weight)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
