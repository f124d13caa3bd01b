"""Hub upload: push an export folder to a Hugging Face Hub repository.

``push_folder`` uses the standard settings: the token from ``token=``, else ``HF_TOKEN``, else
the one saved by ``hf auth login``; the endpoint from ``endpoint=``, else ``HF_ENDPOINT`` read
when the call is made (``huggingface_hub`` reads it only at import), else huggingface.co.

The token is never written, logged or shown: every failure is re-raised as a ``HubError``
whose message has the token scrubbed out, says why it failed (auth, network, quota, server,
...) and that the local folder is intact.

Retrying: ``upload_folder`` asks the Hub's ``preupload`` endpoint about every file; the Hub
answers with the oid of the file it already holds at that path, and the client leaves files
whose local oid (git sha1 of small "regular" files, sha256 of large LFS/Xet files) equals it
out of the commit. Large files go through Xet, whose content-defined chunks are deduplicated
server-side, so an interrupted upload re-sends only the chunks that never arrived. When
nothing changed no commit is made at all. The client offers no finer control than that.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fbnprune.publish.errors import ExportError

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload pruned model (fbnprune)"
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class HubError(ExportError):
    """An upload that failed; ``reason`` is one of auth, network, quota, rate-limit, server,
    not-found, invalid, offline, no-token, error. The message never holds the token."""

    def __init__(self, message: str, *, reason: str, status: int | None = None) -> None:
        super().__init__(message)
        self.reason, self.status = reason, status


@dataclass
class PushResult:
    """What was (or, in a dry run, would be) uploaded."""

    repo_id: str
    endpoint: str
    revision: str
    files: dict[str, int]
    dry_run: bool
    private: bool = False
    token_found: bool = False
    commit_url: str | None = None
    commit_oid: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        from fbnprune.publish.card import human_bytes

        target = f"{self.endpoint.rstrip('/')}/{self.repo_id} (branch {self.revision})"
        if self.dry_run:
            lines = [
                f"dry run: would upload {len(self.files)} files "
                f"({human_bytes(self.total_bytes)}) to {target}"
                + (", private" if self.private else "")
            ]
            lines += [f"  {name:<40} {human_bytes(size):>12}" for name, size in self.files.items()]
            missing = "none found (set HF_TOKEN or run `hf auth login`)"
            lines.append("token: " + ("found" if self.token_found else missing))
        else:
            lines = [
                f"uploaded {len(self.files)} files ({human_bytes(self.total_bytes)}) to {target}",
                f"commit: {self.commit_url}",
            ]
        return "\n".join(lines + self.notes)


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT`` as set now, else the library's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the token saved by ``hf auth login``."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def upload_files(folder: Path) -> dict[str, int]:
    """The files ``upload_folder`` would send (it skips ``.git`` and ``.cache/huggingface``)."""
    from huggingface_hub.utils import filter_repo_objects

    try:  # the client's own list (a private module)
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
    except ImportError:
        DEFAULT_IGNORE_PATTERNS = [
            ".git",
            ".git/*",
            "*/.git",
            "**/.git/**",
            ".cache/huggingface",
            ".cache/huggingface/*",
            "*/.cache/huggingface",
            "**/.cache/huggingface/**",
        ]
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    kept = set(filter_repo_objects(files, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS)))
    return {name: size for name, size in files.items() if name in kept}


def check_repo_id(repo_id: str) -> None:
    """Raise ``HubError`` unless ``repo_id`` is a valid ``namespace/name`` (no network): run
    it before writing anything meant for that repository."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"invalid repository id {repo_id!r}: {exc}", reason="invalid") from None
    if "/" not in repo_id:
        raise HubError(
            f"repository id {repo_id!r} needs a namespace: 'user/{repo_id}'", reason="invalid"
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``folder`` into it in one or more commits.

    Args:
        folder: the export folder (left untouched, whatever happens).
        repo_id: ``namespace/name`` of a model repository.
        private: create the repository private (an existing one keeps its visibility).
        revision: a branch to upload to; created from the default branch if missing.
        commit_message: the commit's title.
        token: a Hub token; default ``HF_TOKEN`` or the saved login.
        endpoint: the Hub URL; default ``HF_ENDPOINT`` or huggingface.co.
        dry_run: only list what would be uploaded; no network.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"{folder} is not a folder with files to upload", reason="invalid")
    check_repo_id(repo_id)
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(token)
    result = PushResult(
        repo_id=repo_id,
        endpoint=endpoint,
        revision=revision or "main",
        files=upload_files(folder),
        dry_run=dry_run,
        private=private,
        token_found=token is not None,
    )
    if dry_run:
        return result
    if token is None:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)",
            reason="no-token",
        )

    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        raise HubError(
            "HF_HUB_OFFLINE is set, so huggingface_hub refuses to upload; unset it "
            f"and retry (the folder {folder} is intact)",
            reason="offline",
        )
    api = HfApi(endpoint=endpoint, token=token)
    step, error, info = "create the repository", None, None
    try:
        api.create_repo(
            repo_id, repo_type="model", private=True if private else None, exist_ok=True
        )
        if revision and revision != "main":
            step = f"create branch {revision!r}"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = "upload the folder"
        logger.info(
            "hub: uploading %d files (%.1f MiB) to %s/%s@%s",
            len(result.files),
            result.total_bytes / 2**20,
            endpoint,
            repo_id,
            result.revision,
        )
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except Exception as exc:  # noqa: BLE001 - every failure is scrubbed and classified
        error = _hub_error(exc, token, step=step, repo_id=repo_id, folder=folder)
    if error is not None:  # raised outside the handler: no chained exception holds the request
        raise error
    assert info is not None  # the upload returned
    result.commit_url, result.commit_oid = str(info.commit_url), info.oid
    return result


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token in every form a server may echo (plain, URL-encoded, base64 as
    in a Basic header), and anything shaped like a Hub token, replaced by ``***``."""
    for form in sorted(token_forms(token) if token else set(), key=len, reverse=True):
        text = re.sub(re.escape(form), "***", text, flags=re.IGNORECASE if "%" in form else 0)
    return _TOKEN_LIKE.sub("hf_***", text)


def token_forms(token: str) -> set[str]:
    """The token as text, URL-encoded (``quote``, ``quote_plus``) and base64-encoded (standard
    and URL-safe, at each of the three alignments it can have after a prefix such as
    ``user:``: the characters that depend on the token alone)."""
    from urllib.parse import quote, quote_plus

    forms = {token, quote(token, safe=""), quote_plus(token, safe="")}
    raw = token.encode()
    for shift in range(3):
        data = b"\0" * shift + raw
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(data).decode()
            tail = 4 if len(data) % 3 else 0  # the last group mixes in the padding
            core = text[(4 * shift + 2) // 3 : len(text) - tail]
            if len(core) >= 8:
                forms.add(core)
    return forms


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _hub_error(
    exc: Exception, token: str | None, *, step: str, repo_id: str, folder: Path
) -> HubError:
    """Classify a failed Hub call into a clear, token-free ``HubError``."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = _status(exc)
    detail = " ".join(scrub(str(exc), token).split())[:600]
    lowered = detail.lower()
    if isinstance(exc, OfflineModeIsEnabled):
        reason, why = "offline", "HF_HUB_OFFLINE is set; unset it to upload"
    elif status in (401, 403) and not any(w in lowered for w in ("quota", "storage limit")):
        reason = "auth"
        why = (
            f"the token was rejected ({status}): check HF_TOKEN or `hf auth login`"
            if status == 401
            else f"the token may not write to {repo_id} ({status}): it needs write access to "
            "that namespace"
        )
    elif status in (402, 413, 507) or "quota" in lowered or "storage limit" in lowered:
        reason, why = "quota", f"storage quota or size limit ({status}): free space or upgrade"
    elif status == 429:
        reason, why = "rate-limit", "too many requests (429): wait and retry"
    elif status == 404:
        reason, why = "not-found", f"{repo_id} or the branch was not found (404)"
    elif status is not None and status >= 500:
        reason, why = "server", f"the Hub answered with a server error ({status}); retry later"
    elif status is None and _is_network(exc):
        reason, why = "network", "could not reach the Hub (network error)"
    elif isinstance(exc, ValueError) and "metadata" in lowered:
        reason, why = "invalid", "the Hub rejected the model card's metadata"
    else:
        reason = "error"
        why = f"{type(exc).__name__}" + (f" ({status})" if status else "")
    message = (
        f"upload to {repo_id} failed while trying to {step}: {why}.\n  {detail}\n"
        f"The local folder {folder} is intact; re-run the same command to retry "
        "(files the Hub already holds unchanged are not sent again)."
    )
    return HubError(scrub(message, token), reason=reason, status=status)


def _is_network(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {
            "TransportError",
            "NetworkError",
            "TimeoutException",
            "ConnectionError",
            "ConnectError",
            "OSError",
        }:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
