"""Component settings: the :class:`Setting` descriptor and the converters that check a
value's type and range when it is given or set (a refused value raises ``TypeError`` or
``ValueError`` naming the setting).

Not public: the settings themselves are documented on :class:`~morsock.Server` and
:class:`~morsock.Client`.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
import textwrap
from enum import Enum
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar, overload

__all__ = ["Setting"]

T = TypeVar("T")


class Setting(property, Generic[T]):
    """A component setting: a plain attribute while the component is stopped.

    Setting one while it runs raises :class:`MorsockError`, unless the setting is
    ``live`` (read afresh each time it is used, so a change takes effect at once).

    Reading one is a C-level property read (``operator.attrgetter`` on the instance's
    ``_setting_<name>``, which :class:`Component` fills in with the defaults): settings are
    read on hot paths.
    """

    def __init__(self, default: T, convert: Callable[[Any], T] | None = None,
                 live: bool = False, doc: str = "") -> None:
        self.default = default
        self.convert = convert
        self.live = live
        self.doc = doc  # the description alone (docs/gen_settings.py tabulates it)
        self.name = ""
        self._key = ""
        shown = (f"{type(default).__name__}.{default.name}" if isinstance(default, Enum)
                 else repr(default))
        when = "may also be set while running." if live else "set it while stopped."
        text = "\n".join(textwrap.wrap(f"{doc} Default: {shown}; {when}", 76))
        super().__init__(None, self._assign, None, text)
        self.__doc__ = text

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self._key = "_setting_" + name  # where an instance keeps its value
        text = self.__doc__
        property.__init__(self, attrgetter(self._key), self._assign, None, text)
        self.__doc__ = text  # (3.9 would take the getter's)

    if TYPE_CHECKING:
        @overload
        def __get__(self, obj: None, objtype: Any = None) -> Setting[T]: ...
        @overload
        def __get__(self, obj: object, objtype: Any = None) -> T: ...
        def __get__(self, obj: object | None, objtype: Any = None) -> Any: ...
        def __set__(self, obj: Any, value: Any) -> None: ...

    def _assign(self, obj: Any, value: Any) -> None:
        if self.convert is not None:
            try:
                value = self.convert(value)
            except (TypeError, ValueError) as exc:  # say which setting refused the value
                kind = TypeError if isinstance(exc, TypeError) else ValueError
                raise kind(f"{type(obj).__name__}.{self.name}: {exc}") from exc
        if not self.live and obj._is_running():
            obj._before_change(self.name)
        obj.__dict__[self._key] = value

    @staticmethod
    def fill_defaults(obj: object) -> None:
        """Give *obj* the default of every setting of its class (before any is read)."""
        values = obj.__dict__
        for klass in reversed(type(obj).__mro__):
            for attr in vars(klass).values():
                if isinstance(attr, Setting):
                    values.setdefault(attr._key, attr.default)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _integer(value: Any) -> int:
    """An ``int`` (or anything with ``__index__``), never a bool, float or str."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"must be an int, not {_kind(value)}")
    return operator.index(value)


def _non_negative_int(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"must be >= 0, not {number}")
    return number


def _port(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        raise TypeError(f"a TCP port is an int, not the str {value!r}: pass {int(value)}")
    number = _integer(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"a TCP port is 0-65535, not {number}")
    return number


def _positive_int(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError(f"must be >= 1, not {number}")
    return number


def _boolean(value: Any) -> bool:
    """True or False only: ``bool("no")`` is True, so nothing else is guessed at."""
    if not isinstance(value, bool):
        raise TypeError(f"must be True or False, not {_kind(value)}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"must be a number of seconds, not {_kind(value)}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite number of seconds, not {seconds}")
    return seconds


def _optional_seconds(value: Any) -> float | None:
    if value is None:
        return None
    seconds = _number(value)
    if seconds <= 0:
        raise ValueError(f"must be > 0 seconds, or None (off), not {value!r}")
    return seconds


def _seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds <= 0:
        raise ValueError(f"must be > 0 seconds, not {value!r}")
    return seconds


def _non_negative_seconds(value: Any) -> float:
    seconds = _number(value)
    if seconds < 0:
        raise ValueError(f"must be >= 0 seconds, not {value!r}")
    return seconds


def check_timeout(value: Any, where: str = "request(timeout=...)") -> float:
    """A call's timeout argument: finite seconds > 0, else TypeError/ValueError naming
    *where*."""
    try:
        return _seconds(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


def _address(value: Any, empty_ok: bool) -> str:
    if not isinstance(value, str):
        hint = " (host forgotten? pass host first, then port)" if isinstance(value, int) else ""
        raise TypeError(f"a host is a str (a name or an IP address), not "
                        f"{_kind(value)}{hint}")
    text = value.strip()
    if text != value or (not text and not empty_ok):
        raise ValueError(f"{value!r} is not a host name or IP address")
    if text.isdigit():
        raise ValueError(f"{value!r} is not a host name or IP address (a port? pass it "
                         f"as port=)")
    head, colon, tail = text.rpartition(":")
    if colon and tail.isdigit() and (text.startswith("[") or ":" not in head):
        raise ValueError(f"{value!r} holds a port: pass host={head.strip('[]')!r}, "
                         f"port={int(tail)}")
    return text


def _client_host(value: Any) -> str:
    return _address(value, empty_ok=False)


def _server_host(value: Any) -> str:
    """'' is every interface, like '0.0.0.0'/'::' (socket.bind's convention)."""
    return _address(value, empty_ok=True)


def _optional_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"must be a host name (str) or None, not {_kind(value)}")
    if not value.strip():
        raise ValueError("must be a host name or None, not an empty str")
    return value


def _passphrase(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        raise TypeError("is a str passphrase (used as its UTF-8 bytes), not bytes: "
                        "decode it first")
    if not isinstance(value, str):
        raise TypeError(f"must be a str passphrase ('' for no encryption), not {_kind(value)}")
    return value


def _event_queue(value: Any) -> Any:
    from .events import EventQueue
    if value is not None and not isinstance(value, EventQueue):
        raise TypeError(f"must be a morsock.EventQueue or None, not {_kind(value)}")
    return value


def _logger(value: Any) -> Any:
    if value is not None and not isinstance(value, (logging.Logger, logging.LoggerAdapter)):
        raise TypeError(f"must be a logging.Logger or None, not {_kind(value)}")
    return value


def _enum(parse: Callable[[Any], T]) -> Callable[[Any], T]:
    """An enum setting: its members and their names (*parse*); no bool or float."""
    def convert(value: Any) -> T:
        if isinstance(value, (bool, float)):
            raise TypeError(f"must be a member or name, not {_kind(value)}")
        return parse(value)
    return convert


def _ssl_context(value: Any) -> Any:
    from .tls import check_ssl_context
    return check_ssl_context(value)
