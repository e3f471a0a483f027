"""The Hugging Face PyTorch images (AWS Deep Learning Containers) for a region: training and inference.

The seed recipe used the Hugging Face estimator and HuggingFaceModel, which pick these images.
Training: the default tag is the first HF DLC with transformers >= 4.56. Inference: the newest HF
inference DLC in the SDK's image config (transformers 5.5.3, torch 2.6.0), GPU or CPU build; the
endpoint's requirements.txt then pins lorafit's tested library versions over the image's (torch
held at the image's). ``--image URI`` overrides either. Both follow one rule for the registry
account and domain, the SageMaker Python SDK's image_uri_config (most regions share one account).
"""

from __future__ import annotations

import re

from lorafit.sagemaker.errors import SageMakerError

REPOSITORY = "huggingface-pytorch-training"
DEFAULT_TAG = "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04"
INFERENCE_REPOSITORY = "huggingface-pytorch-inference"
INFERENCE_TAGS = {"gpu": "2.6.0-transformers5.5.3-gpu-py312-cu124-ubuntu22.04",
                  "cpu": "2.6.0-transformers5.5.3-cpu-py312-ubuntu22.04"}
DEFAULT_ACCOUNT = "763104351884"

# Regions whose Deep Learning Containers live in their own registry account.
REGION_ACCOUNTS = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-northeast-3": "364406365360",
    "ap-south-2": "772153158452",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-2": "380420809688",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
    "us-iso-east-1": "886529160074",
    "us-isob-east-1": "094389454867",
}
# ECR's domain outside the commercial partition (the SDK reads these from botocore's endpoint data)
PARTITION_DOMAINS = {"cn-": "amazonaws.com.cn", "us-isob-": "sc2s.sgov.gov", "us-iso-": "c2s.ic.gov"}

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


def image_uri(region: str, repository: str, tag: str) -> str:
    """ECR URI of a Deep Learning Container image in ``region``: the one rule for account and domain."""
    if not _REGION.match(region or ""):
        raise SageMakerError(f"AWS region '{region}' is not a region name (e.g. us-east-1)")
    account = REGION_ACCOUNTS.get(region, DEFAULT_ACCOUNT)
    domain = next((d for prefix, d in PARTITION_DOMAINS.items() if region.startswith(prefix)), "amazonaws.com")
    return f"{account}.dkr.ecr.{region}.{domain}/{repository}:{tag}"


def training_image_uri(region: str, tag: str = DEFAULT_TAG) -> str:
    """ECR URI of the Hugging Face PyTorch GPU training image in ``region``."""
    return image_uri(region, REPOSITORY, tag)


def inference_image_uri(region: str, gpu: bool = True) -> str:
    """ECR URI of the Hugging Face PyTorch inference image in ``region`` (GPU build, or the CPU build
    for CPU instances and serverless endpoints)."""
    return image_uri(region, INFERENCE_REPOSITORY, INFERENCE_TAGS["gpu" if gpu else "cpu"])


def image_torch_version(image: str | None, tags: tuple[str, ...]) -> str | None:
    """The torch version of a default image (its tag starts with it); None for any other image."""
    for tag in tags:
        if image is None or image.endswith(f":{tag}"):
            return tag.split("-", 1)[0]
    return None
