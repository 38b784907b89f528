"""Composition on OmegaConf: one experiment from YAML files, fragments and overrides, then typed.

One YAML per experiment. A section may name a fragment instead of spelling it out
(``model: models/tinystories-8m.yaml``), and any mapping may start from one and change some of
its keys (``data: {base: data/wiki.yaml, tagging: {forget_threshold: 0.7}}``): the mapping is
deep-merged onto the fragment (nested mappings merge key by key, lists and scalars replace), so
the fragment's other ``tagging`` keys stay. Fragments are looked up beside the file that names
them, then under the project's ``configs/`` (:data:`CONFIG_ROOT`). CLI overrides are
``key.path=value`` strings, the value parsed as YAML; a number in the path indexes a list
(``sgtm.domains.0.heads=2``, or ``sgtm.domains[0].heads=2``). :func:`compose` (also used by
``sgtm sweep``) resolves ``${name}``-style interpolations, and ``???`` marks a required value;
:func:`load_config` types the result against :mod:`pipeline.config.schema` and validates it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.schema import ExperimentConfig, from_dict
from pipeline.errors import ConfigError

# the project's configs/ directory (pipeline/config/composition.py -> the repository root)
CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"


# One implementation for `train`, `sweep`, the demo and the tests. Composition works on untyped
# OmegaConf containers, so it keeps exactly what the user wrote (the sweep's cell keys hash that);
# the dataclasses of pipeline.config.schema are the schema: OmegaConf.structured over them
# supplies the default of a list that an override indexes but the files never spelled out
# (``sgtm.domains.0.heads=2``), and
# ``from_dict`` checks every value against their annotations. OmegaConf's own type conversion is
# not used for that: it accepts "3" for an int, 1 for a bool and 5 for a string, and with
# conversion off it refuses 1 for a float; ``from_dict`` is exact and words its errors as before.


def read_yaml(path: Path, key: str) -> Any:
    """The parsed YAML file ``path`` (None when empty); a missing or invalid file is a one-line
    ConfigError naming ``key``."""
    try:
        with open(path) as f:  # libyaml's safe loader when present: same result, faster
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{key}: {path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None


def find_fragment(ref: str, base_dir: Path, key: str) -> Path:
    """The fragment file ``ref``: beside the file that names it (``base_dir``), then under
    :data:`CONFIG_ROOT`, then as given; else a ConfigError naming ``key``."""
    for candidate in (base_dir / ref, CONFIG_ROOT / ref, Path(ref)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{key}: fragment {ref!r} not found beside the config or under {CONFIG_ROOT}")


def _is_fragment_ref(value: Any) -> bool:
    return isinstance(value, str) and value.endswith((".yaml", ".yml"))


def _join(key: str, name: Any) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else str(name)


def _omega_error(exc: Exception, key: str = "") -> ConfigError:
    """An OmegaConf exception as one line that starts with the config key it is about."""
    where = getattr(exc, "full_key", None) or key or "config"
    msg = str(getattr(exc, "msg", None) or exc).strip().splitlines()
    return ConfigError(f"{where}: {msg[0] if msg else type(exc).__name__}")


def _container(value: Any, key: str) -> Any:
    """``value`` as an OmegaConf node (mappings and lists) or as itself (scalars)."""
    if not isinstance(value, (dict, list, tuple)):
        return value
    try:
        return OmegaConf.create(list(value) if isinstance(value, tuple) else value)
    except OmegaConfBaseException as exc:
        raise _omega_error(exc, key) from None


def _clear_mismatches(base: Any, top: Any) -> Any:
    """``base`` with None wherever ``top`` puts a list over a mapping or a mapping over a list, so
    OmegaConf's merge (which refuses those) lets ``top`` replace them."""
    base = OmegaConf.to_container(base) if OmegaConf.is_config(base) else base
    top = OmegaConf.to_container(top) if OmegaConf.is_config(top) else top
    out = dict(base)
    for k, v in top.items():
        old = out.get(k)
        if isinstance(old, dict) and isinstance(v, dict):
            out[k] = _clear_mismatches(old, v)
        elif isinstance(old, (dict, list)) and isinstance(v, (dict, list)):
            out[k] = None
    return out


def merge(*parts: Any, key: str = "") -> Any:
    """Deep merge, later parts win: mappings merge key by key, lists and scalars replace.

    The one merge of the project (fragments, ``data=`` dicts, a sweep's prepared data section);
    returns plain data."""
    out: Any = None
    for part in parts:
        if isinstance(out, (dict, DictConfig)) and isinstance(part, (dict, DictConfig)):
            try:
                out = OmegaConf.merge(_clear_mismatches(out, part), part)
            except OmegaConfBaseException as exc:
                raise _omega_error(exc, key) from None
        else:
            out = _container(part, key)
    return OmegaConf.to_container(out) if OmegaConf.is_config(out) else out


def _expand(value: Any, base_dir: Path, key: str, chain: tuple[Path, ...], top: bool = False) -> Any:
    """Resolve fragments inside ``value``: a top-level section may be a fragment path
    (``model: models/x.yaml``) and any mapping may name one under ``base:``, deep-merged under the
    mapping's other keys. A fragment's own fragments are looked up beside it."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict):
        if "base" in value:
            bkey = _join(key, "base")
            ref = value["base"]
            if not _is_fragment_ref(ref):
                raise ConfigError(f"{bkey}: expected a fragment path ending in .yaml, got {ref!r}")
            fragment = _load_fragment(ref, base_dir, key, chain, ref_key=bkey)
            if not isinstance(fragment, dict):
                raise ConfigError(f"{bkey}: fragment {ref!r} is not a mapping")
            rest = {k: v for k, v in value.items() if k != "base"}
            return merge(fragment, _expand(rest, base_dir, key, chain, top), key=key)
        out = {}
        for name, sub in value.items():
            skey = _join(key, name)
            if top and _is_fragment_ref(sub):
                out[name] = _load_fragment(sub, base_dir, skey, chain)
            else:
                out[name] = _expand(sub, base_dir, skey, chain)
        return out
    if isinstance(value, (list, tuple)):
        return [_expand(v, base_dir, _join(key, i), chain) for i, v in enumerate(value)]
    return value


def _load_fragment(ref: str, base_dir: Path, key: str, chain: tuple[Path, ...], ref_key: str = "") -> Any:
    """The fragment ``ref`` (named at ``ref_key``), expanded, as the value of ``key``."""
    ref_key = ref_key or key
    path = find_fragment(ref, base_dir, ref_key).resolve()
    if path in chain:
        raise ConfigError(f"{ref_key}: fragment cycle {' -> '.join(p.name for p in (*chain, path))}")
    loaded = read_yaml(path, ref_key)
    return _expand({} if loaded is None else loaded, path.parent, key, (*chain, path))


_SCHEMA: DictConfig | None = None


def _schema_default(tokens: list[str | int]) -> Any:
    """The dataclasses' default at a key path (plain data), or None: what a list that the files
    never wrote holds before an override indexes it."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = OmegaConf.structured(ExperimentConfig)
    try:
        node = OmegaConf.select(_SCHEMA, _key_str(tokens), default=None)
    except OmegaConfBaseException:
        return None
    value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    return list(value) if isinstance(value, tuple) else value


_KEY_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*|\d+")


def parse_key(path: str) -> list[str | int]:
    """``a.b.0.c`` or ``a.b[0].c`` -> ['a', 'b', 0, 'c'] (numbers index lists)."""
    raw = path.replace("[", ".").replace("]", "")
    tokens = raw.split(".")
    if not path or not all(_KEY_TOKEN.fullmatch(t) for t in tokens):
        raise ConfigError(f"{path}: expected a key path like model.n_layers or sgtm.domains.0.heads")
    return [int(t) if t.isdigit() else t for t in tokens]


def _key_str(tokens: list[str | int]) -> str:
    out = ""
    for t in tokens:
        out = _join(out, t)
    return out


def parse_override(override: str) -> tuple[list[str | int], Any]:
    """``key.path=value``: the key's tokens and the value parsed as (safe) YAML."""
    if "=" not in override:
        raise ConfigError(f"{override}: override must look like key.path=value")
    path, raw = override.split("=", 1)
    tokens = parse_key(path)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{path}: cannot parse override value {raw!r}") from None
    return tokens, value


def _child(node: DictConfig | ListConfig, tok: str | int) -> Any:
    """The node under ``tok`` (interpolations unresolved), or None when absent or null."""
    if isinstance(node, DictConfig) and tok not in node:
        return None
    child = node._get_node(tok)
    if isinstance(child, (DictConfig, ListConfig)):
        return None if child._is_none() else child
    return None if child._value() is None else child


def _apply(cfg: DictConfig, override: str, base_dir: Path) -> None:
    """Set one override on the composed config. A mapping merges into the mapping it replaces;
    anything else replaces, and so does a fragment (``model=models/x.yaml``, ``model={base: ...}``):
    it names a whole section, the file's keys for that section must not leak into it."""
    tokens, value = parse_override(override)
    key = _key_str(tokens)
    if len(tokens) == 1 and _is_fragment_ref(value):
        fragment, value = True, _load_fragment(value, base_dir, key, ())
    else:
        fragment, value = isinstance(value, dict) and "base" in value, _expand(value, base_dir, key, ())
    node: Any = cfg
    for i, tok in enumerate(tokens):
        here, parent = _key_str(tokens[: i + 1]), _key_str(tokens[:i])
        if isinstance(tok, int):
            if not isinstance(node, ListConfig):
                raise ConfigError(f"{here}: {parent or 'the config'} is not a list")
            if not 0 <= tok < len(node):
                n = len(node)
                raise ConfigError(f"{here}: index out of range ({parent} has {n} item{'' if n == 1 else 's'}; "
                                  "set the whole list to change its length)")
        elif not isinstance(node, DictConfig):
            raise ConfigError(f"{here}: {parent} is a list; index it with a number")
        if i == len(tokens) - 1:
            break
        child = _child(node, tok)
        if child is None:  # absent or null: a mapping to fill, or the schema's default list to index
            fresh = _schema_default(tokens[: i + 1]) if isinstance(tokens[i + 1], int) else {}
            if not isinstance(fresh, (dict, list)):
                raise ConfigError(f"{_key_str(tokens[: i + 2])}: {here} has no list to index")
            node[tok] = fresh
            child = node._get_node(tok)
        elif not isinstance(child, (DictConfig, ListConfig)):
            raise ConfigError(f"{here}: cannot override inside {child._value()!r} (not a mapping or list)")
        node = child
    current = _child(node, tokens[-1])
    try:
        if isinstance(value, dict) and isinstance(current, DictConfig) and not fragment:
            value = merge(current, value, key=key)
        node[tokens[-1]] = value
    except OmegaConfBaseException as exc:
        raise _omega_error(exc, key) from None


def _plain(cfg: DictConfig) -> dict:
    """Resolve ``${...}`` interpolations, refuse ``???`` (a value a fragment requires), plain data."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _omega_error(exc) from None


def compose(path: str | Path | None = None, overrides: list[str] | None = None,
            data: dict | None = None) -> dict:
    """The experiment as written: the file (or ``{}``), deep-merged with ``data``, fragments
    resolved, each ``key.path=value`` override applied in order; plain data, not yet typed."""
    base_dir = Path(path).resolve().parent if path else Path.cwd()
    raw: Any = {} if path is None else read_yaml(Path(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    chain = (Path(path).resolve(),) if path else ()
    composed = _expand(raw, base_dir, "", chain, top=True)
    if data is not None:
        if not isinstance(data, dict):
            raise ConfigError(f"data: expected a mapping of config sections, got {type(data).__name__}")
        composed = merge(composed, _expand(data, base_dir, "", chain, top=True))
    cfg = _container(composed, "")
    for ov in overrides or []:
        _apply(cfg, ov, base_dir)
    return _plain(cfg)


def apply_override(data: dict, override: str, base_dir: str | Path | None = None) -> None:
    """``a.b.c=value`` or ``a.b.0.c=value`` into the plain mapping ``data``, in place."""
    cfg = _container(data, "")
    _apply(cfg, override, Path(base_dir) if base_dir else Path.cwd())
    data.clear()
    data.update(OmegaConf.to_container(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> ExperimentConfig:
    """Read, compose, override, type-check and validate an experiment config."""
    raw = compose(path, overrides, data)
    if isinstance(raw.get("data"), dict) and "domains" not in raw["data"]:
        sgtm = raw.get("sgtm") if isinstance(raw.get("sgtm"), dict) else {}
        domains = sgtm.get("domains", [{"name": "forget"}])
        if isinstance(domains, list) and all(isinstance(d, dict) for d in domains):
            raw["data"] = {**raw["data"], "domains": [d.get("name", "forget") for d in domains]}
    cfg = from_dict(ExperimentConfig, raw, "")
    return cfg.validate()
