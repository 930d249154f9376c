"""
C{senders}: an authenticated user may only use the envelope senders that
are theirs (Postfix's C{reject_sender_login_mismatch}).

    [[filter]]
    use = "senders"
    map = "senders"            # optional: a separate map (default: the users file)
    allow_null_sender = true   # MAIL FROM:<> from an authenticated user (default: true)

Which senders a user owns:

  - from the C{[auth] users} file, the optional third field of the
    user's line: C{name:hash:alice@example.test,*@dept.example.test};
  - or, with C{map}, from a file of lines C{name:sender,sender,...} in
    the same syntax (blank lines and C{#} comments allowed), for sites
    whose users are checked elsewhere (LDAP, Dovecot);
  - either way, a user whose name is an address owns that address.

An entry is an address (compared without regard to case), C{*@domain}
(any address in exactly that domain) or C{*} (any sender: an application
server that sends for many).  Any other sender is refused with
C{553 5.7.1 <sender>: Sender address rejected: not owned by user NAME}.
The null sender C{<>} (bounces, read receipts, vacation replies) is
allowed unless C{allow_null_sender = false}, as Postfix allows it.
Unauthenticated sessions are not this rule's business (the relay rules
are).

The file is read when the pipeline is built, so a reload reads it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from zope.interface import implementer

from twisted_mta.interfaces import IMailFilter
from twisted_mta.users import (
    UsersFileError, check_name, owned_senders, parse_senders, read_users,
)
from twisted_mta.values import Verdict


def read_map(path: Path) -> dict[str, tuple[str, ...]]:
    """A senders map file (C{name:sender,...} lines); L{UsersFileError} as C{file:line: reason}."""
    file = str(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise UsersFileError(f"{file}: no such file")
    except UnicodeDecodeError:
        raise UsersFileError(f"{file}: not UTF-8")
    except OSError as e:
        raise UsersFileError(f"{file}: {e.strerror or e}")
    out: dict[str, tuple[str, ...]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        name = name.strip()
        why = "expected name:sender,sender,..." if not colon else check_name(name)
        if why:
            raise UsersFileError(f"{file}:{number}: {why}")
        try:
            senders = parse_senders(rest)
        except ValueError as e:
            raise UsersFileError(f"{file}:{number}: {e}")
        out[name] = out.get(name, ()) + senders
    return out


def sender_allowed(owned: tuple[str, ...], sender) -> bool:
    """Whether the L{Address} C{sender} matches one of the C{owned} entries."""
    key = sender.key
    domain = "*@" + sender.domain_key
    return any(entry == "*" or entry == key or entry == domain for entry in owned)


@implementer(IMailFilter)
class SenderLogin:
    """See the module docstring."""

    def __init__(self, map: str | None = None, allow_null_sender: bool = True, context=None):
        if map is not None and not isinstance(map, str):
            raise ValueError("map: expected a path")
        if not isinstance(allow_null_sender, bool):
            raise ValueError("allow_null_sender: expected true or false")
        self.allow_null_sender = allow_null_sender
        folder = Path(context.folder) if context is not None else Path.cwd()
        if map is not None:
            entries = read_map(folder / map)
            self.source = str(folder / map)
        else:
            users_path = getattr(getattr(getattr(context, "config", None), "auth", None),
                                 "users", None)
            if users_path is None:
                raise ValueError("no [auth] users file and no map: nothing says which "
                                 "senders a user owns")
            entries = {name: user.senders for name, user in read_users(users_path).items()}
            self.source = str(users_path)
        self.senders: Mapping[str, tuple[str, ...]] = entries

    def owned(self, user: str) -> tuple[str, ...]:
        return owned_senders(user, self.senders.get(user))

    def mail(self, session, envelope):
        user = session.user
        if not user:
            return None
        sender = envelope.sender
        if sender is None:
            if self.allow_null_sender:
                return None
            return Verdict.reject(f"<>: Sender address rejected: not owned by user {user}",
                                  "5.7.1")
        if sender_allowed(self.owned(user), sender):
            return None
        return Verdict.reject(f"<{sender}>: Sender address rejected: not owned by user {user}",
                              "5.7.1")
