"""
The built-in router (C{[[route]]} tables), an L{IRouter}: the first table
whose C{domains} match the recipient's domain gives its route.
"""

from __future__ import annotations

from typing import Iterable

from zope.interface import implementer

from twisted_mta.builtins.relay import DomainSet
from twisted_mta.config import RouteConfig
from twisted_mta.interfaces import IRouter
from twisted_mta.values import Route


def route_from_config(rc: RouteConfig) -> Route:
    return Route(
        via=rc.via,
        path=str(rc.path) if rc.path else None,
        endpoint=rc.endpoint,
        host=rc.host,
        port=rc.port,
        tls=rc.tls,
        username=rc.username,
        password_file=str(rc.password_file) if rc.password_file else None,
    )


@implementer(IRouter)
class RouteTable:
    def __init__(self, routes: Iterable[RouteConfig]):
        self.table = tuple((DomainSet(rc.domains), route_from_config(rc)) for rc in routes)

    def route(self, envelope, recipient):
        domain = recipient.domain_key
        for domains, route in self.table:
            if domain in domains:
                return route
        return None
