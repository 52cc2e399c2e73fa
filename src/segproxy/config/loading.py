"""Where the values come from: the TOML file (``--config``), then ``SEGPROXY_*`` variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from segproxy.config.assemble import build
from segproxy.config.environment import _from_env, env_name
from segproxy.config.schema import SECTIONS, Config
from segproxy.config.values import ConfigError


def _flatten(raw: Mapping[str, Any]) -> dict[str, object]:
    """The file's tables as dotted keys: ``[queue] backend`` -> ``queue.backend``."""
    flat: dict[str, object] = {}
    for k, v in raw.items():
        if k in SECTIONS:
            if not isinstance(v, Mapping):
                raise ConfigError(k, v, f"a [{k}] table")
            for sk, sv in v.items():
                flat[f"{k}.{sk}"] = sv
        else:
            flat[k] = v
    return flat


def load(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Embedded defaults, then the TOML file (if any), then ``SEGPROXY_*`` variables."""
    flat: dict[str, object] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError("--config", str(p), "an existing TOML file") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", str(p), f"valid TOML ({exc})") from exc
        flat.update(_flatten(raw))
    from_env = _from_env(os.environ if env is None else env)
    flat.update(from_env)
    try:
        return build(flat)
    except ConfigError as exc:
        if exc.key in from_env:
            raise exc.from_variable(env_name(exc.key)) from None
        related = tuple(env_name(k) for k in exc.related if k in from_env)
        if related:
            raise exc.set_by(related) from None
        raise
