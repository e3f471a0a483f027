"""``lorafit sagemaker launch|status|logs|stop|download|train``: training as an Amazon SageMaker job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lorafit.cli import add_config_arguments
from lorafit.sagemaker.errors import SageMakerError


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
    from lorafit.sagemaker.entry import add_entry_arguments

    add_entry_arguments(train)
    train.add_argument("extra", nargs="*", metavar="-- --SECTION.KEY VALUE",
                       help="config fields as hyperparameters, after '--'")
    train.set_defaults(func=run_train)


def _add_aws_arguments(parser: argparse.ArgumentParser, debug: bool = True) -> None:
    parser.add_argument("--region", help="AWS region (default: boto3's configuration, e.g. AWS_REGION)")
    parser.add_argument("--profile", help="AWS profile (default: boto3's configuration, e.g. AWS_PROFILE)")
    parser.add_argument("--poll", type=float, default=None, metavar="S", help=argparse.SUPPRESS)
    if debug:
        parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _session(args: argparse.Namespace):  # noqa: ANN202 - a boto3 Session
    from lorafit.sagemaker.aws import session

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
    from lorafit.sagemaker.jobs import still_running_message

    try:
        return follow()
    except KeyboardInterrupt:
        print(f"\nlorafit: {still_running_message(job)}", file=sys.stderr, flush=True)
        return None


def run_launch(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.instances import describe_instance
    from lorafit.sagemaker.jobs import summary_lines, wait
    from lorafit.sagemaker.launcher import LaunchOptions, launch

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
    from lorafit.sagemaker.jobs import describe, redacted, summary_lines, wait

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
    from lorafit.sagemaker.jobs import logs

    boto_session = _session(args)
    info = _following(args.job, lambda: logs(args.job, follow=args.follow, poll_s=_poll(args, 10.0),
                                             boto_session=boto_session, out=lambda line: print(line, flush=True)))
    if info is None:
        return 130
    if args.follow:
        _say(f"training job {args.job} {str(info.get('TrainingJobStatus')).lower()}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.jobs import stop

    info = stop(args.job, boto_session=_session(args))
    _say(f"stopping training job {args.job} (now {info.get('TrainingJobStatus')}); SageMaker signals the "
         f"container and ends it. Checkpoints stay in {info.get('CheckpointConfig', {}).get('S3Uri', 'S3')}; "
         f"continue later with: lorafit sagemaker launch CONFIG ... --resume-from {args.job}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.jobs import download

    target = download(args.job, args.output, boto_session=_session(args), echo=_say)
    _say(f"adapter: {target / 'adapter'}")
    _say(f"try it: lorafit generate {target}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.entry import run
    from lorafit.sagemaker.hyperparameters import decode_argv

    return run(args, decode_argv(list(args.extra)))
