"""
The C{twisted-mta} command.  Every subcommand takes C{--config FILE}
(default C{mta.toml}), exits 0 on success, and otherwise prints one line
on standard error saying what went wrong and exits non-zero.

The commands that need the running server reach it through the control
channel (L{twisted_mta.control}).  When nothing answers there, C{queue
list} and C{queue show} read the spool folder instead (read-only, and say
so on standard error); the commands that change something fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from twisted_mta import config as configmod


class CommandError(Exception):
    """A subcommand failed; C{str()} is the line shown."""


def cmd_check_config(args) -> int:
    from twisted_mta import loader
    from twisted_mta.service import MTAService, StartupError

    cfg = configmod.load(args.file or args.config or "mta.toml")
    try:
        loader.build_pipeline(cfg, generation=1)
        MTAService(cfg)._load_tls(cfg)
    except (loader.PluginError, StartupError) as e:
        raise CommandError(str(e))
    print("ok")
    return 0


# --- talking to the server ---------------------------------------------------


class _NotRunning(CommandError):
    pass


def remote(cfg, command, **kwargs) -> dict:
    """
    Run one control C{command} on the server of C{cfg} and return its
    answer.  Runs the reactor, so once per process.  Raises L{_NotRunning}
    when no server answers, L{CommandError} when the command failed.
    """
    from twisted.internet import defer, reactor

    from twisted_mta import control

    address = control.control_address(cfg)
    outcome: list = []

    def go():
        d = defer.Deferred.fromCoroutine(control.call(reactor, address, command, **kwargs))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, dict):
        return result
    if result.check(control.ReloadRefused):
        raise CommandError(f"reload refused: {result.value}")
    if result.check(control.NotRunning):
        raise _NotRunning(f"the server is not running ({result.value})")
    if result.check(control.ControlError):
        raise CommandError(str(result.value))
    raise CommandError(f"{type(result.value).__name__}: {result.value}")


def _offline_spool(cfg):
    from twisted_mta.spool.store import Spool

    return Spool(cfg.spool, inline=True)


def _offline_note(cfg, why: _NotRunning) -> None:
    print(f"twisted-mta: {why}; read the spool folder {cfg.spool} instead (read-only)",
          file=sys.stderr)


# --- showing the queue ---------------------------------------------------------


def _when(t) -> str:
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(t)) if t else "-"


def _recipient_detail(r) -> str:
    detail = r["state"]
    if r["attempts"]:
        detail += f", {r['attempts']} attempt{'s' if r['attempts'] != 1 else ''}"
    if r["state"] in ("pending", "deferred") and r["next_try"]:
        detail += f", next try {_when(r['next_try'])}"
    return detail


def format_queue(entries: list[dict]) -> str:
    """C{postqueue -p}'s layout: C{*} after the id: being delivered; C{!}: on hold."""
    if not entries:
        return "Mail queue is empty\n"
    indent = " " * 52
    lines = ["-Queue ID-           --Size-- ----Arrival Time---  -Sender/Recipient-------"]
    for e in entries:
        mark = "*" if e.get("active") else "!" if e["held"] else " "
        lines.append(f"{e['id'] + mark:<20}{e['size']:>9} {_when(e['arrival']):<19}  "
                     f"{e['sender'] or '<>'}")
        for r in e["recipients"]:
            lines.append(f"{indent}{r['address']}  [{_recipient_detail(r)}]")
            if r["last_reply"]:
                lines.append(f"{indent}  ({r['last_reply']})")
        lines.append("")
    kbytes = (sum(e["size"] for e in entries) + 1023) // 1024
    n = len(entries)
    lines.append(f"-- {kbytes} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(lines) + "\n"


def format_entry(e: dict) -> str:
    status = ("being delivered" if e.get("active") else "on hold" if e["held"] else "queued")
    lines = [
        f"id:         {e['id']}",
        f"status:     {status}",
        f"sender:     {e['sender'] or '<>'}",
        f"arrival:    {_when(e['arrival'])}",
        f"size:       {e['size']} bytes",
        f"attempts:   {e['attempts']}",
        f"next try:   {_when(e['next_try'])}",
        "recipients:",
    ]
    for r in e["recipients"]:
        lines.append(f"  {r['address']}  [{_recipient_detail(r)}]")
        if r["last_reply"]:
            lines.append(f"    ({r['last_reply']})")
    lines.append("")
    lines.append(e.get("headers", "").rstrip("\n"))
    return "\n".join(lines) + "\n"


def cmd_queue_list(args) -> int:
    from twisted_mta import control

    cfg = _load(args)
    try:
        entries = json.loads(remote(cfg, control.QueueList)["json"])
    except _NotRunning as why:
        spool = _offline_spool(cfg)
        entries = [control.entry_dict(e) for e in
                   sorted(spool.entries(), key=lambda e: (e.arrival, e.id))]
        _offline_note(cfg, why)
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_queue(entries))
    return 0


def cmd_queue_show(args) -> int:
    from twisted_mta import control
    from twisted_mta.spool.store import SpoolError

    cfg = _load(args)
    try:
        control.check_queue_id(args.id)
        try:
            entry = json.loads(remote(cfg, control.QueueShow, id=args.id)["json"])
        except _NotRunning as why:
            spool = _offline_spool(cfg)
            try:
                found = spool.load(args.id)
                entry = {**control.entry_dict(found),
                         "headers": control.read_headers(spool, found)}
            except (SpoolError, OSError):
                raise control.ControlError(
                    f"no such message: {args.id} (the server is not running; "
                    f"looked in the spool folder {cfg.spool})")
            _offline_note(cfg, why)
    except control.ControlError as e:
        raise CommandError(str(e))
    if args.json:
        print(json.dumps(entry, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_entry(entry))
    return 0


# --- changing the queue, and the server -------------------------------------------


def cmd_queue_flush(args) -> int:
    from twisted_mta import control

    if args.id is not None and args.domain is not None:
        raise CommandError("queue flush: give a message id or --domain, not both")
    cfg = _load(args)
    kwargs = {}
    if args.id is not None:
        kwargs["id"] = args.id
    if args.domain is not None:
        kwargs["domain"] = args.domain
    ids = remote(cfg, control.QueueFlush, **kwargs)["ids"]
    for queue_id in ids:
        print(f"flushed: {queue_id}")
    if not ids:
        print("twisted-mta: nothing to flush", file=sys.stderr)
    return 0


def cmd_queue_delete(args) -> int:
    from twisted_mta import control

    cfg = _load(args)
    if remote(cfg, control.QueueDelete, id=args.id)["later"]:
        print(f"deleted: {args.id} (once the delivery attempt under way has ended)")
    else:
        print(f"deleted: {args.id}")
    return 0


def cmd_queue_hold(args) -> int:
    from twisted_mta import control

    remote(_load(args), control.QueueHold, id=args.id)
    print(f"held: {args.id}")
    return 0


def cmd_queue_release(args) -> int:
    from twisted_mta import control

    remote(_load(args), control.QueueRelease, id=args.id)
    print(f"released: {args.id}")
    return 0


def cmd_reload(args) -> int:
    from twisted_mta import control

    answer = remote(_load(args), control.Reload)
    print(f"reloaded: generation {answer['generation']}")
    for note in answer.get("notes") or ():
        print(f"not applied: {note}")
    return 0


def format_plugins(p: dict) -> str:
    def where(x):
        return x["origin"] or x["class"]

    lines = [f"generation {p['generation']}",
             f"relay:   {p['relay']['name']}  ({where(p['relay'])})",
             f"router:  {p['router']['name']}  ({where(p['router'])})"]
    if not p["filters"]:
        lines.append("filters: none")
    else:
        lines.append("filters, in order:")
        for i, f in enumerate(p["filters"], 1):
            hooks = ", ".join(f["hooks"]) or "none"
            lines.append(f"  {i}. {f['name']}  hooks: {hooks}  timeout: {f['timeout']:g} s")
            lines.append(f"     from {where(f)}")
    return "\n".join(lines) + "\n"


def cmd_plugins(args) -> int:
    from twisted_mta import control

    p = json.loads(remote(_load(args), control.Plugins)["json"])
    if args.json:
        print(json.dumps(p, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(format_plugins(p))
    return 0


def cmd_passwd(args) -> int:
    from twisted_mta import users

    return users.passwd(args.config or "mta.toml", args.name, args.stdin)


def _load(args):
    """
    The configuration the server runs on: C{--config FILE}; else
    C{./mta.toml}; else, as C{twistd -n mta} without --config, the
    embedded development default in this folder.
    """
    if args.config is not None:
        return configmod.load(args.config)
    if os.path.exists("mta.toml"):
        return configmod.load("mta.toml")
    return configmod.default()


# --- the command line -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """
    argparse, but every mistake on the command line is one line on
    standard error (and status 2), not a usage block and then the error.
    """

    def usage_line(self) -> str:
        return " ".join(self.format_usage().split())

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}; {self.usage_line()}\n")


class _Usage(Exception):
    """A command was needed and none was given: show this parser's usage line."""

    def __init__(self, parser: _Parser):
        self.parser = parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="the configuration file (default: mta.toml)")
    parser = _Parser(prog="twisted-mta", description="Control twisted-mta.", parents=[common])
    # Not required=True: without a command, main() prints the usage line alone.
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    parser.set_defaults(func=_Usage(parser))
    p = sub.add_parser("check-config", parents=[common],
                       help="load the configuration and say what is wrong, or ok")
    p.add_argument("file", nargs="?", help="the file to check (default: --config)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("reload", parents=[common],
                       help="reload the configuration and plugins of the running server")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("plugins", parents=[common],
                       help="list the running server's plugins, in order, with their hooks")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("passwd", parents=[common],
                       help="set a user's password in the [auth] users file")
    p.add_argument("name")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from standard input, without asking")
    p.set_defaults(func=cmd_passwd)

    queue = sub.add_parser("queue", parents=[common], help="look at and steer the mail queue")
    qsub = queue.add_subparsers(dest="queue_command", parser_class=_Parser)
    queue.set_defaults(func=_Usage(queue))
    p = qsub.add_parser("list", parents=[common], help="list the queued messages")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_queue_list)
    p = qsub.add_parser("show", parents=[common], help="show one message: state and headers")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_queue_show)
    p = qsub.add_parser("flush", parents=[common],
                        help="try one message, the messages for a domain, or all, now")
    p.add_argument("id", nargs="?")
    p.add_argument("--domain")
    p.set_defaults(func=cmd_queue_flush)
    for name, func, text in (("delete", cmd_queue_delete, "remove a message from the queue"),
                             ("hold", cmd_queue_hold, "keep a message from being delivered"),
                             ("release", cmd_queue_release, "let a held message be delivered")):
        p = qsub.add_parser(name, parents=[common], help=text)
        p.add_argument("id")
        p.set_defaults(func=func)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args.func, _Usage):
        print(args.func.parser.usage_line(), file=sys.stderr)
        return 2
    if not hasattr(args, "config"):
        args.config = None
    try:
        return args.func(args)
    except (configmod.ConfigError, CommandError) as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
