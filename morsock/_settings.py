"""Component settings: the :class:`Setting` descriptor and the converters that check a
value's type and range when it is given or set (a refused value raises ``TypeError`` or
``ValueError`` naming the setting).

Not public: the settings themselves are documented on :class:`~morsock.Server` and
:class:`~morsock.Client`.
"""

from __future__ import annotations

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


def _non_negative_int(value: Any) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def _port(value: Any) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"a TCP port is 0-65535, not {number}")
    return number


def _positive_int(value: Any) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _optional_seconds(value: Any) -> float | None:
    if value is None:
        return None
    seconds = float(value)
    if seconds <= 0:
        raise ValueError("must be > 0 or None")
    return seconds


def _seconds(value: Any) -> float:
    seconds = float(value)
    if seconds <= 0:
        raise ValueError("must be > 0")
    return seconds


def _non_negative_seconds(value: Any) -> float:
    seconds = float(value)
    if not seconds >= 0:
        raise ValueError("must be >= 0")
    return seconds


def _ssl_context(value: Any) -> Any:
    from .tls import check_ssl_context
    return check_ssl_context(value)
