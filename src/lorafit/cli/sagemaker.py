"""``lorafit sagemaker launch|status|download|train``: run training as an Amazon SageMaker job."""

from __future__ import annotations

import argparse
import json

from lorafit.cli import add_config_arguments
from lorafit.sagemaker.errors import SageMakerError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sagemaker", help="run training as an Amazon SageMaker training job")
    commands = parser.add_subparsers(dest="sagemaker_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    launch = commands.add_parser("launch", help="upload data and config to S3 and create a training job")
    add_config_arguments(launch)
    launch.add_argument("--role", required=True, metavar="ARN", help="IAM role SageMaker assumes for the job")
    launch.add_argument("--instance-type", required=True, metavar="TYPE", help="e.g. ml.g5.2xlarge (1 x A10G 24 GB)")
    launch.add_argument("--instance-count", type=int, default=1, metavar="N",
                        help="instances; >1 trains data-parallel across them with torchrun")
    launch.add_argument("--spot", action="store_true", help="managed spot training (resumes from checkpoints)")
    launch.add_argument("--max-runtime", type=int, default=86400, metavar="S", help="stop the job after S seconds")
    launch.add_argument("--max-wait", type=int, default=None, metavar="S",
                        help="spot only: runtime plus waiting for capacity (default 2 x --max-runtime)")
    launch.add_argument("--bucket", metavar="NAME", help="S3 bucket (default: sagemaker-REGION-ACCOUNT, created)")
    launch.add_argument("--image", metavar="URI", help="training image (default: Hugging Face PyTorch DLC)")
    launch.add_argument("--job-name", metavar="NAME", help="default: lorafit-DATE-TIME-XXXX")
    launch.add_argument("--volume-size", type=int, default=100, metavar="GB", help="EBS volume per instance")
    launch.add_argument("--merge", action="store_true", help="also write the merged model to model.tar.gz")
    launch.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job, e.g. HF_TOKEN=... (repeatable)")
    launch.add_argument("--wait", action="store_true", help="follow the job's status until it ends")
    _add_aws_arguments(launch, debug=False)  # add_config_arguments already added --debug
    launch.set_defaults(func=run_launch)

    status = commands.add_parser("status", help="show a training job's status")
    status.add_argument("job", metavar="JOB", help="training job name")
    status.add_argument("--json", action="store_true", help="print DescribeTrainingJob as JSON")
    status.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _add_aws_arguments(status)
    status.set_defaults(func=run_status)

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
    parser.add_argument("--poll", type=float, default=30.0, metavar="S", help=argparse.SUPPRESS)
    if debug:
        parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _session(args: argparse.Namespace):  # noqa: ANN202 - a boto3 Session
    from lorafit.sagemaker.launcher import session

    return session(profile=args.profile, region=args.region)


def _say(message: str) -> None:
    print(f"lorafit: {message}", flush=True)


def _environment(items: list[str]) -> dict[str, str]:
    environment = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SageMakerError(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
    return environment


def run_launch(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.instances import describe_instance
    from lorafit.sagemaker.launcher import LaunchOptions, launch, summary_lines, wait

    options = LaunchOptions(
        config_path=args.config, overrides=list(args.overrides), role=args.role,
        instance_type=args.instance_type, instance_count=args.instance_count, spot=args.spot,
        max_runtime=args.max_runtime, max_wait=args.max_wait, bucket=args.bucket, image=args.image,
        job_name=args.job_name, volume_size=args.volume_size, merge=args.merge,
        environment=_environment(args.env),
    )
    from lorafit.sagemaker.launcher import check_role_arn

    check_role_arn(options.role)  # fail before touching AWS (or needing credentials)
    hardware = describe_instance(options.instance_type)
    boto_session = _session(args)
    result = launch(options, echo=_say, boto_session=boto_session)
    _say(f"created training job {result.job_name} on {options.instance_count} x {options.instance_type} "
         f"({hardware}){' spot' if options.spot else ''} in {result.region}")
    _say(f"console: https://{result.region}.console.aws.amazon.com/sagemaker/home?region={result.region}"
         f"#/jobs/{result.job_name}")
    if not args.wait:
        _say(f"follow it: lorafit sagemaker status {result.job_name} --wait")
        _say(f"then: lorafit sagemaker download {result.job_name} --output DIR")
        return 0
    info = wait(result.job_name, poll_s=args.poll, echo=_say, boto_session=boto_session)
    for line in summary_lines(info):
        print(line)
    _say(f"done. fetch the adapter: lorafit sagemaker download {result.job_name} --output DIR")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.launcher import describe, summary_lines, wait

    boto_session = _session(args)
    info = wait(args.job, poll_s=args.poll, echo=_say, boto_session=boto_session) if args.wait \
        else describe(args.job, boto_session)
    if args.json:
        info = {k: v for k, v in info.items() if k != "ResponseMetadata"}
        print(json.dumps(info, indent=2, default=str))
    else:
        for line in summary_lines(info):
            print(line)
    return 0


def run_download(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.launcher import download

    target = download(args.job, args.output, boto_session=_session(args), echo=_say)
    _say(f"adapter: {target / 'adapter'}")
    _say(f"try it: lorafit generate {target}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from lorafit.sagemaker.entry import run

    return run(args, list(args.extra))
