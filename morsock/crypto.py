"""Per-message AES encryption of frame payloads (docs/guide/encryption.rst): two profiles.

Sans-I/O like :mod:`morsock.protocol`: bytes in, bytes out, no sockets, no threads.
Every primitive comes from pycryptodome (AES) or the standard library (PBKDF2, HMAC);
nothing here implements a cipher.

MORMOT profile (flag 1) -- :class:`MormotCipher`
    Byte-compatible with the Delphi mORMot Socket Components v1.0.3 and unauthenticated.
    Key = PBKDF2-HMAC-SHA256(UTF-8 key text, ``b"mormot_protocol_salt_2024"``, 1000
    rounds, 32 bytes)[:key_size // 8], derived once per (key text, key size) and cached.
    Payload = 16 random IV bytes || AES(plaintext || PKCS#7 padding of 1..16 bytes), in
    every mode: ECB ignores the IV; CFB uses 128-bit segments; CTR counts the whole IV as
    a 128-bit big-endian counter; GCM is its keystream only (counter blocks
    ``IV[0:12] || 00000002``, ...; no tag); CFC/OFC/CTC are CFB/OFB/CTR on the wire.

AUTHENTICATED (flag 2) -- :class:`ClientHandshake`, :func:`server_handshake`, :class:`AuthSession`
    morsock's own format. Master key = PBKDF2-HMAC-SHA256(UTF-8 key text,
    ``b"morsock/authenticated/v1"``, 600,000 rounds, 32 bytes), once per key text and
    process (cached). Right after connect the *client* sends a hello and the server
    answers (the server never speaks first)::

        ClientHello = b"MSA1" || mode_index (1) || key_size // 64 (1) || client_random (32)
        ServerHello = b"MSA1" || server_random (32) || confirm (32)
        confirm     = HMAC-SHA256(k_confirm, ClientHello || server_random)

    Session keys = HKDF-SHA256(master, salt = client_random || server_random,
    info = b"morsock v1 <MODE> <BITS>", e.g. ``b"morsock v1 CBC 256"``) split, in this
    order, into enc_c2s (key_size/8), mac_c2s (32), enc_s2c (key_size/8), mac_s2c (32),
    k_confirm (32), k_export (32). Fresh randoms on both sides bind the keys to one
    connection. k_export is never used on the wire by this profile: it is the
    connection's :attr:`AuthSession.binding`, a secret both ends share and nobody without
    the key can compute, to which the session layer (:mod:`morsock._session`) binds its
    hello. (HKDF output is prefix-stable, so the other keys are those of a 5-key split.)

    Each direction numbers its frames ``seq`` = 0, 1, 2 ... (uint64, never sent: the
    receiver uses the number it expects). ``H`` = the 9 header bytes of the frame
    (magic, payload size, flag 2), ``S`` = seq as 8 bytes big-endian::

        GCM       ct || tag(16)             nonce = 00000000 || S, AAD = H || 0^7
        CTR, CTC  ct || mac(32)             counter blocks S || 0^8, S || 0..01, ...
        CBC       IV || ct || mac(32)       random IV, PKCS#7 padding
        CFB, CFC  IV || ct || mac(32)       random IV, 128-bit segments, no padding
        OFB, OFC  IV || ct || mac(32)       random IV, no padding
        ECB       ct || mac(32)             PKCS#7 padding, no IV
        mac = HMAC-SHA256(mac key of the direction, H || S || payload before the mac)

    GCM binds the sequence number through its nonce; its AAD is the header padded to one
    16-byte block (pycryptodome takes ~6 us longer per message on an unaligned AAD).
    The MAC is checked (in constant time) before anything is decrypted. A frame that is
    tampered with, replayed, reordered, dropped (the next one fails), from another
    connection or another direction fails with ``CryptoError(AUTHENTICATION_FAILED)``,
    and the session is then broken: every later :meth:`AuthSession.open` fails too, so
    the connection must be closed. ECB has no IV or nonce, so it still shows which
    16-byte blocks are equal, within a message and across messages (identical messages
    give identical ciphertext): prefer GCM or CTR.

    A server that cannot accept a ClientHello (another mode or key size, no key, the
    MORMOT profile) answers ``Refusal = b"MSA!" || reason`` (UTF-8, at most 400 bytes,
    flag 2) and closes; the client raises the reason. Only a payload shaped like a
    ClientHello (38 bytes, ``MSA1``) is ever answered so, which no Delphi peer sends.

    A peer without the AUTHENTICATED profile never gets a ClientHello from a server
    (servers never speak first). A server that is not AUTHENTICATED gets it as a flag-2
    frame (the Delphi components pass it to their handler as 38 bytes of data) and
    sends no ServerHello, so the client's handshake fails.

Key texts are used as their UTF-8 bytes, without Unicode normalisation.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import struct
from typing import Any, Callable, NamedTuple, Union

from Crypto.Cipher import AES

from .enums import AESMode, ErrorCode, KeySize
from .errors import CryptoError
from .protocol import (
    FLAG_AUTHENTICATED,
    FLAG_MORMOT,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME_SIZE,
    encode_frame,
)

__all__ = [
    "MORMOT_SALT", "MORMOT_ITERATIONS", "AUTH_SALT", "AUTH_ITERATIONS",
    "BLOCK_SIZE", "IV_SIZE", "MAC_SIZE", "TAG_SIZE", "HELLO_MAGIC",
    "CLIENT_HELLO_SIZE", "SERVER_HELLO_SIZE", "RANDOM_SIZE", "SEQ_LIMIT",
    "mormot_key", "mormot_payload_size", "MormotCipher",
    "authenticated_master_key", "authenticated_payload_size",
    "AuthSession", "ClientHandshake", "server_handshake", "REFUSAL_MAGIC",
    "REFUSAL_MAX", "is_client_hello", "refusal_frame",
]

Buffer = Union[bytes, bytearray, memoryview]
KeySizeLike = Union[KeySize, int, str]
ModeLike = Union[AESMode, str]

MORMOT_SALT = b"mormot_protocol_salt_2024"  #: PBKDF2 salt of the MORMOT key.
MORMOT_ITERATIONS = 1000  #: PBKDF2 rounds of the MORMOT key.
AUTH_SALT = b"morsock/authenticated/v1"  #: PBKDF2 salt of the AUTHENTICATED master key.
AUTH_ITERATIONS = 600_000  #: PBKDF2 rounds of the AUTHENTICATED master key.

BLOCK_SIZE = 16  #: AES block size.
IV_SIZE = 16  #: Bytes of a random IV.
MAC_SIZE = 32  #: Bytes of an HMAC-SHA256 MAC.
TAG_SIZE = 16  #: Bytes of a GCM tag.
RANDOM_SIZE = 32  #: Bytes of each side's handshake random.
HELLO_MAGIC = b"MSA1"  #: First bytes of both handshake hellos.
CLIENT_HELLO_SIZE = len(HELLO_MAGIC) + 2 + RANDOM_SIZE  #: 38 bytes.
SERVER_HELLO_SIZE = len(HELLO_MAGIC) + RANDOM_SIZE + MAC_SIZE  #: 68 bytes.
#: A server's answer to a ClientHello it cannot accept: this magic, then the reason as
#: UTF-8 text (at most REFUSAL_MAX bytes), in one flag-2 frame; the server then closes.
REFUSAL_MAGIC = b"MSA!"
REFUSAL_MAX = 400
SEQ_LIMIT = 1 << 64  #: Sequence numbers are 0 .. SEQ_LIMIT - 1.

_MODES: tuple[AESMode, ...] = tuple(AESMode)
_PADS: tuple[bytes, ...] = tuple(bytes((n,)) * n for n in range(BLOCK_SIZE + 1))
_SEQ = struct.Struct(">Q")
_pack_header = HEADER.pack
_pack_seq = _SEQ.pack
_GCM_NONCE_PREFIX = b"\x00\x00\x00\x00"
_GCM_COUNTER_2 = b"\x00\x00\x00\x02"             # MORMOT GCM: the first data block's counter
_ZERO8 = bytes(8)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_GCM_AAD_PAD = bytes(BLOCK_SIZE - HEADER_SIZE)      # AAD = header || 0^7: one block

_DECRYPT_FAILED = ErrorCode.DECRYPT_FAILED
_AUTH_FAILED = ErrorCode.AUTHENTICATION_FAILED

# Hot paths hand pycryptodome bytes (slicing a bytes payload is cheaper than passing a
# memoryview), let it return new bytes (4.x writes outputs of 64 KiB and more straight
# into a new bytes object) and build each frame with one b"".join. Encrypting into a
# bytearray with output= measured slower (an extra call per message, a final copy).

# A pycryptodome cipher object (typed loosely: AES.new() returns one of several classes).
_Cipher = Any
_Factory = Callable[[bytes, bytes], _Cipher]


# ------------------------------------------------------------ AES cipher objects

class _AESConstructors(NamedTuple):
    """Makers of fresh pycryptodome AES cipher objects (one per message: a cipher object
    carries its mode's running state, so none is reused). *key* is 16, 24 or 32 bytes."""

    direct: bool  #: True: built from pycryptodome's mode classes, without AES.new
    ecb: Callable[[bytes], _Cipher]
    cbc: Callable[[bytes, bytes], _Cipher]          # (key, iv)
    cfb: Callable[[bytes, bytes], _Cipher]          # (key, iv), 128-bit segments
    ofb: Callable[[bytes, bytes], _Cipher]          # (key, iv)
    #: (key, initial counter block, nonce length): the counter is the block's last
    #: ``16 - nonce length`` bytes, big-endian
    ctr: Callable[[bytes, bytes, int], _Cipher]
    #: (key) -> a maker of GCM objects with 16-byte tags under that key: (nonce) ->
    #: object. Make one maker per key and keep it (it may hold GCM's hash subkey).
    gcm: Callable[[bytes], Callable[[bytes], _Cipher]]


def _public_constructors() -> _AESConstructors:
    """The constructors through pycryptodome's public ``AES.new``."""
    new = AES.new
    return _AESConstructors(
        False,
        lambda key: new(key, AES.MODE_ECB),
        lambda key, iv: new(key, AES.MODE_CBC, iv=iv),
        lambda key, iv: new(key, AES.MODE_CFB, iv=iv, segment_size=128),
        lambda key, iv: new(key, AES.MODE_OFB, iv=iv),
        lambda key, block, prefix: new(key, AES.MODE_CTR, nonce=block[:prefix],
                                       initial_value=block[prefix:]),
        lambda key: lambda nonce: new(key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_SIZE))


def _direct_constructors() -> _AESConstructors:
    """The same cipher objects, made the way ``AES.new`` makes them after its keyword
    handling: the AES key schedule (``AES._create_base_cipher``) handed to the mode's
    class. That handling is a third of the cost of a cipher object (1.5 of 4.7 us for
    CBC here), paid twice per encrypted request. GCM objects come from pycryptodome's
    ``GcmMode`` given :class:`_GcmParts` in place of the AES module (22 -> 12 us per
    object). These names are pycryptodome internals (the same in 3.23 and 4.4, the
    versions checked): raises ImportError or AttributeError where they are missing, and
    :func:`_choose_constructors` checks the result against ``AES.new``."""
    from Crypto.Cipher import _mode_gcm
    from Crypto.Cipher._mode_cbc import CbcMode
    from Crypto.Cipher._mode_cfb import CfbMode
    from Crypto.Cipher._mode_ctr import CtrMode
    from Crypto.Cipher._mode_ecb import EcbMode
    from Crypto.Cipher._mode_ofb import OfbMode

    schedule: Callable[[dict[str, bytes]], Any] = AES._create_base_cipher
    gcm_mode = _mode_gcm.GcmMode
    # What AES.new(MODE_GCM) picks: the carry-less multiply GHASH where the CPU has it
    ghash = _mode_gcm._ghash_clmul or _mode_gcm._ghash_portable

    def ecb(key: bytes) -> _Cipher:
        state = schedule({"key": key})
        state.block_size = BLOCK_SIZE  # EcbMode reads it from the key schedule
        return EcbMode(state)

    def ctr(key: bytes, block: bytes, prefix: int, **extra: Any) -> _Cipher:
        return CtrMode(schedule({"key": key}), block, prefix, BLOCK_SIZE - prefix, False,
                       **extra)

    def gcm(key: bytes) -> Callable[[bytes], _Cipher]:
        parts: Any = _GcmParts(key, ecb, ctr)  # stands in for the AES module
        return lambda nonce: gcm_mode(parts, key, nonce, TAG_SIZE, {}, ghash)

    return _AESConstructors(
        True,
        ecb,
        lambda key, iv: CbcMode(schedule({"key": key}), iv),
        lambda key, iv: CfbMode(schedule({"key": key}), iv, BLOCK_SIZE),
        lambda key, iv: OfbMode(schedule({"key": key}), iv),
        ctr,
        gcm)


class _GcmParts:
    """What pycryptodome's ``GcmMode`` asks of its cipher module, for one key, without
    ``AES.new``: its two CTR objects, made directly, and the ECB encryption of the zero
    block (GCM's hash subkey), computed once per key instead of once per message. Every
    ``GcmMode`` of pycryptodome 3.23 and 4.4 calls :meth:`new` exactly so; the
    known-answer check of :func:`_choose_constructors` guards the rest."""

    __slots__ = ("_key", "_ecb", "_ctr", "_zero_block")

    block_size = BLOCK_SIZE
    MODE_ECB = AES.MODE_ECB
    MODE_CTR = AES.MODE_CTR

    def __init__(self, key: bytes, ecb: Callable[[bytes], _Cipher],
                 ctr: Callable[..., _Cipher]) -> None:
        self._key = key
        self._ecb = ecb
        self._ctr = ctr
        self._zero_block = _ZeroBlockECB(key, ecb)

    def new(self, key: bytes, mode: int, nonce: bytes = b"",
            initial_value: int | bytes = 0, **extra: Any) -> _Cipher:
        """``AES.new(key, mode, nonce=..., initial_value=..., **extra)`` for the ECB and
        CTR objects ``GcmMode`` makes (*extra*: pycryptodome 4's ``threads``)."""
        if mode == AES.MODE_ECB and not extra:
            return self._zero_block if key == self._key else self._ecb(key)
        if mode != AES.MODE_CTR:
            raise ValueError(f"GCM asked for AES mode {mode}")
        if isinstance(initial_value, int):
            counter = initial_value.to_bytes(BLOCK_SIZE - len(nonce), "big")
        else:
            counter = bytes(initial_value)
        return self._ctr(key, bytes(nonce) + counter, len(nonce), **extra)


class _ZeroBlockECB:
    """The ECB object ``GcmMode`` asks for to compute its hash subkey: the encryption of
    the zero block under one key, computed once. Any other block gets a fresh ECB object
    (``GcmMode`` asks for none). Holds no key schedule; stateless, so any thread."""

    __slots__ = ("_key", "_ecb", "_zero")

    def __init__(self, key: bytes, ecb: Callable[[bytes], _Cipher]) -> None:
        self._key = key
        self._ecb = ecb
        self._zero: bytes = ecb(key).encrypt(_ZERO_BLOCK)

    def encrypt(self, block: bytes) -> bytes:
        if block == _ZERO_BLOCK:
            return self._zero
        result: bytes = self._ecb(self._key).encrypt(block)
        return result


def _cipher_kinds(key: bytes, iv: bytes) -> list[Callable[[_AESConstructors], _Cipher]]:
    """One maker per kind of cipher object the profiles make from *key* and *iv*."""
    return [lambda c: c.ecb(key), lambda c: c.cbc(key, iv), lambda c: c.cfb(key, iv),
            lambda c: c.ofb(key, iv), lambda c: c.ctr(key, iv, 0),
            lambda c: c.ctr(key, iv[:8] + _ZERO8, 8),
            lambda c: c.ctr(key, iv[:12] + _GCM_COUNTER_2, 12)]


def _constructors_agree(candidate: _AESConstructors, reference: _AESConstructors) -> bool:
    """True when *candidate* encrypts and decrypts exactly as *reference* in every mode
    and key size morsock uses (a known-answer check with fixed inputs, under 1 ms)."""
    iv = bytes(range(100, 116))
    data = bytes(range(3 * BLOCK_SIZE))
    for size in (16, 24, 32):
        key = bytes(range(size))
        for make in _cipher_kinds(key, iv):
            ciphertext = make(reference).encrypt(data)
            if (make(candidate).encrypt(data) != ciphertext
                    or make(candidate).decrypt(ciphertext) != data):
                return False
        if not _gcm_agree(candidate.gcm(key), reference.gcm(key), iv[:12], iv, data):
            return False
    return True


def _gcm_agree(candidate: Callable[[bytes], _Cipher], reference: Callable[[bytes], _Cipher],
               nonce: bytes, aad: bytes, data: bytes) -> bool:
    """True when two GCM makers for one key give the same ciphertext and tag for
    (*nonce*, *aad*, *data*), the candidate's object opens it, and rejects a wrong tag.
    Raises nothing of its own (a maker's exception propagates)."""
    sealer = reference(nonce)
    sealer.update(aad)
    ciphertext, tag = sealer.encrypt(data), sealer.digest()
    sealer = candidate(nonce)
    sealer.update(aad)
    if sealer.encrypt(data) != ciphertext or sealer.digest() != tag:
        return False
    for check in (tag, bytes(a ^ 1 for a in tag)):
        opener = candidate(nonce)
        opener.update(aad)
        if opener.decrypt(ciphertext) != data:
            return False
        try:
            opener.verify(check)
            accepted = True
        except ValueError:
            accepted = False
        if accepted != (check == tag):
            return False
    return True


def _choose_constructors() -> _AESConstructors:
    """The direct constructors when they work on this pycryptodome and agree with
    ``AES.new``, else ``AES.new`` itself (logged at DEBUG). Runs once, at import."""
    public = _public_constructors()
    try:
        direct = _direct_constructors()
        if _constructors_agree(direct, public):
            return direct
        reason = "they do not match AES.new"
    except Exception as exc:  # noqa: BLE001 - any failure means: use the public API
        reason = f"{type(exc).__name__}: {exc}"
    logging.getLogger("morsock").debug(
        "AES cipher objects come from AES.new: pycryptodome's mode classes are not "
        "usable directly (%s)", reason)
    return public


#: How this process makes its AES cipher objects. The ciphers below look it up when they
#: are created (tests swap it).
_AES: _AESConstructors = _choose_constructors()


def _as_bytes(data: Buffer) -> bytes:
    """Return *data* as bytes: itself if it is bytes, else a copy of its raw bytes.

    pycryptodome reads bytes much faster than a memoryview (cffi's from_buffer costs
    about 2 us a call), so a copy of a bytearray/memoryview is cheaper than passing it.
    """
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return bytes(memoryview(data))     # other buffers; TypeError for non-buffers


def _require_key(key_text: str) -> None:
    if not isinstance(key_text, str):
        raise TypeError(f"key text must be str, not {type(key_text).__name__}")
    if not key_text:
        raise CryptoError("encryption requested but no encryption key is set",
                          ErrorCode.ENCRYPTION_REQUIRED)


def _check_size(payload_size: int) -> None:
    if payload_size > MAX_FRAME_SIZE:
        raise ValueError(f"message too large: a payload of {payload_size} bytes does not "
                         "fit a frame")


def _padded_len(n: int) -> int:
    """Length of *n* bytes after PKCS#7 padding (always 1..16 bytes added)."""
    return (n // BLOCK_SIZE + 1) * BLOCK_SIZE


def _pad(data: bytes) -> bytes:
    """Return ``data || PKCS#7 padding`` (1..16 bytes, each equal to the padding length)."""
    return data + _PADS[BLOCK_SIZE - len(data) % BLOCK_SIZE]


def _unpad(data: bytes) -> bytes | None:
    """Return *data* without its PKCS#7 padding, or None if the padding is invalid."""
    if not data:
        return None
    pad = data[-1]
    if not 1 <= pad <= BLOCK_SIZE or pad > len(data) or data[-pad:] != _PADS[pad]:
        return None
    return data[:-pad]


# --------------------------------------------------------------------------- MORMOT

@functools.cache  # once per key and process: never evicted
def mormot_key(key_text: str, key_size: KeySizeLike = KeySize.AES256) -> bytes:
    """Return the MORMOT-profile AES key of *key_text* (cached; PBKDF2 runs once).

    PBKDF2-HMAC-SHA256(UTF-8 key text, ``MORMOT_SALT``, 1000 rounds, 32 bytes) truncated
    to ``key_size // 8`` bytes. Raises :class:`CryptoError` for an empty key text and
    ValueError for an unknown key size.
    """
    _require_key(key_text)
    bits = KeySize.parse(key_size)
    raw = hashlib.pbkdf2_hmac("sha256", key_text.encode("utf-8"), MORMOT_SALT,
                              MORMOT_ITERATIONS, 32)
    return raw[:bits // 8]


def mormot_payload_size(plaintext_len: int) -> int:
    """Payload bytes of a MORMOT frame carrying *plaintext_len* bytes: 16 + padded length."""
    return IV_SIZE + _padded_len(plaintext_len)


def _mormot_factory(mode: AESMode) -> _Factory:
    """Return ``f(key, iv) -> cipher`` applying *mode* the way mORMot does."""
    aes = _AES
    if mode is AESMode.ECB:
        ecb = aes.ecb
        return lambda key, iv: ecb(key)
    if mode is AESMode.CBC:
        return aes.cbc
    if mode in (AESMode.CFB, AESMode.CFC):
        return aes.cfb
    if mode in (AESMode.OFB, AESMode.OFC):
        return aes.ofb
    ctr = aes.ctr
    if mode in (AESMode.CTR, AESMode.CTC):
        # The whole IV is the first counter block, incremented as a 128-bit integer.
        return lambda key, iv: ctr(key, iv, 0)
    if mode is AESMode.GCM:
        # GCM's keystream without its tag: J0 = IV[0:12] || 1, data from IV[0:12] || 2.
        # (A frame holds < 2**28 blocks, so GCM's 32-bit counter never wraps.)
        return lambda key, iv: ctr(key, iv[:12] + _GCM_COUNTER_2, 12)
    raise ValueError(f"unsupported AES mode {mode!r}")  # pragma: no cover


class MormotCipher:
    """The MORMOT profile (flag 1) for one key, mode and key size.

    Unauthenticated by design (it is the Delphi components' format): use it only to talk
    to Delphi peers. Stateless after construction, so one instance may be shared by any
    number of threads.
    """

    __slots__ = ("mode", "key_size", "_key", "_factory")

    def __init__(self, key_text: str, mode: ModeLike,
                 key_size: KeySizeLike = KeySize.AES256) -> None:
        """Raise :class:`CryptoError` for an empty *key_text*, ValueError for a bad mode/size."""
        self.mode: AESMode = AESMode.parse(mode)
        self.key_size: KeySize = KeySize.parse(key_size)
        self._key: bytes = mormot_key(key_text, self.key_size)
        self._factory: _Factory = _mormot_factory(self.mode)

    def __repr__(self) -> str:
        return f"MormotCipher(mode={self.mode.name}, key_size={int(self.key_size)})"

    def _encrypt(self, plaintext: Buffer, iv: bytes | None) -> tuple[bytes, bytes]:
        """Return (iv, ciphertext of the padded plaintext)."""
        src = _as_bytes(plaintext)
        pad = BLOCK_SIZE - len(src) % BLOCK_SIZE  # _pad's, reused by the size check
        _check_size(IV_SIZE + len(src) + pad)
        if iv is None:
            iv = os.urandom(IV_SIZE)
        elif len(iv) != IV_SIZE:
            raise ValueError(f"iv must be {IV_SIZE} bytes, not {len(iv)}")
        else:
            iv = bytes(iv)
        ciphertext: bytes = self._factory(self._key, iv).encrypt(src + _PADS[pad])
        return iv, ciphertext

    def encrypt(self, plaintext: Buffer, iv: bytes | None = None) -> bytes:
        """Return the payload ``IV || AES(plaintext || PKCS#7)``.

        *iv* (16 bytes) is for test vectors only; by default a fresh random IV is used.
        """
        iv, ciphertext = self._encrypt(plaintext, iv)
        return iv + ciphertext

    def seal_frame(self, plaintext: Buffer, iv: bytes | None = None) -> bytes:
        """Return a complete flag-1 frame (header + payload) carrying *plaintext*.

        *iv*: test vectors only, as in :meth:`encrypt`.
        """
        iv, ciphertext = self._encrypt(plaintext, iv)
        header = _pack_header(MAGIC, IV_SIZE + len(ciphertext), FLAG_MORMOT)
        return b"".join((header, iv, ciphertext))

    def decrypt(self, payload: Buffer) -> bytes:
        """Return the plaintext of a flag-1 *payload*.

        Raises ``CryptoError(DECRYPT_FAILED)`` when the payload has an invalid length
        (< 32 bytes or not IV + whole blocks) or invalid PKCS#7 padding (which a wrong
        key almost always gives). Without authentication, a tampered frame whose padding
        stays valid decrypts to modified data: that is the MORMOT profile's nature.
        """
        data = _as_bytes(payload)
        n = len(data)
        if n < IV_SIZE + BLOCK_SIZE or n % BLOCK_SIZE:
            raise CryptoError(f"MORMOT payload has an invalid length of {n} bytes (expected "
                              "a 16-byte IV and a positive multiple of 16)", _DECRYPT_FAILED)
        padded: bytes = self._factory(self._key, data[:IV_SIZE]).decrypt(data[IV_SIZE:])
        plaintext = _unpad(padded)
        if plaintext is None:
            raise CryptoError("MORMOT payload does not decrypt: invalid PKCS#7 padding "
                              "(wrong key, mode or key size?)", _DECRYPT_FAILED)
        return plaintext


# --------------------------------------------------------------------- AUTHENTICATED

@functools.cache  # once per key and process: never evicted
def authenticated_master_key(key_text: str) -> bytes:
    """Return the AUTHENTICATED-profile master key of *key_text* (cached per process).

    PBKDF2-HMAC-SHA256(UTF-8 key text, ``AUTH_SALT``, 600,000 rounds, 32 bytes): about
    0.1 s the first time for each key text, free afterwards. Raises :class:`CryptoError`
    for an empty key text.
    """
    _require_key(key_text)
    return hashlib.pbkdf2_hmac("sha256", key_text.encode("utf-8"), AUTH_SALT,
                               AUTH_ITERATIONS, 32)


def authenticated_payload_size(mode: ModeLike, plaintext_len: int) -> int:
    """Payload bytes of a flag-2 data frame carrying *plaintext_len* bytes in *mode*."""
    mode = AESMode.parse(mode)
    if mode is AESMode.GCM:
        return plaintext_len + TAG_SIZE
    if mode in (AESMode.CTR, AESMode.CTC):
        return plaintext_len + MAC_SIZE
    if mode is AESMode.ECB:
        return _padded_len(plaintext_len) + MAC_SIZE
    if mode is AESMode.CBC:
        return IV_SIZE + _padded_len(plaintext_len) + MAC_SIZE
    return IV_SIZE + plaintext_len + MAC_SIZE      # CFB, OFB, CFC, OFC


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) with the standard library's HMAC."""
    prk = hmac.digest(salt, ikm, "sha256")
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:length]


def _kdf_info(mode: AESMode, key_size: KeySize) -> bytes:
    return b"morsock v1 %s %d" % (mode.value.encode("ascii"), int(key_size))


class _SessionKeys:
    __slots__ = ("enc_c2s", "mac_c2s", "enc_s2c", "mac_s2c", "confirm", "export")

    def __init__(self, master: bytes, client_random: bytes, server_random: bytes,
                 mode: AESMode, key_size: KeySize) -> None:
        klen = key_size // 8
        okm = _hkdf_sha256(master, client_random + server_random, _kdf_info(mode, key_size),
                           2 * klen + 4 * MAC_SIZE)
        self.enc_c2s = okm[:klen]
        self.mac_c2s = okm[klen:klen + MAC_SIZE]
        pos = klen + MAC_SIZE
        self.enc_s2c = okm[pos:pos + klen]
        self.mac_s2c = okm[pos + klen:pos + klen + MAC_SIZE]
        pos += klen + MAC_SIZE
        self.confirm = okm[pos:pos + MAC_SIZE]
        self.export = okm[pos + MAC_SIZE:]


def _auth_error(message: str) -> CryptoError:
    return CryptoError(message, _AUTH_FAILED)


class AuthSession:
    """Keys and sequence counters of one AUTHENTICATED connection (one side of it).

    Made by :meth:`ClientHandshake.finish` or :func:`server_handshake`, never reused
    for another connection. :meth:`seal` and :meth:`open` are NOT thread-safe: the caller
    serialises sends (one lock) and serialises receives (another lock); a send and a
    receive may run at the same time. Frames must be opened in the order they arrived
    and sent in the order they were sealed.
    """

    __slots__ = ("mode", "key_size", "_send_key", "_recv_key", "_send_mac", "_recv_mac",
                 "_send_seq", "_recv_seq", "_broken", "_seal_impl", "_open_impl",
                 "_iv_len", "_padded", "_factory", "_send_gcm", "_recv_gcm", "binding")

    def __init__(self, mode: ModeLike, key_size: KeySizeLike, send_key: bytes,
                 send_mac_key: bytes, recv_key: bytes, recv_mac_key: bytes, *,
                 binding: bytes = b"") -> None:
        """Internal: use the handshake. Keys are per direction and per connection."""
        self.mode: AESMode = AESMode.parse(mode)
        self.key_size: KeySize = KeySize.parse(key_size)
        #: k_export of the handshake (32 bytes, the same on both ends of the connection,
        #: unique to it): what the session layer binds its hello to. Never sent.
        self.binding: bytes = bytes(binding)
        self._send_key = bytes(send_key)
        self._recv_key = bytes(recv_key)
        self._send_mac = hmac.new(send_mac_key, digestmod="sha256")
        self._recv_mac = hmac.new(recv_mac_key, digestmod="sha256")
        self._send_seq = 0
        self._recv_seq = 0
        self._broken = False
        mode = self.mode
        self._iv_len = 0
        self._padded = mode in (AESMode.ECB, AESMode.CBC)
        self._factory: _Factory
        aes = _AES
        if mode is AESMode.GCM:
            self._seal_impl: Callable[[bytes, int], bytes] = self._seal_gcm
            self._open_impl: Callable[[bytes, int], bytes] = self._open_gcm
            self._send_gcm: Callable[[bytes], _Cipher] = aes.gcm(self._send_key)
            self._recv_gcm: Callable[[bytes], _Cipher] = aes.gcm(self._recv_key)
            return
        self._seal_impl = self._seal_etm
        self._open_impl = self._open_etm
        if mode is AESMode.ECB:
            ecb = aes.ecb
            self._factory = lambda key, _seq8: ecb(key)
        elif mode in (AESMode.CTR, AESMode.CTC):
            # Counter block = seq (8 bytes) || block number (8 bytes): one 2**64-block
            # counter space per frame, never shared with another frame.
            ctr = aes.ctr
            self._factory = lambda key, seq8: ctr(key, seq8 + _ZERO8, 8)
        else:
            self._iv_len = IV_SIZE
            if mode is AESMode.CBC:
                self._factory = aes.cbc
            elif mode in (AESMode.CFB, AESMode.CFC):
                self._factory = aes.cfb
            else:   # OFB, OFC
                self._factory = aes.ofb

    def __repr__(self) -> str:
        return (f"AuthSession(mode={self.mode.name}, key_size={int(self.key_size)}, "
                f"send_seq={self._send_seq}, recv_seq={self._recv_seq}, "
                f"broken={self._broken})")

    @property
    def send_seq(self) -> int:
        """Sequence number the next sealed frame gets (= frames sealed so far)."""
        return self._send_seq

    @property
    def recv_seq(self) -> int:
        """Sequence number the next opened frame must carry (= frames opened so far)."""
        return self._recv_seq

    @property
    def broken(self) -> bool:
        """True once a frame failed to open: every later :meth:`open` raises."""
        return self._broken

    def payload_size(self, plaintext_len: int) -> int:
        """Payload bytes :meth:`seal` produces for *plaintext_len* bytes."""
        return authenticated_payload_size(self.mode, plaintext_len)

    # -- public API

    def seal(self, plaintext: Buffer) -> bytes:
        """Return a COMPLETE flag-2 frame (header + payload) carrying *plaintext*.

        Consumes one send sequence number. Raises ValueError if the frame would exceed
        4 GiB, CryptoError if the 2**64 sequence numbers are used up.
        """
        seq = self._send_seq
        if seq >= SEQ_LIMIT:
            raise CryptoError("AUTHENTICATED session exhausted its sequence numbers; "
                              "reconnect", _AUTH_FAILED)
        frame = self._seal_impl(_as_bytes(plaintext), seq)
        self._send_seq = seq + 1
        return frame

    def open(self, payload: Buffer) -> bytes:
        """Return the plaintext of the next received flag-2 frame's *payload*.

        Raises ``CryptoError(AUTHENTICATION_FAILED)`` for anything that is not exactly
        the next frame the peer sealed on this connection; the session is broken from
        then on (close the connection).
        """
        if self._broken:
            raise _auth_error("AUTHENTICATED session is broken by an earlier "
                              "authentication failure")
        seq = self._recv_seq
        if seq >= SEQ_LIMIT:
            self._broken = True
            raise _auth_error("AUTHENTICATED session exhausted its sequence numbers")
        try:
            plaintext = self._open_impl(_as_bytes(payload), seq)
        except CryptoError:
            self._broken = True
            raise
        self._recv_seq = seq + 1
        return plaintext

    # -- GCM

    def _seal_gcm(self, src: bytes, seq: int) -> bytes:
        n = len(src)
        size = n + TAG_SIZE
        _check_size(size)
        seq8 = _pack_seq(seq)
        header = _pack_header(MAGIC, size, FLAG_AUTHENTICATED)
        cipher = self._send_gcm(_GCM_NONCE_PREFIX + seq8)
        cipher.update(header + _GCM_AAD_PAD)
        ciphertext: bytes = cipher.encrypt(src) if n else b""
        return b"".join((header, ciphertext, cipher.digest()))

    def _open_gcm(self, payload: bytes, seq: int) -> bytes:
        size = len(payload)
        if size < TAG_SIZE:
            raise _auth_error(f"AUTHENTICATED GCM payload too short ({size} bytes)")
        n = size - TAG_SIZE
        seq8 = _pack_seq(seq)
        cipher = self._recv_gcm(_GCM_NONCE_PREFIX + seq8)
        cipher.update(_pack_header(MAGIC, size, FLAG_AUTHENTICATED) + _GCM_AAD_PAD)
        plaintext: bytes = cipher.decrypt(payload[:n]) if n else b""
        try:
            cipher.verify(payload[n:])
        except ValueError:
            raise _auth_error("AUTHENTICATED frame failed authentication (tampered, "
                              "replayed, reordered, lost or not from this connection)"
                              ) from None
        return plaintext

    # -- encrypt-then-MAC (every other mode)

    def _seal_etm(self, src: bytes, seq: int) -> bytes:
        n = len(src)
        iv_len = self._iv_len
        clen = _padded_len(n) if self._padded else n
        size = iv_len + clen + MAC_SIZE
        _check_size(size)
        seq8 = _pack_seq(seq)
        header = _pack_header(MAGIC, size, FLAG_AUTHENTICATED)
        if iv_len:
            iv = os.urandom(iv_len)
            cipher = self._factory(self._send_key, iv)
        else:
            iv = b""
            cipher = self._factory(self._send_key, seq8)
        if self._padded:
            ciphertext: bytes = cipher.encrypt(_pad(src))
        else:
            ciphertext = cipher.encrypt(src) if n else b""
        mac = self._send_mac.copy()
        mac.update(header + seq8 + iv)
        mac.update(ciphertext)
        return b"".join((header, iv, ciphertext, mac.digest()))

    def _open_etm(self, payload: bytes, seq: int) -> bytes:
        size = len(payload)
        iv_len = self._iv_len
        clen = size - iv_len - MAC_SIZE
        if clen < 0 or (self._padded and (clen < BLOCK_SIZE or clen % BLOCK_SIZE)):
            raise _auth_error(f"AUTHENTICATED {self.mode.name} payload has an invalid "
                              f"length ({size} bytes)")
        seq8 = _pack_seq(seq)
        mac_at = size - MAC_SIZE
        iv = payload[:iv_len]
        ciphertext = payload[iv_len:mac_at]
        mac = self._recv_mac.copy()
        mac.update(_pack_header(MAGIC, size, FLAG_AUTHENTICATED) + seq8 + iv)
        mac.update(ciphertext)
        if not hmac.compare_digest(mac.digest(), payload[mac_at:]):
            raise _auth_error("AUTHENTICATED frame failed authentication (tampered, "
                              "replayed, reordered, lost or not from this connection)")
        if not clen:
            return b""
        cipher = self._factory(self._recv_key, iv if iv_len else seq8)
        decrypted: bytes = cipher.decrypt(ciphertext)
        if not self._padded:
            return decrypted
        plaintext = _unpad(decrypted)
        if plaintext is None:       # cannot happen for a frame that passed the MAC
            raise _auth_error("AUTHENTICATED frame has invalid padding")
        return plaintext


# ------------------------------------------------------------------------- handshake

def _hello_fields(mode: AESMode, key_size: KeySize) -> bytes:
    return bytes((_MODES.index(mode), int(key_size) // 64))


def _random(value: bytes | None) -> bytes:
    if value is None:
        return os.urandom(RANDOM_SIZE)
    if len(value) != RANDOM_SIZE:
        raise ValueError(f"handshake random must be {RANDOM_SIZE} bytes")
    return bytes(value)


def _describe(fields: bytes) -> str:
    mode_index, size_code = fields[0], fields[1]
    mode = _MODES[mode_index].name if mode_index < len(_MODES) else f"mode #{mode_index}"
    return f"AES-{size_code * 64}-{mode}"


class ClientHandshake:
    """The client's side of the AUTHENTICATED handshake.

    Send :attr:`hello_frame` right after connecting, before any other frame; pass the
    payload of the server's first flag-2 frame to :meth:`finish`, which returns the
    connection's :class:`AuthSession`. Single use.
    """

    __slots__ = ("mode", "key_size", "hello_frame", "_master", "_hello", "_done")

    def __init__(self, key_text: str, mode: ModeLike = AESMode.CBC,
                 key_size: KeySizeLike = KeySize.AES256, *,
                 client_random: bytes | None = None) -> None:
        """Raise :class:`CryptoError` for an empty key. *client_random*: tests only."""
        self.mode: AESMode = AESMode.parse(mode)
        self.key_size: KeySize = KeySize.parse(key_size)
        self._master = authenticated_master_key(key_text)
        self._hello = HELLO_MAGIC + _hello_fields(self.mode, self.key_size) + \
            _random(client_random)
        #: The complete ClientHello frame (flag 2) to send first.
        self.hello_frame: bytes = encode_frame(self._hello, FLAG_AUTHENTICATED)
        self._done = False

    def finish(self, payload: Buffer) -> AuthSession:
        """Check the ServerHello *payload*; return this connection's session.

        Raises ``CryptoError(AUTHENTICATION_FAILED)`` if it is not a valid ServerHello,
        if the server's key confirmation does not match (wrong key, or a mode/key size
        the server did not accept), or if called twice.
        """
        if self._done:
            raise _auth_error("AUTHENTICATED handshake already finished")
        self._done = True
        data = bytes(payload)
        if data[:4] == REFUSAL_MAGIC:
            reason = data[4:4 + REFUSAL_MAX].decode("utf-8", "replace")
            reason = "".join(c if c.isprintable() else "?" for c in reason)
            raise _auth_error(f"the server refused the AUTHENTICATED handshake: {reason}")
        if len(data) != SERVER_HELLO_SIZE or data[:4] != HELLO_MAGIC:
            raise _auth_error("expected a morsock AUTHENTICATED server hello "
                              f"({SERVER_HELLO_SIZE} bytes starting b'MSA1'), got "
                              f"{len(data)} bytes")
        server_random = data[4:4 + RANDOM_SIZE]
        keys = _SessionKeys(self._master, self._hello[6:], server_random, self.mode,
                            self.key_size)
        expected = hmac.digest(keys.confirm, self._hello + server_random, "sha256")
        if not hmac.compare_digest(expected, data[4 + RANDOM_SIZE:]):
            raise _auth_error("AUTHENTICATED handshake failed: the server's key "
                              "confirmation does not match (wrong key?): the client and "
                              "the server have different encryption_key values")
        return AuthSession(self.mode, self.key_size, keys.enc_c2s, keys.mac_c2s,
                           keys.enc_s2c, keys.mac_s2c, binding=keys.export)


def server_handshake(key_text: str, mode: ModeLike, key_size: KeySizeLike,
                     hello_payload: Buffer, *, server_random: bytes | None = None
                     ) -> tuple[bytes, AuthSession]:
    """Answer a ClientHello: return (complete ServerHello frame, session).

    *hello_payload* is the payload of the first flag-2 frame the client sent. Raises
    ``CryptoError(AUTHENTICATION_FAILED)`` if it is not a morsock ClientHello or asks for
    another mode or key size; the connection should then be closed without a reply.
    *server_random*: tests only.
    """
    mode = AESMode.parse(mode)
    key_size = KeySize.parse(key_size)
    master = authenticated_master_key(key_text)
    hello = bytes(hello_payload)
    if len(hello) != CLIENT_HELLO_SIZE or hello[:4] != HELLO_MAGIC:
        raise _auth_error("expected a morsock AUTHENTICATED client hello "
                          f"({CLIENT_HELLO_SIZE} bytes starting b'MSA1'), got "
                          f"{len(hello)} bytes")
    fields = _hello_fields(mode, key_size)
    if hello[4:6] != fields:
        raise _auth_error(f"AUTHENTICATED handshake failed: mode/key size mismatch (client "
                          f"{_describe(hello[4:6])}, server {_describe(fields)}): set "
                          f"encryption_mode and encryption_key_size alike on both sides")
    srv_random = _random(server_random)
    keys = _SessionKeys(master, hello[6:], srv_random, mode, key_size)
    confirm = hmac.digest(keys.confirm, hello + srv_random, "sha256")
    frame = encode_frame(HELLO_MAGIC + srv_random + confirm, FLAG_AUTHENTICATED)
    return frame, AuthSession(mode, key_size, keys.enc_s2c, keys.mac_s2c,
                              keys.enc_c2s, keys.mac_c2s, binding=keys.export)


def is_client_hello(payload: Buffer) -> bool:
    """Whether a flag-2 *payload* is shaped like a ClientHello: only a morsock client in
    the AUTHENTICATED profile sends one, so only such a client ever gets a refusal."""
    return len(payload) == CLIENT_HELLO_SIZE and bytes(payload[:4]) == HELLO_MAGIC


def refusal_frame(reason: str) -> bytes:
    """The frame a server sends a ClientHello it cannot accept (see REFUSAL_MAGIC)."""
    text = reason.encode("utf-8")[:REFUSAL_MAX]
    return encode_frame(REFUSAL_MAGIC + text, FLAG_AUTHENTICATED)
