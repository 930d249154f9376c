"""What several built-ins take from their L{PluginContext} the same way."""

from __future__ import annotations


def reactor_of(context):
    """The context's reactor, or the global one (a plugin built without a context)."""
    reactor = getattr(context, "reactor", None)
    if reactor is None:
        from twisted.internet import reactor
    return reactor


class ContextResolver:
    """
    A plugin attribute: the server's DNS resolver (C{self.context.resolver}),
    asked for at first use, so that building the plugin does no DNS set-up;
    a test may set another.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.slot)
        if value is None:
            value = obj.__dict__[self.slot] = obj.context.resolver
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value
