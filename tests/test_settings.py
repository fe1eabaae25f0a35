"""Every setting refuses nonsense (bools as ints, numbers as strings, NaN, negative sizes
and timeouts, a port inside host) with TypeError/ValueError naming the setting, before any
network activity, and keeps its value; and the sensible values still pass."""

from __future__ import annotations

import logging
import math
import socket
from typing import Any, List, Tuple

import pytest

from morsock import Client, Server

LOCAL = "127.0.0.1"

T, V = TypeError, ValueError
#: (setting, bad value, exception) for both components
COMMON: List[Tuple[str, Any, type]] = [
    ("port", "3434", T), ("port", 3.5, T), ("port", True, T), ("port", None, T),
    ("port", -1, V), ("port", 65536, V),
    ("connection_timeout", -1, V), ("connection_timeout", 0, V),
    ("connection_timeout", math.nan, V), ("connection_timeout", math.inf, V),
    ("connection_timeout", "10", T), ("connection_timeout", True, T),
    ("events_use_main_thread", 1, T), ("events_use_main_thread", "no", T),
    ("event_queue", "queue", T),
    ("encryption_key", b"key", T), ("encryption_key", 1234, T),
    ("encryption_mode", "XYZ", V), ("encryption_mode", True, T),
    ("encryption_key_size", 100, V), ("encryption_key_size", 256.0, T),
    ("encryption_key_size", True, T),
    ("encryption_profile", "none", V),
    ("require_encryption", 1, T), ("require_encryption", "yes", T),
    ("keep_alive", 0, T), ("no_delay", None, T),
    ("keepalive_idle", 0, V), ("keepalive_idle", 2.5, T), ("keepalive_idle", True, T),
    ("keepalive_interval", -5, V), ("keepalive_count", "3", T),
    ("max_message_size", 0, V), ("max_message_size", -1, V), ("max_message_size", 1e6, T),
    ("max_message_size", True, T),
    ("max_send_buffer", 0, V), ("max_send_buffer", "8M", T),
    ("max_receive_backlog", -1, V), ("max_receive_backlog", 1.5, T),
    ("ssl_context", "tls", T), ("logger", "morsock", T),
]
SERVER: List[Tuple[str, Any, type]] = COMMON + [
    ("host", 0, T), ("host", "127.0.0.1:3434", V), ("host", "3434", V),
    ("host", " 127.0.0.1", V),
    ("max_connections", 0, V), ("max_connections", True, T), ("max_connections", 1.0, T),
    ("thread_pool_size", 0, V), ("thread_pool_size", "4", T),
    ("reuse_port", 1, T),
    ("idle_timeout", 0, V), ("idle_timeout", -1, V), ("idle_timeout", math.nan, V),
    ("idle_timeout", "30", T),
    ("backlog", 0, V), ("backlog", False, T),
    ("resume_window", -1, V), ("resume_window", math.nan, V), ("resume_window", "30", T),
    ("resume_window", True, T),
    ("backplane", "redis://127.0.0.1:6379", T), ("backplane", object(), T),
]
CLIENT: List[Tuple[str, Any, type]] = COMMON + [
    ("host", 3434, T), ("host", None, T), ("host", "", V), ("host", "3434", V),
    ("host", "127.0.0.1:3434", V), ("host", "localhost:80", V), ("host", "[::1]:3434", V),
    ("auto_reconnect", 1, T), ("auto_reconnect", "false", T),
    ("reconnect_strategy", "sometimes", V), ("reconnect_strategy", 1.0, T),
    ("reconnect_interval", 0, V), ("reconnect_interval", -5, V),
    ("reconnect_interval", 5.5, T), ("reconnect_interval", True, T),
    ("reconnect_max_attempts", -1, V), ("reconnect_max_attempts", "10", T),
    ("reconnect_max_interval", 0, V), ("reconnect_max_interval", math.nan, T),
    ("server_hostname", 5, T), ("server_hostname", "", V),
    ("resumable", 1, T), ("resumable", "yes", T),
    ("send_data_replies", 1, T),
]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused setting never reaches the network: no name lookup, no socket."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("network activity for a refused setting")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize("name, value, kind", SERVER,
                         ids=[f"{n}={v!r}" for n, v, _ in SERVER])
def test_server_setting_refuses_nonsense(name: str, value: Any, kind: type,
                                         no_network: None) -> None:
    with pytest.raises(kind, match=rf"^Server\.{name}: "):
        Server(**{"port": 0, name: value})
    server = Server(port=0)
    before = getattr(server, name)
    with pytest.raises(kind, match=rf"^Server\.{name}: "):
        setattr(server, name, value)
    assert getattr(server, name) == before or (before != before)  # unchanged


@pytest.mark.parametrize("name, value, kind", CLIENT,
                         ids=[f"{n}={v!r}" for n, v, _ in CLIENT])
def test_client_setting_refuses_nonsense(name: str, value: Any, kind: type,
                                         no_network: None) -> None:
    with pytest.raises(kind, match=rf"^Client\.{name}: "):
        Client(**{"host": LOCAL, "port": 1, name: value})
    client = Client(LOCAL, 1)
    before = getattr(client, name)
    with pytest.raises(kind, match=rf"^Client\.{name}: "):
        setattr(client, name, value)
    assert getattr(client, name) == before


def test_client_with_the_host_forgotten_says_so(no_network: None) -> None:
    with pytest.raises(TypeError, match=r"Client\.host: .*host forgotten"):
        Client(3434)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pass host='127\.0\.0\.1', port=3434"):
        Client("127.0.0.1:3434")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "fe80::1%lo",
                                  "example.org", "2001:db8::1"])
def test_sensible_hosts_pass(host: str) -> None:
    assert Client(host, 1).host == host


def test_sensible_values_pass_and_are_kept() -> None:
    server = Server(port=0, host="", connection_timeout=2.5, idle_timeout=None,
                    thread_pool_size=2, max_message_size=1, reuse_port=False,
                    encryption_key=None, encryption_mode="amGCM", encryption_key_size="128",
                    logger=logging.getLogger("x"))
    assert (server.host, server.connection_timeout, server.max_message_size) == ("", 2.5, 1)
    assert server.encryption_key == "" and server.encryption_key_size == 128
    server.idle_timeout = 3
    assert server.idle_timeout == 3.0
    client = Client("localhost", 65535, connection_timeout=1, reconnect_interval=1,
                    reconnect_max_attempts=0, server_hostname="name",
                    encryption_profile="mormot", reconnect_strategy="rsFixedInterval")
    assert client.connection_timeout == 1.0 and client.reconnect_max_attempts == 0


def test_every_setting_has_rows_in_the_tables() -> None:
    """A setting added later is reviewed here too."""
    from morsock._settings import Setting
    for component, table in ((Server, SERVER), (Client, CLIENT)):
        names = {name for klass in component.__mro__ for name, attr in vars(klass).items()
                 if isinstance(attr, Setting)}
        assert names - {name for name, _, _ in table} == set(), component.__name__
