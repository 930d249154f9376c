"""
Helpers for plugin authors: call a plugin's hooks the way the server does,
without a server.

    from twisted_mta import testing

    plugin = testing.load("no_exe:NoExe", plugin_paths=["plugins"], max_size=1000)
    message = testing.message(b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
    verdict = testing.run(plugin, "data", testing.session(), testing.envelope(), message)
    assert verdict.action is Action.REJECT

L{run} goes through the same code as the server (timeouts, errors become
a 451 4.3.0 tempfail, Deferreds and coroutines awaited), and returns the
L{Verdict} directly when the hook has answered by the time it returns,
else the Deferred.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from twisted_mta import loader
from twisted_mta.interfaces import IDeliveryObserver, IFilter, IRelayPolicy, IRouter
from twisted_mta.config import PluginConfig, parse
from twisted_mta.pipeline import LoadedPlugin, Pipeline, call_hook
from twisted_mta.smtp.grammar import parse_mailbox
from twisted_mta.values import Address, Envelope, Message, Session, TLSInfo, parse_headers

ANY_PLUGIN = (IFilter, IDeliveryObserver, IRelayPolicy, IRouter)

__all__ = ["load", "session", "envelope", "message", "address", "run", "Pipeline"]


def address(text: str) -> Address:
    """An L{Address} from C{local@domain} text (RFC 5321 syntax, UTF-8 allowed)."""
    return parse_mailbox(text, utf8=True)


def session(client_ip: str = "192.0.2.1", helo: str | None = "client.example.test",
            tls: bool = False, user: str | None = None, **kw) -> Session:
    """A L{Session} as the server would pass it, after EHLO."""
    return Session(
        id=kw.pop("id", "test"), client_ip=client_ip, helo=helo, esmtp=helo is not None,
        tls=TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256) if tls else None,
        user=user, **kw,
    )


def envelope(sender: str | None = "sender@example.test",
             recipients: tuple[str, ...] | list[str] = ("rcpt@example.test",), **kw) -> Envelope:
    """An L{Envelope}; C{sender=None} is the null sender C{<>}."""
    return Envelope(
        sender=address(sender) if sender else None,
        recipients=tuple(address(r) for r in recipients),
        **kw,
    )


def message(data: bytes, folder: str | os.PathLike | None = None) -> Message:
    """
    A L{Message} holding C{data} (the message as it would be stored: CRLF
    line ends), written to a temporary file that L{Message.open} reads.
    """
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="mta-test-"))
    path = folder / "message"
    path.write_bytes(data)
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    return Message(size=len(data), headers=parse_headers(head), path=str(path))


def load(use: str, plugin_paths: list[str] | tuple[str, ...] = ("plugins",),
         timeout: float = 30.0, **options: Any) -> LoadedPlugin:
    """
    Load a plugin the way the server does (by short name or C{module:Class},
    constructed from C{options}, checked against the interfaces it
    declares).  Raises L{loader.PluginError} with the server's message.
    A plugin that takes a C{context} gets one whose state folder is a new
    temporary folder.
    """
    cfg = parse({"plugin_paths": [str(Path(p).resolve()) for p in plugin_paths],
                 "spool": tempfile.mkdtemp(prefix="mta-test-spool-")},
                "<test>", Path.cwd())
    pc = PluginConfig(use, dict(options), "filter[test]", timeout)
    return loader.load(cfg, pc, loader._Build(0), required=ANY_PLUGIN)


def run(plugin: LoadedPlugin | Any, stage: str, *args, reactor=None):
    """
    Call C{plugin}'s C{stage} hook (C{connect}, C{helo}, C{auth}, C{mail},
    C{rcpt} or C{data}) as the server would.  Returns the L{Verdict} (never
    C{None}: no answer is continue) if the hook has answered, else a
    Deferred that fires with it.
    """
    if not isinstance(plugin, LoadedPlugin):
        plugin = LoadedPlugin(type(plugin).__name__, plugin)
    if reactor is None:
        from twisted.internet import reactor
    from twisted_mta.pipeline import _as_verdict

    d: Deferred = call_hook(reactor, plugin, stage, *args)
    d.addCallback(_as_verdict, plugin, stage)
    results: list = []

    def keep(result):
        results.append(result)
        return result

    d.addBoth(keep)
    if results:
        result = results[0]
        if hasattr(result, "raiseException"):
            result.raiseException()
        return result
    out: Deferred = Deferred()
    d.addBoth(out.callback)
    return out
