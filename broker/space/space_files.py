"""Search spaces as plain data: space files (YAML or JSON), `--param NAME=VALUE`, and the wire.

A space is a mapping of input names to values. A mapping whose `type` is `float`, `integer` or
`category` is a suggestion (`low`, `high`, `step`, `log`; `choices`); any other value is a fixed
input passed as is; nested mappings nest, and parameters are named by dotted path:

    x: {type: float, low: -10, high: 10}
    model:
      lr: {type: float, low: 1.0e-5, high: 0.1, log: true}
    seed: 42
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from optuna_rq.errors import ConfigError
from optuna_rq.space.declarations import Category, Float, Integer, Suggestion

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_FILE_VALUES",
    "load_data_file",
    "load_space_file",
    "load_yaml",
    "parse_param",
    "space_from_data",
    "space_to_data",
]

MAX_FILE_BYTES = 64 * 1024 * 1024
"""The largest space or parameter-set file read (64 MiB): past it, the file is refused unread."""
MAX_FILE_VALUES = 4_000_000
"""The most values (mappings, lists and scalars) a YAML text may hold, each alias counted as what
it expands to: ten lines of aliases of aliases can stand for billions of values (an alias bomb),
which everything after the load would walk. 100,000 parameter sets of five names are ~1,100,000."""

_KEYS: dict[str, tuple[type[Suggestion], set[str], set[str]]] = {
    # type: (class, required keys, optional keys)
    "float": (Float, {"low", "high"}, {"step", "log"}),
    "integer": (Integer, {"low", "high"}, {"step", "log"}),
    "category": (Category, {"choices"}, set()),
}


def _suggestion(path: str, entry: Mapping[str, Any]) -> Suggestion:
    kind = entry["type"]
    if kind not in _KEYS:
        raise ConfigError(
            f"{path}: unknown suggestion type {kind!r}; use float, integer or category"
        )
    cls, required, optional = _KEYS[kind]
    given = set(entry) - {"type"}
    missing = sorted(required - given)
    if missing:
        raise ConfigError(f"{path}: a {kind} suggestion needs {', '.join(missing)}")
    unknown = sorted(given - required - optional)
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {unknown} for a {kind} suggestion "
            f"(it takes {', '.join(sorted(required | optional))})"
        )
    arguments = {name: entry[name] for name in given}
    if kind == "category":
        if not isinstance(arguments["choices"], list):
            raise ConfigError(f"{path}: choices must be a list, got {arguments['choices']!r}")
    else:
        number = int if kind == "integer" else (int, float)
        for name in ("low", "high", "step"):
            value = arguments.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, number)):
                wanted = "an integer" if kind == "integer" else "a number"
                raise ConfigError(f"{path}: {name} must be {wanted}, got {value!r}")
        if "log" in arguments and not isinstance(arguments["log"], bool):
            raise ConfigError(f"{path}: log must be true or false, got {arguments['log']!r}")
    try:
        return cls(**arguments)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def space_from_data(data: Mapping[str, Any], root: str = "") -> dict[str, Any]:
    """Build the inputs (suggestions and fixed values) a space mapping describes; validates all."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a search space must be a mapping of names to values, got {data!r}")
    inputs: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"input names must be non-empty strings, got {name!r}")
        path = f"{root}.{name}" if root else name
        if isinstance(value, Mapping) and "type" in value and isinstance(value["type"], str):
            inputs[name] = _suggestion(path, value)
        elif isinstance(value, Mapping):
            inputs[name] = space_from_data(value, path)
        else:
            inputs[name] = value
    return inputs


def space_to_data(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-data form of `inputs`: what a space file holds and what a submission carries."""
    data: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Float):
            data[name] = {"type": "float", "low": value.low, "high": value.high, "log": value.log}
            if value.step is not None:
                data[name]["step"] = value.step
        elif isinstance(value, Integer):
            data[name] = {"type": "integer", "low": value.low, "high": value.high}
            data[name].update(step=value.step, log=value.log)
        elif isinstance(value, Category):
            data[name] = {"type": "category", "choices": list(value.choices)}
        elif isinstance(value, Mapping):
            data[name] = space_to_data(value)
        else:
            data[name] = value
    return data


def load_space_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a YAML or JSON space file; errors name the file and the fix."""
    file = Path(path)
    data = load_data_file(file, what="space file")
    if data is None:
        raise ConfigError(f"space file {str(file)!r} is empty")
    try:
        return space_from_data(data)
    except ConfigError as exc:
        raise ConfigError(f"space file {str(file)!r}: {exc}") from exc


def load_data_file(file: Path, *, what: str) -> Any:
    """The data in a YAML (or `.json`) file, read within `MAX_FILE_BYTES` and, for YAML,
    `MAX_FILE_VALUES` (`load_yaml`); ConfigError naming the file (as `what`), and the fix."""
    name = f"{what} {str(file)!r}"
    try:
        with file.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {name}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            f"{name} is over {MAX_FILE_BYTES // 2**20} MiB, the most a file of inputs may be: "
            "split it, or keep large data out of it (give a path to the data instead)"
        )
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name} is not UTF-8 text: {exc}") from exc
    if file.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} is not valid JSON: {exc}") from exc
    return load_yaml(text, what=name)


def load_yaml(text: str, *, what: str) -> Any:
    """`yaml.safe_load(text)`, bounded: ConfigError, naming `what`, for text that is not YAML,
    that nests deeper than Python can walk, or whose aliases expand past `MAX_FILE_VALUES`
    values, found on the node graph before anything is built (aliases share nodes, so it is
    walked once, whatever they expand to)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        values = 0 if node is None else _expanded_size(node, {}, set())
        data = None if node is None or values > MAX_FILE_VALUES else loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{what} nests too deep to read") from None
    except _AliasLoop:
        raise ConfigError(
            f"{what}: an alias refers to a mapping or list that contains it (a loop): write "
            "the values out"
        ) from None
    finally:
        loader.dispose()
    if values > MAX_FILE_VALUES:
        raise ConfigError(
            f"{what}: its YAML aliases expand to more than {MAX_FILE_VALUES:,} values, the "
            "most a file of inputs may hold (an alias bomb?): write the values out, or split it"
        )
    return data


class _AliasLoop(Exception):
    """A YAML node that contains itself, through an alias."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with every alias expanded (at most one past the
    limit); `sizes` remembers each node (an alias is its anchor's node again), `open_` holds the
    nodes being counted, to find one that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _AliasLoop
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(item, sizes, open_) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            total += _expanded_size(name, sizes, open_) + _expanded_size(value, sizes, open_)
    open_.discard(key)
    sizes[key] = total = min(total, MAX_FILE_VALUES + 1)  # no huge numbers past the limit
    return total


def parse_param(text: str) -> tuple[list[str], Any]:
    """`--param NAME=VALUE`: the dotted NAME as a path, and VALUE read as a YAML value.

    `--param model.lr=0.1` sets `inputs["model"]["lr"] = 0.1`; a VALUE like
    `{type: float, low: 0, high: 1}` is a suggestion, as in a space file.
    """
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"--param {text!r}: write it as NAME=VALUE, e.g. --param seed=42")
    path = name.strip().split(".")
    if not all(path):
        raise ConfigError(f"--param {text!r}: {name!r} is not a dotted name")
    value = load_yaml(raw, what=f"--param {text!r}: the value") if raw.strip() else ""
    glued = _glued_colon_key(value)
    if glued is not None:
        raise ConfigError(
            f"--param {text!r}: YAML reads {glued!r} as one key with no value; in flow style a "
            f"colon needs a space after it: {glued.replace(':', ': ', 1)!r}"
        )
    return path, value


def _glued_colon_key(value: Any) -> str | None:
    """The first mapping key like `type:float` with no value, at any depth, or None.

    YAML reads `{type:float,low:0}` as the keys "type:float" and "low:0", each null: what was
    written as a suggestion would silently become a fixed (and useless) input.
    """
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key:
                return key
            found = _glued_colon_key(item)
            if found is not None:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _glued_colon_key(item)
            if found is not None:
                return found
    return None


def merge_param(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `value` at `path` in a space mapping, creating nested mappings as needed."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict) or "type" in child:
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value
