"""``lorafit push RUN --repo-id NAME [--private] [--merged] [--dry-run]``: share an adapter on the Hub."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push", help="upload an adapter and its model card to the Hugging Face Hub",
        description="Upload the adapter (peft format) and its model card to a Hub model repo through "
        "huggingface_hub; --merged adds the merged model under merged/. Needs a token (HF_TOKEN or "
        "`hf auth login`), except with --dry-run, which lists what would go up.")
    parser.add_argument("path", metavar="RUN", help="run folder or adapter folder")
    parser.add_argument("--repo-id", required=True, metavar="NAME", help="Hub repo, e.g. your-name/my-adapter")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--merged", action="store_true", help="also upload the merged model (lorafit merge) under merged/")
    parser.add_argument("--dry-run", action="store_true", help="list the files and sizes that would go up; upload nothing")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.hub import push

    push(args.path, args.repo_id, private=args.private, merged=args.merged, dry_run=args.dry_run)
    return 0
