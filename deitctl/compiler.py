"""``torch.compile`` as deitctl runs it (``run.compile``): PyTorch's compiler plus one graph
pass of deitctl's for CPU training.

Inductor's CPU code sums a (rows × columns) tensor over its rows, as the backward of every
linear layer's bias and of every layer norm's weight and bias does, by walking each
16-float column strip down all rows: at DeiT-Ti's MLP shape (4224 × 768 fp32, 2 threads)
about 1.0 ms, against 0.4 ms for ATen's sum and 0.3 ms for MKL's product with a row of
ones (measured on an Intel Xeon, family 6 model 167). :class:`ColumnSumsAsMatmul` rewrites
those sums, after autograd and before code generation, as ``ones(1, rows) @ x``. The result
is the same sum in another order (float rounding only, as compiling itself gives);
``benchmarks/step_vs_reference.py --variants compile,compile_plain`` measures the step with
and without the pass.

Only fp32 sums on the CPU are rewritten: under bf16 autocast the bf16 bias gradients
summed by a bf16 matmul made the step slower (measured on the same machine).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import fx, nn

try:  # torch >= 2.6
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover - older torch compiles without the pass
    CustomGraphPass = None  # type: ignore[assignment,misc]

aten = torch.ops.aten

#: Sums over fewer rows than this stay inductor's (too small to matter either way).
MIN_ROWS = 256

#: ``False`` compiles with PyTorch's passes alone (the benchmarks' ``compile_plain``).
GRAPH_PASSES = True


def _column_sum(node: fx.Node) -> tuple[int, int] | None:
    """(rows, columns) when ``node`` sums a contiguous fp32 CPU tensor over its leading
    dimensions, keeping at least one; else None."""
    if node.op != "call_function" or node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype"):
        return None
    source, dims = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.device.type != "cpu":
        return None
    if not isinstance(dims, (list, tuple)) or not value.is_contiguous():
        return None
    reduced = sorted(d % value.dim() for d in dims if isinstance(d, int))
    if len(reduced) != len(dims) or reduced != list(range(len(reduced))) or len(reduced) == value.dim():
        return None
    rows = math.prod(int(s) for s in value.shape[: len(reduced)])
    columns = math.prod(int(s) for s in value.shape[len(reduced) :])
    return (rows, columns) if rows >= MIN_ROWS else None


def rewrite_column_sums(graph: fx.Graph) -> int:
    """Replace each column sum (see :func:`_column_sum`) in ``graph`` by a product with a
    row of ones; returns how many."""
    count = 0
    for node in list(graph.nodes):
        shape = _column_sum(node)
        if shape is None:
            continue
        rows, columns = shape
        source = node.args[0]
        assert isinstance(source, fx.Node)
        value = source.meta["val"]
        with graph.inserting_before(node):
            flat = graph.call_function(aten.view.default, (source, [rows, columns]))
            ones = graph.call_function(
                aten.full.default,
                ([1, rows], 1.0),
                {"dtype": torch.float32, "device": value.device, "pin_memory": False},
            )
            product = graph.call_function(aten.mm.default, (ones, flat))
            result = graph.call_function(aten.view.default, (product, list(node.meta["val"].shape)))
        fake_mode = getattr(value, "fake_mode", None)
        if fake_mode is not None:  # shapes for the nodes after, as inductor's own passes keep them
            with fake_mode:
                flat.meta["val"] = value.view(rows, columns)
                ones.meta["val"] = torch.ones(1, rows, dtype=torch.float32, device=value.device)
                product.meta["val"] = ones.meta["val"] @ flat.meta["val"]
                result.meta["val"] = product.meta["val"].view(node.meta["val"].shape)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    return count


if CustomGraphPass is not None:

    class ColumnSumsAsMatmul(CustomGraphPass):
        """Inductor's post-grad pass form of :func:`rewrite_column_sums`; ``rewritten``
        counts the sums it replaced in this process."""

        rewritten = 0

        def __call__(self, graph: fx.Graph) -> None:
            ColumnSumsAsMatmul.rewritten += rewrite_column_sums(graph)

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,)) + f"min_rows={MIN_ROWS}".encode()


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with deitctl's graph pass (unless :data:`GRAPH_PASSES` is off)."""
    if not GRAPH_PASSES or CustomGraphPass is None:
        return cast(nn.Module, torch.compile(module))
    return cast(nn.Module, torch.compile(module, options={"post_grad_custom_post_pass": ColumnSumsAsMatmul()}))
