"""
Shared test helpers: configurations and a server context without a
running service.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from twisted.internet.task import Clock

from twisted_mta import config as configmod
from twisted_mta import loader
from twisted_mta.smtp.server import ServerContext
from twisted_mta.spool.store import Spool

BASE_TOML = """
hostname = "mx.example.test"
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
[relay]
local_domains = ["example.test"]
networks = ["192.0.2.0/24"]
"""


def make_config(folder, toml: str = BASE_TOML, **sections) -> configmod.Config:
    """
    A L{Config} from C{toml}, with C{sections} (e.g. C{limits={...}})
    merged over it, paths relative to C{folder}.
    """
    data = tomllib.loads(toml)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return configmod.parse(data, "test.toml", Path(folder))


class FakeContext(ServerContext):
    """
    A L{ServerContext} over a real spool in C{folder} and a fake clock;
    C{queued} entries are collected in L{entries}.
    """

    def __init__(self, folder, config=None, reactor=None, tls_options=None, auth=None):
        self.reactor = reactor if reactor is not None else Clock()
        self.config = config if config is not None else make_config(folder)
        self.spool = Spool(Path(folder) / "spool", self.reactor, inline=True)
        self.spool.prepare()
        self.pipeline = loader.build_pipeline(self.config, 1, reactor=self.reactor)
        self.tls_options = tls_options
        self.auth = auth
        self.entries = []

    def queued(self, entry) -> None:
        self.entries.append(entry)
