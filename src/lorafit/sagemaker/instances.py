"""SageMaker training instance types lorafit knows, and the GPUs they carry.

Checked before anything is uploaded, so a typo (``ml.g5.2xlage``) fails in a second instead of
after the S3 upload. The GPU column is what ``launch`` prints and what SM_NUM_GPUS will be.
"""

from __future__ import annotations

from lorafit.sagemaker.errors import SageMakerError

# family: (GPU name, GPU memory GB, {size: GPU count})
_GPU_FAMILIES: dict[str, tuple[str, int, dict[str, int]]] = {
    "g4dn": ("NVIDIA T4", 16, {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "12xlarge": 4, "16xlarge": 1}),
    "g5": ("NVIDIA A10G", 24, {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
                               "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "g6": ("NVIDIA L4", 24, {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
                             "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "g6e": ("NVIDIA L40S", 48, {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
                                "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}),
    "p3": ("NVIDIA V100", 16, {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8}),
    "p3dn": ("NVIDIA V100", 32, {"24xlarge": 8}),
    "p4d": ("NVIDIA A100", 40, {"24xlarge": 8}),
    "p4de": ("NVIDIA A100", 80, {"24xlarge": 8}),
    "p5": ("NVIDIA H100", 80, {"48xlarge": 8}),
    "p5e": ("NVIDIA H200", 141, {"48xlarge": 8}),
    "p5en": ("NVIDIA H200", 141, {"48xlarge": 8}),
}
_CPU_FAMILIES: dict[str, tuple[str, ...]] = {
    "m5": ("large", "xlarge", "2xlarge", "4xlarge", "12xlarge", "24xlarge"),
    "c5": ("xlarge", "2xlarge", "4xlarge", "9xlarge", "18xlarge"),
}


def gpu_count(instance_type: str) -> int:
    """GPUs on ``instance_type`` (0 for CPU instances); raises for unknown types."""
    family, size = _split(instance_type)
    if family in _GPU_FAMILIES and size in _GPU_FAMILIES[family][2]:
        return _GPU_FAMILIES[family][2][size]
    if family in _CPU_FAMILIES and size in _CPU_FAMILIES[family]:
        return 0
    raise SageMakerError(
        f"--instance-type: unknown SageMaker training instance type '{instance_type}' "
        f"(GPU types look like ml.g5.2xlarge, ml.g6e.xlarge, ml.p4d.24xlarge)"
    )


def describe_instance(instance_type: str) -> str:
    """``'1 x NVIDIA A10G (24 GB)'`` for GPU instances, ``'CPU only'`` otherwise."""
    count = gpu_count(instance_type)
    if count == 0:
        return "CPU only"
    name, memory, _ = _GPU_FAMILIES[_split(instance_type)[0]]
    return f"{count} x {name} ({memory} GB)"


def known_instance_types() -> list[str]:
    types = [f"ml.{f}.{s}" for f, (_, _, sizes) in _GPU_FAMILIES.items() for s in sizes]
    return types + [f"ml.{f}.{s}" for f, sizes in _CPU_FAMILIES.items() for s in sizes]


def _split(instance_type: str) -> tuple[str, str]:
    parts = (instance_type or "").split(".")
    if len(parts) != 3 or parts[0] != "ml":
        return "", ""
    return parts[1], parts[2]
