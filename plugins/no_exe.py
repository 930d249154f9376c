"""
Example filter: reject messages that carry executable attachments.

    [[filter]]
    use = "no_exe:NoExe"
    extensions = [".exe", ".scr", ".bat"]   # default: .exe .scr .com .bat .pif .js .vbs
    text = "Executable attachments are not accepted"

The MIME parse reads the whole message, so it runs in a thread
(deferToThread): a hook must never hold the reactor for long.
"""

from email import policy
from email.parser import BytesParser

from twisted.internet.threads import deferToThread
from zope.interface import implementer

from twisted_mta.interfaces import IDataFilter
from twisted_mta.values import Verdict

DEFAULT = (".exe", ".scr", ".com", ".bat", ".pif", ".js", ".vbs")


@implementer(IDataFilter)
class NoExe:
    def __init__(self, extensions=DEFAULT, text="Executable attachments are not accepted"):
        if isinstance(extensions, str) or not all(isinstance(e, str) for e in extensions):
            raise ValueError("extensions must be a list of strings such as [\".exe\"]")
        self.extensions = tuple(e.lower() for e in extensions)
        self.text = text

    def data(self, session, envelope, message):
        return deferToThread(self._check, message)

    def _check(self, message):
        with message.open() as f:
            parsed = BytesParser(policy=policy.default).parse(f)
        for part in parsed.walk():
            name = part.get_filename()
            if name and name.lower().endswith(self.extensions):
                return Verdict.reject(f"{self.text} ({name})", "5.7.1")
        return None
