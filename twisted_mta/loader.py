"""
Finding, constructing and checking plugins, and building a L{Pipeline}.

A plugin is named by C{use}: a built-in's short name, or C{module:Class}.
C{module} is looked for first as a file in the configured C{plugin_paths}
(C{plugins/no_exe.py} for C{no_exe:NoExe}), then as an installed module.
Files from plugin paths are executed afresh for every pipeline built (a
new module object per generation, never C{importlib.reload}), so a reload
runs the code as it is now on disk while sessions on the old generation
keep the old code.

Every problem is a L{PluginError} whose text names the config table, and
for code problems the file and line.
"""

from __future__ import annotations

import importlib
import inspect
import importlib.util
import sys
import traceback
import weakref
from pathlib import Path
from types import ModuleType

from zope.interface import providedBy
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from twisted_mta.config import Config, PluginConfig
from twisted_mta.interfaces import IDeliveryObserver, IFilter, IRelayPolicy, IRouter
from twisted_mta.pipeline import LoadedPlugin, Pipeline
from twisted_mta.values import PluginContext, SharedState

#: Built-in plugins by short name.
BUILTINS: dict[str, str] = {
    "relay": "twisted_mta.builtins.relay:RelayRules",
    "routes": "twisted_mta.builtins.routes:RouteTable",
    "recipients": "twisted_mta.builtins.recipients:Recipients",
    "size": "twisted_mta.builtins.size:SizeLimits",
    "headers": "twisted_mta.builtins.headers:HeaderRules",
    "greylist": "twisted_mta.builtins.greylist:Greylist",
    "ratelimit": "twisted_mta.builtins.ratelimit:RateLimit",
    "senders": "twisted_mta.builtins.senders:SenderLogin",
    "dnsbl": "twisted_mta.builtins.dnsbl:DNSBL",
    "spf": "twisted_mta.builtins.spf:SPF",
    "dkim_sign": "twisted_mta.builtins.dkim:DKIMSign",
    "dkim_verify": "twisted_mta.builtins.dkim:DKIMVerify",
}


class PluginError(Exception):
    """A plugin could not be loaded; C{str()} is one line saying where and why."""


def _where(config: Config, pc: PluginConfig) -> str:
    return f"{config.file}: {pc.where}"


def _code_location(exc: BaseException, fallback: str) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        return f"{last.filename}:{last.lineno}"
    return fallback


class _Build:
    """
    One pipeline's worth of loading: the generation, and the modules
    executed from plugin files for it (each file once per generation).
    """

    def __init__(self, generation: int, shared: SharedState | None = None, reactor=None,
                 state_folder: Path | None = None):
        self.generation = generation
        self.state_folder = state_folder
        self.modules: dict[Path, ModuleType] = {}
        self.shared = shared if shared is not None else SharedState()
        self.reactor = reactor

    def context(self, config: Config, where: str) -> PluginContext:
        state = self.state_folder or Path(config.spool) / "state"
        state.mkdir(parents=True, exist_ok=True)
        return PluginContext(folder=config.folder, state_folder=state, shared=self.shared,
                             where=where, config=config, reactor=self.reactor)

    def load_file(self, path: Path, module_name: str) -> ModuleType:
        path = path.resolve()
        if path in self.modules:
            return self.modules[path]
        unique = f"twisted_mta_plugin_g{self.generation}_{module_name.replace('.', '_')}"
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        # Registered while the generation lives, so that dataclasses and
        # tracebacks can find it; each generation has its own name, so
        # sessions on an old generation keep running the old code.
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[unique]
            raise
        self.modules[path] = module
        return module

    def forget(self) -> None:
        """Drop this build's modules from sys.modules (the generation is retired)."""
        for module in self.modules.values():
            # Only if it is still ours: another service in this process
            # may have a build of the same generation number.
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]


def find_class(use: str, plugin_paths, build: _Build):
    """The class named by C{use}, and where it came from."""
    target = BUILTINS.get(use, use)
    if ":" not in target:
        known = ", ".join(sorted(BUILTINS))
        raise LookupError(f"unknown plugin {use!r} (built-ins: {known}; others: module:Class)")
    module_name, _, class_name = target.partition(":")
    module = None
    for folder in plugin_paths:
        candidate = Path(folder) / (module_name.replace(".", "/") + ".py")
        if candidate.is_file():
            module = build.load_file(candidate, module_name)
            break
    if module is None:
        module = importlib.import_module(module_name)
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise LookupError(f"{getattr(module, '__file__', module_name)} has no {class_name!r}")
    return cls, getattr(module, "__file__", None) or module_name


#: What a [[filter]] table may name: a filter, or an observer of deliveries.
FILTER_INTERFACES = (IFilter, IDeliveryObserver)


def load(config: Config, pc: PluginConfig, build: _Build, required=FILTER_INTERFACES,
         extra: dict | None = None) -> LoadedPlugin:
    """
    Load, construct and check the plugin C{pc} names.  C{required}: the
    interfaces of which it must declare at least one.  C{extra}:
    constructor arguments the server supplies (for built-ins configured by
    their own tables).  Every interface it declares is verified.
    """
    where = _where(config, pc)
    try:
        cls, origin = find_class(pc.use, config.plugin_paths, build)
    except LookupError as e:
        raise PluginError(f"{where}: {e.args[0]}")
    except ImportError as e:
        raise PluginError(f"{where}: cannot import {pc.use}: {e}")
    except Exception as e:
        raise PluginError(f"{where}: {_code_location(e, pc.use)}: {type(e).__name__}: {e}")
    kwargs = {**(extra or {}), **pc.options}
    if _takes_context(cls):
        kwargs["context"] = build.context(config, where)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise PluginError(f"{where}: bad options for {pc.use}: {e}")
    except Exception as e:
        raise PluginError(f"{where}: {pc.use} refused its options: "
                          f"{_code_location(e, origin)}: {type(e).__name__}: {e}")
    provided = list(providedBy(obj))
    if not any(iface.providedBy(obj) for iface in required):
        names = " or ".join(iface.__name__ for iface in required)
        raise PluginError(f"{where}: {pc.use} does not declare {names} (@implementer)")
    for iface in provided:
        try:
            verifyObject(iface, obj)
        except Invalid as e:
            raise PluginError(f"{where}: {pc.use} ({origin}): {' '.join(str(e).split())}")
    return LoadedPlugin(pc.use, obj, str(origin), pc.timeout)


def _takes_context(cls) -> bool:
    try:
        return "context" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def with_sender_rule(config: Config) -> tuple[PluginConfig, ...]:
    """
    The filter tables to load: C{[[filter]]}, preceded by C{[auth]
    sender_rule} (the rule that says which envelope senders a login may
    use; C{"senders"} by default) when a listener takes AUTH, unless a
    C{[[filter]]} already uses it or it is C{"none"}.
    """
    rule = config.auth.sender_rule
    if (rule == "none" or all(listen.auth == "none" for listen in config.listen)
            or any(pc.use == rule for pc in config.filters)):
        return tuple(config.filters)
    return (PluginConfig(rule, {}, "auth.sender_rule"),) + tuple(config.filters)


def build_pipeline(config: Config, generation: int, reactor=None,
                   shared: SharedState | None = None,
                   state_folder: Path | None = None) -> Pipeline:
    """
    Build a whole L{Pipeline} from C{config}, or raise L{PluginError}.
    Plugin files are executed afresh; their modules are forgotten when the
    pipeline is garbage (the last session using it has ended).
    C{state_folder} is the plugins' L{PluginContext.state_folder}
    (default C{<spool>/state}): each process gets its own.
    """
    build = _Build(generation, shared, reactor, state_folder)
    try:
        relay_pc = config.relay_plugin or PluginConfig("relay", {}, "relay")
        relay_extra = {} if config.relay_plugin else {
            "local_domains": config.relay.local_domains,
            "relay_domains": config.relay.relay_domains,
            "networks": config.relay.networks,
        }
        relay = load(config, relay_pc, build, (IRelayPolicy,), relay_extra)
        router_pc = config.router_plugin or PluginConfig("routes", {}, "route")
        router_extra = {} if config.router_plugin else {"routes": config.routes}
        router = load(config, router_pc, build, (IRouter,), router_extra)
        filters = [load(config, pc, build) for pc in with_sender_rule(config)]
    except BaseException:
        build.forget()
        raise
    observers = [f for f in filters if IDeliveryObserver.providedBy(f.plugin)]
    pipeline = Pipeline(generation, relay, router, filters, observers, reactor=reactor)
    weakref.finalize(pipeline, build.forget)
    return pipeline
