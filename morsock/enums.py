"""Enumerations of the public contract.

Every enum that a setting takes also accepts its name as a string, case-insensitively,
and the Delphi spelling with its prefix (``"amCBC"``, ``"rsBackoff"``): use
:func:`AESMode.parse` and friends, which the components call for you.
"""

from __future__ import annotations

import enum
from typing import TypeVar

_E = TypeVar("_E", bound=enum.Enum)


def _parse(cls: type[_E], value: _E | str | int, prefixes: tuple[str, ...]) -> _E:
    """Return the member of *cls* named or valued by *value*; raise ValueError otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace("-", "_")
        for prefix in prefixes:
            if text.startswith(prefix.upper()) and text[len(prefix):] in cls.__members__:
                text = text[len(prefix):]
                break
        if text in cls.__members__:
            return cls.__members__[text]
        raise ValueError(f"{value!r} is not a valid {cls.__name__}: "
                         f"choose from {', '.join(cls.__members__)}")
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None


class AESMode(enum.Enum):
    """AES chaining mode (Delphi ``TAESMode``: ``amECB`` ... ``amCTC``)."""

    ECB = "ECB"
    CBC = "CBC"
    CFB = "CFB"
    OFB = "OFB"
    CTR = "CTR"
    GCM = "GCM"
    CFC = "CFC"
    OFC = "OFC"
    CTC = "CTC"

    @classmethod
    def parse(cls, value: AESMode | str) -> AESMode:
        """Accept a member, ``"cbc"``, ``"CBC"`` or ``"amCBC"`` (case-insensitive)."""
        return _parse(cls, value, ("AM",))


class KeySize(enum.IntEnum):
    """AES key size in bits (Delphi ``TAESKeySize``)."""

    AES128 = 128
    AES192 = 192
    AES256 = 256

    @classmethod
    def parse(cls, value: KeySize | str | int) -> KeySize:
        """Accept a member, 128/192/256, ``"256"``, ``"AES256"`` or ``"aks256"``."""
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, str):
            text = value.strip().upper()
            for prefix in ("AKS", "AES"):
                if text.startswith(prefix) and text[len(prefix):].isdigit():
                    value = int(text[len(prefix):])
                    break
        return _parse(cls, value, ())


class EncryptionProfile(enum.Enum):
    """How encrypted frames are built (see the guide, "Frames and encryption profiles").

    ``AUTHENTICATED`` (default, flag 2): morsock's own authenticated format.
    ``MORMOT`` (flag 1): byte-compatible with the Delphi components, unauthenticated.
    """

    AUTHENTICATED = "AUTHENTICATED"
    MORMOT = "MORMOT"

    @classmethod
    def parse(cls, value: EncryptionProfile | str) -> EncryptionProfile:
        """Accept a member or its name (case-insensitive)."""
        return _parse(cls, value, ())


class ReconnectStrategy(enum.Enum):
    """Delay rule between reconnection attempts (Delphi ``TReconnectStrategy``)."""

    NONE = "NONE"
    IMMEDIATE = "IMMEDIATE"
    BACKOFF = "BACKOFF"
    FIXED_INTERVAL = "FIXED_INTERVAL"

    @classmethod
    def parse(cls, value: ReconnectStrategy | str) -> ReconnectStrategy:
        """Accept a member, its name, or the Delphi spelling (``"rsBackoff"``)."""
        if isinstance(value, str) and value.strip().lower() == "rsfixedinterval":
            return cls.FIXED_INTERVAL
        return _parse(cls, value, ("RS",))


class ServerState(enum.Enum):
    """Life cycle of a :class:`~morsock.Server`."""

    DISCONNECTED = "DISCONNECTED"
    STARTING = "STARTING"
    LISTENING = "LISTENING"
    STOPPING = "STOPPING"


class ClientState(enum.Enum):
    """Life cycle of a :class:`~morsock.Client`."""

    DISCONNECTED = "DISCONNECTED"
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTING = "DISCONNECTING"


class ErrorCode(enum.IntEnum):
    """Every code passed to ``on_error``.

    All are negative: positive codes passed to a client's ``on_error`` are reconnection
    attempt numbers (1, 2, ...).

    * ``CONNECTION_FAILED`` (-1) -- ``Client.connect()`` failed (refused, unreachable,
      timed out, handshake unanswered; a refused TLS or AUTHENTICATED handshake has
      its own code).
    * ``INVALID_PROTOCOL`` -- bad magic (from its first wrong byte) or an unknown flag.
    * ``MESSAGE_TOO_LARGE`` -- a header announcing more than ``max_message_size``.
    * ``DECRYPT_FAILED`` -- a MORMOT-profile frame that does not decrypt, or one this
      side has no MORMOT key for.
    * ``AUTHENTICATION_FAILED`` -- an AUTHENTICATED frame that fails its tag/MAC, is
      replayed, reordered or from another connection; a failed handshake.
    * ``ENCRYPTION_REQUIRED`` -- a plaintext frame while ``require_encryption`` is set;
      also the code of the CryptoError raised for ``encrypted=True`` without a key.
    * ``HANDLER_EXCEPTION`` -- an event handler raised.
    * ``SERVER_FULL`` -- a connection past ``max_connections`` (closed at once).
    * ``SEND_BUFFER_FULL`` -- a peer that does not read: its queue is at
      ``max_send_buffer``.
    * ``TIMEOUT`` -- a frame not completed within ``connection_timeout``,
      ``idle_timeout`` reached, keep-alive gave up, a request's order lost (a skipped
      reply: the client closes that connection).
    * ``BIND_FAILED`` -- ``Server.start()`` could not listen.
    * ``TLS_FAILED`` -- a TLS handshake failed.
    * ``CONNECTION_LOST`` -- the connection dropped under a pending operation; a
      client also reports it when the way the server closed tells why (a TLS server,
      an encrypted frame it could not decrypt).
    * ``SESSION_LOST`` -- a session (docs/guide/sessions.rst)
      could not be resumed (its window passed,
      the server restarted): the messages it had not acknowledged are handed back.
    * ``CLUSTER_UNAVAILABLE`` -- a cluster backplane (docs/guide/cluster.rst) lost its Redis
      connection (it retries) or gave up retrying.
    * ``CLUSTER_UNDELIVERED`` -- cluster messages (broadcasts, ``send_to``,
      ``disconnect_client``) that did not reach another node: the report says how many.
    * ``MAX_RECONNECT_ATTEMPTS`` (-99) -- reconnection gave up.
    """

    CONNECTION_FAILED = -1
    INVALID_PROTOCOL = -2
    MESSAGE_TOO_LARGE = -3
    DECRYPT_FAILED = -4
    AUTHENTICATION_FAILED = -5
    ENCRYPTION_REQUIRED = -6
    HANDLER_EXCEPTION = -7
    SERVER_FULL = -8
    SEND_BUFFER_FULL = -9
    TIMEOUT = -10
    BIND_FAILED = -11
    TLS_FAILED = -12
    CONNECTION_LOST = -13
    SESSION_LOST = -14
    CLUSTER_UNAVAILABLE = -20
    CLUSTER_UNDELIVERED = -21
    MAX_RECONNECT_ATTEMPTS = -99
