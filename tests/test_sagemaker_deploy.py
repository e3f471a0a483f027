"""``lorafit sagemaker deploy|predict|endpoints|delete`` and ``lorafit eval --endpoint`` against moto's
AWS server (tests/sagemaker_server.py, real HTTP), with a real model container behind InvokeEndpoint
(tests/serving_container.py: the HF inference toolkit serving the packaged run on the CPU).

The helper server plays what moto lacks, as SageMaker does it: an endpoint that is Creating for a
while and then InService or Failed, a Creating endpoint that cannot be deleted yet, and invocations
sent to the model container (its 4xx as SageMaker's ModelError).
"""

# ruff: noqa: F811 - the moto fixtures (aws, moto_url) are imported from test_sagemaker by name
from __future__ import annotations

import io
import json
import shutil
import tarfile
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config, write_jsonl
from test_sagemaker import ROLE, aws, cli, client, moto_url, one_line_error, s3_objects, set_job  # noqa: F401

from lorafit.cli import main

FIXTURE = Path(__file__).with_name("fixtures") / "sagemaker_huggingface_images.json"
BUCKET = "sagemaker-us-east-1-123456789012"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("deploy-run")
    data = write_jsonl(root / "dialogues.jsonl", generate(64, 11))
    config = root / "lorafit.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama, data, root / "run")), encoding="utf-8")
    assert main(["train", str(config)]) == 0
    return root / "run"


def control(server: str, path: str, **query: object) -> None:
    text = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in query.items())
    urllib.request.urlopen(urllib.request.Request(f"{server}{path}?{text}", method="POST")).read()


@pytest.fixture(autouse=True)
def _no_progress_bars() -> None:
    """transformers decides on its load bars when first imported; the CLI turns them off before that,
    a test process imports it earlier (the bars would break the one-line error checks)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def leftovers() -> dict[str, list]:
    sm = client("sagemaker")
    s3 = client("s3")
    buckets = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
    return {"endpoints": sm.list_endpoints()["Endpoints"], "configs": sm.list_endpoint_configs()["EndpointConfigs"],
            "models": sm.list_models()["Models"],
            "objects": [k for b in buckets for k in s3_objects(b, "lorafit/endpoints/")]}


NOTHING = {"endpoints": [], "configs": [], "models": [], "objects": []}


def deploy_args(run: Path, *extra: str) -> list[str]:
    # ml.g4dn: moto's list of endpoint instance types predates ml.g5
    return ["deploy", str(run), "--role", ROLE, "--instance-type", "ml.g4dn.xlarge", "--poll", "0", *extra]


# ------------------------------------------------------------------------------- image URIs
def test_image_uris_follow_the_sdk_image_config() -> None:
    """Every region of the SageMaker Python SDK's image config, training and inference, from one rule."""
    from lorafit.sagemaker.images import (
        DEFAULT_TAG,
        INFERENCE_TAGS,
        inference_image_uri,
        training_image_uri,
    )

    sdk = json.loads(FIXTURE.read_text())

    def expected(scope: str, version: str, framework: str, processor: str, region: str) -> str:
        entry = sdk[scope]["versions"][version][framework]
        tag = (f"{framework.removeprefix('pytorch')}-transformers{version}-{processor}-{entry['py_versions'][-1]}-"
               f"{entry['container_version'][processor]}").removesuffix("-")
        # botocore's partitions: aws-cn, aws-iso-b, aws-iso, else aws
        domain = ("amazonaws.com.cn" if region.startswith("cn-") else "sc2s.sgov.gov" if region.startswith("us-isob-")
                  else "c2s.ic.gov" if region.startswith("us-iso-") else "amazonaws.com")
        return f"{entry['registries'][region]}.dkr.ecr.{region}.{domain}/{entry['repository']}:{tag}"

    training = sdk["training"]["versions"]["4.56.2"]["pytorch2.8.0"]["registries"]
    for region in training:
        assert training_image_uri(region) == expected("training", "4.56.2", "pytorch2.8.0", "gpu", region)
    inference = sdk["inference"]["versions"]["5.5.3"]["pytorch2.6.0"]["registries"]
    assert len(inference) > 30
    for region in inference:
        assert inference_image_uri(region) == expected("inference", "5.5.3", "pytorch2.6.0", "gpu", region)
        assert inference_image_uri(region, gpu=False) == expected("inference", "5.5.3", "pytorch2.6.0", "cpu", region)
    assert training_image_uri("us-east-1").endswith(DEFAULT_TAG)
    assert set(INFERENCE_TAGS.values()) == {inference_image_uri("us-east-1", g).split(":")[-1] for g in (True, False)}


# ------------------------------------------------------------------------- deploy, use, delete
def test_deploy_waits_lists_and_deletes(aws: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    control(aws, "/_lorafit/endpoint-next", creating=2, final="InService")
    code, out, err = cli(capsys, *deploy_args(
        tiny_run, "--endpoint-name", "summaries", "--env", "HF_TOKEN=hf_secret", "--tags", "team=nlp",
        "--vpc-subnets", "subnet-0123abcd", "--security-groups", "sg-0123abcd", "--kms-key", "alias/mine",
        "--context", "256", "--concurrency", "2", "--wait"))
    assert code == 0, err
    assert out.index("fit: fits on ml.g4dn.xlarge") < out.index("uploaded the model folder") \
        < out.index("created endpoint summaries") < out.index("endpoint summaries: Creating") \
        < out.index("endpoint summaries: InService")
    sm = client("sagemaker")
    model = sm.describe_model(ModelName="summaries")
    container = model["PrimaryContainer"]
    assert container["Image"] == ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-inference:"
                                  "2.6.0-transformers5.5.3-gpu-py312-cu124-ubuntu22.04")
    assert container["ModelDataUrl"] == f"s3://{BUCKET}/lorafit/endpoints/summaries/model.tar.gz"
    environment = container["Environment"]
    assert environment["HF_TOKEN"] == "hf_secret" and environment["SAGEMAKER_MODEL_SERVER_WORKERS"] == "1"
    assert json.loads(environment["LORAFIT_SERVING"]) == {
        "weights": "merged", "base": None, "quantization": None, "dtype": "float16", "max_total_tokens": 256,
        "max_batch_size": 2}
    assert model["VpcConfig"] == {"SecurityGroupIds": ["sg-0123abcd"], "Subnets": ["subnet-0123abcd"]}
    config = sm.describe_endpoint_config(EndpointConfigName="summaries")
    variant = config["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == \
        ("summaries", "ml.g4dn.xlarge", 1)
    assert "KmsKeyId" not in config  # g4dn keeps the model on local NVMe storage: SageMaker refuses a key there
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=model["ModelArn"])["Tags"]}
    assert tags["lorafit:endpoint"] == "summaries" and tags["team"] == "nlp"
    # the uploaded archive is the model folder: merged weights in the T4's fp16 (no bf16), the run, the code
    archive = s3_objects(BUCKET, "lorafit/endpoints/")["lorafit/endpoints/summaries/model.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(archive)) as handle:
        names = set(handle.getnames())
        merge_info = json.load(handle.extractfile("merged/lorafit_merge.json"))
    assert {"config.yaml", "adapter/adapter_config.json", "merged/config.json", "code/inference.py",
            "code/requirements.txt", "code/sitecustomize.py", "code/lorafit/sagemaker/handler.py"} <= names
    assert merge_info["dtype"] == "float16"
    head = client("s3").head_object(Bucket=BUCKET, Key="lorafit/endpoints/summaries/model.tar.gz")
    assert head.get("ServerSideEncryption") == "aws:kms"

    code, out, err = cli(capsys, "endpoints")
    assert code == 0, err
    assert "summaries" in out and "InService" in out and "1 x ml.g4dn.xlarge" in out

    code, out, err = cli(capsys, "delete", "summaries")
    assert code == 0, err
    for item in ("endpoint summaries", "endpoint config summaries", "model summaries",
                 f"s3://{BUCKET}/lorafit/endpoints/summaries/model.tar.gz"):
        assert f"deleted {item}" in out
    assert leftovers() == NOTHING
    code, out, err = cli(capsys, "delete", "summaries")  # safe to repeat
    assert code == 0 and "nothing to delete" in out


def test_serverless_and_cpu_get_the_cpu_image(aws: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = cli(capsys, "deploy", str(tiny_run), "--role", ROLE, "--serverless", "2048",
                         "--serverless-concurrency", "3", "--endpoint-name", "tiny-serverless", "--weights", "adapter")
    assert code == 0, err
    sm = client("sagemaker")
    image = sm.describe_model(ModelName="tiny-serverless")["PrimaryContainer"]["Image"]
    assert image.endswith("huggingface-pytorch-inference:2.6.0-transformers5.5.3-cpu-py312-ubuntu22.04")
    variant = sm.describe_endpoint_config(EndpointConfigName="tiny-serverless")["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 3}
    assert "InstanceType" not in variant
    assert cli(capsys, "delete", "tiny-serverless")[0] == 0
    assert leftovers() == NOTHING


# ------------------------------------------------------------------------------ failure paths
def test_failed_endpoint_deletes_what_the_deploy_created(aws: str, tiny_run: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    control(aws, "/_lorafit/endpoint-next", creating=1, final="Failed",
            reason="The primary container for production variant AllTraffic did not pass the ping health check.")
    code, out, err = cli(capsys, *deploy_args(tiny_run, "--endpoint-name", "broken", "--wait"))
    line = one_line_error(code, err)
    assert "endpoint broken failed: The primary container for production variant AllTraffic did not pass" in line
    assert "deleted what the deploy created" in line
    assert leftovers() == NOTHING


def test_failed_create_endpoint_cleans_up(aws: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    control(aws, "/_lorafit/fail-next", target="SageMaker.CreateEndpoint", code="ResourceLimitExceeded",
            message="The account-level service limit 'ml.g5.xlarge for endpoint usage' is 0 Instances")
    code, out, err = cli(capsys, *deploy_args(tiny_run, "--endpoint-name", "no-quota"))
    line = one_line_error(code, err)
    assert "service quota reached" in line and "removed what it created" in line
    assert leftovers() == NOTHING


def test_interrupted_deploy_deletes_what_it_created(aws: str, tiny_run: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the endpoint is Creating: SageMaker refuses to delete it then, so lorafit waits for
    it to leave Creating and deletes it, with its config, model and upload."""
    import time

    control(aws, "/_lorafit/endpoint-next", creating=3, final="InService")
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    code, out, err = cli(capsys, *deploy_args(tiny_run, "--endpoint-name", "interrupted", "--wait"))
    assert code == 130, err
    assert "interrupted: deleting endpoint interrupted" in out
    assert "SageMaker deletes it only after that ends: waiting" in out
    assert "deleted endpoint interrupted" in out
    assert leftovers() == NOTHING


# -------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_creates_nothing(aws: str, tiny_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    (no_adapter / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    cases = [
        (deploy_args(tiny_run, "--instance-type", "ml.g5.2xlage"), "unknown SageMaker instance type 'ml.g5.2xlage'"),
        (["deploy", str(tiny_run), "--role", "my-role", "--instance-type", "ml.g5.xlarge"], "--role: 'my-role'"),
        (deploy_args(no_adapter), "no adapter_config.json"),
        (deploy_args(tiny_run, "--context", "100000000"), "the model will not fit on ml.g4dn.xlarge"),
        (deploy_args(tiny_run, "--endpoint-name", "bad_name"), "--endpoint-name: 'bad_name'"),
        (deploy_args(tiny_run, "--serverless", "3000", "--instance-type", ""), "--serverless: 3000 MB"),
        (deploy_args(tiny_run, "--vpc-subnets", "subnet-0123abcd"), "give both"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, *args)
        assert message in one_line_error(code, err), (args, err)
    # a training job that has not completed (moto completes jobs at once; the helper sets it back)
    client("s3").create_bucket(Bucket="team-bucket")
    config = tmp_path / "job.yaml"
    config.write_text((tiny_run / "config.yaml").read_text())
    code, _, err = cli(capsys, "launch", str(config), "--role", ROLE, "--instance-type", "ml.g5.2xlarge",
                       "--bucket", "team-bucket", "--job-name", "still-training")
    assert code == 0, err
    set_job(aws, "still-training", "InProgress", secondary="Training")
    code, _, err = cli(capsys, *deploy_args("still-training"))  # type: ignore[arg-type]
    assert "training job still-training is InProgress, not Completed" in one_line_error(code, err)
    assert leftovers() == NOTHING
    assert client("sagemaker").list_models()["Models"] == []


def test_fit_check_names_what_would_fit(aws: str, tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, *deploy_args(tiny_run, "--context", "10000000"))
    line = one_line_error(code, err)
    assert "will not fit on ml.g4dn.xlarge" in line and "--instance-type ml." in line
    code, out, err = cli(capsys, *deploy_args(tiny_run, "--context", "10000000", "--force", "--endpoint-name", "forced"))
    assert code == 0 and "does NOT fit on ml.g4dn.xlarge" in out and "deploying anyway (--force)" in out
    assert cli(capsys, "delete", "forced")[0] == 0


def test_a_cpu_instance_serves_in_the_dtype_the_deploy_chose(tiny_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """model.dtype auto on a CPU instance is fp32 (ml.m5 has no bf16 units), whatever the deploying machine
    or the worker's CPU would make of auto: merged in it, counted in it, pinned in the package, loaded in it."""
    from lorafit.sagemaker.handler import load, read_settings

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["dtype"] = "auto"
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    monkeypatch.setenv("LORAFIT_CPU_BF16", "1")  # this machine (and the worker below) would make auto bf16
    folder = tmp_path / "model"
    capsys.readouterr()
    assert main(["sagemaker", "deploy", str(run), "--instance-type", "ml.m5.xlarge", "--package-only",
                 str(folder)]) == 0
    from lorafit.config import load_config
    from lorafit.planner import resolve_for
    from lorafit.sagemaker.endpoints import DeployOptions, _serving_config
    from lorafit.sagemaker.instances import host_device

    options = DeployOptions(source=str(run), instance_type="ml.m5.xlarge")
    counted = resolve_for(_serving_config(load_config(run / "config.yaml"), options), host_device("ml.m5.xlarge"))
    assert counted.precision.weights == "float32"  # what the fit check counts
    assert read_settings(folder).dtype == "float32"
    assert json.loads((folder / "merged" / "lorafit_merge.json").read_text())["dtype"] == "float32"
    served = load(folder, read_settings(folder))
    with served.session.activate(None) as model:
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fit_hints_size_each_gpu_in_its_own_dtype(tiny_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """A bf16 GPU that does not fit gets the hint, not the T4's "no bf16" error (the run's bf16 is not
    forced on the candidates); a run trained in bf16 still deploys to a T4 (fp16: serving computes in
    the weights' dtype, not the training precision)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["dtype"] = "auto"
    config["train"]["precision"] = "bf16"
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    code = main(["sagemaker", "deploy", str(run), "--instance-type", "ml.g5.xlarge", "--context", "15000000",
                 "--package-only", str(tmp_path / "big")])
    line = one_line_error(code, capsys.readouterr().err)
    assert "will not fit on ml.g5.xlarge" in line and "try --instance-type ml." in line, line
    assert main(["sagemaker", "deploy", str(run), "--instance-type", "ml.g4dn.xlarge", "--package-only",
                 str(tmp_path / "t4")]) == 0
    from lorafit.sagemaker.handler import read_settings

    assert read_settings(tmp_path / "t4").dtype == "float16"


# --------------------------------------------------------------------------------- from a job
def test_deploy_a_finished_job_from_its_own_archive(aws: str, tiny_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """A job launched with --merge holds merged weights and code/: served from its model.tar.gz as it is.
    Without them (adapter only, local base) the archive is downloaded and the run packaged here."""
    client("s3").create_bucket(Bucket="team-bucket")
    config = tmp_path / "job.yaml"
    config.write_text((tiny_run / "config.yaml").read_text())
    launch = ["launch", str(config), "--role", ROLE, "--instance-type", "ml.g5.2xlarge", "--bucket", "team-bucket"]
    assert cli(capsys, *launch, "--job-name", "merged-job", "--merge")[0] == 0
    code, out, err = cli(capsys, *deploy_args("merged-job", "--endpoint-name", "from-job"))  # type: ignore[arg-type]
    assert code == 0, err
    job = client("sagemaker").describe_training_job(TrainingJobName="merged-job")
    model = client("sagemaker").describe_model(ModelName="from-job")
    assert model["PrimaryContainer"]["ModelDataUrl"] == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert "nothing downloaded or uploaded" in out and "uploaded the model folder" not in out
    assert cli(capsys, "delete", "from-job")[0] == 0
    assert s3_objects("team-bucket", "lorafit/endpoints/") == {}

    assert cli(capsys, *launch, "--job-name", "adapter-job")[0] == 0
    job = client("sagemaker").describe_training_job(TrainingJobName="adapter-job")
    bucket, key = job["ModelArtifacts"]["S3ModelArtifacts"][5:].split("/", 1)
    buffer = io.BytesIO()  # what the job would have written: the run folder (the entry's export)
    with tarfile.open(fileobj=buffer, mode="w:gz") as handle:
        for name in ("adapter", "config.yaml"):
            handle.add(tiny_run / name, arcname=name)
    client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    code, out, err = cli(capsys, *deploy_args("adapter-job", "--endpoint-name", "repackaged",  # type: ignore[arg-type]
                                              "--weights", "adapter", "--bucket", "team-bucket"))
    assert code == 0, err
    assert "cannot be served as it is (its base is not a hub model" in out and "uploaded the model folder" in out
    url = client("sagemaker").describe_model(ModelName="repackaged")["PrimaryContainer"]["ModelDataUrl"]
    assert url == "s3://team-bucket/lorafit/endpoints/repackaged/model.tar.gz"
    assert cli(capsys, "delete", "repackaged")[0] == 0
    assert s3_objects("team-bucket", "lorafit/endpoints/") == {}


# --------------------------------------------------------------- predict and eval, served == trained
def test_predict_and_eval_against_the_served_model(aws: str, tiny_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from test_serving import DIALOGUES, Container

    folder = tmp_path / "model"
    assert main(["sagemaker", "deploy", str(tiny_run), "--instance-type", "ml.m5.xlarge", "--concurrency", "4",
                 "--package-only", str(folder)]) == 0
    served = Container(folder)
    try:
        code, _, err = cli(capsys, "deploy", str(tiny_run), "--role", ROLE, "--instance-type", "ml.m5.xlarge",
                           "--concurrency", "4", "--endpoint-name", "served")
        assert code == 0, err
        control(aws, "/_lorafit/endpoint-backend", name="served", url=served.url)

        capsys.readouterr()
        assert main(["generate", str(tiny_run), "--prompt", DIALOGUES[0], "--max-new-tokens", "10",
                     "--no-stream"]) == 0
        local = capsys.readouterr().out.strip()
        code, out, err = cli(capsys, "predict", "served", "--prompt", DIALOGUES[0], "--max-new-tokens", "10")
        assert code == 0, err
        assert out.strip() == local

        code, _, err = cli(capsys, "predict", "served", "--prompt", "x", "--temperature", "0", "--sample")
        line = one_line_error(code, err)
        assert line == "error: endpoint served refused the request (400): parameters.temperature: must be above 0 " \
                       "(use do_sample false for greedy)"

        rows = write_jsonl(tmp_path / "held-out.jsonl",
                           [{"dialogue": d, "summary": "They talk."} for d in DIALOGUES] + [{"dialogue": "no summary"}])
        code, out, err = cli(capsys, "predict", "served", "--data", str(rows), "--batch-size", "2",
                             "--max-new-tokens", "4")
        assert code == 0, err
        assert [json.loads(line)["id"] for line in out.splitlines()] == [0, 1, 2, 3]

        # lorafit eval --endpoint scores the served model exactly as lorafit eval RUN scores the local one
        assert main(["eval", str(tiny_run), "--data", str(rows), "--json", "--batch-size", "4",
                     "--output", str(tmp_path / "local.json"), "--no-report"]) == 0
        local_scores = json.loads(capsys.readouterr().out)["adapter"]
        assert main(["eval", "--endpoint", "served", "--data", str(rows), "--json", "--batch-size", "4",
                     "--output", str(tmp_path / "served.json")]) == 0
        served_scores = json.loads(capsys.readouterr().out)["endpoint"]
        assert served_scores == local_scores
        assert served_scores["perplexity"] is not None and "rouge1" in served_scores
    finally:
        served.close()
    assert cli(capsys, "delete", "served")[0] == 0
    assert leftovers() == NOTHING
