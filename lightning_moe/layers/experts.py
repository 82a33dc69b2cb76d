"""Expert feed-forward networks.

Shape legend: N tokens routed to the experts (sorted by expert), D model dim, F expert hidden,
E local experts.

Experts receive their tokens already grouped: rows ``[offset_e, offset_e + tokens_per_expert[e])``
of ``x_ND`` belong to local expert e. :class:`GroupedExperts` runs them as grouped GEMMs where torch
has a fused kernel for it (CUDA, bfloat16, compute capability 9.0+; see
:mod:`lightning_moe.ops.grouped_mm`), with no host sync; elsewhere it loops over the experts.

Each expert e is initialised from its own random stream, seeded by the layer's seed and its
*global* index, so global expert e starts with the same weights whether the layer holds all
experts or only a shard of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import cast, overload

import torch
from torch import Tensor, nn

from lightning_moe.layers.activations import check_activation, is_glu
from lightning_moe.ops.activation import GluKind, KernelActivation, glu
from lightning_moe.ops.activation import activation as apply_activation
from lightning_moe.ops.cast import cast as cast_op
from lightning_moe.ops.expert_mlp import expert_mlp, expert_mlp_usable
from lightning_moe.ops.grouped_mm import grouped_mlp, grouped_mm_usable
from lightning_moe.ops.token_grad import TokenGradSum


def expert_generator(seed: int, global_expert: int) -> torch.Generator:
    """A CPU generator dedicated to one global expert of a layer seeded with ``seed``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + global_expert) % (2**63))


class GroupedExperts(nn.Module):
    """E MLP experts held as stacked weights.

    Expert e computes ``w2[e] @ act(w1[e] @ x + b1[e]) + b2[e]``, or for GLU activations
    ``w2[e] @ (act(w1[e] @ x) * (w3[e] @ x))`` (biases added likewise when ``bias=True``).

    Args:
        num_experts: Number of experts held here (E).
        d_model: Model dimension D.
        d_hidden: Expert hidden dimension F.
        activation: Activation name (see :mod:`lightning_moe.layers.activations`).
        bias: Give each projection a bias.
        seed: Seed of the per-expert initialisation streams.
        expert_offset: Global index of the first expert held here.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        seed: int = 0,
        expert_offset: int = 0,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.activation = activation
        self.seed = seed
        self.expert_offset = expert_offset
        # The name of the fused act(w1 x) * (w3 x) op, for GLU activations.
        self.glu_kind: GluKind | None = cast(GluKind, activation) if is_glu(activation) else None
        self.w1 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # (E, F, D)
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden))  # (E, D, F)
        self.w3 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model)) if is_glu(activation) else None
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise each expert like ``nn.Linear`` from its own seeded stream."""
        if self.w1.is_meta:
            return
        bound_in = 1.0 / math.sqrt(self.d_model)
        bound_hidden = 1.0 / math.sqrt(self.d_hidden)
        for local in range(self.num_experts):
            generator = expert_generator(self.seed, self.expert_offset + local)
            draws = [(self.w1, bound_in), (self.w3, bound_in), (self.b1, bound_in)]
            draws += [(self.w2, bound_hidden), (self.b2, bound_hidden)]
            for param, bound in draws:
                if param is not None:
                    values = torch.rand(param.shape[1:], generator=generator, device="cpu") * (2 * bound) - bound
                    param[local].copy_(values)

    def expert_forward(self, local: int, x_ND: Tensor) -> Tensor:
        """Apply local expert ``local`` to its tokens ``x_ND`` (N, D) -> (N, D).

        To run several experts, take them from :meth:`expert_functions` instead: indexing a
        stacked weight once per expert makes its backward fill a zero tensor of the whole stack
        per expert.
        """
        w3_FD = None if self.w3 is None else self.w3[local]
        b1_F = None if self.b1 is None else self.b1[local]
        b2_D = None if self.b2 is None else self.b2[local]
        return self._mlp(self.w1[local], self.w2[local], w3_FD, b1_F, b2_D, x_ND)

    def expert_functions(self) -> list[Callable[[Tensor], Tensor]]:
        """One function per local expert, mapping its tokens (N, D) to (N, D), like
        :meth:`expert_forward`. Each stacked weight is unbound once for all of them, so the
        backward stacks the experts' gradients once (zeros for experts left out)."""
        stacks = (self.w1, self.w2, self.w3, self.b1, self.b2)
        per_expert = [[None] * self.num_experts if p is None else p.unbind(0) for p in stacks]
        return [functools.partial(self._mlp, *weights) for weights in zip(*per_expert, strict=True)]

    def single_expert_forward(self, x_ND: Tensor) -> Tensor:
        """:meth:`expert_forward` of the only expert, through views rather than indexing, whose
        backward would fill a zero tensor of each stacked weight's size."""
        assert self.num_experts == 1, "single_expert_forward is for layers of one expert"
        w3_FD, b1_F, b2_D = (None if p is None else p.squeeze(0) for p in (self.w3, self.b1, self.b2))
        return self._mlp(self.w1.squeeze(0), self.w2.squeeze(0), w3_FD, b1_F, b2_D, x_ND)

    def _mlp(
        self,
        w1_FD: Tensor,
        w2_DF: Tensor,
        w3_FD: Tensor | None,
        b1_F: Tensor | None,
        b2_D: Tensor | None,
        x_ND: Tensor,
    ) -> Tensor:
        """One expert's MLP on its rows ``x_ND``, given that expert's weights (the rows last, so
        that the weights can be bound first)."""
        hidden_NF = x_ND @ w1_FD.t()
        if b1_F is not None:
            hidden_NF = hidden_NF + b1_F
        if w3_FD is None:  # one fused op on CUDA
            hidden_NF = apply_activation(hidden_NF, cast(KernelActivation, self.activation))
        else:  # act and gate as one fused op on CUDA
            assert self.glu_kind is not None
            hidden_NF = glu(hidden_NF, x_ND @ w3_FD.t(), self.glu_kind)
        out_ND = hidden_NF @ w2_DF.t()
        if b2_D is not None:
            out_ND = out_ND + b2_D
        return out_ND

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the experts' matmuls run in for inputs like ``x``: autocast's when it is on
        for CUDA, else the weights'."""
        return _compute_dtype(x, self.w1.dtype)

    def forward(self, x_ND: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Run every expert on its group of rows.

        Args:
            x_ND: (N, D) tokens sorted by local expert.
            tokens_per_expert: (E,) int64 row count of each local expert, summing to N.

        Returns:
            (N, D) expert outputs in the same order, in the input's dtype.
        """
        dtype = self.compute_dtype(x_ND)
        if grouped_mm_usable(x_ND.device, dtype, self.num_experts, self.d_model, self.d_hidden):
            return _cast(self._grouped_forward(x_ND, tokens_per_expert, dtype), x_ND.dtype)
        experts = self.expert_functions()
        run = _run_grouped(lambda local, rows: experts[local](rows), _cast(x_ND, self.w1.dtype), tokens_per_expert)
        return _cast(run, x_ND.dtype)

    def can_forward_and_combine(self, x_TD: Tensor, num_rows: int) -> bool:
        """Whether :meth:`forward_and_combine` runs for tokens like ``x_TD`` (T, D) and ``num_rows``
        assignments: eager, plain experts (not gated: see :mod:`lightning_moe.ops.expert_mlp`) without
        biases, the tokens already in the experts' compute dtype, and sizes both
        :func:`~lightning_moe.ops.grouped_mm.grouped_mm_usable` and
        :func:`~lightning_moe.ops.expert_mlp.expert_mlp_usable` take, i.e. where :meth:`forward`
        would run on the grouped GEMM kernels of :mod:`lightning_moe.ops.grouped_linear`."""
        if self.w3 is not None or self.b1 is not None or x_TD.dtype != self.compute_dtype(x_TD):
            return False
        sizes = (self.num_experts, self.d_model, self.d_hidden)
        return grouped_mm_usable(x_TD.device, x_TD.dtype, *sizes) and expert_mlp_usable(x_TD, num_rows, *sizes)

    def forward_and_combine(
        self,
        x_TD: Tensor,
        inverse: Tensor,
        token_offsets: Tensor,
        weights: Tensor,
        expert_ends: Tensor,
        out_dtype: torch.dtype,
        order: Tensor | None = None,
        token_grads: TokenGradSum | None = None,
    ) -> Tensor:
        """Gather each assignment's token, run its expert and sum each token's weighted outputs
        through :func:`lightning_moe.ops.expert_mlp.expert_mlp`: the result, gradients included, of
        ``ops.permute``, :meth:`forward` and ``ops.unpermute`` in turn, in two autograd nodes rather
        than five (less host time), at the same peak memory. Call only where
        :meth:`can_forward_and_combine` holds.

        Args:
            x_TD: (T, D) tokens in the experts' compute dtype.
            inverse: (N,) int64 expert-sorted position of each token-major assignment.
            token_offsets: (T + 1,) int64 where each token's assignments start.
            weights: (N,) float32 combine weight of each assignment.
            expert_ends: (E,) int32 where each expert's assignments end in the sorted order
                (``cumsum`` of the tokens per expert), from
                :func:`lightning_moe.ops.sort_by_expert_with_ends`.
            out_dtype: dtype of the result.
            order: The sort's ``order``, given only where every token has exactly one assignment
                (see :func:`lightning_moe.ops.expert_mlp.expert_mlp`).
            token_grads: The router's sum of the tokens' gradients, to hand ``x_TD``'s gradient to
                (see :func:`lightning_moe.ops.expert_mlp.expert_mlp`); None: autograd adds them.

        Returns:
            (T, D) in ``out_dtype``.
        """
        dtype = x_TD.dtype
        w1, w2, w3 = (_cast(self.w1, dtype), _cast(self.w2, dtype), _cast(self.w3, dtype))
        args = (x_TD, inverse, token_offsets, weights, expert_ends)
        return expert_mlp(*args, w1, w2, w3, self.activation, out_dtype, order, token_grads)

    def _grouped_forward(self, x_ND: Tensor, tokens_per_expert: Tensor, dtype: torch.dtype) -> Tensor:
        # Cast up front as autocast would for a matmul: every op of grouped_mlp then runs in `dtype`,
        # autocast or not.
        w3, b1, b2 = (None if p is None else _cast(p, dtype) for p in (self.w3, self.b1, self.b2))
        w1, w2 = _cast(self.w1, dtype), _cast(self.w2, dtype)
        return grouped_mlp(_cast(x_ND, dtype), tokens_per_expert, w1, w2, w3, b1, b2, self.activation)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, bias={self.b1 is not None}, expert_offset={self.expert_offset}"
        )


class ModuleListExperts(nn.Module):
    """Experts given as arbitrary modules mapping (N, D) -> (N, D), possibly all different.

    Args:
        experts: One module per local expert.
        expert_offset: Global index of the first expert held here.
    """

    def __init__(self, experts: Sequence[nn.Module], expert_offset: int = 0) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.expert_offset = expert_offset

    @classmethod
    def from_factory(
        cls, factory: Callable[[], nn.Module], num_experts: int, seed: int, expert_offset: int = 0
    ) -> ModuleListExperts:
        """Build ``num_experts`` modules with ``factory()``, each under its own seeded RNG."""
        modules = []
        for local in range(num_experts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(expert_generator(seed, expert_offset + local).initial_seed()))
                module = factory()
            if not isinstance(module, nn.Module):
                raise TypeError(f"experts= factory must return an nn.Module, got {type(module).__name__}.")
            modules.append(module)
        return cls(modules, expert_offset)

    def forward(self, x_ND: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Same contract as :meth:`GroupedExperts.forward`."""
        return _run_grouped(lambda local, rows: self.experts[local](rows), x_ND, tokens_per_expert)


@overload
def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor: ...
@overload
def _cast(tensor: None, dtype: torch.dtype) -> None: ...
def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``tensor.to(dtype)``, skipping the dispatch when it is already in ``dtype`` (host time);
    through :func:`lightning_moe.ops.cast`, whose backward casts float32 weights' gradients back
    faster on CUDA."""
    return tensor if tensor is None or tensor.dtype == dtype else cast_op(tensor, dtype)


def _compute_dtype(x_ND: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert matmuls run in: autocast's when it is on for CUDA, else the weights'."""
    if x_ND.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return weight_dtype


def _run_grouped(expert_forward: Callable[[int, Tensor], Tensor], x_ND: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """Split ``x_ND`` by ``tokens_per_expert``, apply each expert, and concatenate in order.

    Experts without tokens still run on their empty slice: every expert parameter then takes part
    in the graph and gets a (zero) gradient, as under a single grouped GEMM. Data-parallel training
    needs that (DDP waits for every parameter's gradient), and optimizers then treat an idle expert
    the same whether the experts are split over ranks or not.
    """
    counts = tokens_per_expert.tolist()
    outputs = [expert_forward(local, rows) for local, rows in enumerate(torch.split(x_ND, counts))]
    return torch.cat(outputs, dim=0)
