"""
The configuration: one TOML file read into immutable values.

Every problem stops loading with a L{ConfigError} whose text is one line
naming the file, the key and what is wrong, e.g.
C{mta.toml: limits.message_size: expected a positive integer, got "big"}.
Unknown keys are errors, never ignored.  Paths are relative to the file's
folder (to the working folder for the embedded default).

Only values are made here; nothing listens, opens or connects.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from twisted_mta.handoff import MAX_LISTENERS
from twisted_mta.smtp.grammar import is_domain

TLS_MODES = ("none", "starttls", "require-starttls", "implicit")
AUTH_MODES = ("none", "offer", "require")
ROUTE_KINDS = ("maildir", "lmtp", "smtp", "mx", "discard")
ROUTE_TLS = ("none", "opportunistic", "require", "verify")
BARE_NEWLINE = ("reject", "normalize")


class ConfigError(Exception):
    """A configuration problem: C{str()} is the one line shown to the user."""

    def __init__(self, file: str, key: str, reason: str):
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclass(frozen=True)
class ListenConfig:
    endpoint: str
    tls: str = "starttls"
    auth: str = "none"
    allow_plaintext_auth: bool = False


@dataclass(frozen=True)
class TLSConfig:
    """Certificate chain and key files; both C{None}: generate one at start."""

    certificate: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    users: Path | None = None
    show_user_in_received: bool = False
    failure_limit: int = 10
    lockout: float = 600.0
    sender_rule: str = "senders"  # the plugin that says which senders a login may use


@dataclass(frozen=True)
class LimitsConfig:
    message_size: int = 52428800
    recipients: int = 100
    connections: int = 1000
    connections_per_client: int = 20
    command_timeout: float = 300.0
    bad_commands: int = 10
    bare_newline: str = "reject"


@dataclass(frozen=True)
class RelayConfig:
    local_domains: tuple[str, ...] = ()
    relay_domains: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class RouteConfig:
    """One C{[[route]]} table: C{domains} (lower case, C{*} for any) and a next hop."""

    domains: tuple[str, ...]
    via: str
    path: Path | None = None
    host: str | None = None
    port: int = 25
    tls: str = "opportunistic"
    username: str | None = None
    password_file: Path | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class PluginConfig:
    """
    One plugin table (C{[[filter]]}, or C{[relay]}/C{[router]} with
    C{use}): the plugin's name and the rest of its table, for its
    constructor.  C{where} names the table in error messages.
    """

    use: str
    options: Mapping[str, Any]
    where: str
    timeout: float = 30.0


@dataclass(frozen=True)
class DeliveryConfig:
    max_connections: int = 100
    max_per_destination: int = 20
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    queue_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    bounce_lifetime: float = 5 * 86400.0
    connect_timeout: float = 30.0
    # RFC 5321 4.5.3.2 command timeouts.
    greeting_timeout: float = 300.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    nameservers: tuple[str, ...] = ()
    ca_file: Path | None = None  # PEM CAs for tls = "verify" (default: the system's)


@dataclass(frozen=True)
class Config:
    file: str
    folder: Path
    hostname: str
    spool: Path
    control: str | None
    plugin_paths: tuple[Path, ...]
    tls: TLSConfig
    listen: tuple[ListenConfig, ...]
    auth: AuthConfig
    limits: LimitsConfig
    relay: RelayConfig
    relay_plugin: PluginConfig | None
    routes: tuple[RouteConfig, ...]
    router_plugin: PluginConfig | None
    filters: tuple[PluginConfig, ...]
    delivery: DeliveryConfig
    receivers: int = 0  # receiving processes besides the main one (0: it receives itself)
    spool_sync: str = "file"  # how a batch is made durable: "file" or "filesystem" (syncfs)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# --- reading ----------------------------------------------------------------


class _Table:
    """
    Takes keys out of one TOML table, checking each; L{done} refuses what
    is left.  C{prefix} is the table's name in error messages.
    """

    def __init__(self, file: str, prefix: str, data: Any, folder: Path):
        if not isinstance(data, dict):
            raise ConfigError(file, prefix, f"expected a table, got {_show(data)}")
        self.file, self.prefix, self.folder = file, prefix, folder
        self.data = dict(data)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), reason)

    def take(self, name: str, kind: type | tuple[type, ...], default: Any, what: str) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        # TOML booleans are not integers for us.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(name, f"expected {what}, got {_show(value)}")
        if not isinstance(value, kind):
            raise self.error(name, f"expected {what}, got {_show(value)}")
        return value

    def string(self, name: str, default: Any = None, choices: tuple[str, ...] | None = None) -> Any:
        value = self.take(name, str, default, "a string")
        if choices is not None and value is not None and value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return self.take(name, bool, default, "true or false")

    def positive(self, name: str, default: Any, kind: type = int) -> Any:
        kinds = (int, float) if kind is float else (int,)
        what = "a positive number" if kind is float else "a positive integer"
        value = self.take(name, kinds, default, what)
        if value is not None and value <= 0:
            raise self.error(name, f"expected {what}, got {_show(value)}")
        return kind(value) if value is not None else None

    def strings(self, name: str, default: tuple = ()) -> tuple[str, ...]:
        value = self.take(name, list, None, "a list of strings")
        if value is None:
            return default
        for item in value:
            if not isinstance(item, str):
                raise self.error(name, f"expected a list of strings, got {_show(item)} in it")
        return tuple(value)

    def path(self, name: str, default: Any = None, must_exist: bool = False) -> Path | None:
        value = self.string(name)
        if value is None:
            return default
        if not value:
            raise self.error(name, "expected a path, got an empty string")
        path = self.folder / os.path.expanduser(value)
        if must_exist and not path.exists():
            raise self.error(name, f"no such file: {path}")
        return path

    def done(self) -> None:
        for name in self.data:
            raise self.error(name, "unknown key")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return '"' + value[:60] + '"'
    return repr(value)


def _check_endpoint(table: _Table, name: str, value: str, client: bool = False) -> str:
    from twisted.internet import endpoints

    try:
        if client:
            endpoints.clientFromString(None, value)
        else:
            endpoints.serverFromString(None, value)
    except Exception as e:  # Twisted raises ValueError, TypeError, KeyError...
        raise table.error(name, f"bad endpoint {_show(value)}: {e}")
    return value


def _domains(table: _Table, name: str, allow_star: bool = False) -> tuple[str, ...]:
    out = []
    for d in table.strings(name):
        if allow_star and d == "*":
            out.append(d)
            continue
        bare = d[2:] if d.startswith("*.") else d
        if not is_domain(bare, utf8=True):
            raise table.error(name, f"not a domain: {_show(d)}")
        out.append(d.lower())
    return tuple(out)


def _listen(file: str, i: int, data: Any, folder: Path) -> ListenConfig:
    t = _Table(file, f"listen[{i}]", data, folder)
    endpoint = t.string("endpoint")
    if endpoint is None:
        raise t.error("endpoint", "missing")
    _check_endpoint(t, "endpoint", endpoint)
    tls = t.string("tls", "starttls", TLS_MODES)
    auth = t.string("auth", "none", AUTH_MODES)
    plain = t.boolean("allow_plaintext_auth", False)
    t.done()
    return ListenConfig(endpoint, tls, auth, plain)


def _route(file: str, i: int, data: Any, folder: Path) -> RouteConfig:
    t = _Table(file, f"route[{i}]", data, folder)
    domains = _domains(t, "domains", allow_star=True)
    if not domains:
        raise t.error("domains", "missing (a list of domains, or [\"*\"])")
    via = t.string("via", None, ROUTE_KINDS)
    if via is None:
        raise t.error("via", f"missing (one of {', '.join(ROUTE_KINDS)})")
    route = RouteConfig(domains=domains, via=via)
    if via == "maildir":
        route = RouteConfig(domains, via, path=t.path("path", folder / "mail"))
    elif via == "lmtp":
        endpoint = t.string("endpoint")
        if endpoint is None:
            raise t.error("endpoint", "missing (a client endpoint such as unix:/run/dovecot/lmtp)")
        route = RouteConfig(domains, via, endpoint=_check_endpoint(t, "endpoint", endpoint, client=True))
    elif via in ("smtp", "mx"):
        host = t.string("host") if via == "smtp" else None
        if via == "smtp" and not host:
            raise t.error("host", "missing (the smart host's name)")
        port = t.take("port", int, 25, "a port number")
        if not 0 < port < 65536:
            raise t.error("port", f"expected a port number, got {port}")
        tls = t.string("tls", "opportunistic", ROUTE_TLS)
        username = t.string("username") if via == "smtp" else None
        password_file = t.path("password_file", must_exist=True) if via == "smtp" else None
        if (username is None) != (password_file is None):
            raise t.error("username" if username is None else "password_file",
                          "username and password_file go together")
        if username is not None and tls in ("none", "opportunistic"):
            raise t.error("tls", "AUTH is only sent under TLS: use require or verify with a username")
        route = RouteConfig(domains, via, host=host, port=port, tls=tls,
                            username=username, password_file=password_file)
    t.done()
    return route


def _plugin(file: str, where: str, data: Any, folder: Path) -> PluginConfig:
    t = _Table(file, where, data, folder)
    use = t.string("use")
    if not use:
        raise t.error("use", "missing (a built-in name or module:Class)")
    timeout = t.positive("timeout", 30.0, float)
    return PluginConfig(use, MappingProxyType(dict(t.data)), where, timeout)


def _networks(t: _Table, name: str) -> tuple:
    out = []
    for text in t.strings(name):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise t.error(name, f"not a network (CIDR): {_show(text)}")
    return tuple(out)


def parse(data: Mapping[str, Any], file: str, folder: Path) -> Config:
    """Build a L{Config} from parsed TOML C{data} read from C{file}."""
    top = _Table(file, "", data, folder)

    hostname = top.string("hostname") or socket.getfqdn()
    if not is_domain(hostname):
        raise top.error("hostname", f"not a host name: {_show(hostname)}")
    spool = top.path("spool", folder / "spool")
    control = top.string("control")
    if control is not None:
        _check_endpoint(top, "control", control)
    plugin_paths = tuple(folder / p for p in top.strings("plugin_paths"))
    from twisted_mta.spool.store import SYNC_MODES, syncfs_available
    spool_sync = top.string("spool_sync", "file", SYNC_MODES)
    if spool_sync == "filesystem" and not syncfs_available():
        raise top.error("spool_sync", "syncfs(2) is not available on this system")
    receivers = top.take("receivers", int, 0, "an integer from 0 to 64")
    if not 0 <= receivers <= 64:
        raise top.error("receivers", f"expected an integer from 0 to 64, got {receivers}")

    t = _Table(file, "tls", top.take("tls", dict, {}, "a table"), folder)
    cert, key = t.path("certificate", must_exist=True), t.path("key", must_exist=True)
    if (cert is None) != (key is None):
        raise t.error("key" if key is None else "certificate", "certificate and key go together")
    t.done()
    tls = TLSConfig(cert, key)

    listens = top.take("listen", list, None, "a list of [[listen]] tables")
    if listens is None:
        listen = (ListenConfig("tcp:25"),)
    else:
        listen = tuple(_listen(file, i, d, folder) for i, d in enumerate(listens, 1))
        if not listen:
            raise top.error("listen", "no listeners")
    if receivers:
        # Receivers are handed connections with one byte naming the
        # listener (twisted_mta.handoff); they are TCP ones (the receivers
        # know a session's client by its IP address).
        if len(listen) > MAX_LISTENERS:
            raise ConfigError(file, "listen", f"receivers = {receivers} takes at most "
                                              f"{MAX_LISTENERS} listeners, got {len(listen)}")
        for i, each in enumerate(listen, 1):
            if each.endpoint.split(":", 1)[0] not in ("tcp", "tcp6"):
                raise ConfigError(file, f"listen[{i}].endpoint",
                                  f"receivers = {receivers} takes tcp: or tcp6: listeners only, "
                                  f"got {_show(each.endpoint)}")

    t = _Table(file, "auth", top.take("auth", dict, {}, "a table"), folder)
    auth = AuthConfig(
        users=t.path("users"),
        show_user_in_received=t.boolean("show_user_in_received", False),
        failure_limit=t.positive("failure_limit", 10),
        lockout=t.positive("lockout", 600.0, float),
        sender_rule=t.string("sender_rule", "senders"),
    )
    if not auth.sender_rule:
        raise t.error("sender_rule", "expected a plugin name (\"senders\", module:Class, "
                                     "or \"none\")")
    if auth.users is None and any(listen.auth != "none" for listen in listen):
        raise t.error("users", "missing: a [[listen]] has auth = \"offer\" or \"require\" "
                               "(create the file with 'twisted-mta passwd NAME')")
    t.done()

    t = _Table(file, "limits", top.take("limits", dict, {}, "a table"), folder)
    d = LimitsConfig()
    limits = LimitsConfig(
        message_size=t.positive("message_size", d.message_size),
        recipients=t.positive("recipients", d.recipients),
        connections=t.positive("connections", d.connections),
        connections_per_client=t.positive("connections_per_client", d.connections_per_client),
        command_timeout=t.positive("command_timeout", d.command_timeout, float),
        bad_commands=t.positive("bad_commands", d.bad_commands),
        bare_newline=t.string("bare_newline", d.bare_newline, BARE_NEWLINE),
    )
    t.done()

    t = _Table(file, "relay", top.take("relay", dict, {}, "a table"), folder)
    relay_plugin = None
    if "use" in t.data:
        relay_plugin = _plugin(file, "relay", t.data, folder)
        relay = RelayConfig()
    else:
        relay = RelayConfig(
            local_domains=_domains(t, "local_domains"),
            relay_domains=_domains(t, "relay_domains"),
            networks=_networks(t, "networks") if "networks" in t.data
            else tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128")),
        )
        t.done()

    routes_data = top.take("route", list, None, "a list of [[route]] tables")
    routes = tuple(_route(file, i, d, folder) for i, d in enumerate(routes_data or (), 1))
    if routes_data is None:
        routes = default_routes(relay.local_domains, folder)
    router_data = top.take("router", dict, None, "a table")
    router_plugin = _plugin(file, "router", router_data, folder) if router_data is not None else None

    filters = tuple(
        _plugin(file, f"filter[{i}]", d, folder)
        for i, d in enumerate(top.take("filter", list, [], "a list of [[filter]] tables"), 1)
    )

    t = _Table(file, "delivery", top.take("delivery", dict, {}, "a table"), folder)
    dd = DeliveryConfig()
    delivery = DeliveryConfig(
        max_connections=t.positive("max_connections", dd.max_connections),
        max_per_destination=t.positive("max_per_destination", dd.max_per_destination),
        min_backoff=t.positive("min_backoff", dd.min_backoff, float),
        max_backoff=t.positive("max_backoff", dd.max_backoff, float),
        queue_lifetime=t.positive("queue_lifetime", dd.queue_lifetime, float),
        delay_warning=t.positive("delay_warning", dd.delay_warning, float),
        bounce_lifetime=t.positive("bounce_lifetime", dd.bounce_lifetime, float),
        connect_timeout=t.positive("connect_timeout", dd.connect_timeout, float),
        greeting_timeout=t.positive("greeting_timeout", dd.greeting_timeout, float),
        command_timeout=t.positive("command_timeout", dd.command_timeout, float),
        data_timeout=t.positive("data_timeout", dd.data_timeout, float),
        nameservers=t.strings("nameservers"),
        ca_file=t.path("ca_file", must_exist=True),
    )
    for server in delivery.nameservers:
        from twisted_mta.delivery.mx import parse_nameserver
        try:
            parse_nameserver(server)
        except ValueError as e:
            raise t.error("nameservers", str(e))
    if delivery.max_backoff < delivery.min_backoff:
        raise t.error("max_backoff", "must not be less than min_backoff")
    t.done()

    top.done()
    return Config(
        file=file, folder=folder, hostname=hostname, spool=spool, control=control,
        plugin_paths=plugin_paths, tls=tls, listen=listen, auth=auth, limits=limits,
        relay=relay, relay_plugin=relay_plugin, routes=routes, router_plugin=router_plugin,
        filters=filters, delivery=delivery, receivers=receivers, spool_sync=spool_sync, raw=MappingProxyType(dict(data)),
    )


def default_routes(local_domains: tuple[str, ...], folder: Path) -> tuple[RouteConfig, ...]:
    """Without [[route]]: local domains to Maildirs under C{mail}, the rest by MX."""
    routes = []
    if local_domains:
        routes.append(RouteConfig(local_domains, "maildir", path=folder / "mail"))
    routes.append(RouteConfig(("*",), "mx"))
    return tuple(routes)


def load(path: str | os.PathLike) -> Config:
    """Read and check the configuration file at C{path}."""
    path = Path(path)
    file = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(file, "", "no such file")
    except OSError as e:
        raise ConfigError(file, "", e.strerror or str(e))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"not valid TOML: {e}")
    return parse(data, file, path.resolve().parent)


DEFAULT_FILE = "<embedded default>"
DEFAULT_TOML = """\
# The embedded development default (twistd -n mta without --config).
hostname = "localhost"
spool = "spool"

[[listen]]
endpoint = "tcp:2525:interface=127.0.0.1"
tls = "starttls"

[relay]
local_domains = ["localhost"]
networks = ["127.0.0.0/8", "::1/128"]
"""


def default(folder: str | os.PathLike | None = None) -> Config:
    """The embedded development default, with paths under C{folder} (default: cwd)."""
    folder = Path(folder or os.getcwd()).resolve()
    return parse(tomllib.loads(DEFAULT_TOML), DEFAULT_FILE, folder)

