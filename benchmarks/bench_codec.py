#!/usr/bin/env python3
"""Throughput of the frame codec and of both encryption profiles (no sockets).

Run from the repository: ``python benchmarks/bench_codec.py [--quick]``.

* codec: FrameDecoder fed a stream in 64 KiB chunks (frames straddle chunks), and
  encode_frame;
* crypto: for every mode, one 64 KiB message sealed into a frame and opened again, next to
  the bare pycryptodome cipher doing the same work (new cipher + encrypt, new cipher +
  decrypt; no padding, no MAC, no framing). "overhead" = extra time over the bare cipher.
  For the AUTHENTICATED profile a second baseline adds the bare MAC work too (HMAC-SHA256
  of the ciphertext on both sides; GCM: digest + verify), so "framing overhead" is what
  morsock itself costs beyond the primitives its format requires. "64 B msgs": thousands
  of 64-byte messages sealed and opened per second (per-message cost).
"""

from __future__ import annotations

import argparse
import hmac
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from Crypto import __version__ as crypto_version  # noqa: E402
from Crypto.Cipher import AES  # noqa: E402

from morsock import AESMode, EncryptionProfile  # noqa: E402
from morsock.crypto import (ClientHandshake, MormotCipher, mormot_key,  # noqa: E402
                            server_handshake)
from morsock.protocol import HEADER_SIZE, FrameDecoder, encode_frame  # noqa: E402

KIB = 1024
CHUNK = 64 * KIB
MSG = 64 * KIB


def best_time(fn: Callable[[], object], min_time: float, repeat: int) -> float:
    """Best seconds per call of *fn* over *repeat* runs of at least *min_time* / repeat."""
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / repeat:
            break
        number *= 2
    best = elapsed / number
    for _ in range(repeat - 1):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


Endpoints = Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def time_seal_open(endpoints: Callable[[], Endpoints], data: bytes, batch: int) -> float:
    """Seconds per message to seal a frame and open its payload (one run).

    Frames are sealed in a batch, their payloads cut out (as FrameDecoder delivers them:
    bytes; not timed), then opened in order. Each run gets fresh endpoints.
    """
    seal, open_ = endpoints()
    start = time.perf_counter()
    frames = [seal(data) for _ in range(batch)]
    sealed = time.perf_counter() - start
    payloads = [frame[HEADER_SIZE:] for frame in frames]
    del frames
    start = time.perf_counter()
    for payload in payloads:
        open_(payload)
    return (sealed + time.perf_counter() - start) / batch


def time_calls(fn: Callable[[], object], batch: int) -> float:
    """Seconds per call of *fn* (one run of *batch* calls)."""
    start = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - start) / batch


def chunks(data: bytes, size: int) -> List[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def bench_codec(min_time: float, repeat: int) -> None:
    print("== codec (morsock.protocol) ==")
    small = os.urandom(64)
    n_small = 20_000
    stream = chunks(encode_frame(small) * n_small, CHUNK)

    def decode_small() -> None:
        dec = FrameDecoder()
        count = 0
        for chunk in stream:
            count += len(dec.feed(chunk))
        assert count == n_small

    t = best_time(decode_small, min_time, repeat)
    print(f"  decode 64-byte payloads (73-byte frames), 64 KiB chunks: "
          f"{n_small / t:>12,.0f} frames/s")

    big = os.urandom(MSG)
    n_big = 64
    big_stream = chunks(encode_frame(big) * n_big, CHUNK)

    def decode_big() -> None:
        dec = FrameDecoder(max_message_size=MSG)
        count = 0
        for chunk in big_stream:
            count += len(dec.feed(chunk))
        assert count == n_big

    t = best_time(decode_big, min_time, repeat)
    print(f"  decode 64 KiB payloads, 64 KiB chunks:                   "
          f"{n_big * MSG / t / 1e6:>12,.0f} MB/s  ({n_big / t:,.0f} frames/s)")
    t = best_time(lambda: encode_frame(small), min_time, repeat)
    print(f"  encode_frame 64-byte payload:                            "
          f"{1 / t:>12,.0f} frames/s")
    t = best_time(lambda: encode_frame(big), min_time, repeat)
    print(f"  encode_frame 64 KiB payload:                             "
          f"{MSG / t / 1e6:>12,.0f} MB/s")


def _raw_factory(profile: EncryptionProfile, mode: AESMode
                 ) -> Callable[[bytes, bytes], object]:
    """The bare pycryptodome cipher a profile uses for *mode*: f(key, iv)."""
    if mode is AESMode.ECB:
        return lambda k, iv: AES.new(k, AES.MODE_ECB)
    if mode is AESMode.CBC:
        return lambda k, iv: AES.new(k, AES.MODE_CBC, iv=iv)
    if mode in (AESMode.CFB, AESMode.CFC):
        return lambda k, iv: AES.new(k, AES.MODE_CFB, iv=iv, segment_size=128)
    if mode in (AESMode.OFB, AESMode.OFC):
        return lambda k, iv: AES.new(k, AES.MODE_OFB, iv=iv)
    if mode is AESMode.GCM and profile is EncryptionProfile.AUTHENTICATED:
        return lambda k, iv: AES.new(k, AES.MODE_GCM, nonce=iv[:12])
    if mode is AESMode.GCM:   # MORMOT: GCM keystream only
        return lambda k, iv: AES.new(k, AES.MODE_CTR, nonce=iv[:12], initial_value=2)
    return lambda k, iv: AES.new(k, AES.MODE_CTR, nonce=iv[:8], initial_value=0)


def bench_crypto(rounds: int, batch: int, modes: List[AESMode]) -> List[float]:
    print(f"\n== crypto: encrypt + decrypt of one {MSG // KIB} KiB message, AES-256 ==")
    print(f"  {'profile':13} {'mode':4} {'morsock':>9} {'bare':>9} {'overhead':>9}"
          f" {'bare+MAC':>9} {'framing':>8} {'64 B msgs':>9}")
    print(f"  {'':13} {'':4} {'MB/s':>9} {'MB/s':>9} {'%':>9} {'MB/s':>9} {'%':>8}"
          f" {'k/s':>9}")
    data = os.urandom(MSG)
    small = os.urandom(64)
    key = "benchmark key"
    k256 = mormot_key(key, 256)
    iv = os.urandom(16)
    mac_key = os.urandom(32)
    framing: List[float] = []
    for profile in (EncryptionProfile.MORMOT, EncryptionProfile.AUTHENTICATED):
        for mode in modes:
            factory = _raw_factory(profile, mode)

            def bare() -> None:
                ct = factory(k256, iv).encrypt(data)  # type: ignore[attr-defined]
                factory(k256, iv).decrypt(ct)  # type: ignore[attr-defined]

            if profile is EncryptionProfile.MORMOT:
                cipher = MormotCipher(key, mode, 256)

                def endpoints() -> Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
                    return cipher.seal_frame, cipher.decrypt

                bare_mac = None
            else:
                def endpoints() -> Tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
                    hs = ClientHandshake(key, mode, 256)
                    reply, server = server_handshake(key, mode, 256,
                                                     hs.hello_frame[HEADER_SIZE:])
                    return hs.finish(reply[HEADER_SIZE:]).seal, server.open

                if mode is AESMode.GCM:
                    def bare_mac() -> None:
                        c = factory(k256, iv)
                        ct, tag = c.encrypt_and_digest(data)  # type: ignore[attr-defined]
                        factory(k256, iv).decrypt_and_verify(ct, tag)  # type: ignore
                else:
                    def bare_mac() -> None:
                        ct = factory(k256, iv).encrypt(data)  # type: ignore[attr-defined]
                        hmac.new(mac_key, ct, "sha256").digest()
                        hmac.new(mac_key, ct, "sha256").digest()
                        factory(k256, iv).decrypt(ct)  # type: ignore[attr-defined]

            # Interleaved rounds, best of each: robust against other load on the machine.
            t_ours = t_bare = t_mac = t_small = float("inf")
            for _ in range(rounds):
                t_small = min(t_small, time_seal_open(endpoints, small, 8 * batch))
                t_ours = min(t_ours, time_seal_open(endpoints, data, batch))
                t_bare = min(t_bare, time_calls(bare, batch))
                if bare_mac is not None:
                    t_mac = min(t_mac, time_calls(bare_mac, batch))
            line = (f"  {profile.name:13} {mode.name:4} {MSG / t_ours / 1e6:>9,.0f}"
                    f" {MSG / t_bare / 1e6:>9,.0f} {100 * (t_ours / t_bare - 1):>8.1f}%")
            if bare_mac is not None:
                over = 100 * (t_ours / t_mac - 1)
                framing.append(over)
                line += f" {MSG / t_mac / 1e6:>9,.0f} {over:>7.1f}%"
            else:
                framing.append(100 * (t_ours / t_bare - 1))
                line += f" {'-':>9} {'-':>8}"
            print(f"{line} {1 / t_small / 1e3:>9,.0f}")
    return framing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier)")
    parser.add_argument("--modes", default="all",
                        help="comma-separated modes (default: all nine)")
    args = parser.parse_args()
    min_time, repeat = (0.05, 3) if args.quick else (0.25, 5)
    modes = list(AESMode) if args.modes == "all" else \
        [AESMode.parse(m) for m in args.modes.split(",")]
    print(f"Python {platform.python_version()} ({platform.machine()}), "
          f"pycryptodome {crypto_version}")
    bench_codec(min_time, repeat)
    framing = bench_crypto(*((5, 16) if args.quick else (25, 32)), modes)
    print(f"\n  worst overhead beyond the primitives the format needs: {max(framing):.1f}%"
          " (target < 20%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
