"""
Example asynchronous filter: ask an HTTP service about each recipient.

    [[filter]]
    use = "http_check:HTTPCheck"
    url = "http://127.0.0.1:8080/check"
    timeout = 5                 # seconds before the server gives up (451 4.3.0)

It POSTs JSON {"client_ip", "helo", "user", "sender", "recipient"} and
expects JSON back: {"action": "continue" | "reject" | "tempfail", "text": "..."}.
An async def hook: the server awaits it without blocking, bounded by the
table's timeout; if the service is down or answers nonsense the hook
raises, which the server turns into a tempfail (451 4.3.0), so mail is
retried rather than lost or let through.
"""

import json

from twisted.internet import reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from twisted_mta.interfaces import IRcptFilter
from twisted_mta.values import Verdict


class _Body:
    """A tiny IBodyProducer for a bytes body."""

    def __init__(self, data: bytes):
        self.data, self.length = data, len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        from twisted.internet.defer import succeed
        return succeed(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IRcptFilter)
class HTTPCheck:
    def __init__(self, url: str):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http:// or https://, got {url!r}")
        self.url = url.encode("ascii")
        self.agent = Agent(reactor)

    async def rcpt(self, session, envelope, recipient):
        query = {
            "client_ip": session.client_ip, "helo": session.helo, "user": session.user,
            "sender": str(envelope.sender or ""), "recipient": str(recipient),
        }
        response = await self.agent.request(
            b"POST", self.url, Headers({b"Content-Type": [b"application/json"]}),
            _Body(json.dumps(query).encode("utf-8")))
        answer = json.loads(await readBody(response))
        action = answer.get("action", "continue")
        if action == "reject":
            return Verdict.reject(answer.get("text") or "Rejected by policy", "5.7.1")
        if action == "tempfail":
            return Verdict.tempfail(answer.get("text") or "Try again later", "4.7.1")
        if action != "continue":
            raise ValueError(f"policy service answered unknown action {action!r}")
        return None
