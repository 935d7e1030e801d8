"""Where checkpoints live: repo ids and file names, local directories or Hugging Face hub repos.

The one place that knows repo ids and file names (moshi's ``loaders.py`` habit). Every hub
failure becomes one ``CSMError`` line naming the fix; offline, the cache is tried first and the
network only when the hub's host resolves at all.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

from csm_engine.errors import CSMError, first_line

DEFAULT_CSM_REPO = "sesame/csm-1b"
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_REPO = "unsloth/Llama-3.2-1B"

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

ORIGINAL = "original"
TRANSFORMERS = "transformers"

# What a hub download of a CSM repo fetches: never pickles (ckpt.pt), never audio prompts.
HUB_PATTERNS = [CONFIG_FILE, "model*.safetensors", MODEL_INDEX_FILE, TOKENIZER_FILE, MIMI_FILE]

MAKE_CHECKPOINT_HINT = "`python -m csm_engine.testing make-checkpoint DIR`"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with no path syntax (``./``, ``~``, absolute paths, more slashes)."""
    return bool(_REPO_ID.match(name)) and not name.startswith(".")


def hub_error(repo_id: str, err: BaseException, what: str, filename: str | None = None) -> CSMError:
    """One line saying why ``repo_id`` could not be fetched and what to do about it (other packages fetch too)."""
    from huggingface_hub import errors

    url = f"https://huggingface.co/{repo_id}"
    if isinstance(err, errors.GatedRepoError):
        return CSMError(f"{repo_id} is gated: accept the licence at {url} and run `huggingface-cli login` "
                        "or set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return CSMError(f"{what} {repo_id!r} is neither a local directory nor a hub repo you can access "
                        f"(check the name; private repos need `huggingface-cli login` or HF_TOKEN)")
    if isinstance(err, errors.RevisionNotFoundError):
        return CSMError(f"{repo_id}: revision not found on the hub (check the repo at {url})")
    if isinstance(err, getattr(errors, "RemoteEntryNotFoundError", ())):
        return CSMError(f"{repo_id} has no {filename or what} on the hub; pass a local path to the {what} instead")
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, ConnectionError,
                        TimeoutError)) or _is_transport_error(err):
        return CSMError(f"cannot download {repo_id}: the hub is unreachable and it is not in the local cache "
                        "(connect and retry, unset HF_HUB_OFFLINE, or pass a local directory)")
    detail = first_line(err)
    return CSMError(f"cannot download {repo_id}: {detail} (retry, or pass a local directory)")


def _client_error_types(attr: str) -> tuple[type[BaseException], ...]:
    """Error classes named ``attr`` of the HTTP clients huggingface_hub releases use (httpx2, httpx)."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _is_transport_error(err: BaseException) -> bool:
    """A network-level failure (no answer from the hub), whichever HTTP client the hub uses."""
    if isinstance(err, _client_error_types("TransportError")):
        return True
    try:  # huggingface_hub < 1.0 used requests
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout
    except ImportError:
        return False
    return isinstance(err, (RequestsConnectionError, Timeout))


def hub_reachable() -> bool:
    """Whether the Hugging Face endpoint's host resolves (False in offline mode); a quick local check."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _hub_call(repo_id: str, what: str, filename: str | None, fn, *args, **kwargs) -> Path:
    """Run a huggingface_hub download and turn its failures into one-line CSMErrors."""
    from huggingface_hub import errors

    caught = (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
              ConnectionError, TimeoutError, OSError, *_client_error_types("HTTPError"))
    try:
        # The cache first; then only go to the network when the hub's host resolves at all:
        # offline, the hub client would retry a dead connection for ~25 s before failing.
        try:
            return Path(fn(*args, local_files_only=True, **kwargs))
        except errors.LocalEntryNotFoundError:
            if not hub_reachable():
                raise
        return Path(fn(*args, **kwargs))
    except errors.HFValidationError:
        raise CSMError(f"{what} {repo_id!r} is neither a local path nor a valid hub repo id") from None
    except caught as e:
        raise hub_error(repo_id, e, what, filename) from None


def download_repo(repo_id: str, allow_patterns: list[str] | None = None, what: str = "model") -> Path:
    """Fetch (or find in the HF cache) a hub repo snapshot; tqdm progress bars while it downloads."""
    from huggingface_hub import snapshot_download

    return _hub_call(repo_id, what, None, snapshot_download, repo_id, allow_patterns=allow_patterns or HUB_PATTERNS)


def download_file(repo_id: str, filename: str, what: str) -> Path:
    """Fetch (or find in the HF cache) one file of a hub repo."""
    from huggingface_hub import hf_hub_download

    return _hub_call(repo_id, what, filename, hf_hub_download, repo_id, filename)


def resolve_model_dir(path_or_repo: str | os.PathLike | None = None) -> Path:
    """A checkpoint directory: ``path_or_repo`` itself if it is a local dir, else a hub snapshot of it.

    ``None`` means the released model (``sesame/csm-1b``).
    """
    name = DEFAULT_CSM_REPO if path_or_repo is None else os.fspath(path_or_repo)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CSMError(f"model path {local} is a file; pass the checkpoint directory that holds it "
                       f"({CONFIG_FILE} + {MODEL_FILE})")
    if not looks_like_repo_id(name):
        raise CSMError(f"model directory not found: {local} (write one with {MAKE_CHECKPOINT_HINT} "
                       f"or pass a hub repo id such as {DEFAULT_CSM_REPO})")
    return download_repo(name)

