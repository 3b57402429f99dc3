"""Where a configuration's values come from besides Python: the environment and a file.

:meth:`RouterConfig.load <cache_router.config.RouterConfig.load>` reads
``CACHE_ROUTER_<FIELD>`` variables with :func:`env_values` and a TOML, YAML or JSON file
with :func:`read_file`, then checks what they gave. Both only find values and name what
does not fit: a variable or key that is no option is a problem (with the closest option's
name when there is one), reported with every other problem of the load, never ignored.
The options are passed in, so this module knows nothing of ``RouterConfig`` and
``cache_router.config`` imports it, not the other way round.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cache_router.config_values import Invalid, Option

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "OTHER_ENV",
    "env_values",
    "read_file",
    "unknown_option",
]

#: Prefix of every environment variable the router reads.
ENV_PREFIX = "CACHE_ROUTER_"
#: Environment variable naming the configuration file when no ``--config`` is given.
CONFIG_ENV = "CACHE_ROUTER_CONFIG"
#: ``CACHE_ROUTER_*`` variables that are not options, so never reported as unknown: the
#: config file, what ``--workers`` processes inherit (the serialized config, the
#: supervisor's socket directory), the benchmark launcher.
OTHER_ENV = frozenset(
    {CONFIG_ENV, "CACHE_ROUTER_SERVE_ARGS", "CACHE_ROUTER_PROCESS_DIR", "CACHE_ROUTER_LAUNCHER"}
)


# -- the environment ------------------------------------------------------------------------


def unknown_option(key: str, source: str, known: list[str], name: str | None = None) -> str:
    """``key`` is not an option; ``name`` is what to match it on when not ``key`` itself."""
    close = difflib.get_close_matches(name or key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {key!r} (from {source}){hint}"


def env_values(
    environ: Mapping[str, str], options: Mapping[str, Option], problems: list[str]
) -> Iterator[tuple[str, str, str]]:
    """(field, text, variable) for each of ``options`` set in ``environ``; unknown
    ``CACHE_ROUTER_*`` variables are added to ``problems``."""
    by_env = {option.env: name for name, option in options.items()}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in OTHER_ENV:
            continue
        name = by_env.get(variable)
        if name is not None:
            yield name, text, variable
            continue
        field_name = variable[len(ENV_PREFIX) :].lower()
        if field_name in options:  # CACHE_ROUTER_<FIELD> where the field declares another
            close = [options[field_name].env]
        else:
            close = difflib.get_close_matches(variable, list(by_env), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"unknown environment variable {variable}{hint}")


# -- files ----------------------------------------------------------------------------------


def _parse_file(path: Path) -> Any:
    """The file's content as Python data, by its suffix; ``Invalid`` when unreadable."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            toml: Any = importlib.import_module(
                "tomllib" if sys.version_info >= (3, 11) else "tomli"
            )
            with path.open("rb") as stream:
                return toml.load(stream)
        if suffix in (".yaml", ".yml"):
            try:
                yaml: Any = importlib.import_module("yaml")
            except ImportError:
                raise Invalid(
                    "reading YAML needs PyYAML: pip install pyyaml (or use a .toml file)"
                ) from None
            with path.open("rb") as stream:
                return yaml.safe_load(stream)
        if suffix == ".json":
            with path.open("rb") as stream:
                return json.load(stream)
    except OSError as exc:
        raise Invalid(f"cannot read it: {exc.strerror or exc}") from None
    except Invalid:
        raise
    except Exception as exc:  # each format's own syntax error type
        raise Invalid(f"not valid {suffix[1:].upper()}: {exc}") from None
    raise Invalid("unknown file type: use .toml, .yaml, .yml or .json")


def _flatten(
    data: Mapping[str, Any], prefix: str, path: str, out: dict[str, tuple[str, Any]]
) -> list[str]:
    """Flat field names from ``data``: a table ``[health]`` with key ``check_interval_secs``
    is ``health_check_interval_secs``; dashes in keys count as underscores."""
    problems: list[str] = []
    for key, value in data.items():
        name = prefix + str(key).replace("-", "_")
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping):
            problems += _flatten(value, name + "_", where, out)
        elif name in out:
            problems.append(f"{name} is given twice, as {out[name][0]} and as {where}")
        else:
            out[name] = (where, value)
    return problems


def read_file(path: Path, options: Mapping[str, Option], problems: list[str]) -> dict[str, Any]:
    """The values of ``options`` in the file at ``path`` (problems are added to ``problems``)."""
    try:
        data = _parse_file(path)
    except Invalid as exc:
        problems.append(f"config file {path}: {exc}")
        return {}
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, Mapping):
        problems.append(f"config file {path}: expected a table of options at the top level")
        return {}
    flat: dict[str, tuple[str, Any]] = {}
    problems += [f"config file {path}: {text}" for text in _flatten(data, "", "", flat)]
    values: dict[str, Any] = {}
    for name, (key, value) in flat.items():
        if name in options:
            values[name] = value
        else:
            problems.append(unknown_option(key, str(path), list(options), name))
    return values
