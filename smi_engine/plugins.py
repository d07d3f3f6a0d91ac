"""The plugin manager: entry points of group ``smi`` plus the built-ins, through the same hooks.

``SMI_LOAD_PLUGINS`` limits which third-party plugins load: a comma-separated list of entry
point names, or empty for none (built-ins always load).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pluggy

from smi_engine import hookspecs
from smi_engine.checks import flag_value, named_options
from smi_engine.errors import SmiError, plain

BUILTIN_PLUGINS = ("smi_plugins.deepinversion", "smi_plugins.psaq", "smi_plugins.cmi", "smi_plugins.selections",
                   "smi_plugins.tasks", "smi_plugins.quant_schemes", "smi_plugins.tensorboard")
KINDS = {"losses": "register_losses", "selections": "register_selections", "tasks": "register_tasks",
         "sinks": "register_event_sinks", "schemes": "register_quant_schemes"}
NOUNS = {"losses": "loss", "selections": "selection", "tasks": "task", "sinks": "event sink",
         "schemes": "quantisation scheme"}
#: The kinds whose options a run's command line gives as NAME.KEY=VALUE: (the option flag, the
#: flag that picks the plugin, an example).
OPTION_FLAGS = {"losses": ("--loss-option", "--loss", "deepinversion.tv_l2=1e-4"),
                "selections": ("--selection-option", "--selection", "pri.keep_remaining=false"),
                "sinks": ("--sink-option", "--sink", "tensorboard.every=10"),
                "schemes": ("--scheme-option", "--scheme", "repq.reparameterize=false")}


@dataclass(frozen=True)
class Registration:
    name: str
    factory: Callable[..., Any]
    plugin: str


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    error: str | None = None


@dataclass
class Registry:
    manager: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    entries: dict[str, dict[str, Registration]]

    def get(self, kind: str, name: str) -> Registration:
        found = self.entries[kind].get(name)
        if found is None:
            known = ", ".join(sorted(self.entries[kind])) or "none"
            raise SmiError(f"unknown {NOUNS[kind]} {name!r}: installed ones are {known} (see `smi plugins`)")
        return found


def warn(message: str) -> None:
    """One line on stderr, whatever the message holds (a plugin's words included)."""
    print(f"smi: warning: {plain(message)}", file=sys.stderr)


class PluginExit(Exception):
    """A plugin called ``sys.exit``: a failure of that plugin like any other, never the end of smi."""


@contextlib.contextmanager
def plugin_code() -> Iterator[None]:
    """Run third-party code: what it prints goes to stderr (stdout is for ``--json`` alone), and
    a ``sys.exit`` in it becomes ``PluginExit``."""
    with contextlib.redirect_stdout(sys.stderr):
        try:
            yield
        except SystemExit as exc:
            raise PluginExit(f"called sys.exit({exc.code!r})") from None


def call_factory(factory: Callable[..., Any], options: dict[str, Any], what: str, fix: str, args: tuple = ()) -> Any:
    """``factory(*args, **options)`` for a registered plugin object, its options checked and
    converted (``checked_options``); what it rejects is one line naming ``what`` and ``fix``.
    ``args``: what the contract passes first (a sink's run directory and config)."""
    options = checked_options(factory, options, what, fix, args)
    try:
        return factory(*args, **options)
    except SmiError:
        raise
    except (TypeError, ValueError) as exc:
        raise SmiError(f"{what} rejected its options ({exc}): check {fix}") from None


def checked_options(factory: Callable[..., Any], options: dict[str, Any], what: str, fix: str,
                    args: tuple = ()) -> dict[str, Any]:
    """The options a factory would be called with, converted to the types its signature
    annotates (``typed_options``), without calling it: an unknown or missing option is one line
    naming ``what`` and the option flag ``fix``. Lets a job refuse bad options before it writes."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        parameters = list(signature.parameters.values())[len(args):]
        named = [p for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            unknown = sorted(set(options) - {p.name for p in named})
            if unknown:
                raise SmiError(f"{what} has no option {unknown[0]!r}: its options are "
                               f"{', '.join(p.name for p in named) or 'none'}")
        missing = [p.name for p in named if p.default is p.empty and p.name not in options]
        if missing:
            raise SmiError(f"{what} needs option {missing[0]!r}: give it with {fix}")
    return typed_options(factory, options, what, fix)


def plugin_options(kind: str, texts: list[str] | None, chosen: Iterable[str], given: dict[str, dict] | None = None,
                   args: tuple = ()) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` texts (``OPTION_FLAGS[kind]``) for the ``chosen`` plugins of ``kind``,
    by name, over the options ``given`` already, checked and typed against each factory: what a
    run records in its config.json, as the values they are. ``args``: as ``checked_options``."""
    flag, choose_flag, example = OPTION_FLAGS[kind]
    grouped = named_options(texts or [], flag, NOUNS[kind], chosen, choose_flag, example)
    return {name: typed_plugin_options(kind, name, {**(given or {}).get(name, {}), **values}, args)
            for name, values in grouped.items()}


def typed_plugin_options(kind: str, name: str, options: dict[str, Any], args: tuple = ()) -> dict[str, Any]:
    """``checked_options`` for the registered ``kind`` ``name``: its options as its factory takes them."""
    return checked_options(get_registry().get(kind, name).factory, options, *_option_names(kind, name), args)


def build_plugin(kind: str, name: str, options: dict[str, Any], args: tuple = ()) -> Any:
    """``call_factory`` for the registered ``kind`` ``name``: the plugin object, built with its options."""
    return call_factory(get_registry().get(kind, name).factory, options, *_option_names(kind, name), args)


def _option_names(kind: str, name: str) -> tuple[str, str]:
    """What a message about a plugin's options names, and the flag that fixes them."""
    return f"{NOUNS[kind]} {name!r}", f"{OPTION_FLAGS[kind][0]} {name}.KEY=VALUE"


def typed_options(factory: Callable[..., Any], options: dict[str, Any], what: str, fix: str) -> dict[str, Any]:
    """Options (text from the command line, or values from a config) converted to the types the
    factory's signature annotates: ``bool`` (true/false, yes/no, 1/0), ``int``, ``float``,
    ``str`` and ``list[str]`` (one text becomes a list of it), optional ones too; a value that
    does not convert is one line naming the option. Options without such an annotation pass
    as they are."""
    try:
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # unresolvable annotations: the plugin's own business
        hints = {}
    converted = {}
    for name, value in options.items():
        hint = hints.get(name)
        if value is not None and _is_text_list(hint):
            converted[name] = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        target = _plain_type(hint)
        if target is None or value is None or (isinstance(value, target) and not (target is int and isinstance(value, bool))):
            converted[name] = value
            continue
        if target is bool:
            converted[name] = flag_value(f"{what} option {name}", value)
            continue
        try:
            if isinstance(value, bool) or (target is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            converted[name] = target(value)
        except (TypeError, ValueError):
            kind = {int: "a whole number", float: "a number", str: "text"}[target]
            raise SmiError(f"{what} option {name}={value!r} is not {kind}: check {fix}") from None
    return converted


def _plain_type(hint: Any) -> type | None:
    """``bool``, ``int``, ``float`` or ``str`` from an annotation (``X | None`` included), else None."""
    if hint in (bool, int, float, str):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float, str) else None


def _is_text_list(hint: Any) -> bool:
    """``list[str]`` (``| None`` included)."""
    hints = [hint, *(a for a in typing.get_args(hint) if a is not type(None))]
    return any(typing.get_origin(h) is list and typing.get_args(h) == (str,) for h in hints)


def _load(manager: pluggy.PluginManager, plugins: dict[str, PluginInfo], refresh: bool = False) -> None:
    for module_name in BUILTIN_PLUGINS:
        name = module_name.rpartition(".")[2]
        manager.register(importlib.import_module(module_name), name=name)
        plugins[name] = PluginInfo(name, "smi-toolkit", _version("smi-toolkit"), builtin=True)
    for info, module in third_party_plugins(refresh):  # a fresh info: the registry fills in what it registers
        plugins[info.name] = PluginInfo(info.name, info.distribution, info.version, builtin=False, error=info.error)
        if module is not None:
            manager.register(module, name=info.name)


_THIRD_PARTY: list[tuple[PluginInfo, Any]] | None = None


def third_party_plugins(refresh: bool = False) -> list[tuple[PluginInfo, Any]]:
    """The entry points of group ``smi`` (as ``SMI_LOAD_PLUGINS`` allows), each loaded once per
    process unless ``refresh`` looks again (a plugin installed since, or a changed
    ``SMI_LOAD_PLUGINS``): (its info, its module, or None when it failed to load, with a warning)."""
    global _THIRD_PARTY
    if _THIRD_PARTY is not None and not refresh:
        return _THIRD_PARTY
    allowed = os.environ.get("SMI_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    _THIRD_PARTY = []
    for entry_point in importlib.metadata.entry_points(group="smi"):
        if allowed_names is not None and entry_point.name not in allowed_names:
            continue
        dist = entry_point.dist.name if entry_point.dist else None
        info = PluginInfo(entry_point.name, dist, entry_point.dist.version if entry_point.dist else None, builtin=False)
        try:
            with plugin_code():
                module = entry_point.load()
        except Exception as exc:  # a broken plugin must not break the toolkit
            info.error = f"failed to load: {type(exc).__name__}: {exc}"
            warn(f"plugin {entry_point.name!r} ({dist}) {info.error}; continuing without it")
            module = None
        _THIRD_PARTY.append((info, module))
    return _THIRD_PARTY


def command_hooks() -> pluggy.HookCaller:
    """``register_commands`` of the third-party plugins alone: the built-ins add no commands, and
    loading them (torch, timm) would slow down ``smi --help`` and shell completion."""
    manager = pluggy.PluginManager("smi")
    manager.add_hookspecs(hookspecs)
    for info, module in third_party_plugins():
        if module is not None:
            manager.register(module, name=info.name)
    return manager.hook.register_commands


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_entries(manager: pluggy.PluginManager, plugins: dict[str, PluginInfo]) -> dict[str, dict[str, Registration]]:
    """What every registered plugin's hooks register, by kind: a hook that raises is recorded in
    its ``PluginInfo`` and skipped, and a name registered twice keeps the first (both warned)."""
    entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
    for kind, hook_name in KINDS.items():
        for impl in getattr(manager.hook, hook_name).get_hookimpls():  # in registration order
            plugin = impl.plugin_name
            info = plugins[plugin]

            def register(name: str, factory: Callable[..., Any], _kind=kind, _plugin=plugin) -> None:
                existing = entries[_kind].get(name)
                if existing is not None:
                    warn(f"{_plugin!r} registers {name!r}, already registered by {existing.plugin!r}; keeping the first")
                    return
                entries[_kind][name] = Registration(name, factory, _plugin)
                plugins[_plugin].registers[_kind].append(name)

            try:
                with plugin_code():
                    impl.function(register=register)
            except Exception as exc:
                info.error = f"failed in {hook_name}: {type(exc).__name__}: {exc}"
                warn(f"plugin {plugin!r} {info.error}; continuing without what it registers there")
    return entries


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, loaded once; ``refresh`` reads the entry points again."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        manager = pluggy.PluginManager("smi")
        manager.add_hookspecs(hookspecs)
        plugins: dict[str, PluginInfo] = {}
        _load(manager, plugins, refresh)
        _REGISTRY = Registry(manager, plugins, collect_entries(manager, plugins))
    return _REGISTRY
