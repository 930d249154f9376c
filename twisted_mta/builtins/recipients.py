"""
C{recipients}: only known addresses in local domains, with aliases.

    [[filter]]
    use = "recipients"
    file = "recipients"            # re-read on every reload (relative to the config file)
    addresses = ["postmaster@example.test", "*@catchall.example.test"]
    domains = ["example.test"]     # default: [relay] local_domains

Each line of the file (and each item of C{addresses}) is one of:

    user@example.test                                  an address that exists
    *@example.test                                     every address in that domain exists
    sales@example.test -> ann@example.test, bob@other.test   an alias
    # a comment

An unknown recipient in a checked domain gets C{550 5.1.1 <addr>:
Recipient address rejected: User unknown in local recipient table} at
RCPT, so the server never accepts mail it would have to bounce.  Aliases
(in any domain) are expanded at RCPT, recursively (up to 10 levels; an
address met again on its own path is final), into the recipients that
are queued and routed, local or remote; the client sees one 250.  The
file is read when the plugin is built: at start-up and on every reload
(a file that cannot be read or parsed refuses the reload).  Recipients
in other domains are left alone.
"""

from __future__ import annotations

from pathlib import Path

from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.interfaces import IRcptFilter
from twisted_mta.smtp.grammar import Address, parse_mailbox
from twisted_mta.values import RewriteRecipient, Verdict

log = Logger()
UNKNOWN = "Recipient address rejected: User unknown in local recipient table"
MAX_DEPTH = 10


def _address(text: str, where: str) -> Address:
    try:
        return parse_mailbox(text.strip(), utf8=True)
    except ValueError as e:
        raise ValueError(f"{where}: not an address: {text.strip()!r} ({e})")


class RecipientTable:
    """Known addresses, catch-all domains and aliases, parsed from lines."""

    def __init__(self) -> None:
        self.addresses: set[str] = set()
        self.catchall: set[str] = set()
        self.aliases: dict[str, tuple[Address, ...]] = {}
        self.where: dict[str, str] = {}  # alias key -> the line it came from

    def add_line(self, line: str, where: str) -> None:
        line = line.split("#", 1)[0].strip()
        if not line:
            return
        if "->" in line:
            left, _, right = line.partition("->")
            source = _address(left, where)
            targets = tuple(_address(t, where) for t in right.split(",") if t.strip())
            if not targets:
                raise ValueError(f"{where}: alias {left.strip()!r} has no targets")
            self.aliases[source.key] = targets
            self.where[source.key] = where
        elif line.startswith("*@"):
            domain = line[2:].strip().lower()
            _address(f"x@{domain}", where)
            self.catchall.add(domain)
        else:
            self.addresses.add(_address(line, where).key)

    def exists(self, address: Address) -> bool:
        return (address.key in self.addresses or address.key in self.aliases
                or address.domain_key in self.catchall)

    def expand(self, address: Address) -> tuple[Address, ...]:
        """
        The final addresses for C{address}, aliases followed (depth first,
        in order, without duplicates).  An address met again on its own
        path is final there: C{a@d -> a@d, b@d} delivers to a@d itself
        and to b@d, as in Postfix; a longer loop ends where it closes.
        """
        out: list[Address] = []
        seen: set[str] = set()

        def walk(addr: Address, path: frozenset, depth: int) -> None:
            targets = self.aliases.get(addr.key)
            if targets is None or addr.key in path or depth >= MAX_DEPTH:
                if addr.key not in seen:
                    seen.add(addr.key)
                    out.append(addr)
                return
            for target in targets:
                walk(target, path | {addr.key}, depth + 1)

        walk(address, frozenset(), 0)
        return tuple(out)

    def unknown_targets(self, domains: frozenset) -> list[tuple[str, Address]]:
        """
        Alias targets in a checked domain that are not known recipients,
        with the line of their alias: mail sent to them directly would be
        refused, yet the alias delivers to them.
        """
        return [(self.where[key], target) for key, targets in self.aliases.items()
                for target in targets
                if target.domain_key in domains and not self.exists(target)]


@implementer(IRcptFilter)
class Recipients:
    def __init__(self, file: str | None = None, addresses=(), domains=None, context=None):
        self.table = RecipientTable()
        if isinstance(addresses, str) or not isinstance(addresses, (list, tuple)):
            raise ValueError(f"addresses: expected a list of strings, got {addresses!r}")
        for i, line in enumerate(addresses, 1):
            if not isinstance(line, str):
                raise ValueError(f"addresses[{i}]: expected a string, got {line!r}")
            self.table.add_line(line, f"addresses[{i}]")
        if file is not None:
            if not isinstance(file, str) or not file:
                raise ValueError(f"file: expected a file name, got {file!r}")
            path = Path(context.folder if context else ".") / file
            try:
                text = path.read_text("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"file: {path}: cannot read: {getattr(e, 'strerror', None) or e}")
            for n, line in enumerate(text.splitlines(), 1):
                self.table.add_line(line, f"{path}:{n}")
        if domains is None:
            domains = context.config.relay.local_domains if context and context.config else ()
        elif isinstance(domains, str) or not isinstance(domains, (list, tuple)) or not all(
                isinstance(d, str) for d in domains):
            raise ValueError(f"domains: expected a list of domain names, got {domains!r}")
        self.domains = frozenset(d.lower() for d in domains)
        for where, target in self.table.unknown_targets(self.domains):
            log.warn("recipients: {where}: alias target {target} is not itself a known "
                     "recipient", where=where, target=str(target))

    def rcpt(self, session, envelope, recipient):
        if recipient.domain_key in self.domains and not self.table.exists(recipient):
            return Verdict.reject(UNKNOWN, "5.1.1")
        expanded = self.table.expand(recipient)
        if expanded != (recipient,):
            return Verdict.continue_(RewriteRecipient(recipient, expanded))
        return None
