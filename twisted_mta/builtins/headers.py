"""
C{headers}: add, remove or rewrite header fields by simple rules.

    [[filter]]
    use = "headers"

    [[filter.rules]]                 # strip internal hops from mail going out
    direction = "outbound"           # inbound | outbound | any (default)
    action = "remove"                # add | remove | replace
    name = "Received"
    match = 'by [^ ]+\\.internal\\.example\\.test'   # a regex searched in the value; default: any value

    [[filter.rules]]
    action = "replace"
    name = "Subject"
    match = '^\\[EXTERNAL\\] '
    value = ""                       # replace: re.sub replacement; add: the new field's value

    [[filter.rules]]
    direction = "inbound"
    action = "add"
    name = "X-Origin"
    value = "internet"

Outbound mail is mail from an authenticated client or from C{networks}
(default: the C{[relay] networks}); everything else is inbound.  Rules
apply in order to the message as received; added fields go on top.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from zope.interface import implementer

from twisted_mta.interfaces import IDataFilter
from twisted_mta.values import AddHeader, RemoveHeader, Verdict

ACTIONS = ("add", "remove", "replace")
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
        raise ValueError(f"{where}.action: expected one of {', '.join(ACTIONS)}, got {action!r}")
    name = table.pop("name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name: expected a header field name, got {name!r}")
    match = table.pop("match", None)
    try:
        pattern = re.compile(match) if match is not None else None
    except (re.error, TypeError) as e:
        raise ValueError(f"{where}.match: not a regular expression: {e}")
    value = table.pop("value", None)
    if action in ("add", "replace") and not isinstance(value, str):
        raise ValueError(f"{where}.value: {action} needs a string value")
    if value is not None and ("\r" in value or "\n" in value):
        raise ValueError(f"{where}.value: no line breaks in header values")
    direction = table.pop("direction", "any")
    if direction not in DIRECTIONS:
        raise ValueError(f"{where}.direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
    for key in table:
        raise ValueError(f"{where}.{key}: unknown key")
    return Rule(action, name, pattern, value or "", direction)


@implementer(IDataFilter)
class HeaderRules:
    def __init__(self, rules=(), networks=None, context=None):
        self.rules = tuple(_rule(r, i) for i, r in enumerate(rules, 1))
        if networks is None:
            networks = context.config.relay.networks if context and context.config else ()
        self.networks = tuple(ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n
                              for n in networks)

    def outbound(self, session) -> bool:
        if session.user:
            return True
        try:
            ip = ipaddress.ip_address(session.client_ip)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def data(self, session, envelope, message):
        direction = "outbound" if self.outbound(session) else "inbound"
        changes = []
        for rule in self.rules:
            if rule.direction not in ("any", direction):
                continue
            if rule.action == "add":
                changes.append(AddHeader(rule.name, rule.value))
                continue
            matched = [v for v in message.header(rule.name)
                       if rule.match is None or rule.match.search(v)]
            if not matched:
                continue
            if rule.action == "remove":
                changes.append(RemoveHeader(rule.name, rule.match.pattern if rule.match else None))
            else:
                for old in matched:
                    changes.append(RemoveHeader(rule.name, "^" + re.escape(old.strip()) + "$"))
                    changes.append(AddHeader(rule.name, rule.match.sub(rule.value, old)
                                             if rule.match else rule.value))
        return Verdict.continue_(*changes) if changes else None
