"""Config files in layers: a site's own file names the shipped one it changes.

A file whose first key is ``extends = "cxr-node.toml"`` holds only what differs from that file
(the path is relative to the extending file's directory). Sections merge key by key, the
extending file winning; ``[[destinations]]`` and ``[[stations]]`` given in the extending file
replace the base file's whole list. A relative path keeps the meaning it had in the file that
wrote it: the base file's ``data_dir = "../var"`` stays the checkout's ``var/`` whichever file
extends it. ``make run`` serves ``config/local.toml`` (git-ignored, made on first run) over
``config/cxr-node.toml``, so a site's changes never touch a tracked file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from cxr_node.errors import ConfigError

#: The keys whose values are file system paths, by section (resolved against their file's directory).
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "storage": ("data_dir",),
    "model": ("checkpoint", "lung_checkpoint", "ood_reference"),
    "tls": ("certificate", "private_key", "ca_certificates"),
    "web": ("certificate", "private_key"),
}
#: Arrays of tables: the extending file's list replaces the base file's.
LISTS = ("destinations", "stations")
MAX_DEPTH = 4
#: A value that names something instead of a path (``[model] checkpoint = "bundled:v5"``) is kept as it is.
NAMED = "bundled:"


def read_toml(path: Path, env_var: str) -> dict[str, Any]:
    """One file's TOML, every failure a ConfigError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass --config or set {env_var})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def read(path: Path, env_var: str, _below: tuple[Path, ...] = ()) -> tuple[dict[str, Any], tuple[Path, ...]]:
    """The merged raw settings of ``path`` and the files it extends, and those files (nearest
    first). Paths from base files come back absolute; ``path``'s own stay as written."""
    raw = read_toml(path, env_var)
    base = raw.pop("extends", None)
    if base is None:
        return raw, ()
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: extends: must be the path of another config file (got {base!r})")
    base_path = (path.parent / Path(base).expanduser()).resolve()
    if base_path == path or base_path in _below:
        raise ConfigError(f"{path}: extends: {base} leads back to {base_path} (a circle of config files)")
    if len(_below) >= MAX_DEPTH:
        raise ConfigError(f"{path}: extends: more than {MAX_DEPTH} files deep")
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends: {base_path} is not a file")
    under, chain = read(base_path, env_var, _below + (path,))
    _absolute_paths(under, base_path.parent)
    return merge(under, raw), (base_path, *chain)


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables key by key, anything else (lists of tables included) replaced."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _absolute_paths(raw: dict[str, Any], base_dir: Path) -> None:
    for section, keys in PATH_KEYS.items():
        table = raw.get(section)
        if not isinstance(table, dict):
            continue
        for key in keys:
            v = table.get(key)
            if isinstance(v, str) and v and not v.startswith(NAMED):
                p = Path(v).expanduser()
                table[key] = str(p if p.is_absolute() else (base_dir / p).resolve())
