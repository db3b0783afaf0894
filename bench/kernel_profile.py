"""Where a decode step's time goes: each kernel's time per step, from ``torch.profiler``.

The steps run eagerly (the runner's CUDA graphs set aside), so that every kernel is its own profiler event; a
kernel takes as long inside a graph. The sum of the kernels against the graph step's measured time says how much
of a step is kernels and how much is the gaps between them, and the list says which kernels to fuse or speed up
(the bs1 roofline goals). On a CPU the "kernels" are the ATen ops' own times.
"""
from __future__ import annotations

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from relaykern.engine.runner import ModelRunner
from relaykern.bench.model_bench import Probe, eager

PROFILED_STEPS = 10
TOP_KERNELS = 15


def decode_kernel_times(runner: ModelRunner, batch: int, context: int, graph_step_ms: float) -> dict:
    """Kernel times of one decode step of ``batch`` rows over ``context`` cached tokens (mean of PROFILED_STEPS);
    ``graph_step_ms``: the step's measured time as the engine runs it."""
    cuda = runner.device.type == "cuda"
    with eager(runner), Probe(runner, repeats=1).decode_step(batch, context) as step:
        step()  # compiles whatever the eager path needs that the graphs did not
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                step()
    kernels = []
    for event in prof.key_averages():
        on_device = event.device_type == DeviceType.CUDA
        micros = event.self_device_time_total if on_device else event.self_cpu_time_total
        if micros > 0 and on_device == cuda:
            kernels.append({"name": event.key[:120], "calls_per_step": event.count / PROFILED_STEPS,
                            "ms_per_step": micros / 1e3 / PROFILED_STEPS})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total_ms = sum(k["ms_per_step"] for k in kernels)
    return {
        "batch": batch,
        "context": context,
        "graph_step_ms": graph_step_ms,
        "kernel_ms_per_step": total_ms,
        "kernels_per_step": sum(k["calls_per_step"] for k in kernels),
        "kernel_share_of_step": total_ms / graph_step_ms,
        "top": kernels[:TOP_KERNELS],
    }
