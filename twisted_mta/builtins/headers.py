"""
C{headers}: add, remove or rewrite header fields by simple rules.

    [[filter]]
    use = "headers"

    [[filter.rules]]                 # strip internal hops from mail going out
    direction = "outbound"           # inbound | outbound | any (default)
    action = "remove"                # add | remove | rewrite
    name = "Received"
    match = 'by [^ ]+\\.internal\\.example\\.test'   # a regex searched in the value; default: any value

    [[filter.rules]]
    action = "rewrite"               # ("replace" is another name for it)
    name = "Subject"
    match = '^\\[EXTERNAL\\] '
    value = ""                       # rewrite: re.sub replacement; add: the new field's value

    [[filter.rules]]
    direction = "inbound"
    action = "add"
    name = "X-Origin"
    value = "internet"

Outbound mail is mail from an authenticated client or from C{networks}
(default: the C{[relay] networks}); everything else is inbound.  Rules
apply in order to the message as received, this server's own
C{Received} field included (as in C{message.headers}).  The
changes are kept with the queued message and applied whenever it is
read for delivery: added fields, and rewritten ones, go on top of the
header (the only place the spool adds fields).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from zope.interface import implementer

from twisted_mta.network import in_networks
from twisted_mta.interfaces import IDataFilter
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

ACTIONS = ("add", "remove", "rewrite", "replace")  # replace: another name for rewrite
DIRECTIONS = ("any", "inbound", "outbound")
_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")


@dataclass(frozen=True)
class Rule:
    action: str
    name: str
    match: re.Pattern | None
    value: str
    direction: str


def _rule(table, i: int) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table")
    table = dict(table)
    action = table.pop("action", None)
    if action not in ACTIONS:
        raise ValueError(f"{where}.action: expected one of add, remove, rewrite, got {action!r}")
    if action == "replace":
        action = "rewrite"
    name = table.pop("name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name: expected a header field name, got {name!r}")
    match = table.pop("match", None)
    try:
        pattern = re.compile(match) if match is not None else None
    except (re.error, TypeError) as e:
        raise ValueError(f"{where}.match: not a regular expression: {e}")
    value = table.pop("value", None)
    if action in ("add", "rewrite") and not isinstance(value, str):
        raise ValueError(f"{where}.value: {action} needs a string value")
    if action == "remove" and value is not None:
        raise ValueError(f"{where}.value: remove takes no value")
    if value is not None and ("\r" in value or "\n" in value or "\0" in value):
        raise ValueError(f"{where}.value: no line breaks or NULs in header values")
    if action == "rewrite" and pattern is not None:
        try:
            pattern.sub(value, "")  # checks the template's group references
        except (re.error, IndexError) as e:
            raise ValueError(f"{where}.value: not a replacement for match: {e}")
    if action == "add" and pattern is not None:
        raise ValueError(f"{where}.match: add takes no match")
    direction = table.pop("direction", "any")
    if direction not in DIRECTIONS:
        raise ValueError(f"{where}.direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    for key in table:
        raise ValueError(f"{where}.{key}: unknown key")
    return Rule(action, name, pattern, value or "", direction)


def _networks(networks) -> tuple:
    if isinstance(networks, str) or not isinstance(networks, (list, tuple)):
        raise ValueError(f"networks: expected a list of networks, got {networks!r}")
    out = []
    for i, net in enumerate(networks, 1):
        if isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(net)
            continue
        try:
            out.append(ipaddress.ip_network(net, strict=False))
        except (ValueError, TypeError):
            raise ValueError(f"networks[{i}]: not a network (CIDR): {net!r}")
    return tuple(out)


@implementer(IDataFilter)
class HeaderRules:
    def __init__(self, rules=(), networks=None, context=None):
        if isinstance(rules, (str, dict)) or not isinstance(rules, (list, tuple)):
            raise ValueError("rules: expected [[filter.rules]] tables")
        self.rules = tuple(_rule(r, i) for i, r in enumerate(rules, 1))
        if networks is None:
            networks = context.config.relay.networks if context and context.config else ()
        self.networks = _networks(networks)

    def outbound(self, session) -> bool:
        """Mail from an authenticated client or from C{networks}: going out."""
        return bool(session.user) or in_networks(session.client_ip, self.networks)

    def data(self, session, envelope, message):
        direction = "outbound" if self.outbound(session) else "inbound"
        rules = [r for r in self.rules if r.direction in ("any", direction)]
        if not rules:
            return None
        fields = message.headers  # as stored, our Received field first
        changes = []
        for rule in rules:
            if rule.action == "add":
                changes.append(AddHeader(rule.name, rule.value))
                continue
            lname = rule.name.lower()
            matched = [v for n, v in fields if n.lower() == lname
                       and (rule.match is None or rule.match.search(v))]
            if not matched:
                continue
            if rule.action == "remove":
                changes.append(RemoveHeader(rule.name, rule.match.pattern if rule.match else None))
                continue
            for old in dict.fromkeys(matched):  # each distinct value once
                new = rule.match.sub(rule.value, old) if rule.match else rule.value
                if new == old:
                    continue
                changes.append(RemoveHeader(rule.name, "^" + re.escape(old.strip()) + "$"))
                changes.extend(AddHeader(rule.name, new) for _ in range(matched.count(old)))
        return Verdict.continue_(*changes) if changes else None
