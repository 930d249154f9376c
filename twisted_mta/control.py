"""
The admin channel: an AMP server on the configuration's C{control}
endpoint, which the C{twisted-mta} command talks to.

Without a C{control} key the channel is the UNIX socket
C{<spool>/control.sock}, mode 0600.  A relative C{unix:} path is taken
relative to the configuration file's folder, like every other path.

Before the server starts, L{ControlService.prepare} looks at the socket
path: a socket that answers belongs to a server that is running (on the
same spool, most likely), and this one refuses to start; a socket that
does not answer is left over from a server that died, and is removed.

Every command fails with L{ControlError} and a one-line message ("no such
message: ID"); results that can be long (the queue) travel as JSON text
in L{BigText} values, which AMP's 64 KiB value limit does not bound.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, endpoints, error, protocol, threads
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()

#: What a queue id looks like (the spool's alphabet, and a little room).
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")

#: Seconds the command-line client waits for the server.
CONNECT_TIMEOUT = 5
CALL_TIMEOUT = 120

#: The longest path a UNIX socket can have on Linux (sun_path is 108 bytes with the NUL).
_MAX_UNIX_PATH = 107


# --- the wire ---------------------------------------------------------------


class ControlError(Exception):
    """A control command failed; C{str()} is one line saying why."""


class ReloadRefused(ControlError):
    """The server refused to reload; C{str()} is its one-line reason."""


class BigText(amp.Argument):
    """
    Text of any length: UTF-8, cut into values of at most
    L{amp.MAX_VALUE_LENGTH} bytes under the keys C{name.0}, C{name.1}, …,
    with their count under C{name}.
    """

    def toBox(self, name, strings, objects, proto):
        data = objects[name.decode("ascii")].encode("utf-8")
        step = amp.MAX_VALUE_LENGTH
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        strings[name] = b"%d" % len(chunks)
        for i, chunk in enumerate(chunks):
            strings[name + b".%d" % i] = chunk

    def fromBox(self, name, strings, objects, proto):
        count = int(strings.pop(name))
        data = b"".join(strings.pop(name + b".%d" % i) for i in range(count))
        objects[name.decode("ascii")] = data.decode("utf-8")


class _Command(amp.Command):
    errors = {ControlError: b"CONTROL_ERROR"}


class QueueList(_Command):
    """Every queued message, as a JSON array of L{entry_dict}s."""

    arguments: list = []
    response = [(b"json", BigText())]


class QueueShow(_Command):
    """One message: L{entry_dict} plus C{headers} (the header block, as text)."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"json", BigText())]


class QueueFlush(_Command):
    """Make one message, or every message with recipients in C{domain}, or all, due now."""

    arguments = [(b"id", amp.Unicode(optional=True)), (b"domain", amp.Unicode(optional=True))]
    response = [(b"ids", amp.ListOf(amp.Unicode()))]


class QueueDelete(_Command):
    """
    Remove a message.  C{later} is true when it was being delivered: it is
    removed as soon as that attempt has been recorded.
    """

    arguments = [(b"id", amp.Unicode())]
    response = [(b"later", amp.Boolean())]


class QueueHold(_Command):
    arguments = [(b"id", amp.Unicode())]
    response: list = []


class QueueRelease(_Command):
    arguments = [(b"id", amp.Unicode())]
    response: list = []


class Reload(amp.Command):  # not a _Command: AMP tries base classes' errors first
    """
    Reload the configuration and plugins; answers the new generation
    number, and what the reload could not apply (listeners, spool...).
    """

    arguments: list = []
    response = [(b"generation", amp.Integer()),
                (b"notes", amp.ListOf(amp.Unicode(), optional=True))]
    errors = {ReloadRefused: b"RELOAD_REFUSED", ControlError: b"CONTROL_ERROR"}


class Plugins(_Command):
    """The active plugins, as JSON (see L{plugins_dict})."""

    arguments: list = []
    response = [(b"json", BigText())]


# --- values -----------------------------------------------------------------


def entry_dict(entry, active: bool = False) -> dict:
    """
    A queue entry as the queue commands show it.  Times are seconds since
    the epoch; C{next_try} is C{None} when nothing is waiting for a time.
    """
    next_try = entry.next_try
    return {
        "id": entry.id,
        "sender": entry.sender,
        "recipients": [
            {
                "address": r.address,
                "state": r.state,
                "attempts": r.attempts,
                "next_try": r.next_try if (r.next_try and not r.final) else None,
                "last_reply": r.last_reply,
            }
            for r in entry.recipients
        ],
        "size": entry.size,
        "arrival": entry.arrival,
        "attempts": entry.attempts,
        "next_try": next_try or None,
        "held": entry.held,
        "active": active,
        "bounce": entry.bounce,
        "last_reply": _last_reply(entry),
    }


def _last_reply(entry):
    """The last reply of a recipient still waiting, else of any recipient."""
    for rcpts in ([r for r in entry.recipients if not r.final], entry.recipients):
        for r in rcpts:
            if r.last_reply:
                return r.last_reply
    return None


def read_headers(spool, entry, limit: int = 256 * 1024) -> str:
    """
    The header block of C{entry}'s message as it would be delivered (with
    the headers filters added), as text with C{\\n} line ends.  Blocking.
    """
    head = b""
    chunks = spool.read_message(entry, chunk_size=16384)
    try:
        for chunk in chunks:
            head += chunk
            if head.startswith(b"\r\n") or b"\r\n\r\n" in head or len(head) >= limit:
                break
    finally:
        chunks.close()
    if head.startswith(b"\r\n"):
        head = b""
    else:
        end = head.find(b"\r\n\r\n")
        head = head[:end + 2] if end >= 0 else head[:limit]
    return head.decode("utf-8", "replace").replace("\r\n", "\n")


def plugins_dict(pipeline) -> dict:
    """The active plugin set, in the order it runs."""
    from twisted_mta.interfaces import IDeliveryObserver

    def one(loaded, role, hooks=None):
        if hooks is None:
            hooks = loaded.hooks()
            if IDeliveryObserver.providedBy(loaded.plugin):
                hooks = hooks + ["delivered", "deferred", "bounced"]
        return {
            "role": role,
            "name": loaded.name,
            "class": f"{type(loaded.plugin).__module__}.{type(loaded.plugin).__qualname__}",
            "hooks": hooks,
            "origin": loaded.origin,
            "timeout": loaded.timeout,
        }

    return {
        "generation": pipeline.generation,
        "filters": [one(f, "filter") for f in pipeline.filters],
        "relay": one(pipeline.relay, "relay", ["check_relay"]),
        "router": one(pipeline.router, "router", ["route"]),
    }


def check_queue_id(queue_id) -> str:
    if not isinstance(queue_id, str) or not _QUEUE_ID.fullmatch(queue_id):
        raise ControlError(f"no such message: {queue_id}")
    return queue_id


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# --- the server -------------------------------------------------------------


class ControlProtocol(amp.AMP):
    """One admin connection; C{mta} is the L{MTAService} (or anything shaped like it)."""

    def __init__(self, mta):
        super().__init__()
        self.mta = mta

    # AMP logs every connection made and lost (two lines per twisted-mta
    # command); the commands that change something log what they did.
    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    def _entry(self, queue_id):
        entry = self.mta.delivery.entries.get(check_queue_id(queue_id))
        if entry is None:
            raise ControlError(f"no such message: {queue_id}")
        return entry

    @staticmethod
    def _guard(d: defer.Deferred, what: str) -> defer.Deferred:
        """Any failure but a L{ControlError} is logged and told as one line."""
        def failed(f):
            if f.check(ControlError):
                return f
            log.failure("control: {what} failed", f, what=what)
            raise ControlError(f"{what} failed: {_one_line(f.value)}")
        return d.addErrback(failed)

    @QueueList.responder
    def queue_list(self):
        delivery = self.mta.delivery
        entries = sorted(delivery.entries.values(), key=lambda e: (e.arrival, e.id))
        return {"json": json.dumps([entry_dict(e, e.id in delivery.active) for e in entries],
                                   ensure_ascii=False)}

    @QueueShow.responder
    def queue_show(self, id):
        entry = self._entry(id)
        active = entry.id in self.mta.delivery.active

        def shown(headers):
            return {"json": json.dumps({**entry_dict(entry, active), "headers": headers},
                                       ensure_ascii=False)}

        d = threads.deferToThread(read_headers, self.mta.spool, entry)
        d.addCallback(shown)
        return self._guard(d, f"reading {entry.id}")

    @QueueFlush.responder
    def queue_flush(self, id=None, domain=None):
        if id is not None and domain is not None:
            raise ControlError("give a message id or a domain, not both")
        if id is not None:
            entry = self._entry(id)
            if entry.held:
                raise ControlError(f"{entry.id} is on hold; release it to deliver it")
        ids = self.mta.delivery.flush(queue_id=id, domain=domain)
        entries = self.mta.delivery.entries
        ids = [i for i in ids if i in entries and not entries[i].held]
        log.info("control: flush {what}: {n} message{s} due now",
                 what=id or (domain and f"domain {domain}") or "all", n=len(ids),
                 s="" if len(ids) == 1 else "s")
        return {"ids": ids}

    @QueueDelete.responder
    def queue_delete(self, id):
        entry = self._entry(id)
        later = entry.id in self.mta.delivery.active
        d = defer.maybeDeferred(self.mta.delivery.delete, entry.id)
        d.addCallback(lambda _: {"later": later})
        return self._guard(d, f"deleting {entry.id}")

    @QueueHold.responder
    def queue_hold(self, id):
        entry = self._entry(id)
        d = defer.maybeDeferred(self.mta.delivery.hold, entry.id)
        d.addCallback(lambda _: log.info("{id}: held by the administrator", id=entry.id) or {})
        return self._guard(d, f"holding {entry.id}")

    @QueueRelease.responder
    def queue_release(self, id):
        entry = self._entry(id)
        d = defer.maybeDeferred(self.mta.delivery.release, entry.id)
        d.addCallback(lambda _: log.info("{id}: released by the administrator", id=entry.id) or {})
        return self._guard(d, f"releasing {entry.id}")

    @Reload.responder
    def reload(self):
        d = defer.maybeDeferred(self.mta.reload)

        def failed(f):
            raise ReloadRefused(_one_line(f.value))

        def done(generation):
            return {"generation": int(generation),
                    "notes": list(getattr(self.mta, "reload_notes", ()))}

        return d.addCallbacks(done, failed)

    @Plugins.responder
    def plugins(self):
        pipeline = self.mta.pipeline
        if pipeline is None:
            raise ControlError("no plugins loaded yet")
        return {"json": json.dumps(plugins_dict(pipeline), ensure_ascii=False)}


class ControlFactory(protocol.Factory):
    noisy = False

    def __init__(self, mta):
        self.mta = mta

    def buildProtocol(self, addr):
        p = ControlProtocol(self.mta)
        p.factory = self
        return p


# --- where the channel is ---------------------------------------------------


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint-string syntax: C{:}-separated, C{=} for keywords, C{\\} escapes."""
    fields: list[list[str]] = [[""]]
    i = 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            fields[-1][-1] += description[i + 1]
            i += 2
            continue
        if c == ":":
            fields.append([""])
        elif c == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += c
        i += 1
    args = [f[0] for f in fields if len(f) == 1]
    kwargs = {f[0]: f[1] for f in fields if len(f) == 2}
    return args, kwargs


@dataclass(frozen=True)
class ControlAddress:
    """
    Where the control channel is: C{kind} is C{unix} (C{path}) or C{tcp}/
    C{tcp6} (C{host}, C{port}); other server endpoints are served as
    written (C{description}) but the command-line client cannot reach them.
    """

    description: str
    kind: str
    path: Path | None = None
    mode: int = 0o600
    backlog: int = 50
    host: str | None = None
    port: int | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"control socket {self.path}"
        return f"control endpoint {self.description}"

    def server_endpoint(self, reactor):
        if self.kind == "unix":
            return endpoints.UNIXServerEndpoint(reactor, str(self.path), backlog=self.backlog,
                                                mode=self.mode)
        return endpoints.serverFromString(reactor, self.description)

    def client_endpoint(self, reactor, timeout: float = CONNECT_TIMEOUT):
        if self.kind == "unix":
            return endpoints.UNIXClientEndpoint(reactor, str(self.path), timeout=timeout)
        if self.kind == "tcp":
            return endpoints.TCP4ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.kind == "tcp6":
            return endpoints.TCP6ClientEndpoint(reactor, self.host, self.port, timeout=timeout)
        raise ControlError(f"the twisted-mta command can reach only unix: and tcp: control "
                           f"endpoints, not {self.description}")


def control_address(config) -> ControlAddress:
    """The control channel of C{config} (see the module docstring)."""
    description = config.control
    if description is None:
        path = Path(config.spool) / "control.sock"
        return ControlAddress(f"unix:{path}", "unix", path=path)
    args, kwargs = _split_endpoint(description)
    kind = args[0].lower() if args else ""
    if kind == "unix":
        address = kwargs.get("address", args[1] if len(args) > 1 else "")
        path = Path(config.folder) / os.path.expanduser(address)
        mode = int(kwargs["mode"], 8) if "mode" in kwargs else 0o600
        backlog = int(kwargs.get("backlog", 50))
        return ControlAddress(description, "unix", path=path, mode=mode, backlog=backlog)
    if kind in ("tcp", "tcp6"):
        port = int(kwargs.get("port", args[1] if len(args) > 1 else 0))
        host = kwargs.get("interface", "")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if kind == "tcp" else "::1"
        return ControlAddress(description, kind, host=host, port=port)
    return ControlAddress(description, kind)


# --- the service ------------------------------------------------------------


class ControlStartupError(Exception):
    """The control channel cannot be opened; the text says why, in one line."""


def _claim_socket(path: Path) -> None:
    """
    Make C{path} free for a new control socket: refuse if a server answers
    on it or it is not a socket; remove it if it is a socket nobody
    answers on (left by a server that died).  Blocking, but only a local
    connect.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlStartupError(f"control socket {path}: {e.strerror}")
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlStartupError(f"control socket {path}: the path exists and is not a socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
    except ConnectionRefusedError:
        pass  # nobody listens: stale
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.ECONNREFUSED:
            raise ControlStartupError(f"control socket {path}: {e.strerror or e}")
    else:
        raise ControlStartupError(
            f"control socket {path}: another server is running and answers on it")
    finally:
        s.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    log.info("control: removed the stale control socket {path}", path=str(path))


class ControlService(service.Service):
    """
    The admin channel of C{mta} (an L{MTAService}): call L{prepare} before
    anything touches the spool (it refuses to run beside a live server),
    then start it as a child service.  The endpoint is the one in the
    configuration at L{prepare}; a reload does not move it.
    """

    def __init__(self, mta, reactor=None):
        if reactor is None:
            reactor = getattr(mta, "reactor", None)
        if reactor is None:
            from twisted.internet import reactor
        self.mta = mta
        self.reactor = reactor
        self.address: ControlAddress | None = None
        self.port = None

    def prepare(self) -> None:
        """Check the control endpoint; raises L{ControlStartupError} with the reason."""
        try:
            self.address = control_address(self.mta.config)
        except (ValueError, IndexError) as e:
            raise ControlStartupError(f"{self.mta.config.file}: control: {e}")
        if self.address.kind == "unix":
            _claim_socket(self.address.path)
        elif self.address.kind in ("tcp", "tcp6") and self.address.host not in ("127.0.0.1", "::1"):
            log.warn("control: {endpoint} accepts admin commands from the network, "
                     "without authentication", endpoint=self.address.description)

    def startService(self) -> None:
        if self.address is None:
            self.prepare()
        super().startService()
        if self.address.kind == "unix" and len(os.fsencode(self.address.path)) > _MAX_UNIX_PATH:
            log.error("control: cannot listen on {address}: the path is longer than a UNIX "
                      "socket allows ({n} bytes); set `control` to a shorter path; "
                      "twisted-mta reload and queue commands will not reach this server",
                      address=str(self.address), n=_MAX_UNIX_PATH)
            return
        endpoint = self.address.server_endpoint(self.reactor)
        d = endpoint.listen(ControlFactory(self.mta))
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port) -> None:
        if not self.running:
            port.stopListening()
            return
        self.port = port
        log.info("control: listening on {address}", address=str(self.address))

    def _failed(self, failure) -> None:
        # An error, not a crash: the MTA runs on without its admin channel.
        log.error("control: cannot listen on {address}: {why}; twisted-mta reload and queue "
                  "commands will not reach this server",
                  address=str(self.address), why=_one_line(failure.value))

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


# --- the client -------------------------------------------------------------


class NotRunning(Exception):
    """Nothing answers on the control channel; C{str()} says where it looked."""


async def call(reactor, address: ControlAddress, command, **kwargs) -> dict:
    """
    Connect to the server at C{address}, run one C{command}, and return its
    answer.  Raises L{NotRunning} when nothing listens there, and
    L{ControlError} when the command failed.
    """
    if address.kind == "unix" and len(os.fsencode(address.path)) > _MAX_UNIX_PATH:
        # No server can listen there (and Twisted's connect would only time out).
        raise NotRunning(f"{address}: the path is too long for a UNIX socket")
    endpoint = address.client_endpoint(reactor)
    try:
        proto = await endpoints.connectProtocol(endpoint, amp.AMP())
    except error.ConnectionRefusedError:
        raise NotRunning(f"{address}: connection refused")
    except error.ConnectError as e:
        if getattr(e, "osError", None) in (errno.ENOENT, errno.ECONNREFUSED):
            raise NotRunning(f"{address}: no such socket" if e.osError == errno.ENOENT
                             else f"{address}: connection refused")
        raise ControlError(f"cannot reach the server ({address}): {e.args[0] if e.args else e}")
    try:
        d = proto.callRemote(command, **kwargs)
        d.addTimeout(CALL_TIMEOUT, reactor)
        try:
            return await d
        except defer.TimeoutError:
            raise ControlError(f"the server did not answer within {CALL_TIMEOUT} s ({address})")
        except error.ConnectionClosed:
            raise ControlError(f"the server closed the connection ({address})")
        except amp.RemoteAmpError as e:
            raise ControlError(f"the server failed: {_one_line(e)}")
    finally:
        proto.transport.loseConnection()
