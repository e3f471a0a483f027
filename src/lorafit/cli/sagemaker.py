"""``lorafit sagemaker launch|status|logs|stop|download|train``: training as an Amazon SageMaker job;
``deploy|predict|endpoints|delete``: serving the trained run from a SageMaker endpoint."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lorafit.cli import add_config_arguments
from lorafit.cli.generate import _input_rows, add_generation_arguments, settings_from
from lorafit.sagemaker import endpoints, entry
from lorafit.sagemaker.aws import session
from lorafit.sagemaker.endpoints import age, delete, invoke, list_endpoints
from lorafit.sagemaker.entry import add_entry_arguments
from lorafit.sagemaker.errors import SageMakerError
from lorafit.sagemaker.hyperparameters import decode_argv
from lorafit.sagemaker.instances import describe_instance
from lorafit.sagemaker.jobs import (
    describe,
    download,
    logs,
    redacted,
    still_running_message,
    stop,
    summary_lines,
    wait,
)
from lorafit.sagemaker.launcher import LaunchOptions, launch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sagemaker", help="run training as an Amazon SageMaker training job")
    commands = parser.add_subparsers(dest="sagemaker_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    launch = commands.add_parser("launch", help="check locally, upload data and config to S3, create a training job")
    add_config_arguments(launch)
    launch.add_argument("--role", required=True, metavar="ARN", help="IAM role SageMaker assumes for the job")
    launch.add_argument("--instance-type", required=True, metavar="TYPE", help="e.g. ml.g5.2xlarge (1 x A10G 24 GB)")
    launch.add_argument("--instance-count", type=int, default=1, metavar="N",
                        help="instances; >1 trains data-parallel across them with torchrun")
    launch.add_argument("--spot", action="store_true", help="managed spot training (resumes from checkpoints)")
    launch.add_argument("--max-run", "--max-runtime", dest="max_run", type=int, default=86400, metavar="S",
                        help="MaxRuntime: SageMaker ends the job after S seconds; lorafit saves and stops "
                             "shortly before (default 86400)")
    launch.add_argument("--max-wait", type=int, default=None, metavar="S",
                        help="spot only: runtime plus waiting for capacity (default 2 x --max-run)")
    launch.add_argument("--bucket", metavar="NAME", help="S3 bucket (default: sagemaker-REGION-ACCOUNT, "
                                                        "checked to be yours, created when missing)")
    launch.add_argument("--image", metavar="URI", help="training image (default: Hugging Face PyTorch DLC)")
    launch.add_argument("--job-name", metavar="NAME", help="default: lorafit-DATE-TIME-XXXX")
    launch.add_argument("--volume-size", type=int, default=100, metavar="GB", help="EBS volume per instance")
    launch.add_argument("--merge", action="store_true", help="also write the merged model to model.tar.gz")
    launch.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job, e.g. HF_TOKEN=... (repeatable; "
                             "secret-looking values are never printed by lorafit)")
    launch.add_argument("--resume-from", metavar="JOB|S3URI",
                        help="continue from an earlier job's checkpoints (its name, or its checkpoint s3:// URI)")
    launch.add_argument("--tags", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="tags for the job (repeatable)")
    launch.add_argument("--vpc-subnets", default="", metavar="ID[,ID]", help="run in these VPC subnets")
    launch.add_argument("--security-groups", default="", metavar="ID[,ID]", help="with --vpc-subnets")
    launch.add_argument("--volume-kms-key", metavar="KEY", help="KMS key for the instances' storage volumes")
    launch.add_argument("--output-kms-key", metavar="KEY",
                        help="KMS key for model.tar.gz and for the objects lorafit uploads")
    launch.add_argument("--keep-alive", type=int, default=None, metavar="S",
                        help="keep the instances warm S seconds after the job (warm pools, up to 3600)")
    launch.add_argument("--force", action="store_true",
                        help="launch even when lorafit plan predicts the run will not fit the instance's GPU")
    launch.add_argument("--wait", action="store_true", help="follow the job's status until it ends")
    _add_aws_arguments(launch, debug=False)  # add_config_arguments already added --debug
    launch.set_defaults(func=run_launch)

    status = commands.add_parser("status", help="show a training job's status, times and cost")
    status.add_argument("job", metavar="JOB", help="training job name")
    status.add_argument("--json", action="store_true",
                        help="print DescribeTrainingJob as JSON (secret-looking environment values masked)")
    status.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _add_aws_arguments(status)
    status.set_defaults(func=run_status)

    logs = commands.add_parser("logs", help="print a training job's CloudWatch log")
    logs.add_argument("job", metavar="JOB", help="training job name")
    logs.add_argument("--follow", action="store_true", help="keep printing new lines until the job ends")
    _add_aws_arguments(logs)
    logs.set_defaults(func=run_logs)

    stop = commands.add_parser("stop", help="stop a running training job")
    stop.add_argument("job", metavar="JOB", help="training job name")
    _add_aws_arguments(stop)
    stop.set_defaults(func=run_stop)

    download = commands.add_parser("download", help="fetch a finished job's model.tar.gz and unpack the adapter")
    download.add_argument("job", metavar="JOB", help="training job name")
    download.add_argument("--output", required=True, metavar="DIR", help="empty or new folder for the run")
    _add_aws_arguments(download)
    download.set_defaults(func=run_download)

    train = commands.add_parser(
        "train", help="the in-container entry point (runs locally with SM_* variables set by hand)",
        description="Same as 'python -m lorafit.sagemaker.entry'. Config fields as SageMaker-style "
                    "hyperparameters go after '--', e.g. -- --train.max_steps 100.")

    add_entry_arguments(train)
    train.add_argument("extra", nargs="*", metavar="-- --SECTION.KEY VALUE",
                       help="config fields as hyperparameters, after '--'")
    train.set_defaults(func=run_train)
    _register_endpoints(commands)


def _register_endpoints(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser("deploy", help="serve a run (or a finished job) from a SageMaker endpoint")
    deploy.add_argument("source", metavar="RUN_OR_JOB", help="run folder, or the name of a finished training job")
    deploy.add_argument("--role", metavar="ARN", help="IAM role SageMaker assumes for the endpoint (not needed "
                                                      "with --package-only)")
    deploy.add_argument("--instance-type", metavar="TYPE", help="e.g. ml.g5.xlarge (1 x A10G 24 GB)")
    deploy.add_argument("--instance-count", type=int, default=1, metavar="N", help="instances behind the endpoint")
    deploy.add_argument("--serverless", type=int, default=None, metavar="MB",
                        help="a serverless endpoint with this much memory (1024-6144, CPU) instead of instances")
    deploy.add_argument("--serverless-concurrency", type=int, default=1, metavar="N",
                        help="serverless: requests served at once (MaxConcurrency, default 1)")
    deploy.add_argument("--endpoint-name", metavar="NAME", help="default: lorafit-RUN-DATE-TIME")
    deploy.add_argument("--weights", choices=["merged", "adapter"], default=None,
                        help="serve merged weights or the adapter on its base (default: merged; adapter for "
                             "int8/nf4 runs)")
    deploy.add_argument("--quantization", choices=["none", "int8", "nf4"], default=None,
                        help="how the endpoint holds the weights (default: as the run trained)")
    deploy.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="dtype of the unquantized weights (default: the run's model.dtype)")
    deploy.add_argument("--context", type=int, default=None, metavar="TOKENS",
                        help="prompt + new tokens per request that the endpoint is sized for and accepts "
                             "(default: the model's positions, at most 4096)")
    deploy.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="sequences generated at once (inputs per request) it is sized for (default 1)")
    deploy.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the endpoint's container, e.g. HF_TOKEN=... (repeatable)")
    deploy.add_argument("--tags", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="tags for the model, endpoint config and endpoint (repeatable)")
    deploy.add_argument("--vpc-subnets", default="", metavar="ID[,ID]", help="run the container in these subnets")
    deploy.add_argument("--security-groups", default="", metavar="ID[,ID]", help="with --vpc-subnets")
    deploy.add_argument("--kms-key", metavar="KEY", help="KMS key for the uploaded model.tar.gz and, on instance "
                                                         "types with EBS storage, the endpoint's volume")
    deploy.add_argument("--image", metavar="URI", help="inference image (default: Hugging Face PyTorch inference DLC)")
    deploy.add_argument("--bucket", metavar="NAME", help="S3 bucket for model.tar.gz (default: sagemaker-REGION-ACCOUNT)")
    deploy.add_argument("--package-only", metavar="DIR",
                        help="write the model folder that would be uploaded into DIR and stop (nothing in AWS)")
    deploy.add_argument("--force", action="store_true", help="deploy even when the model is predicted not to fit")
    deploy.add_argument("--wait", action="store_true",
                        help="follow the endpoint to InService; a failure (or Ctrl-C) deletes what was created")
    _add_aws_arguments(deploy)
    deploy.set_defaults(func=run_deploy)

    predict = commands.add_parser("predict", help="send a prompt or data rows to an endpoint")
    predict.add_argument("endpoint", metavar="ENDPOINT")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the dialogue / instruction / message (the run's template "
                                                        "is applied by the endpoint)")
    source.add_argument("--data", metavar="FILE", help="rows in the run's data format (.jsonl, .json, .csv, ...)")
    predict.add_argument("--json", action="store_true", help="print the endpoint's JSON answers")
    predict.add_argument("--batch-size", type=int, default=1, metavar="N", help="rows per request (--data)")

    add_generation_arguments(predict)
    _add_aws_arguments(predict)
    predict.set_defaults(func=run_predict)

    endpoints = commands.add_parser("endpoints", help="list lorafit's endpoints: status, instances, age")
    endpoints.add_argument("--json", action="store_true", help="one JSON list")
    _add_aws_arguments(endpoints)
    endpoints.set_defaults(func=run_endpoints)

    delete = commands.add_parser("delete", help="delete an endpoint, its endpoint config and model (safe to repeat)")
    delete.add_argument("endpoint", metavar="ENDPOINT")
    _add_aws_arguments(delete)
    delete.set_defaults(func=run_delete)


def _add_aws_arguments(parser: argparse.ArgumentParser, debug: bool = True) -> None:
    parser.add_argument("--region", help="AWS region (default: boto3's configuration, e.g. AWS_REGION)")
    parser.add_argument("--profile", help="AWS profile (default: boto3's configuration, e.g. AWS_PROFILE)")
    parser.add_argument("--poll", type=float, default=None, metavar="S", help=argparse.SUPPRESS)
    if debug:
        parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _session(args: argparse.Namespace):  # noqa: ANN202 - a boto3 Session
    return session(profile=args.profile, region=args.region)


def _say(message: str) -> None:
    print(f"lorafit: {message}", flush=True)


def _pairs(items: list[str], flag: str, split_commas: bool = False) -> dict[str, str]:
    pairs = {}
    for item in items:
        for part in item.split(",") if split_commas else [item]:
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise SageMakerError(f"{flag} {part!r}: expected KEY=VALUE")
            pairs[key.strip()] = value.strip() if split_commas else value
    return pairs


def _ids(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _following(job: str, follow: Callable[[], Any]) -> Any:
    """Run ``follow`` (wait or logs --follow); Ctrl-C (None returned) says the job goes on, and how to stop it."""
    try:
        return follow()
    except KeyboardInterrupt:
        print(f"\nlorafit: {still_running_message(job)}", file=sys.stderr, flush=True)
        return None


def run_launch(args: argparse.Namespace) -> int:
    options = LaunchOptions(
        config_path=args.config, overrides=list(args.overrides), role=args.role,
        instance_type=args.instance_type, instance_count=args.instance_count, spot=args.spot,
        max_runtime=args.max_run, max_wait=args.max_wait, bucket=args.bucket, image=args.image,
        job_name=args.job_name, volume_size=args.volume_size, merge=args.merge,
        environment=_pairs(args.env, "--env"), tags=_pairs(args.tags, "--tags", split_commas=True),
        vpc_subnets=_ids(args.vpc_subnets), security_groups=_ids(args.security_groups),
        volume_kms_key=args.volume_kms_key, output_kms_key=args.output_kms_key, keep_alive=args.keep_alive,
        resume_from=args.resume_from, force=args.force, profile=args.profile, region=args.region,
    )
    hardware = describe_instance(options.instance_type)
    result = launch(options, echo=_say)
    _say(f"created training job {result.job_name} on {options.instance_count} x {options.instance_type} "
         f"({hardware}){' spot' if options.spot else ''} in {result.region}")
    _say(f"console: https://{result.region}.console.aws.amazon.com/sagemaker/home?region={result.region}"
         f"#/jobs/{result.job_name}")
    if not args.wait:
        _say(f"follow it: lorafit sagemaker status {result.job_name} --wait  (log: lorafit sagemaker logs "
             f"{result.job_name} --follow)")
        _say(f"then: lorafit sagemaker download {result.job_name} --output DIR")
        return 0
    info = _following(result.job_name, lambda: wait(result.job_name, poll_s=_poll(args, 30.0), echo=_say,
                                                     boto_session=_session(args)))
    if info is None:
        return 130
    for line in summary_lines(info):
        print(line)
    _say(f"done. fetch the adapter: lorafit sagemaker download {result.job_name} --output DIR")
    return 0


def _poll(args: argparse.Namespace, default: float) -> float:
    return default if args.poll is None else args.poll


def run_status(args: argparse.Namespace) -> int:
    boto_session = _session(args)
    if args.wait:
        info = _following(args.job, lambda: wait(args.job, poll_s=_poll(args, 30.0), echo=_say,
                                                  boto_session=boto_session))
        if info is None:
            return 130
    else:
        info = describe(args.job, boto_session)
    if args.json:
        print(json.dumps(redacted(info), indent=2, default=str))
    else:
        for line in summary_lines(info):
            print(line)
    return 0


def run_logs(args: argparse.Namespace) -> int:
    boto_session = _session(args)
    info = _following(args.job, lambda: logs(args.job, follow=args.follow, poll_s=_poll(args, 10.0),
                                             boto_session=boto_session, out=lambda line: print(line, flush=True)))
    if info is None:
        return 130
    if args.follow:
        _say(f"training job {args.job} {str(info.get('TrainingJobStatus')).lower()}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    info = stop(args.job, boto_session=_session(args))
    _say(f"stopping training job {args.job} (now {info.get('TrainingJobStatus')}); SageMaker signals the "
         f"container and ends it. Checkpoints stay in {info.get('CheckpointConfig', {}).get('S3Uri', 'S3')}; "
         f"continue later with: lorafit sagemaker launch CONFIG ... --resume-from {args.job}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    target = download(args.job, args.output, boto_session=_session(args), echo=_say)
    _say(f"adapter: {target / 'adapter'}")
    _say(f"try it: lorafit generate {target}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    return entry.run(args, decode_argv(list(args.extra)))


def run_deploy(args: argparse.Namespace) -> int:
    options = endpoints.DeployOptions(
        source=args.source, role=args.role, instance_type=args.instance_type, instance_count=args.instance_count,
        serverless_memory=args.serverless, serverless_concurrency=args.serverless_concurrency,
        endpoint_name=args.endpoint_name, weights=args.weights, quantization=args.quantization, dtype=args.dtype,
        context=args.context, concurrency=args.concurrency, environment=_pairs(args.env, "--env"),
        tags=_pairs(args.tags, "--tags", split_commas=True), vpc_subnets=_ids(args.vpc_subnets),
        security_groups=_ids(args.security_groups), kms_key=args.kms_key, image=args.image, bucket=args.bucket,
        package_only=args.package_only, force=args.force, profile=args.profile, region=args.region)
    result = endpoints.deploy(options, echo=_say)
    if result.package_dir is not None:
        folder = result.package_dir
        local = f"{folder}/merged" if (folder / "merged").is_dir() else f"{folder} --base {folder}/base"
        _say(f"model folder: {folder} (what model.tar.gz would hold); its weights: lorafit generate {local}")
        return 0
    where = (f"serverless ({options.serverless_memory} MB)" if options.serverless_memory
             else f"{options.instance_count} x {options.instance_type}")
    _say(f"created endpoint {result.endpoint} on {where} in {result.region}; it bills per instance-hour "
         f"until deleted: lorafit sagemaker delete {result.endpoint}")
    if not args.wait:
        _say(f"it takes 5-10 minutes to be InService; then: lorafit sagemaker predict {result.endpoint} --prompt TEXT")
        return 0
    session = _session(args)
    try:
        endpoints.wait(result.endpoint, poll_s=_poll(args, 30.0), echo=_say, boto_session=session)
    except (KeyboardInterrupt, SageMakerError) as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        if interrupted:
            print("", file=sys.stderr)
            _say(f"interrupted: deleting endpoint {result.endpoint} and what was created for it")
        try:
            endpoints.delete(result.endpoint, boto_session=session, echo=_say, poll_s=_poll(args, 15.0))
        except KeyboardInterrupt:
            _say(f"left endpoint {result.endpoint} in place; delete it with: lorafit sagemaker delete "
                 f"{result.endpoint}")
            return 130
        if interrupted:
            return 130
        raise SageMakerError(f"{exc}; deleted what the deploy created") from exc
    _say(f"endpoint {result.endpoint} is InService. Try: lorafit sagemaker predict {result.endpoint} --prompt TEXT")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    parameters = settings_from(args).request_parameters()
    session = _session(args)
    if args.prompt is not None:
        answer = invoke(args.endpoint, {"inputs": args.prompt, "parameters": parameters}, boto_session=session)
        print(json.dumps(answer) if args.json else answer[0]["generated_text"], flush=True)
        return 0

    rows = _input_rows(args.data)
    size = max(args.batch_size, 1)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        answer = invoke(args.endpoint, {"inputs": chunk, "parameters": parameters}, boto_session=session)
        for offset, (row, item) in enumerate(zip(chunk, answer, strict=True)):
            record = item if args.json else {"id": row.get("id", start + offset), "generated": item["generated_text"]}
            print(json.dumps(record), flush=True)
    return 0


def run_endpoints(args: argparse.Namespace) -> int:
    found = list_endpoints(boto_session=_session(args))
    if args.json:
        print(json.dumps(found, default=str))
        return 0
    if not found:
        _say("no lorafit endpoints in this region")
        return 0
    width = max(len(e["name"]) for e in found)
    print(f"{'ENDPOINT':<{width}}  {'STATUS':<10}  {'INSTANCES':<24}  AGE")
    for item in found:
        print(f"{item['name']:<{width}}  {str(item['status']):<10}  {item['instances']:<24}  {age(item['created'])}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    gone = delete(args.endpoint, boto_session=_session(args), echo=_say, poll_s=_poll(args, 15.0))
    if not gone:
        _say(f"nothing to delete: no endpoint, endpoint config or model named {args.endpoint} remains")
    return 0
