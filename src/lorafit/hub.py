"""``lorafit push``: put an adapter (its model card too, optionally the merged model) on the Hub.

What goes up is decided once, by ``plan_upload``, and both ``--dry-run`` (which prints it) and the
upload (one ``create_commit`` through ``huggingface_hub``) use that same list:

- the adapter folder's files at the repo root, so ``AutoPeftModelForCausalLM.from_pretrained(REPO)``
  loads it; the card's loading instructions are rewritten to name the repo, and a base recorded as
  a local path in ``adapter_config.json`` is replaced by its Hub id when one is known (a builtin
  model, or the run's ``model.name_or_path``), since nobody else has that path;
- with ``--merged``: ``merged/``, the output of ``lorafit merge`` (``from_pretrained(REPO,
  subfolder="merged")``), made in a staging folder inside the run at upload time; the dry run
  lists it with an estimated size instead of writing gigabytes.

The token (``HF_TOKEN`` or ``hf auth login``) is checked before anything is merged or sent.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import is_offline_mode

from lorafit import runs
from lorafit.adapters import read_adapter_config
from lorafit.card import CARD_FILE, card_for_repo, hub_model_id
from lorafit.errors import LorafitError, first_line
from lorafit.export import merge
from lorafit.resolved import Environment, resolve_model_source, resolve_precision
from lorafit.runs import locate_run

MERGED_DIR = "merged"


@dataclass
class UploadItem:
    """One file of the upload: from disk (``local``) or made for the Hub (``content``)."""

    path_in_repo: str
    size: int
    local: Path | None = None
    content: bytes | None = None
    note: str = ""
    estimated: bool = False


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise LorafitError(f"--repo-id: '{repo_id}' is not a valid repo id (expected user/name or name)") from exc


def require_token() -> str:
    """The Hub token, or a one-line error saying how to get one."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise LorafitError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (lorafit push uploads as "
                           "that user); --dry-run lists the files without one")
    return token


def hub_base(target: Any) -> str | None:
    """The Hub id others should load the base from (None if only a local path is known)."""
    names = [target.config.model.name_or_path] if target.config is not None else []
    names.append(target.base_model)
    for name in names:
        found = hub_model_id(name)
        if found:
            return found
    return None


def plan_upload(path: str | Path, repo_id: str, *, merged: bool = False) -> tuple[list[UploadItem], list[str]]:
    """The files ``lorafit push`` uploads, in order, and notes for the user (a base with no Hub id)."""
    target = locate_run(path)
    adapter = target.adapter_dir
    notes: list[str] = []
    base = hub_base(target)
    items: list[UploadItem] = []
    for file in sorted(p for p in adapter.iterdir() if p.is_file()):
        if file.name == CARD_FILE:
            continue
        if file.name == runs.ADAPTER_CONFIG:
            config = read_adapter_config(adapter)
            recorded = str(config.get("base_model_name_or_path") or "")
            if base and recorded != base:
                config["base_model_name_or_path"] = base
                data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
                items.append(UploadItem(file.name, len(data), content=data, note=f"base_model_name_or_path -> {base}"))
                continue
            if not base:
                notes.append(f"{file}: base_model_name_or_path is the local path '{recorded}' and no Hub id is "
                             "known for it; whoever loads the adapter needs that base at that path (or passes --base)")
        items.append(UploadItem(file.name, file.stat().st_size, local=file))
    card = card_for_repo(adapter, repo_id, base)
    if card is None:
        notes.append(f"{adapter / CARD_FILE}: no model card (adapters trained by lorafit have one)")
    else:
        data = card.encode()
        items.insert(0, UploadItem(CARD_FILE, len(data), content=data, note="model card"))
    if merged:
        items += _merged_estimate(target)
    return items, notes


def _merged_estimate(target: Any) -> list[UploadItem]:
    """What ``lorafit merge`` will write, sized from the base's safetensors headers (no merge)."""
    env = Environment.local()  # lorafit merge's default: 16-bit on a GPU, fp32 on the CPU
    precision = resolve_precision("auto", "auto", device_kind=env.device_kind, bf16_supported=env.bf16_supported,
                                  cpu_bf16_units=bool(env.cpu_bf16_units))
    params = _base_params(target)
    size = params * precision.weight_bytes if params else 0
    note = (f"estimated: {params:,} parameters in {precision.weights}" if params else "size known after merging")
    note += "; made by lorafit merge at upload"
    return [UploadItem(f"{MERGED_DIR}/model*.safetensors", size, note=note, estimated=True),
            UploadItem(f"{MERGED_DIR}/config.json, tokenizer, lorafit_merge.json, lorafit_template.json", 0,
                       note="small files", estimated=True)]


def _base_params(target: Any) -> int:
    try:
        folder = Path(resolve_model_source(target.base_model).location)
    except LorafitError:
        return 0
    if not folder.is_dir():
        return 0
    total = 0
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for key, value in header.items():
            if key != "__metadata__":
                count = 1
                for dim in value["shape"]:
                    count *= dim
                total += count
    return total


def push(path: str | Path, repo_id: str, *, private: bool = False, merged: bool = False, dry_run: bool = False,
         api: Any = None, log: Callable[[str], None] = print) -> list[UploadItem]:
    """Upload the adapter behind ``path`` to ``repo_id`` (or, with ``dry_run``, list what would go up)."""
    check_repo_id(repo_id)
    items, notes = plan_upload(path, repo_id, merged=merged)
    for note in notes:
        log(f"lorafit: note: {note}")
    if dry_run:
        _print_plan(items, repo_id, private, log)
        return items
    token = require_token()  # before anything is merged or sent
    if api is None and is_offline_mode():
        raise LorafitError("push: offline mode is on (HF_HUB_OFFLINE): uploading needs the Hub; unset it to push, "
                           "or use --dry-run to list the files")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    staging = None
    try:
        if merged:
            staging, made = _merge_for_upload(path)
            items = [i for i in items if not i.estimated] + made
        try:
            _upload(api, repo_id, items, private=private, path=path)
        except Exception as exc:  # noqa: BLE001 - sorted below: network and Hub failures are one line
            if not _is_network_or_hub_error(exc):
                raise
            raise LorafitError(f"push: could not upload to https://huggingface.co/{repo_id} ({first_line(exc)}); "
                               "nothing was committed") from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    log(f"lorafit: pushed {len(items)} files ({_size(sum(i.size for i in items))}) to https://huggingface.co/{repo_id}")
    return items


def _merge_for_upload(path: str | Path) -> tuple[Path, list[UploadItem]]:
    """Merge into a staging folder inside the run (same disk as the adapter; removed after upload)."""
    target = locate_run(path)
    home = target.run_dir or target.adapter_dir
    try:
        staging = Path(tempfile.mkdtemp(prefix=".push-merged-", dir=home))
    except OSError as exc:  # a read-only run: --merged needs room beside the adapter
        raise LorafitError(f"--merged: cannot stage the merged model in {home} ({exc.strerror or exc}); push "
                           "without --merged, or from a writable copy of the run") from exc
    out = staging / MERGED_DIR
    try:
        merge(path, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # push never got the folder: nothing else removes it
        raise
    made = [UploadItem(f"{MERGED_DIR}/{f.relative_to(out).as_posix()}", f.stat().st_size, local=f)
            for f in sorted(out.rglob("*")) if f.is_file()]
    return staging, made


def _is_network_or_hub_error(exc: Exception) -> bool:
    """A failure of the network or the Hub (no route, DNS, offline mode, HTTP errors), as raised by
    huggingface_hub or the HTTP client underneath it (whichever it uses), not a bug."""
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, OSError) or module in ("huggingface_hub", "httpx", "httpx2", "httpcore", "requests",
                                                  "urllib3")


def _upload(api: Any, repo_id: str, items: list[UploadItem], *, private: bool, path: str | Path) -> None:
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=i.path_in_repo,
                                     path_or_fileobj=i.content if i.content is not None else str(i.local))
                  for i in items]
    api.create_commit(repo_id, operations, commit_message=f"lorafit push: {Path(path).name}")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _print_plan(items: list[UploadItem], repo_id: str, private: bool, log: Callable[[str], None]) -> None:
    from huggingface_hub import get_token

    total = sum(i.size for i in items)
    visibility = "private" if private else "public"
    log(f"lorafit: dry run: would upload {len(items)} files ({'~' if any(i.estimated for i in items) else ''}"
        f"{_size(total)}) to https://huggingface.co/{repo_id} ({visibility})")
    width = max(len(i.path_in_repo) for i in items)
    for item in items:
        size = ("~" if item.estimated else "") + _size(item.size) if item.size or not item.estimated else ""
        note = f"  {item.note}" if item.note else ""
        log(f"  {item.path_in_repo:<{width}}  {size:>10}{note}")
    log("lorafit: token: " + ("found" if get_token() else "none (the upload would stop: set HF_TOKEN or run "
                                                         "`hf auth login`)"))
