"""Where a run computes: device choice, CPU threads and how a meta-batch's tasks are batched."""

import contextlib
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from metalearn.errors import ConfigError


@dataclass
class HardwareConfig:
    """Device and parallelism settings."""

    device: str = "cpu"  # 'cpu', 'cuda' or 'auto' (CUDA when available)
    threads: int | None = None  # CPU threads for torch (None: torch's default, all cores)
    # 'vmap': a meta-batch is one batched computation; 'loop': one task at a time; 'auto': loop
    # for convolutional networks on CPU with large tasks (faster there, see `metalearn bench`),
    # else vmap
    task_batching: str = "auto"
    precision: str = (
        "fp32"  # 'fp32', or 'bf16': autocast to bfloat16 (CUDA, or CPUs with AVX512-BF16)
    )
    channels_last: bool = False  # NHWC image activations (faster convolutions on CPU)
    # torch.compile the training objective (the first iterations pay the compilation)
    compile: bool = False
    # deterministic kernels only (torch.use_deterministic_algorithms, cuDNN without autotuning,
    # a fixed cuBLAS workspace): bit-identical CUDA reruns where PyTorch allows, at some speed;
    # an op without a deterministic kernel then fails, naming itself. CPU runs are always so.
    deterministic: bool = False
    # meta-train this many tasks of a meta-batch at a time, each chunk's backward pass before
    # the next (the same gradient, summed): peak memory of a chunk for a little speed; None:
    # the whole meta-batch at once
    task_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"hardware.device must be cpu, cuda or auto, got {self.device!r}")
        if self.task_batching not in ("auto", "vmap", "loop"):
            raise ConfigError(
                f"hardware.task_batching must be auto, vmap or loop, got {self.task_batching!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"hardware.precision must be fp32 or bf16, got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"hardware.threads must be positive, got {self.threads}")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ConfigError(
                f"hardware.task_chunk must be a positive number of tasks (or null), got "
                f"{self.task_chunk}"
            )


def select_device(cfg: HardwareConfig) -> torch.device:
    """Resolve 'auto' and fail early when CUDA is asked for but absent."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        make_deterministic()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware=cuda but no CUDA device is visible; use hardware=cpu or auto")
    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu" and cfg.precision == "bf16" and not cpu_has_bf16():
        raise ConfigError(
            "hardware.precision=bf16 needs a CPU with bfloat16 arithmetic (AVX512-BF16 or AMX); "
            "this one would emulate it, slower than fp32: use hardware.precision=fp32"
        )
    if kind == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(kind)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively: on x86, AVX512-BF16 or AMX (elsewhere,
    e.g. ARM, torch decides and bf16 is allowed)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def make_deterministic() -> None:
    """What PyTorch's reproducibility notes ask for, before any CUDA work starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# Above this many examples per training task (support and query), conv nets on CPU run faster
# as a per-task loop. Measured on 2 CPU cores, second-order MAML, Omniglot 5-way 1-shot, conv4,
# meta-batch 32, s per meta-iteration loop / vmap: 0.61 / 0.28 at 1 query per class (10
# examples), 0.62 / 0.63 at 5 (30), 0.76 / 1.82 at 15 (80; the README's bench table). The
# loop's cost hardly grows with the task (it is per-call overhead) and it may use the native
# BatchNorm kernel.
LOOP_ABOVE_EXAMPLES = 30


def task_batching(
    cfg: HardwareConfig, device: torch.device, convolutional: bool, examples_per_task: int
) -> str:
    """Resolve hardware.task_batching=auto: the per-task loop for conv nets on CPU with tasks of
    more than LOOP_ABOVE_EXAMPLES examples; vmap for small tasks, MLPs and GPUs."""
    if cfg.task_batching != "auto":
        return cfg.task_batching
    large = examples_per_task > LOOP_ABOVE_EXAMPLES
    return "loop" if device.type == "cpu" and convolutional and large else "vmap"


def test_batchings(
    cfg: HardwareConfig, device: torch.device, convolutional: bool, test_shape: tuple
) -> tuple[str, str]:
    """task_batching for test-time adaptation (on the support sets) and for the query forwards
    of (ways, shots, query) test tasks, each decided by its own size."""
    ways, shots, query = test_shape
    adapt = task_batching(cfg, device, convolutional, ways * shots)
    return adapt, task_batching(cfg, device, convolutional, ways * (shots + query))


def autocast(cfg: HardwareConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast of the forward pass when asked for; parameters and optimiser stay fp32."""
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe(device: torch.device) -> dict[str, Any]:
    """What a run computed on, for results.json: device, threads, torch, CPU and GPU model."""
    info: dict[str, Any] = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> float:
    """Start a new peak-memory window; return the memory held now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _proc_status_mib("VmRSS")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since the last reset (MiB): the CUDA allocator's peak, or the process's peak
    resident set (its whole life where it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _proc_status_mib("VmHWM")
    except (OSError, ValueError):  # not Linux: the process's lifetime peak
        import resource

        scale = 2**20 if platform.system() == "Darwin" else 2**10  # bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise ValueError(f"{field} not in /proc/self/status")


def synchronize(tensor: torch.Tensor) -> None:
    """Wait for the device's queued work on `tensor` (timings; a no-op on the CPU)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
