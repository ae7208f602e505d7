"""Which precision a run computes in: `training.mixed_precision` resolved, one rule for every entry point.

    no / fp16 / bf16   as written
    null               the Accelerate config's (`accelerate launch --mixed_precision ...`, else no)
    auto (default)     the launcher's choice when it made one other than `no`; else, for a run that
                       trains backbone weights, bf16 where the hardware multiplies bf16 natively: a CUDA
                       GPU of compute capability 8+, or a CPU with AMX tiles or AVX512-BF16 for the tasks
                       measured to gain there (text); else no

Why bf16 on AMX CPUs: MiniLM fine-tuning ran 1.4-1.6x faster under bf16 autocast here, at the same
dev accuracy on two text sets and two seeds (BENCHMARKS.md, issue 14). Why not for a frozen
backbone: its cost is one pass that the feature cache keeps, so bf16 saves little there, and the
rounded features cost the solver's head an image on hymenoptera (94.1% vs 94.8%). `rank` resolves as
fine-tuning would (selection/rank.py): its cost is measured against fine-tuning the candidates. fp16 is never
picked for the user: it needs loss scaling and a GPU. Why text only on a CPU: EfficientNet-Lite0
fine-tuning was no faster in bf16 there (260 s vs 255 s on hymenoptera, 188 s vs 165 s on PACS cartoon:
depthwise convolutions, not matrix products) and its last epoch moved +0.6 / -2.4 points; audio and
two-tower runs are not measured yet.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"

# tasks whose fine-tuning runs faster in bf16 on an AMX CPU at the same accuracy (BENCHMARKS.md, issue 14)
CPU_BF16_TASKS = frozenset({"text"})


def cpu_has_native_bf16() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 (also AMD Zen 4), whose instructions oneDNN runs
    bf16 matrix products with. A MiniLM-L6 step (32 x 26 tokens, one thread) on an AMD EPYC with AVX512-BF16 and no
    AMX: 744 ms in fp32, 552 ms under bf16 autocast (BENCHMARKS.md, issue 14, eighth stop)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:  # private in torch 2.x: absent means unknown, so no
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:
        return False


def cuda_has_native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_mixed_precision(
    requested: str | None, *, trains_backbone: bool, task: str, device_type: str | None = None
) -> str | None:
    """The value for `Accelerator(mixed_precision=...)`; None lets Accelerate read its config.

    `trains_backbone`: whether the run steps through backbone weights (fine-tuning), or only reads
    frozen features (a frozen backbone), which auto keeps in fp32. `task`: the recipe's task.

    `device_type`: where the run computes ("cuda", "cpu"); by default CUDA when a GPU is visible and
    the launcher did not ask for the CPU, as Accelerate decides."""
    if requested != AUTO:
        return requested
    launched_with = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched_with != "no":
        return launched_with
    if not trains_backbone:
        return "no"
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")  # accelerate launch --cpu
    device_type = device_type or ("cuda" if torch.cuda.is_available() and not on_cpu else "cpu")
    if device_type == "cuda":
        native = cuda_has_native_bf16()
    else:
        native = device_type == "cpu" and task in CPU_BF16_TASKS and cpu_has_native_bf16()
    return "bf16" if native else "no"
