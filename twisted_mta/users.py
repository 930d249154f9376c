"""
The users file (C{[auth] users}): who may log in with SMTP AUTH, and which
envelope senders each may use.

The format, one user a line::

    # comments and blank lines are ignored
    alice@example.test:$scrypt$n=16384,r=8,p=1$<salt>$<hash>
    scanner:$scrypt$n=16384,r=8,p=1$<salt>$<hash>:scans@example.test
    app:$scrypt$n=16384,r=8,p=1$<salt>$<hash>:*@app.example.test,noreply@example.test

  - the name: any text without C{:}, white space or control characters
    (often an address), compared exactly;
  - the hash, made by C{twisted-mta passwd}: scrypt (RFC 7914) from
    Python's hashlib, with a random 16-byte salt per user and the cost
    parameters kept in the hash, so they can be raised later without
    invalidating old lines; plaintext is never accepted;
  - optionally, the envelope senders the user may use (see
    L{twisted_mta.builtins.senders}): a comma-separated list of addresses
    and C{*@domain} patterns, or C{*} for any sender.  A name that is an
    address (has an C{@}) owns that address without listing it.

Reading is strict: a line that is not of this form makes the whole file
refused with C{file:line: reason} (a reload then keeps the users it had).

L{UsersFileChecker} is a C{twisted.cred} checker for
C{IUsernamePassword} over the file.  The SMTP side
(L{twisted_mta.smtp.auth}) asks a C{Portal}, so a site can put another
checker (LDAP, Dovecot's auth socket) in its place.  scrypt is slow on
purpose: verification runs in a thread, never on the reactor, and a name
that is not in the file costs the same as one that is.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import getpass
import hashlib
import hmac
import os
import re
import secrets
import stat
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: scrypt cost parameters for new hashes: 16 MiB and some 50 ms a check.
SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds for parameters read from a file: a line may not make a check
# take gigabytes or minutes.
MAX_N = 2 ** 20
MAX_R = 32
MAX_P = 16
MAX_NAME = 256
MAX_PASSWORD = 1024

_HASH = re.compile(
    r"\$scrypt\$n=(?P<n>[0-9]{1,8}),r=(?P<r>[0-9]{1,3}),p=(?P<p>[0-9]{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/]+={0,2})\$(?P<hash>[A-Za-z0-9+/]+={0,2})")
_BAD_NAME = re.compile(r"[\s:\x00-\x1f\x7f]")


class UsersFileError(ValueError):
    """The users file cannot be used; C{str()} is C{file:line: reason} (or C{file: reason})."""


# --- hashes -----------------------------------------------------------------


def _normalize(password: str | bytes) -> bytes:
    """
    The bytes a password is hashed as: UTF-8 of its NFKC form (the
    normalisation SASLprep, RFC 4013, is built on), so the same password
    typed on two keyboards matches.  Bytes that are not UTF-8 are taken
    as they are.
    """
    if isinstance(password, bytes):
        try:
            password = password.decode("utf-8")
        except UnicodeDecodeError:
            return password
    return unicodedata.normalize("NFKC", password).encode("utf-8")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=2 * 128 * r * (n + p + 2) + 1024 * 1024)


def hash_password(password: str | bytes, *, n: int | None = None, r: int | None = None,
                  p: int | None = None) -> str:
    """
    A new hash of C{password}: C{$scrypt$n=N,r=R,p=P$<salt base64>$<hash
    base64>}, with the module's C{SCRYPT_*} parameters unless given.
    """
    n, r, p = n or SCRYPT_N, r or SCRYPT_R, p or SCRYPT_P
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(_normalize(password), salt, n, r, p, HASH_BYTES)
    b64 = lambda b: base64.b64encode(b).decode("ascii")
    return f"$scrypt$n={n},r={r},p={p}${b64(salt)}${b64(digest)}"


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> "ScryptHash":
        """Parse a hash string; ValueError says what is wrong with it (never its text)."""
        m = _HASH.fullmatch(text)
        if m is None:
            if text.startswith("$scrypt$"):
                raise ValueError("malformed scrypt hash")
            raise ValueError("not a password hash made by 'twisted-mta passwd' "
                             "(expected $scrypt$n=...,r=...,p=...$salt$hash)")
        n, r, p = int(m["n"]), int(m["r"]), int(m["p"])
        if n < 2 or n & (n - 1) or n > MAX_N:
            raise ValueError(f"scrypt n must be a power of 2 from 2 to {MAX_N}, got {n}")
        if not 1 <= r <= MAX_R:
            raise ValueError(f"scrypt r must be from 1 to {MAX_R}, got {r}")
        if not 1 <= p <= MAX_P:
            raise ValueError(f"scrypt p must be from 1 to {MAX_P}, got {p}")
        try:
            salt = base64.b64decode(m["salt"], validate=True)
            digest = base64.b64decode(m["hash"], validate=True)
        except binascii.Error:
            raise ValueError("malformed scrypt hash (bad base64)")
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError("scrypt salt or hash too short")
        return cls(n, r, p, salt, digest)

    def verify(self, password: str | bytes) -> bool:
        """Whether C{password} matches; blocking (run it in a thread), constant-time compare."""
        computed = _scrypt(_normalize(password), self.salt, self.n, self.r, self.p,
                           len(self.digest))
        return hmac.compare_digest(computed, self.digest)


def verify_password(password: str | bytes, hashed: str) -> bool:
    """Whether C{password} matches the hash string C{hashed} (blocking)."""
    return ScryptHash.parse(hashed).verify(password)


_dummies: dict[tuple[int, int, int], ScryptHash] = {}


def dummy_hash(n: int | None = None, r: int | None = None, p: int | None = None) -> ScryptHash:
    """
    A hash with these parameters that no password matches: what an
    unknown name is checked against, so that it costs what a known one
    does.  Made once per set of parameters.
    """
    key = (n or SCRYPT_N, r or SCRYPT_R, p or SCRYPT_P)
    if key not in _dummies:
        _dummies[key] = ScryptHash.parse(hash_password(secrets.token_hex(16), n=key[0],
                                                       r=key[1], p=key[2]))
    return _dummies[key]


# --- the file ---------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    hash: ScryptHash
    senders: tuple[str, ...] | None = None  # None: no third field
    line: int = 0


def check_name(name: str) -> str | None:
    """Why C{name} cannot be a user name, or C{None} if it can."""
    if not name:
        return "empty user name"
    if len(name) > MAX_NAME:
        return f"user name longer than {MAX_NAME} characters"
    if _BAD_NAME.search(name):
        return "user name with ':', white space or a control character"
    if name.startswith("#"):
        return "user name starting with '#'"
    return None


def parse_senders(text: str) -> tuple[str, ...]:
    """
    A sender list: comma-separated addresses, C{*@domain} patterns, or
    C{*}; lower-cased.  ValueError says what is wrong.
    """
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item == "*":
            out.append(item)
            continue
        local, at, domain = item.rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in item) \
                or not item.isprintable() or "<" in item or ">" in item:
            raise ValueError(f"not an address or *@domain: {item!r}")
        if "*" in local and local != "*":
            raise ValueError(f"only '*@domain' patterns are allowed: {item!r}")
        if "*" in domain:
            raise ValueError(f"no '*' in the domain: {item!r}")
        out.append(item.lower())
    return tuple(out)


def parse_users(text: str, file: str) -> dict[str, User]:
    """The users in C{text} (the contents of C{file}); L{UsersFileError} at the first bad line."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def error(reason: str) -> UsersFileError:
            return UsersFileError(f"{file}:{number}: {reason}")

        parts = line.split(":")
        if len(parts) < 2:
            raise error("expected name:hash or name:hash:senders")
        if len(parts) > 3:
            raise error("too many ':' (expected name:hash or name:hash:senders)")
        name = parts[0]
        why = check_name(name)
        if why:
            raise error(why)
        if name in users:
            raise error(f"user {name!r} again (first on line {users[name].line})")
        try:
            hashed = ScryptHash.parse(parts[1])
        except ValueError as e:
            raise error(f"user {name!r}: {e}")
        senders = None
        if len(parts) == 3:
            try:
                senders = parse_senders(parts[2])
            except ValueError as e:
                raise error(f"user {name!r}: senders: {e}")
        users[name] = User(name, hashed, senders, number)
    return users


def read_users(path: str | os.PathLike) -> dict[str, User]:
    """Read and check the users file at C{path}; L{UsersFileError} says what is wrong."""
    file = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        raise UsersFileError(f"{file}: no such file (create it with 'twisted-mta passwd NAME')")
    except OSError as e:
        raise UsersFileError(f"{file}: {e.strerror or e}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsersFileError(f"{file}:{line}: not UTF-8")
    users = parse_users(text, file)
    if mode & stat.S_IROTH:
        log.warn("{file}: the users file is readable by everyone; chmod o-r it", file=file)
    return users


def owned_senders(name: str, senders: tuple[str, ...] | None) -> tuple[str, ...]:
    """What user C{name} may use as envelope sender: the listed ones, and its name if an address."""
    own = tuple(senders or ())
    if "@" in name and name.lower() not in own:
        own = (name.lower(),) + own
    return own


# --- twisted.cred -----------------------------------------------------------


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """
    Checks C{IUsernamePassword} credentials against the users file.  The
    avatar id is the user's name (text).  Verification runs through
    C{run} (default: C{deferToThread}).  L{reload} reads the file again,
    all or nothing.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str | os.PathLike,
                 run: Callable[..., Deferred] = threads.deferToThread):
        self.path = Path(path)
        self.run = run
        self.users: Mapping[str, User] = {}
        self._use(read_users(self.path))

    def _use(self, users: Mapping[str, User]) -> None:
        # Unknown names are checked against a hash as costly as the
        # file's own (made now, not while a client waits on it).
        first = next(iter(users.values()), None)
        self.dummy = dummy_hash(first.hash.n, first.hash.r, first.hash.p) if first else dummy_hash()
        self.users = users

    def reload(self, path: str | os.PathLike | None = None) -> int:
        """Read the file (or C{path}, from now on) again; the number of users.  Raises L{UsersFileError}."""
        path = Path(path) if path is not None else self.path
        users = read_users(path)
        self._use(users)
        self.path = path
        return len(users)

    def senders(self, name: str) -> tuple[str, ...] | None:
        user = self.users.get(name)
        return None if user is None else owned_senders(user.name, user.senders)

    def requestAvatarId(self, credentials) -> Deferred:
        name = credentials.username
        password = credentials.password
        try:
            if isinstance(name, bytes):
                name = name.decode("utf-8")
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin())
        user = self.users.get(name)
        if len(password) > MAX_PASSWORD:
            return fail(UnauthorizedLogin())
        hashed = user.hash if user is not None else None
        dummy = self.dummy

        def check() -> bool:
            if hashed is None:
                dummy.verify(password)  # the same cost as for a known name
                return False
            return hashed.verify(password)

        def checked(ok: bool):
            if ok:
                return name
            raise UnauthorizedLogin()

        return self.run(check).addCallback(checked)


# --- twisted-mta passwd -----------------------------------------------------


def _say(text: str) -> None:
    print(f"twisted-mta: {text}", file=sys.stderr)


def _read_password(stdin: bool) -> str:
    if stdin:
        line = sys.stdin.readline()
        if line.endswith("\n"):
            line = line[:-1]
        if line.endswith("\r"):
            line = line[:-1]
        return line
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Again: ")
    if first != second:
        raise ValueError("the passwords do not match; nothing changed")
    return first


def set_password(path: Path, name: str, hashed: str) -> bool:
    """
    Put C{name}'s new hash into the users file at C{path}, keeping every
    other line (and the user's senders) as they are; add the user if new.
    The file is replaced atomically (a temporary file, fsync, rename,
    fsync of the folder) and keeps its owner, group and mode (less any
    permission for others; 0600 for a new file).  Returns whether the
    user was new.  Raises L{UsersFileError} if the file is not valid.
    """
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            data = path.read_bytes()
            st = os.stat(path)
        except FileNotFoundError:
            data, st = b"", None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise UsersFileError(f"{path}:{line}: not UTF-8")
        users = parse_users(text, str(path))
        lines = text.splitlines()
        user = users.get(name)
        if user is not None:
            senders = lines[user.line - 1].strip().split(":")[2:]
            lines[user.line - 1] = ":".join([name, hashed, *senders])
        else:
            lines.append(f"{name}:{hashed}")
        out = ("\n".join(lines) + "\n").encode("utf-8")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(out)
                f.flush()
                if st is not None:
                    try:
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
                    except PermissionError:
                        pass
                    os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) & 0o770 | 0o600)
                else:
                    os.fchmod(f.fileno(), 0o600)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return user is None


def passwd(config_path, name: str, stdin: bool) -> int:
    """
    C{twisted-mta passwd NAME [--stdin]}: set NAME's password in the
    C{[auth] users} file of the configuration at C{config_path}, asking
    twice (or reading one line from standard input with C{stdin}).
    Returns the exit status; errors are one line on standard error.
    """
    from twisted_mta import config as configmod

    try:
        config = configmod.load(config_path)
    except configmod.ConfigError as e:
        _say(str(e))
        return 1
    path = config.auth.users
    if path is None:
        _say(f"{config.file}: auth.users: not set; add [auth] users = \"users\"")
        return 1
    why = check_name(name)
    if why:
        _say(f"{why}: {name!r}")
        return 1
    try:
        password = _read_password(stdin)
    except ValueError as e:
        _say(str(e))
        return 1
    except (EOFError, KeyboardInterrupt):
        _say("no password given; nothing changed")
        return 1
    if not password:
        _say("empty password; nothing changed")
        return 1
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        _say(f"password longer than {MAX_PASSWORD} bytes; nothing changed")
        return 1
    try:
        added = set_password(path, name, hash_password(password))
    except UsersFileError as e:
        _say(f"{e}; nothing changed")
        return 1
    except OSError as e:
        _say(f"{path}: {e.strerror or e}")
        return 1
    print(f"{'added' if added else 'changed the password of'} {name} in {path}; "
          "'twisted-mta reload' applies it")
    return 0
