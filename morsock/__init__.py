"""morsock: threaded message-based TCP components (selectors, no asyncio).

The Python counterpart of the Delphi "mORMot Socket Components": :class:`Server`
(TmMServer) and :class:`Client` (TmMClient) exchange framed binary messages, optionally
AES-encrypted per message, with live statistics, client management and events that
can run on the application's main thread (:class:`EventQueue`).
"""

import logging as _logging

from ._version import __version__
from .enums import (
    AESMode,
    ClientState,
    EncryptionProfile,
    ErrorCode,
    KeySize,
    ReconnectStrategy,
    ServerState,
)
from .errors import (
    ConnectError,
    CryptoError,
    MorsockError,
    NotConnectedError,
    ProtocolError,
    RequestTimeout,
    SendBufferFullError,
)

__all__ = [
    "__version__",
    "AESMode", "KeySize", "EncryptionProfile", "ReconnectStrategy", "ServerState",
    "ClientState", "ErrorCode",
    "MorsockError", "ProtocolError", "ConnectError", "NotConnectedError",
    "RequestTimeout", "SendBufferFullError", "CryptoError",
]

from .client import Client  # noqa: E402
from .events import EventQueue  # noqa: E402
from .server import Server, ServerClient  # noqa: E402

__all__ += ["EventQueue", "Server", "ServerClient", "Client"]

# A library logs; the application decides where it goes (no "last resort" stderr output).
_logging.getLogger("morsock").addHandler(_logging.NullHandler())
