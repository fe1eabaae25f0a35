"""The reference server of the benchmarks: an asyncio ``Protocol`` echo server speaking
morsock's wire (the Delphi original's framing: a 9-byte header ``<IIB`` = magic
0xCAFEBABE, payload size, flag; then the payload).

    python benchmarks/asyncio_echo.py --port P [--host 127.0.0.1]

It answers every frame with one frame carrying the same payload and flag 0, which is
what ``python -m morsock server`` does. It is written the way a careful asyncio user
would write it: each ``data_received`` appends to a bytearray, answers every complete
frame in it and hands the whole batch of replies to one ``transport.write``. A bad
magic closes the connection. It prints nothing and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct

MAGIC = 0xCAFEBABE
HEADER = struct.Struct("<IIB")


class EchoProtocol(asyncio.Protocol):
    """One connection: frames in, the same payloads out (flag 0)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP sockets itself

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end_of_data = len(buffer)
        pos = 0
        replies = bytearray()
        unpack_from, pack = HEADER.unpack_from, HEADER.pack
        with memoryview(buffer) as view:
            while end_of_data - pos >= HEADER.size:
                magic, size, _flag = unpack_from(buffer, pos)
                if magic != MAGIC:
                    assert self.transport is not None
                    self.transport.abort()
                    return
                end = pos + HEADER.size + size
                if end > end_of_data:
                    break
                replies += pack(MAGIC, size, 0)
                replies += view[pos + HEADER.size:end]
                pos = end
        if pos:
            del buffer[:pos]
        if replies:
            assert self.transport is not None
            self.transport.write(replies)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(EchoProtocol, host, port, backlog=4096,
                                      reuse_address=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
