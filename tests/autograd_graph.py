"""Reading autograd graphs in tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def _graph_nodes(output: torch.Tensor) -> Iterator[Any]:
    """Every autograd node behind ``output``, each once."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)


def graph_node_names(output: torch.Tensor) -> list[str]:
    """The names of every autograd node behind ``output``."""
    return [type(node).__name__ for node in _graph_nodes(output)]


def consumer_names(output: torch.Tensor, leaf: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``output`` that take the leaf tensor ``leaf``
    directly (whose next functions include its gradient accumulator)."""
    return [
        type(node).__name__
        for node in _graph_nodes(output)
        for next_node, _ in node.next_functions
        if next_node is not None and getattr(next_node, "variable", None) is leaf
    ]
