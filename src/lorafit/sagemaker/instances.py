"""SageMaker training instance types lorafit knows: their GPUs, how many, and each GPU's memory.

Checked before anything is uploaded, so a typo (``ml.g5.2xlage``) fails in a second instead of
after the S3 upload, and ``lorafit plan`` runs against the GPU the job will get. The GPU count is
what SM_NUM_GPUS will be. Memory comes from the planner's GPU table (what the driver reports)
where it has the GPU, else the GPU's nominal size in GB.

The planner (torch) is imported inside the functions that build a ``DeviceSpec``: the CLI imports
this module to parse arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.sagemaker.errors import SageMakerError


@dataclass(frozen=True)
class Gpu:
    """One GPU model: its name, nominal memory, the planner's name for it (None: use the size) and bf16."""

    name: str
    memory_gb: int
    planner_name: str | None
    bf16: bool


_T4 = Gpu("NVIDIA T4", 16, "t4", False)
_A10G = Gpu("NVIDIA A10G", 24, "a10g", True)
_L4 = Gpu("NVIDIA L4", 24, "l4", True)
_L40S = Gpu("NVIDIA L40S", 48, None, True)
_V100 = Gpu("NVIDIA V100", 16, None, False)
_V100_32 = Gpu("NVIDIA V100", 32, None, False)
_A100 = Gpu("NVIDIA A100", 40, "a100-40gb", True)
_A100_80 = Gpu("NVIDIA A100", 80, "a100-80gb", True)
_H100 = Gpu("NVIDIA H100", 80, "h100", True)
_H200 = Gpu("NVIDIA H200", 141, "h200", True)

_G5_SIZES = {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
             "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}
# family: (GPU, {size: GPU count})
_GPU_FAMILIES: dict[str, tuple[Gpu, dict[str, int]]] = {
    "g4dn": (_T4, {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "12xlarge": 4, "16xlarge": 1}),
    "g5": (_A10G, _G5_SIZES),
    "g6": (_L4, _G5_SIZES),
    "g6e": (_L40S, _G5_SIZES),
    "p3": (_V100, {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8}),
    "p3dn": (_V100_32, {"24xlarge": 8}),
    "p4d": (_A100, {"24xlarge": 8}),
    "p4de": (_A100_80, {"24xlarge": 8}),
    "p5": (_H100, {"48xlarge": 8}),
    "p5e": (_H200, {"48xlarge": 8}),
    "p5en": (_H200, {"48xlarge": 8}),
}
# family: {size: memory in GiB}
_CPU_FAMILIES: dict[str, dict[str, int]] = {
    "m5": {"large": 8, "xlarge": 16, "2xlarge": 32, "4xlarge": 64, "12xlarge": 192, "24xlarge": 384},
    "c5": {"xlarge": 8, "2xlarge": 16, "4xlarge": 32, "9xlarge": 72, "18xlarge": 144},
}
# Instance families whose storage is local NVMe (encrypted by the instance's hardware): SageMaker
# refuses a KMS key for an endpoint's storage volume on them (CreateEndpointConfig.KmsKeyId).
LOCAL_STORAGE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en")
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


def gpu_count(instance_type: str) -> int:
    """GPUs on ``instance_type`` (0 for CPU instances); raises for unknown types."""
    family, size = _split(instance_type)
    if family in _GPU_FAMILIES and size in _GPU_FAMILIES[family][1]:
        return _GPU_FAMILIES[family][1][size]
    if family in _CPU_FAMILIES and size in _CPU_FAMILIES[family]:
        return 0
    raise SageMakerError(
        f"--instance-type: unknown SageMaker instance type '{instance_type}' "
        f"(GPU types look like ml.g5.2xlarge, ml.g6e.xlarge, ml.p4d.24xlarge)"
    )


def job_processes(instance_type: str, instance_count: int) -> int:
    """Training processes of a job: one per GPU on every instance, one per CPU instance."""
    return instance_count * max(gpu_count(instance_type), 1)


def instance_gpu(instance_type: str) -> Gpu | None:
    """The GPU model of ``instance_type``, None for CPU instances; raises for unknown types."""
    if gpu_count(instance_type) == 0:
        return None
    return _GPU_FAMILIES[_split(instance_type)[0]][0]


def gpu_device(instance_type: str):  # noqa: ANN201 - lorafit.planner.DeviceSpec (imported lazily)
    """The planner's device for one GPU of ``instance_type``; None for CPU instances."""
    from lorafit.planner import DeviceSpec, resolve_device

    gpu = instance_gpu(instance_type)
    if gpu is None:
        return None
    if gpu.planner_name is not None:
        return resolve_device(gpu.planner_name)
    # nominal GB (10^9 bytes): below what such GPUs report, so the verdict errs towards "does not fit"
    return DeviceSpec(f"{gpu.name.removeprefix('NVIDIA ')} {gpu.memory_gb}GB", gpu.memory_gb * 10**9, "cuda", gpu.bf16)


def host_device(instance_type: str):  # noqa: ANN201 - lorafit.planner.DeviceSpec
    """The planner's device for what one model is served from: one GPU of ``instance_type``, or
    the host's memory on a CPU instance."""
    from lorafit.planner import GIB, DeviceSpec

    device = gpu_device(instance_type)
    if device is not None:
        return device
    family, size = _split(instance_type)
    return DeviceSpec(f"{instance_type} ({_CPU_FAMILIES[family][size]} GiB)", _CPU_FAMILIES[family][size] * GIB,
                      "cpu", False)


def serverless_device(memory_mb: int):  # noqa: ANN201 - lorafit.planner.DeviceSpec
    """A serverless endpoint's memory (CPU only), or a one-line error for a size SageMaker lacks."""
    from lorafit.planner import MIB, DeviceSpec

    if memory_mb not in SERVERLESS_MEMORY_MB:
        raise SageMakerError(f"--serverless: {memory_mb} MB is not a serverless memory size "
                             f"({', '.join(map(str, SERVERLESS_MEMORY_MB))})")
    return DeviceSpec(f"serverless {memory_mb} MB", memory_mb * MIB, "cpu", False)


def gpu_instance_types() -> list[str]:
    """Every GPU instance type in the table, smallest GPU memory (then fewest GPUs) first."""
    types = [(gpu.memory_gb, count, f"ml.{family}.{size}")
             for family, (gpu, sizes) in _GPU_FAMILIES.items() for size, count in sizes.items()]
    return [name for _, _, name in sorted(types)]


def has_local_storage(instance_type: str) -> bool:
    return _split(instance_type)[0] in LOCAL_STORAGE_FAMILIES


def describe_instance(instance_type: str) -> str:
    """``'1 x NVIDIA A10G (24 GB)'`` for GPU instances, ``'CPU only'`` otherwise."""
    count = gpu_count(instance_type)
    gpu = instance_gpu(instance_type)
    if gpu is None:
        return "CPU only"
    return f"{count} x {gpu.name} ({gpu.memory_gb} GB)"


def _split(instance_type: str) -> tuple[str, str]:
    parts = (instance_type or "").split(".")
    if len(parts) != 3 or parts[0] != "ml":
        return "", ""
    return parts[1], parts[2]
