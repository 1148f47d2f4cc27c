"""What a figure was measured on, and that machine's own limit: the device (CPU model and
flags, or GPU name), torch and threads; the best dense-matmul FLOP/s in each precision;
the FLOPs of one training image (``torch.utils.flop_counter``)."""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deitctl.runtime import usable_cpus

# the CPU flags that decide which precisions and kernels run fast
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and flags (Linux ``/proc/cpuinfo``; elsewhere ``platform``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model or platform.processor() or platform.machine(), flags


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpuinfo()[0]


def machine_info(device: torch.device) -> dict[str, Any]:
    """``machine`` in ``deitctl benchmark --json`` and the benchmark scripts' JSON."""
    info: dict[str, Any] = {
        "device": device.type,
        "name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info["capability"] = f"{major}.{minor}"
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["flags"] = [f for f in RELEVANT_FLAGS if f in cpu_flags()]
        info["cores"] = usable_cpus()
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming a machine, for tables and docs."""
    if info["device"] == "cuda":
        return f"{info['name']} (torch {info['torch']})"
    flags = ", ".join(info.get("flags", [])) or "no AVX2"
    return f"{info['name']}, {info['threads']} threads ({flags}; torch {info['torch']})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, precision: str, *, size: int = 0, seconds: float = 0.5) -> float:
    """Dense-matmul FLOP/s of ``size``² × ``size``² products in ``precision`` on ``device``
    (best of repeated timings over about ``seconds``)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    dtype = MATMUL_DTYPES[precision]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)
    torch.mm(a, b)  # warm-up: kernels chosen, memory touched
    synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - t0
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best


def precisions_available(device: torch.device, precision: str) -> list[str]:
    """The precisions a run may use: its own, or every candidate of ``auto``."""
    if precision != "auto":
        return [precision]
    if device.type == "cuda":
        return ["fp32", "bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    return ["fp32", "bf16"]


def matmul_peak(device: torch.device, precisions: list[str]) -> dict[str, float]:
    """Dense-matmul FLOP/s of this device in each precision."""
    return {p: matmul_flops(device, p) for p in precisions}


def _attention_flops() -> dict[Any, Any]:
    """FLOP formulas for the fused attention kernels, so that a model's FLOPs do not depend
    on which kernel runs: ``torch.utils.flop_counter`` does not count PyTorch's CPU kernel,
    and counts the CUDA kernels' backward with their recomputed ``Q Kᵀ`` (2.5 forwards);
    here every kernel counts as the explicit matmuls do (a forward: ``Q Kᵀ`` and ``P V``; a
    backward: their four gradient products, two forwards), deitctl's C++ kernel included."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten

    def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * sdpa_flop_count(query, key, value)

    backwards = (
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
    )
    mapping: dict[Any, Any] = {aten._scaled_dot_product_flash_attention_for_cpu: forward}
    mapping.update({getattr(aten, name): backward for name in backwards if hasattr(aten, name)})

    import deitctl.attention_kernel  # noqa: F401 (registers deitctl's attention operators)

    def kernel(qkv: Any, heads: int, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        batch, tokens, width = qkv  # q kᵀ and p v: 2 · 2·B·N·N·(width / 3)
        return 4 * batch * tokens * tokens * width // 3

    def kernel_backward(grad: Any, qkv: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * kernel(qkv, 0)

    mapping[torch.ops.deitctl.attention] = kernel
    mapping[torch.ops.deitctl.attention_backward] = kernel_backward
    return mapping


def flops_per_image(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor) -> float:
    """FLOPs of one training image: the student's forward and backward, plus the teacher's
    forward, counted by ``torch.utils.flop_counter`` on ``batch`` (the models are not changed)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_attention_flops())
    with torch.random.fork_rng(devices=[]), counter:
        if teacher is not None:
            with torch.no_grad():
                teacher(batch)
        outputs = student(batch)
        outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
        sum(o.float().sum() for o in outputs).backward()
    student.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.shape[0]
