"""csm-chat defaults from a TOML file: ``<user config dir>/csm-chat/config.toml``.

The file holds top-level keys named like the options, with dashes or underscores::

    csm-model = "/models/csm-1b"
    persona = "concise"
    input-device = 2

An explicit ``--config PATH`` must exist; the default file is optional. A key we do not know
is an error naming it (a typo would otherwise be silently ignored).
"""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import platformdirs

from agent.config.settings import AgentSettings
from agent.errors import AgentError

CONFIG_NAME = "config.toml"


def default_config_path() -> Path:
    """``config.toml`` in the user's csm-chat config directory (platformdirs)."""
    return Path(platformdirs.user_config_dir("csm-chat")) / CONFIG_NAME


def _expected_types() -> dict[str, tuple[type, ...]]:
    kinds: dict[str, tuple[type, ...]] = {}
    for f in fields(AgentSettings):
        if f.name == "config_path":
            continue
        hint = str(f.type)
        if hint.startswith("dict"):
            kinds[f.name] = (dict,)
            continue
        allowed: list[type] = []
        if "str" in hint:
            allowed.append(str)
        if "float" in hint:
            allowed.append(float)
        if "int" in hint or "float" in hint:  # a TOML 1 is as good as 1.0 for a float option
            allowed.append(int)
        if "bool" in hint:
            allowed.append(bool)
        kinds[f.name] = tuple(allowed)
    return kinds


def read_config(path: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """Option values from the config file and the file they came from (None when there is none)."""
    explicit = path is not None
    path = Path(path).expanduser() if explicit else default_config_path()
    if not path.is_file():
        if explicit:
            raise AgentError(f"config file {path} does not exist: fix the --config path")
        return {}, None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise AgentError(f"cannot read config file {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise AgentError(f"config file {path} is not valid TOML ({error}): fix or remove it") from None
    kinds = _expected_types()
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in kinds:
            known = ", ".join(sorted(k.replace("_", "-") for k in kinds))
            raise AgentError(f"config file {path}: unknown key {raw_key!r}; known keys: {known}")
        allowed = kinds[key]
        # bool is an int subclass in Python: keep true/false out of numeric options and vice versa.
        if bool in allowed:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, allowed) and not isinstance(value, bool)
        if not ok:
            names = " or ".join(t.__name__ for t in allowed)
            raise AgentError(f"config file {path}: {raw_key!r} must be {names}, got {value!r}")
        values[key] = value
    return values, path


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> AgentSettings:
    """Defaults, then the config file (the user's, or ``config_path``), then ``overrides`` (None = not given)."""
    values, source = read_config(config_path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if source is not None:
        values["config_path"] = str(source)
    return AgentSettings(**values)
