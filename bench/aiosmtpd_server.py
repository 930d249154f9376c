"""
aiosmtpd with a handler that writes each message to its own file and
fsyncs it (in the default thread pool, so the event loop keeps serving
other sessions while the disk works) before answering 250.

    python bench/aiosmtpd_server.py PORT SPOOLDIR

Needs aiosmtpd (pip install aiosmtpd).  aiosmtpd does not advertise
PIPELINING, so the load generator talks to it one command at a time.
"""

import asyncio
import itertools
import os
import resource
import sys

from aiosmtpd.smtp import SMTP

_seq = itertools.count()


class FsyncHandler:
    def __init__(self, folder: str):
        self.folder = folder

    def _store(self, data: bytes) -> None:
        path = os.path.join(self.folder, f"{os.getpid()}.{next(_seq)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def handle_DATA(self, server, session, envelope):
        await asyncio.get_running_loop().run_in_executor(None, self._store, envelope.original_content)
        return "250 2.0.0 Ok: queued"


async def main(port: int, folder: str) -> None:
    loop = asyncio.get_running_loop()
    handler = FsyncHandler(folder)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.test", decode_data=False,
                     data_size_limit=52428800),
        "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
