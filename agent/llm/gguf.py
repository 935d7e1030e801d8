"""``--llm-model``: a GGUF file on disk, or one on the Hugging Face hub fetched into its cache.

    PATH.gguf                   a local file
    OWNER/REPO:FILE.gguf        that file of a hub repo
    OWNER/REPO:QUANT            the repo's file for a quantization (Q4_K_M, q8_0, IQ4_XS, ...)
    OWNER/REPO                  the repo's Q4_K_M file, or its only GGUF

Downloads show a progress bar and land in the Hugging Face cache (``HF_HOME``), like the CSM
weights: the next start finds the file there, also offline. A model split into parts
(``-00001-of-00003.gguf``) is fetched whole; llama.cpp opens the first part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from agent.errors import AgentError

DEFAULT_QUANT = "Q4_K_M"
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<selector>[^:]+))?$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubGGUF:
    repo_id: str
    selector: str | None  # a file name (ends with .gguf), a quantization tag, or None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.selector}" if self.selector else "")


def parse_model_spec(spec: str | Path) -> Path | HubGGUF:
    """A local path (existing, or any name ending in .gguf without a ``:``), else a hub reference."""
    text = str(spec).strip()
    path = Path(text).expanduser()
    if isinstance(spec, Path) or path.exists() or (text.lower().endswith(".gguf") and ":" not in text):
        return path
    match = _SPEC.match(text)
    if match is None:
        raise AgentError(f"--llm-model {text!r} is neither a file nor a hub reference; pass PATH.gguf, "
                         "OWNER/REPO:QUANT (e.g. bartowski/Qwen2.5-3B-Instruct-GGUF:Q4_K_M) or OWNER/REPO:FILE.gguf")
    return HubGGUF(match["repo"], match["selector"])


def choose_file(files: list[str], ref: HubGGUF) -> str:
    """The GGUF of ``files`` (repo paths) that ``ref`` names; AgentError listing what there is otherwise."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if not ggufs:
        raise AgentError(f"{ref.repo_id} has no .gguf files; pick a GGUF repo (their names usually end in -GGUF)")
    selector = ref.selector
    if selector is not None and selector.lower().endswith(".gguf"):
        if selector in ggufs or selector in {Path(f).name for f in ggufs}:
            return next(f for f in ggufs if f == selector or Path(f).name == selector)
        raise AgentError(f"{ref.repo_id} has no file {selector}; it has: {_listing(ggufs)}")
    if selector is None and len(_models(ggufs)) == 1:
        return _models(ggufs)[0]
    quant = (selector or DEFAULT_QUANT).lower()
    matches = [f for f in _models(ggufs) if re.search(rf"(?<![a-z0-9]){re.escape(quant)}(?![a-z0-9])", f.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AgentError(f"{ref.repo_id} has no {quant.upper()} file; choose one of {_listing(ggufs)} "
                         f"(--llm-model {ref.repo_id}:QUANT or :FILE.gguf)")
    raise AgentError(f"{ref} matches several files ({_listing(matches)}); "
                     f"name one: --llm-model {ref.repo_id}:FILE.gguf")


def _models(ggufs: list[str]) -> list[str]:
    """The loadable files: the first part of each split model, and the unsplit ones (not mmproj adapters)."""
    out = []
    for f in ggufs:
        split = _SPLIT.search(f)
        if (split is None or split.group(1) == "00001") and "mmproj" not in Path(f).name.lower():
            out.append(f)
    return out


def _listing(files: list[str], most: int = 8) -> str:
    names = [Path(f).name for f in files]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _parts(filename: str) -> list[str]:
    """Every part of a split GGUF (the file itself when it is not split)."""
    split = _SPLIT.search(filename)
    if split is None:
        return [filename]
    total = int(split.group(2))
    stem = filename[: split.start()]
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def _cached_files(repo_id: str) -> list[str]:
    """GGUF paths of the repo's snapshot in the local Hugging Face cache (empty when none is cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=["*.gguf"]))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.gguf"))


def _hub_files(repo_id: str) -> list[str]:
    from huggingface_hub import HfApi, errors

    from csm_engine.weights import hub_error

    try:
        return HfApi().list_repo_files(repo_id)
    except errors.HFValidationError:
        raise AgentError(f"--llm-model {repo_id!r} is not a valid hub repo id (OWNER/REPO)") from None
    except Exception as error:  # the hub client raises its own types per failure; one message each
        raise AgentError(str(hub_error(repo_id, error, "GGUF model"))) from None


def resolve_hub_gguf(ref: HubGGUF) -> Path:
    """The local path of the GGUF ``ref`` names: from the cache, else downloaded into it (progress bar)."""
    from csm_engine.errors import CSMError
    from csm_engine.weights import download_file, hub_reachable

    cached = _cached_files(ref.repo_id)
    try:
        filename = choose_file(cached, ref)
    except AgentError:
        if not hub_reachable():
            if cached:
                raise
            raise AgentError(f"cannot fetch {ref}: the hub is unreachable and {ref.repo_id} is not in the Hugging "
                             "Face cache (connect once, or pass a local PATH.gguf)") from None
        filename = choose_file(_hub_files(ref.repo_id), ref)
    try:
        paths = [download_file(ref.repo_id, part, "GGUF model") for part in _parts(filename)]
    except CSMError as error:
        raise AgentError(str(error)) from None
    return paths[0]


def resolve_gguf(spec: str | Path | None) -> Path:
    """``--llm-model`` -> a local GGUF path (None: the embedded SmolLM2-135M-Instruct)."""
    from agent.embedded import smollm2_gguf

    if spec is None or str(spec).strip() == "":
        return smollm2_gguf()
    parsed = parse_model_spec(spec)
    return parsed if isinstance(parsed, Path) else resolve_hub_gguf(parsed)


__all__ = ["DEFAULT_QUANT", "HubGGUF", "choose_file", "parse_model_spec", "resolve_gguf", "resolve_hub_gguf"]
