#!/usr/bin/env python3
"""
An SMTP sink for the relay benchmark: accepts everything (PIPELINING,
8BITMIME, SMTPUTF8, SIZE, ENHANCEDSTATUSCODES), stores nothing, counts
messages.  While messages arrive it prints, at most every 20 ms,

    <count> <CLOCK_MONOTONIC time of the last message's final dot>

so a runner can tell when it holds all N and when the Nth arrived.

    python bench/sink.py PORT
"""

import asyncio
import sys
import time


class Sink(asyncio.Protocol):
    count = 0
    last = 0.0

    def connection_made(self, transport):
        self.t = transport
        self.buf = b""
        self.data = False
        transport.write(b"220 sink.bench.test ESMTP sink\r\n")

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        while True:
            if self.data:
                # buf[pos:] starts with a CRLF (the one ending the DATA
                # line, or one kept back), so one search finds the end.
                end = buf.find(b"\r\n.\r\n", pos)
                if end < 0:
                    pos = max(pos, len(buf) - 4)
                    break
                pos = end + 5
                self.data = False
                Sink.count += 1
                Sink.last = time.monotonic()
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = buf[pos:end + 1]
            pos = end + 1
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                           b"250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.data = True
                pos = end - 1  # keep the CRLF ending the DATA line
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.t.write(b"".join(out))
                self.t.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        self.buf = buf[pos:]
        if out:
            self.t.write(b"".join(out))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port, backlog=1024)
    shown = -1
    async with server:
        while True:
            await asyncio.sleep(0.02)
            if Sink.count != shown:
                shown = Sink.count
                sys.stdout.write(f"{Sink.count} {Sink.last:.6f}\n")
                sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
