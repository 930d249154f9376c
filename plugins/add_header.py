"""
Example filter: add a header field to every message.

    [[filter]]
    use = "add_header:AddHeader"
    name = "X-Scanned-By"          # default
    value = "twisted-mta"          # default

A template for the smallest useful filter: one hook, a value returned
directly (no Deferred needed when nothing waits).
"""

from zope.interface import implementer

from twisted_mta.interfaces import IDataFilter
from twisted_mta.values import AddHeader as AddHeaderChange, Verdict


@implementer(IDataFilter)
class AddHeader:
    def __init__(self, name: str = "X-Scanned-By", value: str = "twisted-mta"):
        if not name or any(c in name for c in ": \r\n") or any(c in value for c in "\r\n"):
            raise ValueError(f"not a header field name and value: {name!r}: {value!r}")
        self.name, self.value = name, value

    def data(self, session, envelope, message):
        return Verdict.continue_(AddHeaderChange(self.name, self.value))
