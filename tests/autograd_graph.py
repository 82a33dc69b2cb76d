"""Reading autograd graphs in tests."""

from __future__ import annotations

import torch


def graph_node_names(output: torch.Tensor) -> list[str]:
    """The names of every autograd node behind ``output``."""
    names, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def consumer_names(output: torch.Tensor, leaf: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``output`` that take the leaf tensor ``leaf``
    directly (whose next functions include its gradient accumulator)."""
    names, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            if next_node is not None and getattr(next_node, "variable", None) is leaf:
                names.append(type(node).__name__)
            stack.append(next_node)
    return names
