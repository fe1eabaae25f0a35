"""Tests of morsock.crypto: the MORMOT profile (interop vectors) and the AUTHENTICATED one."""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

import pytest
from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SHARED_VECTORS, VECTORS, VENDORED_VECTORS, VENDORED_VECTORS_SHA256
from morsock import crypto
from morsock.crypto import (AuthSession, ClientHandshake, MormotCipher,
                            authenticated_master_key, authenticated_payload_size,
                            mormot_key, mormot_payload_size, server_handshake)
from morsock.enums import AESMode, ErrorCode, KeySize
from morsock.errors import CryptoError, ProtocolError
from morsock.protocol import (FLAG_AUTHENTICATED, FLAG_MORMOT, HEADER, HEADER_SIZE, MAGIC,
                              FrameDecoder, encode_frame)

MODES = list(AESMode)
KEY = "correct horse battery staple"
OTHER_KEY = "correct horse battery stapler"
CLIENT_RANDOM = bytes(range(32))
SERVER_RANDOM = bytes(range(100, 132))
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- vectors



def _edge_id(edge: Dict[str, Any]) -> str:
    return f"{edge['name']}-{edge.get('mode', '')}-{edge.get('key_size', '')}"


# --------------------------------------------------------------- reference (test oracle)

def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def _reference_mormot(key: bytes, mode: AESMode, iv: bytes, plaintext: bytes) -> bytes:
    """MORMOT payload computed block by block from the raw AES block function."""
    block = AES.new(key, AES.MODE_ECB).encrypt
    pad = 16 - len(plaintext) % 16
    data = plaintext + bytes((pad,)) * pad
    blocks = [data[i:i + 16] for i in range(0, len(data), 16)]
    out: List[bytes] = []
    if mode is AESMode.ECB:
        out = [block(b) for b in blocks]
    elif mode is AESMode.CBC:
        prev = iv
        for b in blocks:
            prev = block(_xor(b, prev))
            out.append(prev)
    elif mode in (AESMode.CFB, AESMode.CFC):
        prev = iv
        for b in blocks:
            prev = _xor(b, block(prev))
            out.append(prev)
    elif mode in (AESMode.OFB, AESMode.OFC):
        state = iv
        for b in blocks:
            state = block(state)
            out.append(_xor(b, state))
    elif mode in (AESMode.CTR, AESMode.CTC):
        counter = int.from_bytes(iv, "big")
        for i, b in enumerate(blocks):
            ctr = ((counter + i) % (1 << 128)).to_bytes(16, "big")
            out.append(_xor(b, block(ctr)))
    else:  # GCM keystream: IV[0:12] || 32-bit counter from 2
        for i, b in enumerate(blocks):
            ctr = iv[:12] + ((2 + i) % (1 << 32)).to_bytes(4, "big")
            out.append(_xor(b, block(ctr)))
    return iv + b"".join(out)


# --------------------------------------------------------------------- MORMOT: vectors

def test_the_repository_copy_of_the_interop_vectors_is_the_shared_original() -> None:
    data = VENDORED_VECTORS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == VENDORED_VECTORS_SHA256
    if SHARED_VECTORS.is_file():  # the project's shared copy, beside the repository
        assert SHARED_VECTORS.read_bytes() == data
    assert VECTORS["cases"] and VECTORS["edge_cases"] and VECTORS["unencrypted_cases"]


def test_vector_constants() -> None:
    const = VECTORS["constants"]
    assert const["salt"].encode() == crypto.MORMOT_SALT
    assert const["pbkdf2_iterations"] == crypto.MORMOT_ITERATIONS
    assert const["iv_size"] == crypto.IV_SIZE
    assert const["header_size"] == HEADER_SIZE
    assert int(const["magic"], 16) == MAGIC


@pytest.mark.parametrize("entry", VECTORS.get("derived_keys", []), ids=lambda e: repr(e["key"]))
def test_vector_derived_keys(entry: Dict[str, Any]) -> None:
    assert entry["key"].encode("utf-8").hex() == entry["key_utf8_hex"]
    assert mormot_key(entry["key"], 256).hex() == entry["pbkdf2_sha256_32_hex"]
    for bits in (128, 192, 256):
        name = f"aes_key_{bits}_hex"
        if name in entry:
            assert mormot_key(entry["key"], bits).hex() == entry[name]
            assert mormot_key(entry["key"], KeySize(bits)).hex() == entry[name]


@pytest.mark.parametrize("case", VECTORS.get("cases", []), ids=lambda c: c["id"])
def test_vector_case(case: Dict[str, Any]) -> None:
    """Decode every Pascal frame and reproduce it byte for byte from its IV."""
    wire = bytes.fromhex(case["frame_hex"])
    plaintext = bytes.fromhex(case["plaintext_hex"])
    iv = bytes.fromhex(case["iv_hex"])
    assert case["key"].encode("utf-8").hex() == case["key_utf8_hex"]
    assert mormot_key(case["key"], case["key_size"]).hex() == case["aes_key_hex"]
    cipher = MormotCipher(case["key"], case["mode"], case["key_size"])

    frames = FrameDecoder().feed(wire)
    assert len(frames) == 1
    assert frames[0].flag == FLAG_MORMOT
    assert len(frames[0].payload) == case["data_size"] == mormot_payload_size(len(plaintext))
    assert frames[0].payload[:16] == iv
    assert cipher.decrypt(frames[0].payload) == plaintext

    assert cipher.seal_frame(plaintext, iv=iv) == wire
    assert encode_frame(cipher.encrypt(plaintext, iv=iv), FLAG_MORMOT) == wire
    assert _reference_mormot(cipher._key, cipher.mode, iv, plaintext) == wire[HEADER_SIZE:]


@pytest.mark.parametrize("case", VECTORS.get("unencrypted_cases", []), ids=lambda c: c["id"])
def test_vector_unencrypted_case(case: Dict[str, Any]) -> None:
    wire = bytes.fromhex(case["frame_hex"])
    plaintext = bytes.fromhex(case["plaintext_hex"])
    assert encode_frame(plaintext) == wire
    frames = FrameDecoder().feed(wire)
    assert [(f.payload, f.flag) for f in frames] == [(plaintext, 0)]
    assert len(plaintext) == case["data_size"]


@pytest.mark.parametrize("edge", VECTORS.get("edge_cases", []), ids=_edge_id)
def test_vector_edge_case(edge: Dict[str, Any]) -> None:
    wire = bytes.fromhex(edge["frame_hex"])
    pascal_data = bytes.fromhex(edge["pascal_data_hex"])
    decoder = FrameDecoder()
    error: Optional[ProtocolError] = None
    try:
        frames = decoder.feed(wire)
    except ProtocolError as exc:
        frames, error = list(exc.frames), exc

    if not edge["pascal_parsed"]:
        assert frames == []
        if wire[:4] != HEADER.pack(MAGIC, 0, 0)[:4]:         # bad magic: refused at once
            assert error is not None and error.code == ErrorCode.INVALID_PROTOCOL
        else:                                                # incomplete: waits for more
            assert error is None and decoder.buffered == len(wire)
        return

    magic, size, flag = HEADER.unpack_from(wire)
    assert len(frames) == 1
    frame = frames[0]
    assert frame.flag == flag and frame.payload == wire[HEADER_SIZE:HEADER_SIZE + size]
    extra = len(wire) - HEADER_SIZE - size
    if extra:   # trailing bytes are not part of the frame (here: the start of a bad one)
        assert error is not None or decoder.buffered == extra

    if flag != FLAG_MORMOT:
        # Pascal hands flag 2 on as raw data; morsock reads flag 2 as AUTHENTICATED,
        # never as MORMOT, and a payload that is not an authenticated frame is refused.
        assert frame.payload == pascal_data
        with pytest.raises(CryptoError) as info:
            _server_session(AESMode.parse(edge["mode"]), int(edge["key_size"])).open(
                frame.payload)
        assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
        return
    if not edge["decoder_key"]:
        # Pascal passes the raw payload on; morsock refuses to build a keyless cipher.
        assert frame.payload == pascal_data
        with pytest.raises(CryptoError):
            MormotCipher(edge["decoder_key"], edge["mode"], edge["key_size"])
        return
    cipher = MormotCipher(edge["decoder_key"], edge["mode"], edge["key_size"])
    if edge["pascal_decrypt_failed"]:
        # The Pascal code delivers "[DECRYPT_FAILED] ..." text AS DATA; morsock raises.
        assert pascal_data.startswith(b"[DECRYPT_FAILED]")
        with pytest.raises(CryptoError) as info:
            cipher.decrypt(frame.payload)
        assert info.value.code == ErrorCode.DECRYPT_FAILED
        if b"InputLen" in pascal_data or len(frame.payload) < 32 or len(frame.payload) % 16:
            assert "invalid length" in str(info.value)
    else:
        assert cipher.decrypt(frame.payload) == pascal_data


# ------------------------------------------------------------------ MORMOT: properties

@SETTINGS
@given(key_text=st.text(min_size=1, max_size=20), mode=st.sampled_from(MODES),
       bits=st.sampled_from([128, 192, 256]), iv=st.binary(min_size=16, max_size=16),
       plaintext=st.binary(max_size=1100))
def test_mormot_matches_reference(key_text: str, mode: AESMode, bits: int, iv: bytes,
                                  plaintext: bytes) -> None:
    """Any key text (non-ASCII too), key size, mode, IV and length: block-exact."""
    key = hashlib.pbkdf2_hmac("sha256", key_text.encode("utf-8"),
                              b"mormot_protocol_salt_2024", 1000, 32)[:bits // 8]
    assert mormot_key(key_text, bits) == key
    cipher = MormotCipher(key_text, mode, bits)
    payload = cipher.encrypt(plaintext, iv=iv)
    assert payload == _reference_mormot(key, mode, iv, plaintext)
    assert cipher.decrypt(payload) == plaintext
    random_iv = cipher.encrypt(plaintext)
    assert len(random_iv) == mormot_payload_size(len(plaintext))
    assert cipher.decrypt(random_iv) == plaintext


@pytest.mark.parametrize("mode", [AESMode.CTR, AESMode.CTC, AESMode.GCM])
@pytest.mark.parametrize("iv_hex", [
    "ff" * 16,                                   # full 128-bit wrap
    "00" * 8 + "ff" * 8,                         # carry out of the low 64 bits
    "0123456789abcdef" + "ff" * 7 + "fe",
    "00" * 12 + "ff" * 4,                        # carry out of the low 32 bits
])
def test_mormot_counter_carry(mode: AESMode, iv_hex: str) -> None:
    iv = bytes.fromhex(iv_hex)
    plaintext = bytes(range(100))                        # 7 blocks once padded
    cipher = MormotCipher("\U0001F511 clé", mode, 192)
    key = mormot_key("\U0001F511 clé", 192)
    ecb = AES.new(key, AES.MODE_ECB)
    padded = plaintext + bytes((12,)) * 12
    if mode is AESMode.GCM:
        # GCM's keystream (32-bit counter from IV[0:12] || 2), checked against real GCM.
        blocks = [iv[:12] + (2 + i).to_bytes(4, "big") for i in range(7)]
        assert AES.new(key, AES.MODE_GCM, nonce=iv[:12]).encrypt(padded) == \
            cipher.encrypt(plaintext, iv=iv)[16:]
    else:
        start = int.from_bytes(iv, "big")
        blocks = [((start + i) % (1 << 128)).to_bytes(16, "big") for i in range(7)]
    keystream = ecb.encrypt(b"".join(blocks))
    assert cipher.encrypt(plaintext, iv=iv) == iv + _xor(padded, keystream)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 33, 47])
def test_mormot_invalid_length(mode: AESMode, size: int) -> None:
    cipher = MormotCipher(KEY, mode)
    with pytest.raises(CryptoError) as info:
        cipher.decrypt(os.urandom(size))
    assert info.value.code == ErrorCode.DECRYPT_FAILED
    assert "invalid length" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("last_block", [
    bytes(16),                                   # pad byte 0
    b"A" * 15 + b"\x11",                         # pad byte 17
    b"A" * 15 + b"\xff",
    b"A" * 14 + b"\x01\x02",                     # pad 2, bytes not all equal
    b"A" * 12 + b"\x03\x04\x04\x04",
    b"\x10" * 15 + b"\x0f",
])
def test_mormot_bad_padding(mode: AESMode, last_block: bytes) -> None:
    cipher = MormotCipher(KEY, mode)
    iv = bytes(range(16))
    raw = crypto._mormot_factory(mode)(mormot_key(KEY), iv).encrypt(b"B" * 16 + last_block)
    with pytest.raises(CryptoError) as info:
        cipher.decrypt(iv + raw)
    assert info.value.code == ErrorCode.DECRYPT_FAILED
    # A full block of padding (16 x 0x10) is valid: an empty tail.
    good = crypto._mormot_factory(mode)(mormot_key(KEY), iv).encrypt(b"B" * 16 + b"\x10" * 16)
    assert cipher.decrypt(iv + good) == b"B" * 16


def test_mormot_wrong_key_is_not_plaintext() -> None:
    iv = bytes(16)
    for mode in MODES:
        payload = MormotCipher(KEY, mode).encrypt(b"secret message", iv=iv)
        try:
            result = MormotCipher(OTHER_KEY, mode).decrypt(payload)
        except CryptoError as exc:
            assert exc.code == ErrorCode.DECRYPT_FAILED
        else:
            assert result != b"secret message"


def test_mormot_api_details() -> None:
    with pytest.raises(CryptoError):
        MormotCipher("", AESMode.CBC)
    with pytest.raises(CryptoError):
        mormot_key("", 256)
    with pytest.raises(ValueError):
        MormotCipher(KEY, "XTS")
    with pytest.raises(ValueError):
        MormotCipher(KEY, "CBC", 512)
    with pytest.raises(ValueError):
        MormotCipher(KEY, "CBC").encrypt(b"x", iv=b"short")
    assert MormotCipher(KEY, "amCBC").mode is AESMode.CBC
    assert MormotCipher(KEY, "cbc", "aks128").key_size is KeySize.AES128
    assert KEY not in repr(MormotCipher(KEY, "CBC"))
    # memoryview / bytearray input
    cipher = MormotCipher(KEY, "OFB")
    data = bytearray(b"0123456789" * 7)
    assert cipher.decrypt(cipher.encrypt(memoryview(data)[3:])) == bytes(data[3:])
    assert cipher.decrypt(bytearray(cipher.seal_frame(data)[HEADER_SIZE:])) == data


def test_mormot_key_is_cached() -> None:
    key_text = "cache probe \u00e9"
    before = mormot_key.cache_info()
    for _ in range(5):
        MormotCipher(key_text, "CBC", 128)
    after = mormot_key.cache_info()
    assert after.misses == before.misses + 1
    assert after.hits >= before.hits + 4


# ------------------------------------------------------------ AUTHENTICATED: helpers

def _pair(mode: AESMode, bits: int = 256, key: str = KEY, server_key: Optional[str] = None,
          client_random: Optional[bytes] = None, server_random: Optional[bytes] = None
          ) -> Tuple[AuthSession, AuthSession]:
    """(client session, server session) after a handshake through the frame decoder."""
    hs = ClientHandshake(key, mode, bits, client_random=client_random)
    [hello] = FrameDecoder().feed(hs.hello_frame)
    assert hello.flag == FLAG_AUTHENTICATED
    reply, server = server_handshake(server_key or key, mode, bits, hello.payload,
                                     server_random=server_random)
    [answer] = FrameDecoder().feed(reply)
    assert answer.flag == FLAG_AUTHENTICATED
    return hs.finish(answer.payload), server


def _fixed_pair(mode: AESMode, bits: int = 256) -> Tuple[AuthSession, AuthSession]:
    return _pair(mode, bits, client_random=CLIENT_RANDOM, server_random=SERVER_RANDOM)


def _server_session(mode: AESMode, bits: int = 256) -> AuthSession:
    """A fresh server-side receiver with the fixed handshake's keys."""
    return _fixed_pair(mode, bits)[1]


def _receive(session: AuthSession, wire: bytes) -> List[bytes]:
    """What a receiver accepts as authenticated data from *wire* (never raises)."""
    try:
        frames = FrameDecoder().feed(wire)
    except ProtocolError as exc:
        frames = list(exc.frames)
    accepted: List[bytes] = []
    for frame in frames:
        if frame.flag != FLAG_AUTHENTICATED:
            continue       # not an authenticated frame: never handed to open()
        try:
            accepted.append(session.open(frame.payload))
        except CryptoError as exc:
            assert exc.code == ErrorCode.AUTHENTICATION_FAILED
            break
    return accepted


def _open_fails(session: AuthSession, payload: bytes) -> None:
    with pytest.raises(CryptoError) as info:
        session.open(payload)
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED


# ------------------------------------------------------------ AUTHENTICATED: basics

@pytest.mark.parametrize("bits", [128, 256])
@pytest.mark.parametrize("mode", MODES)
def test_auth_round_trip(mode: AESMode, bits: int) -> None:
    client, server = _pair(mode, bits)
    assert client.mode is server.mode is mode and client.key_size == bits
    decoder = FrameDecoder(max_message_size=1 << 20)
    for n in (0, 1, 15, 16, 17, 31, 32, 33, 1000, 65536):
        data = os.urandom(n)
        for sender, receiver in ((client, server), (server, client)):
            wire = sender.seal(data)
            assert len(wire) == HEADER_SIZE + authenticated_payload_size(mode, n)
            assert len(wire) == HEADER_SIZE + sender.payload_size(n)
            [frame] = decoder.feed(wire)
            assert frame.flag == FLAG_AUTHENTICATED
            assert receiver.open(frame.payload) == data
    assert client.send_seq == client.recv_seq == server.send_seq == server.recv_seq == 10


@pytest.mark.parametrize("mode", MODES)
def test_auth_round_trip_random(mode: AESMode) -> None:
    client, server = _pair(mode, 192)

    @SETTINGS
    @given(st.binary(max_size=3000))
    def check(data: bytes) -> None:
        assert server.open(client.seal(data)[HEADER_SIZE:]) == data
        assert client.open(server.seal(bytearray(data))[HEADER_SIZE:]) == data

    check()


@pytest.mark.parametrize("mode", MODES)
def test_auth_stream_split_anywhere(mode: AESMode) -> None:
    client, server = _pair(mode)
    messages = [os.urandom(n) for n in (5, 0, 300, 16, 77)]
    wire = b"".join(client.seal(m) for m in messages)
    decoder = FrameDecoder()
    got = []
    for i in range(len(wire)):
        for frame in decoder.feed(wire[i:i + 1]):
            got.append(server.open(frame.payload))
    assert got == messages


@pytest.mark.parametrize("mode", MODES)
def test_auth_bit_flips_rejected(mode: AESMode) -> None:
    """Every single bit flip anywhere in a frame (header included) is refused."""
    client, _ = _fixed_pair(mode)
    plaintext = b"attack at dawn!"
    wire = client.seal(plaintext)
    assert _receive(_server_session(mode), wire) == [plaintext]   # the control
    for bit in range(len(wire) * 8):
        flipped = bytearray(wire)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert _receive(_server_session(mode), bytes(flipped)) == [], f"bit {bit}"


@pytest.mark.parametrize("mode", MODES)
def test_auth_replay_reorder_drop(mode: AESMode) -> None:
    client, _ = _fixed_pair(mode)
    frames = [client.seal(b"message %d" % i)[HEADER_SIZE:] for i in range(4)]

    replay = _server_session(mode)
    assert replay.open(frames[0]) == b"message 0"
    _open_fails(replay, frames[0])                     # replayed
    assert replay.broken
    _open_fails(replay, frames[1])                     # poisoned: even the right one fails

    reorder = _server_session(mode)
    _open_fails(reorder, frames[1])                    # reordered
    _open_fails(reorder, frames[0])

    drop = _server_session(mode)
    assert drop.open(frames[0]) == b"message 0"
    _open_fails(drop, frames[2])                       # frames[1] dropped

    ok = _server_session(mode)
    assert [ok.open(f) for f in frames] == [b"message %d" % i for i in range(4)]
    assert not ok.broken


@pytest.mark.parametrize("mode", MODES)
def test_auth_reflection_rejected(mode: AESMode) -> None:
    client, server = _pair(mode)
    _open_fails(client, client.seal(b"to the server")[HEADER_SIZE:])   # own frame back
    _open_fails(server, server.seal(b"to the client")[HEADER_SIZE:])


@pytest.mark.parametrize("mode", MODES)
def test_auth_recorded_session_replayed_on_new_connection(mode: AESMode) -> None:
    hs = ClientHandshake(KEY, mode)
    reply, server = server_handshake(KEY, mode, 256, hs.hello_frame[HEADER_SIZE:])
    client = hs.finish(reply[HEADER_SIZE:])
    recorded = [client.seal(b"transfer %d coins" % i)[HEADER_SIZE:] for i in range(3)]
    assert [server.open(p) for p in recorded] == [b"transfer %d coins" % i for i in range(3)]

    # An attacker replays the recorded ClientHello and then the recorded data frames.
    _, replayed_server = server_handshake(KEY, mode, 256, hs.hello_frame[HEADER_SIZE:])
    assert _receive(replayed_server, b"".join(encode_frame(p, FLAG_AUTHENTICATED)
                                              for p in recorded)) == []
    # A new, honest connection with the same key does not accept them either.
    _, fresh_server = _pair(mode)
    _open_fails(fresh_server, recorded[0])
    # A recorded ServerHello does not complete a new client handshake.
    with pytest.raises(CryptoError) as info:
        ClientHandshake(KEY, mode).finish(reply[HEADER_SIZE:])
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED


def test_auth_wrong_passphrase() -> None:
    hs = ClientHandshake(OTHER_KEY, AESMode.GCM)
    reply, server = server_handshake(KEY, AESMode.GCM, 256, hs.hello_frame[HEADER_SIZE:])
    with pytest.raises(CryptoError) as info:
        hs.finish(reply[HEADER_SIZE:])
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
    assert "wrong key" in str(info.value)
    # Even a client that ignored that could not get a frame accepted by the server.
    forged = AuthSession(AESMode.GCM, 256, bytes(32), bytes(32), bytes(32), bytes(32))
    _open_fails(server, forged.seal(b"hi")[HEADER_SIZE:])


@pytest.mark.parametrize("client_mode,client_bits,server_mode,server_bits", [
    (AESMode.CBC, 256, AESMode.GCM, 256),
    (AESMode.CTR, 256, AESMode.CTC, 256),
    (AESMode.GCM, 128, AESMode.GCM, 256),
    (AESMode.OFB, 192, AESMode.OFB, 128),
])
def test_auth_mode_or_key_size_mismatch(client_mode: AESMode, client_bits: int,
                                        server_mode: AESMode, server_bits: int) -> None:
    hs = ClientHandshake(KEY, client_mode, client_bits)
    with pytest.raises(CryptoError) as info:
        server_handshake(KEY, server_mode, server_bits, hs.hello_frame[HEADER_SIZE:])
    assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
    assert "mismatch" in str(info.value)


def test_auth_bad_hellos() -> None:
    hello = ClientHandshake(KEY, "GCM").hello_frame[HEADER_SIZE:]
    for bad in (b"", hello[:-1], hello + b"x", b"MSA2" + hello[4:],
                hello[:4] + b"\x09\x04" + hello[6:], hello[:4] + b"\x05\x05" + hello[6:]):
        with pytest.raises(CryptoError) as info:
            server_handshake(KEY, "GCM", 256, bad)
        assert info.value.code == ErrorCode.AUTHENTICATION_FAILED
    hs = ClientHandshake(KEY, "GCM")
    reply, _ = server_handshake(KEY, "GCM", 256, hs.hello_frame[HEADER_SIZE:])
    for bad in (b"", reply[HEADER_SIZE:-1], b"MSA0" + reply[HEADER_SIZE + 4:]):
        with pytest.raises(CryptoError):
            ClientHandshake(KEY, "GCM").finish(bad)
    hs.finish(reply[HEADER_SIZE:])
    with pytest.raises(CryptoError):                    # single use
        hs.finish(reply[HEADER_SIZE:])
    with pytest.raises(CryptoError):
        ClientHandshake("", "GCM")
    with pytest.raises(CryptoError):
        server_handshake("", "GCM", 256, hello)
    with pytest.raises(ValueError):
        ClientHandshake(KEY, "GCM", client_random=b"short")


def test_auth_hello_format() -> None:
    hs = ClientHandshake(KEY, "amCTC", "aks192", client_random=CLIENT_RANDOM)
    assert hs.hello_frame == encode_frame(b"MSA1" + bytes((8, 3)) + CLIENT_RANDOM,
                                          FLAG_AUTHENTICATED)
    reply, _ = server_handshake(KEY, AESMode.CTC, 192, hs.hello_frame[HEADER_SIZE:],
                                server_random=SERVER_RANDOM)
    assert reply[:HEADER_SIZE] == HEADER.pack(MAGIC, 68, FLAG_AUTHENTICATED)
    assert reply[HEADER_SIZE:HEADER_SIZE + 36] == b"MSA1" + SERVER_RANDOM


@pytest.mark.parametrize("mode", MODES)
def test_auth_profiles_never_cross(mode: AESMode) -> None:
    """A MORMOT payload never opens as AUTHENTICATED, nor the reverse."""
    client, server = _pair(mode)
    mormot = MormotCipher(KEY, mode)
    for n in (0, 5, 16, 40):
        plaintext = b"p" * n
        _open_fails(_pair(mode)[1], mormot.encrypt(plaintext))
        payload = client.seal(plaintext)[HEADER_SIZE:]
        assert server.open(payload) == plaintext
        if len(payload) < 32 or len(payload) % 16:
            with pytest.raises(CryptoError):
                mormot.decrypt(payload)
        else:
            try:
                assert mormot.decrypt(payload) != plaintext
            except CryptoError as exc:
                assert exc.code == ErrorCode.DECRYPT_FAILED


@pytest.mark.parametrize("mode", MODES)
def test_auth_nonces_never_repeat(mode: AESMode) -> None:
    client, server = _pair(mode)
    plaintext = b"same message every time, 48 bytes long.........."
    payloads = [client.seal(plaintext)[HEADER_SIZE:] for _ in range(1000)]
    assert len(set(payloads)) == 1000                   # the MAC/tag alone differs by seq
    if mode in (AESMode.GCM, AESMode.CTR, AESMode.CTC):
        ciphertexts = {p[:len(plaintext)] for p in payloads}
        assert len(ciphertexts) == 1000                 # a fresh keystream for every frame
    elif mode is not AESMode.ECB:
        ivs = {p[:16] for p in payloads}
        assert len(ivs) == 1000
        assert len({p[16:-32] for p in payloads}) == 1000
    assert [server.open(p) for p in payloads] == [plaintext] * 1000


@functools.lru_cache(maxsize=None)
def _independent_master_key() -> bytes:
    return hashlib.pbkdf2_hmac("sha256", KEY.encode(), b"morsock/authenticated/v1", 600_000, 32)


@pytest.mark.parametrize("mode", MODES)
def test_auth_wire_format_matches_spec(mode: AESMode) -> None:
    """Rebuild frames from the documented format with independent primitives."""
    bits = 128
    client, server = _pair(mode, bits, client_random=CLIENT_RANDOM,
                           server_random=SERVER_RANDOM)
    master = _independent_master_key()
    assert authenticated_master_key(KEY) == master
    okm = HKDF(master, 2 * 16 + 3 * 32, CLIENT_RANDOM + SERVER_RANDOM, SHA256,
               context=b"morsock v1 " + mode.value.encode() + b" 128")
    assert isinstance(okm, bytes)
    enc_c2s, mac_c2s = okm[:16], okm[16:48]
    hello = b"MSA1" + bytes((MODES.index(mode), 2)) + CLIENT_RANDOM
    confirm = hmac.new(okm[96:128], hello + SERVER_RANDOM, "sha256").digest()
    reply, _ = server_handshake(KEY, mode, bits, hello, server_random=SERVER_RANDOM)
    assert reply[HEADER_SIZE:] == b"MSA1" + SERVER_RANDOM + confirm

    for seq, plaintext in enumerate([b"", b"seventeen bytes!!", b"x" * 40]):
        wire = client.seal(plaintext)
        size = len(wire) - HEADER_SIZE
        header = HEADER.pack(MAGIC, size, FLAG_AUTHENTICATED)
        seq8 = struct.pack(">Q", seq)
        pad = 16 - len(plaintext) % 16
        padded = plaintext + bytes((pad,)) * pad
        if mode is AESMode.GCM:
            gcm = AES.new(enc_c2s, AES.MODE_GCM, nonce=bytes(4) + seq8)
            gcm.update(header + bytes(7))
            ct, tag = gcm.encrypt_and_digest(plaintext)
            expected = header + ct + tag
        else:
            if mode in (AESMode.CTR, AESMode.CTC):
                body = AES.new(enc_c2s, AES.MODE_CTR, nonce=b"",
                               initial_value=seq8 + bytes(8)).encrypt(plaintext)
            elif mode is AESMode.ECB:
                body = AES.new(enc_c2s, AES.MODE_ECB).encrypt(padded)
            else:
                iv = wire[HEADER_SIZE:HEADER_SIZE + 16]
                if mode is AESMode.CBC:
                    ct = AES.new(enc_c2s, AES.MODE_CBC, iv=iv).encrypt(padded)
                elif mode in (AESMode.CFB, AESMode.CFC):
                    ct = AES.new(enc_c2s, AES.MODE_CFB, iv=iv, segment_size=128).encrypt(
                        plaintext)
                else:
                    ct = AES.new(enc_c2s, AES.MODE_OFB, iv=iv).encrypt(plaintext)
                body = iv + ct
            mac = hmac.new(mac_c2s, header + seq8 + body, "sha256").digest()
            expected = header + body + mac
        assert wire == expected
        assert server.open(wire[HEADER_SIZE:]) == plaintext


def test_auth_hkdf_matches_rfc5869() -> None:
    # RFC 5869 test case 1
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    assert crypto._hkdf_sha256(ikm, salt, info, 42).hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
        "34007208d5b887185865")


def test_auth_sequence_exhaustion() -> None:
    client, server = _fixed_pair(AESMode.CTR)
    client._send_seq = server._recv_seq = crypto.SEQ_LIMIT - 1
    assert server.open(client.seal(b"last")[HEADER_SIZE:]) == b"last"
    with pytest.raises(CryptoError):
        client.seal(b"one too many")
    assert client.send_seq == crypto.SEQ_LIMIT
    with pytest.raises(CryptoError):
        server.open(b"x" * 40)


def test_auth_failed_seal_consumes_no_sequence_number() -> None:
    client, server = _fixed_pair(AESMode.GCM)
    with pytest.raises(TypeError):
        client.seal(12345)  # type: ignore[arg-type]
    assert client.send_seq == 0
    assert server.open(client.seal(b"ok")[HEADER_SIZE:]) == b"ok"


def test_auth_master_key_derived_once() -> None:
    key_text = "master cache probe"
    before = authenticated_master_key.cache_info()
    for mode in (AESMode.GCM, AESMode.CBC, AESMode.CTR):
        _pair(mode, key=key_text)
    after = authenticated_master_key.cache_info()
    assert after.misses == before.misses + 1            # one PBKDF2 for six handshake sides
    assert after.hits == before.hits + 5


def test_keys_stay_derived_once_however_many_a_process_uses() -> None:
    # "Once per key and process" (API.md §2, §7): no key is ever evicted and derived again.
    keys = [f"key number {i}" for i in range(300)]
    for key in keys:
        mormot_key(key)
    before = mormot_key.cache_info()
    for key in keys:
        mormot_key(key)
    assert mormot_key.cache_info().misses == before.misses
    assert authenticated_master_key.cache_info().maxsize is None  # 0.1 s+ each: not tried


def test_auth_session_repr_has_no_keys() -> None:
    client, _ = _fixed_pair(AESMode.GCM)
    text = repr(client)
    assert "GCM" in text and client._send_key.hex() not in text


# ------------------------------------------------------------------ AES cipher objects

def test_direct_constructors_in_use() -> None:
    """On the pycryptodome installed (4.4 and 3.23 checked) the cipher objects are made
    without AES.new's keyword handling: a third of their cost, twice per request."""
    assert crypto._AES.direct
    assert crypto._choose_constructors().direct


@SETTINGS
@given(bits=st.sampled_from([128, 192, 256]), iv=st.binary(min_size=16, max_size=16),
       blocks=st.integers(0, 12), split=st.integers(0, 12), data=st.data())
def test_direct_constructors_match_aes_new(bits: int, iv: bytes, blocks: int, split: int,
                                           data: st.DataObject) -> None:
    """Same ciphertext as AES.new in every mode and key size, also when the data is fed
    in two calls (the mode's running state), and decrypting gives the data back."""
    key = data.draw(st.binary(min_size=bits // 8, max_size=bits // 8))
    plaintext = data.draw(st.binary(min_size=16 * blocks, max_size=16 * blocks))
    cut = 16 * min(split, blocks)
    direct, public = crypto._direct_constructors(), crypto._public_constructors()
    assert direct.direct and not public.direct
    for kind, make in enumerate(crypto._cipher_kinds(key, iv)):
        expected = make(public).encrypt(plaintext)
        cipher = make(direct)
        assert cipher.encrypt(plaintext[:cut]) + cipher.encrypt(plaintext[cut:]) == expected, kind
        assert make(direct).decrypt(expected) == plaintext, kind


@SETTINGS
@given(bits=st.sampled_from([128, 192, 256]), nonce_size=st.sampled_from([12, 16]),
       size=st.integers(0, 200), blocks=st.integers(0, 12), data=st.data())
def test_direct_gcm_matches_aes_new(bits: int, nonce_size: int, size: int, blocks: int,
                                    data: st.DataObject) -> None:
    """GCM objects from pycryptodome's GcmMode without AES.new: same ciphertext and tag
    as AES.new (also when the data is fed in two calls, and for a nonce that is not 12
    bytes, which goes through GHASH), they open what AES.new sealed and reject a wrong
    tag or associated data."""
    key = data.draw(st.binary(min_size=bits // 8, max_size=bits // 8))
    nonce = data.draw(st.binary(min_size=nonce_size, max_size=nonce_size))
    aad = data.draw(st.binary(max_size=40))
    plaintext = data.draw(st.binary(min_size=size, max_size=size))
    cut = min(16 * blocks, size)
    direct, public = crypto._direct_constructors(), crypto._public_constructors()
    make_direct, make_public = direct.gcm(key), public.gcm(key)
    expected = make_public(nonce)
    expected.update(aad)
    ciphertext, tag = expected.encrypt(plaintext), expected.digest()
    for _ in range(2):  # a maker makes any number of objects
        sealer = make_direct(nonce)
        sealer.update(aad)
        assert sealer.encrypt(plaintext[:cut]) + sealer.encrypt(plaintext[cut:]) == ciphertext
        assert sealer.digest() == tag
    opener = make_direct(nonce)
    opener.update(aad)
    assert opener.decrypt(ciphertext) == plaintext
    opener.verify(tag)
    for wrong_aad, wrong_tag in ((aad, bytes([tag[0] ^ 1]) + tag[1:]), (aad + b"x", tag)):
        opener = make_direct(nonce)
        opener.update(wrong_aad)
        opener.decrypt(ciphertext)
        with pytest.raises(ValueError):
            opener.verify(wrong_tag)


def test_direct_gcm_computes_the_hash_subkey_once_per_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A GCM object made through AES.new runs the AES key schedule three times (the hash
    subkey, the data's CTR, the tag's CTR); a GCM maker computes the hash subkey once
    for its key, so each object after that runs it twice. That saves 10 of 22 us per
    object here, paid twice per AUTHENTICATED GCM request."""
    schedules: List[int] = []
    real = AES._create_base_cipher

    def counting(params: Dict[str, Any]) -> Any:
        schedules.append(len(params["key"]))
        return real(params)
    monkeypatch.setattr(AES, "_create_base_cipher", counting)
    make = crypto._direct_constructors().gcm(bytes(32))
    assert len(schedules) == 1
    for seq in range(10):
        cipher = make(bytes(4) + seq.to_bytes(8, "big"))
        cipher.encrypt(b"x" * 20)
        cipher.digest()
    assert schedules == [32] * 21
    # GcmMode asks only for the zero block's encryption; any other block is still right
    zero_block_ecb = crypto._GcmParts(bytes(32), crypto._AES.ecb, crypto._AES.ctr).new(
        bytes(32), AES.MODE_ECB)
    for block in (bytes(16), bytes(range(16)), bytes(range(16, 48))):
        assert zero_block_ecb.encrypt(block) == AES.new(bytes(32), AES.MODE_ECB).encrypt(block)


def test_constructors_fall_back_to_aes_new(monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Where pycryptodome's mode classes are missing or differ, AES.new is used (and a
    DEBUG line says why)."""
    def missing() -> Any:
        raise ImportError("no module named Crypto.Cipher._mode_cbc")
    monkeypatch.setattr(crypto, "_direct_constructors", missing)
    with caplog.at_level("DEBUG", logger="morsock"):
        chosen = crypto._choose_constructors()
    assert not chosen.direct
    assert "ImportError: no module named Crypto.Cipher._mode_cbc" in caplog.text

    def wrong() -> Any:  # a CBC that ignores its IV: caught by the known-answer check
        return crypto._public_constructors()._replace(
            direct=True, cbc=lambda key, iv: AES.new(key, AES.MODE_CBC, iv=bytes(16)))
    monkeypatch.setattr(crypto, "_direct_constructors", wrong)
    caplog.clear()
    with caplog.at_level("DEBUG", logger="morsock"):
        chosen = crypto._choose_constructors()
    assert not chosen.direct
    assert "do not match AES.new" in caplog.text
    key, iv, data = bytes(32), bytes(range(16)), bytes(range(32))
    assert chosen.cbc(key, iv).encrypt(data) == AES.new(key, AES.MODE_CBC, iv=iv).encrypt(data)

    class NoVerify:  # a GCM object that accepts any tag
        def __init__(self, cipher: Any) -> None:
            self.update, self.encrypt, self.decrypt = cipher.update, cipher.encrypt, cipher.decrypt
            self.digest = cipher.digest

        def verify(self, tag: bytes) -> None:
            pass
    public = crypto._public_constructors()
    for gcm in (lambda key: lambda nonce: AES.new(key, AES.MODE_GCM, nonce=bytes(12)),
                lambda key: lambda nonce: NoVerify(public.gcm(key)(nonce))):
        monkeypatch.setattr(crypto, "_direct_constructors",
                            lambda gcm=gcm: public._replace(direct=True, gcm=gcm))
        caplog.clear()
        with caplog.at_level("DEBUG", logger="morsock"):
            assert not crypto._choose_constructors().direct
        assert "do not match AES.new" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_profiles_same_bytes_with_either_constructors(mode: AESMode,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that fell back to AES.new speaks the same bytes: the Pascal vectors of
    *mode*, MORMOT payloads both ways, and AUTHENTICATED frames both ways."""
    monkeypatch.setattr(crypto, "_AES", crypto._public_constructors())
    public_cipher = MormotCipher(KEY, mode, 192)
    public_client, public_server = _fixed_pair(mode, 192)
    for case in VECTORS.get("cases", []):
        if AESMode.parse(case["mode"]) is mode:
            cipher = MormotCipher(case["key"], case["mode"], case["key_size"])
            plaintext = bytes.fromhex(case["plaintext_hex"])
            wire = bytes.fromhex(case["frame_hex"])
            assert cipher.seal_frame(plaintext, iv=bytes.fromhex(case["iv_hex"])) == wire
            assert cipher.decrypt(wire[HEADER_SIZE:]) == plaintext
    monkeypatch.setattr(crypto, "_AES", crypto._direct_constructors())
    direct_cipher = MormotCipher(KEY, mode, 192)
    direct_client, direct_server = _fixed_pair(mode, 192)

    iv = bytes(range(7, 23))
    for size in (0, 1, 15, 16, 17, 100):
        plaintext = os.urandom(size)
        payload = direct_cipher.encrypt(plaintext, iv=iv)
        assert payload == public_cipher.encrypt(plaintext, iv=iv)
        assert payload == _reference_mormot(direct_cipher._key, mode, iv, plaintext)
        assert public_cipher.decrypt(direct_cipher.encrypt(plaintext)) == plaintext
        assert direct_cipher.decrypt(public_cipher.encrypt(plaintext)) == plaintext

        sealed = direct_client.seal(plaintext)
        if mode in (AESMode.ECB, AESMode.CTR, AESMode.CTC, AESMode.GCM):  # no random IV
            assert sealed == public_client.seal(plaintext)
            assert direct_server.open(sealed[HEADER_SIZE:]) == plaintext
        assert public_server.open(sealed[HEADER_SIZE:]) == plaintext
        if mode not in (AESMode.ECB, AESMode.CTR, AESMode.CTC, AESMode.GCM):
            assert direct_server.open(public_client.seal(plaintext)[HEADER_SIZE:]) == plaintext
