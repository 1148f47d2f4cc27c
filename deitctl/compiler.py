"""``torch.compile`` as deitctl runs it (``run.compile``): PyTorch's compiler plus deitctl's
graph pass for fp32 CPU training, run after autograd and before code generation.

The pass rewrites three patterns of a DeiT training step that inductor's CPU code leaves
slower than it need be (figures: 2 threads, Intel Xeon family 6 model 167, "machine E"):

- **Column sums.** Summing a (rows × columns) tensor over its rows, as the backward of every
  linear layer's bias and of every layer norm's weight and bias does, walks each 16-float
  column strip down all rows: at DeiT-Ti's MLP shape (4224 × 768) about 1.0 ms, against
  0.3 ms for MKL's product with a row of ones. Rewritten as ``ones(1, rows) @ x``.
- **Bias adds.** ``addmm(bias, x, w)`` broadcasts the bias into the output with a separate
  copy before MKL's product (about 5 % of the 64-token DeiT-Ti⚗ step). Where every user of
  the result is element-wise (the residual add after ``proj`` and ``fc2``; the GELU after
  ``fc1`` when its output is not also saved for the backward, as under
  ``gelu_backward = "saved"``), it becomes ``mm(x, w) + bias`` and inductor folds the add into
  that user's kernel.
- **Wide weight gradients.** A linear layer's weight gradient ``gᵀ @ x`` with more outputs
  than inputs (``qkv``, ``fc1``) runs 10–12 % faster in MKL as ``(xᵀ @ g)ᵀ``.

Each rewrite is the same arithmetic in another order or layout (float rounding only, as
compiling itself gives). ``benchmarks/step_vs_reference.py --variants
compile_plain,compile_sums,compile`` measures the step without the pass, with its column sums
alone, and with all of it. Only fp32 tensors are rewritten: under bf16 autocast the bf16 bias
gradients summed by a bf16 matmul made the step slower.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

import torch
from torch import fx, nn

try:  # torch >= 2.6
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    from torch._inductor.utils import is_pointwise_use
except ImportError:  # pragma: no cover - older torch compiles without the pass
    CustomGraphPass = None  # type: ignore[assignment,misc]

aten = torch.ops.aten

#: Sums and products over fewer rows than this stay inductor's (too small to matter).
MIN_ROWS = 256


def _value(node: Any) -> torch.Tensor | None:
    """The fake tensor a graph node computes, when it is an fp32 CPU tensor."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.device.type != "cpu":
        return None
    return value


def _replace_each(
    graph: fx.Graph, match: Callable[[fx.Node], Any], build: Callable[[fx.Graph, fx.Node, Any], fx.Node]
) -> int:
    """Replace every node that ``match`` finds (anything but None) by the node ``build``
    inserts before it from what was found; returns how many."""
    count = 0
    for node in list(graph.nodes):
        found = match(node)
        if found is None:
            continue
        with graph.inserting_before(node):
            result = build(graph, node, found)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        count += 1
    return count


def _column_sum(node: fx.Node) -> tuple[int, int] | None:
    """(rows, columns) when ``node`` sums a contiguous fp32 CPU tensor over its leading
    dimensions, keeping at least one; else None."""
    if node.op != "call_function" or node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype"):
        return None
    source, dims = node.args[0], node.args[1]
    value = _value(source)
    if value is None or not isinstance(dims, (list, tuple)) or not value.is_contiguous():
        return None
    reduced = sorted(d % value.dim() for d in dims if isinstance(d, int))
    if len(reduced) != len(dims) or reduced != list(range(len(reduced))) or len(reduced) == value.dim():
        return None
    rows = math.prod(int(s) for s in value.shape[: len(reduced)])
    columns = math.prod(int(s) for s in value.shape[len(reduced) :])
    return (rows, columns) if rows >= MIN_ROWS else None


def _sum_as_product(graph: fx.Graph, node: fx.Node, shape: tuple[int, int]) -> fx.Node:
    rows, columns = shape
    source = node.args[0]
    assert isinstance(source, fx.Node)
    value = source.meta["val"]
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
    return result


def rewrite_column_sums(graph: fx.Graph) -> int:
    """Replace each column sum (see :func:`_column_sum`) in ``graph`` by a product with a
    row of ones; returns how many."""
    return _replace_each(graph, _column_sum, _sum_as_product)


def _bias_add(node: fx.Node) -> tuple[Any, Any, Any] | None:
    """(bias, x, w) when ``node`` is ``addmm(bias, x, w)`` on fp32 CPU tensors, with a 1-D
    bias, at least :data:`MIN_ROWS` rows and only element-wise users; else None."""
    if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs:
        return None
    bias, x = _value(node.args[0]), _value(node.args[1])
    if bias is None or x is None or bias.dim() != 1 or x.dim() != 2 or int(x.shape[0]) < MIN_ROWS:
        return None
    if not node.users or not all(is_pointwise_use(use) for use in node.users):
        return None
    return node.args[0], node.args[1], node.args[2]


def _product_then_add(graph: fx.Graph, node: fx.Node, found: tuple[Any, Any, Any]) -> fx.Node:
    bias, x, w = found
    product = graph.call_function(aten.mm.default, (x, w))
    result = graph.call_function(aten.add.Tensor, (product, bias))
    product.meta["val"] = result.meta["val"] = node.meta["val"]  # same shape, dtype, strides
    return result


def rewrite_bias_adds(graph: fx.Graph) -> int:
    """Replace each :func:`_bias_add` in ``graph`` by ``mm`` then ``add``; returns how many."""
    return _replace_each(graph, _bias_add, _product_then_add)


def _weight_gradient(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(g, x) when ``node`` is ``mm(permute(g, [1, 0]), x)`` on fp32 CPU tensors, summing at
    least :data:`MIN_ROWS` rows into more outputs (columns of ``g``) than inputs; else None."""
    if node.op != "call_function" or node.target is not aten.mm.default:
        return None
    left, x = node.args[0], node.args[1]
    if not isinstance(left, fx.Node) or left.op != "call_function" or left.target is not aten.permute.default:
        return None
    if list(cast(Any, left.args[1])) != [1, 0]:
        return None
    g = left.args[0]
    gv, xv = _value(g), _value(x)
    if gv is None or xv is None or gv.dim() != 2 or xv.dim() != 2:
        return None
    rows, outputs, inputs = int(gv.shape[0]), int(gv.shape[1]), int(xv.shape[1])
    if rows < MIN_ROWS or outputs <= inputs:
        return None
    assert isinstance(g, fx.Node) and isinstance(x, fx.Node)
    return g, x


def _transposed_product(graph: fx.Graph, node: fx.Node, found: tuple[fx.Node, fx.Node]) -> fx.Node:
    g, x = found
    xt = graph.call_function(aten.permute.default, (x, [1, 0]))
    product = graph.call_function(aten.mm.default, (xt, g))
    result = graph.call_function(aten.permute.default, (product, [1, 0]))
    gv, xv = g.meta["val"], x.meta["val"]
    fake_mode = getattr(gv, "fake_mode", None)
    if fake_mode is not None:  # shapes and strides for the nodes after
        with fake_mode:
            xt.meta["val"] = xv.permute(1, 0)
            product.meta["val"] = xt.meta["val"] @ gv
            result.meta["val"] = product.meta["val"].permute(1, 0)
    return result


def rewrite_weight_gradients(graph: fx.Graph) -> int:
    """Replace each :func:`_weight_gradient` ``gᵀ @ x`` in ``graph`` by ``(xᵀ @ g)ᵀ``;
    returns how many."""
    return _replace_each(graph, _weight_gradient, _transposed_product)


#: deitctl's rewrites by name, in the order they run.
REWRITES: dict[str, Callable[[fx.Graph], int]] = {
    "column_sums": rewrite_column_sums,
    "bias_adds": rewrite_bias_adds,
    "weight_gradients": rewrite_weight_gradients,
}

#: The rewrites :func:`compile_module` runs: all by default; ``()`` compiles with PyTorch's
#: passes alone (the benchmarks' ``compile_plain``, and ``compile_sums`` with column sums only).
GRAPH_PASSES: tuple[str, ...] = tuple(REWRITES)


def rewrite(graph: fx.Graph, kinds: Iterable[str] = tuple(REWRITES)) -> Counter[str]:
    """Run deitctl's rewrites named in ``kinds`` on a post-autograd ``graph``; counts them."""
    wanted = set(kinds)
    return Counter({kind: rewrite_kind(graph) for kind, rewrite_kind in REWRITES.items() if kind in wanted})


if CustomGraphPass is not None:

    class CpuTrainingPass(CustomGraphPass):
        """Inductor's post-grad pass form of :func:`rewrite`; ``rewritten`` counts what it
        replaced in this process, by kind."""

        rewritten: ClassVar[Counter[str]] = Counter()

        def __init__(self, kinds: Iterable[str] = tuple(REWRITES)) -> None:
            wanted = set(kinds)
            self.kinds = tuple(kind for kind in REWRITES if kind in wanted)

        def __call__(self, graph: fx.Graph) -> None:
            CpuTrainingPass.rewritten.update(rewrite(graph, self.kinds))

        def uuid(self) -> Any:
            return get_hash_for_files((__file__,)) + f"min_rows={MIN_ROWS};{','.join(self.kinds)}".encode()


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with deitctl's rewrites named in :data:`GRAPH_PASSES`."""
    if not GRAPH_PASSES or CustomGraphPass is None:
        return cast(nn.Module, torch.compile(module))
    graph_pass = CpuTrainingPass(GRAPH_PASSES)
    return cast(nn.Module, torch.compile(module, options={"post_grad_custom_post_pass": graph_pass}))
