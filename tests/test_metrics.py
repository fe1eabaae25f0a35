"""morsock.metrics (API.md §12): real HTTP scrapes of running components, checked against
the traffic the test made; promtool on the output; the CLI's --metrics-port."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, Tuple

import pytest

import prometheus_client  # the test extra installs it (with the metrics extra)
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from morsock import Client, ErrorCode, ReconnectStrategy, Server
from morsock.cli import _serve_metrics, build_parser
from morsock.metrics import DURATION_BUCKETS, Observer, register
from morsock.protocol import encode_frame
from morsock.testing import RawPeer, running_server

from helpers import TIMEOUT, Recorder, frame_size, scaled, wait_until
from test_samples_cli import ROOT, child, run, wait_for_file

LOCAL = "127.0.0.1"
Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


@contextlib.contextmanager
def http_endpoint(registry: CollectorRegistry) -> Iterator[str]:
    """*registry* served over real HTTP on 127.0.0.1, a free port; yields the URL."""
    httpd, thread = start_http_server(0, LOCAL, registry=registry)
    try:
        yield f"http://{LOCAL}:{httpd.server_port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        assert response.status == 200
        return str(response.read().decode("utf-8"))


def parse(text: str) -> Samples:
    """``{(sample name, labels): value}`` of an exposition text."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    return parse(scrape_text(url))


def value(samples: Samples, metric: str, **labels: str) -> float:
    key = (metric, frozenset(labels.items()))
    assert key in samples, f"{metric}{labels} not exposed; have {sorted(k[0] for k in samples)}"
    return samples[key]


def boom_or_echo(sender: Server, client: object, data: bytes) -> bytes:
    if data == b"boom":
        raise RuntimeError("boom")
    return data


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


# -- a server, scraped over HTTP after known traffic -------------------------------------------
def test_server_metrics_after_known_traffic_are_exact(registry: CollectorRegistry) -> None:
    rec = Recorder()
    payloads = [b"a", b"hello", b"x" * 300, b"y" * 70_000, b""]
    with running_server(boom_or_echo, max_connections=2,
                        on_error=rec.handler("error")) as server, \
            http_endpoint(registry) as url:
        reg = register(server, registry, name="edge")
        with Client(LOCAL, server.port) as client:
            replies = [client.request(p) for p in payloads[:-1]]
            client.send_data(payloads[-1])        # empty payload: echoed as nothing
            client.send_data(b"boom")             # handler raises: no reply
            rec.wait_for(lambda ev: any(e[3] == ErrorCode.HANDLER_EXCEPTION for e in ev))
            assert replies == payloads[:-1]
            with RawPeer(LOCAL, server.port) as second:
                wait_until(lambda: server.client_count == 2)
                third = socket.create_connection((LOCAL, server.port), timeout=TIMEOUT)
                third.close()  # refused: the server is full
                rec.wait_for(lambda ev: any(e[3] == ErrorCode.SERVER_FULL for e in ev))
                second.send_raw(b"NOTMAGIC")      # bad magic: closed, INVALID_PROTOCOL
                rec.wait_for(lambda ev: any(e[3] == ErrorCode.INVALID_PROTOCOL for e in ev))
                second.expect_close()
            wait_until(lambda: server.client_count == 1)
            samples = scrape(url)
            up_time = server.up_time

            label = {"name": "edge"}
            sent_by_client = sum(frame_size(len(p)) for p in payloads) + frame_size(4)
            assert value(samples, "morsock_connections", **label) == 1
            assert value(samples, "morsock_connections_total", **label) == 2
            assert value(samples, "morsock_connections_rejected_total", **label) == 1
            assert value(samples, "morsock_messages_received_total", **label) == 6
            assert value(samples, "morsock_messages_sent_total", **label) == 4
            # every byte that arrived: the client's frames and the peer's 8 bad bytes
            assert value(samples, "morsock_bytes_received_total", **label) == sent_by_client + 8
            assert value(samples, "morsock_bytes_sent_total", **label) == sum(
                frame_size(len(p)) for p in payloads[:-1])
            errors = {code: value(samples, "morsock_errors_total", name="edge", code=code)
                      for code in ("HANDLER_EXCEPTION", "SERVER_FULL", "INVALID_PROTOCOL")}
            assert errors == {"HANDLER_EXCEPTION": 1, "SERVER_FULL": 1, "INVALID_PROTOCOL": 1}
            assert sum(1 for k in samples if k[0] == "morsock_errors_total") == 3
            # every on_handle_command call is timed, the one that raised included
            assert value(samples, "morsock_handler_duration_seconds_count", **label) == 6
            assert value(samples, "morsock_handler_duration_seconds_bucket",
                         name="edge", le="+Inf") == 6
            assert 0 < value(samples, "morsock_handler_duration_seconds_sum", **label) < 6
            assert value(samples, "morsock_send_queue_bytes", **label) == 0
            assert value(samples, "morsock_receive_backlog_bytes", **label) == 0
            assert value(samples, "morsock_uptime_seconds", **label) in (up_time, up_time - 1)
            # the counters equal the component's own statistics
            assert value(samples, "morsock_bytes_received_total", **label) == \
                server.total_bytes_received
        reg.unregister()
    assert server._observer is None


def test_histogram_buckets_are_cumulative_and_sum_exact(registry: CollectorRegistry) -> None:
    with running_server() as server, http_endpoint(registry) as url:
        reg = register(server, registry)
        for seconds in (0.00004, 0.0001, 0.003, 0.003, 7.0, 12.0):
            reg.observer.handler_done(seconds)
        samples = scrape(url)
        reg.unregister()
    buckets = {float(dict(k[1])["le"]): v for k, v in samples.items()
               if k[0] == "morsock_handler_duration_seconds_bucket"}
    assert sorted(buckets) == [*DURATION_BUCKETS, float("inf")]
    assert buckets[0.00005] == 1 and buckets[0.0001] == 2 and buckets[0.0025] == 2
    assert buckets[0.005] == 4 and buckets[5.0] == 4 and buckets[10.0] == 5
    assert buckets[float("inf")] == 6
    assert value(samples, "morsock_handler_duration_seconds_count", name="server") == 6
    assert value(samples, "morsock_handler_duration_seconds_sum", name="server") == \
        pytest.approx(0.00004 + 0.0001 + 0.006 + 19.0)


def test_observer_quantile_interpolates_within_the_bucket() -> None:
    observer = Observer(buckets=(0.001, 0.01, 0.1))
    assert observer.quantile(0.5) is None
    for _ in range(50):
        observer.handler_done(0.0005)  # bucket (0, 0.001]
    for _ in range(50):
        observer.handler_done(0.05)    # bucket (0.01, 0.1]
    assert observer.quantile(0.5) == pytest.approx(0.001)
    assert observer.quantile(0.99) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert observer.quantile(0.25) == pytest.approx(0.0005)
    observer.handler_done(5.0)
    assert observer.quantile(1.0) == 0.1  # above every bound: the last bound
    with pytest.raises(ValueError, match="within 0..1"):
        observer.quantile(1.5)


def test_a_run_of_calls_counts_each_call_in_the_bucket_of_their_mean() -> None:
    observer = Observer(buckets=(0.001, 0.01, 0.1))
    observer.handler_done(0.003, 3)   # 3 calls, 1 ms each on average: bucket (0, 0.001]
    observer.handler_done(0.3, 2)     # 150 ms each: above every bound
    observer.handler_done(0.005)      # one call: bucket (0.001, 0.01]
    counts, total = observer.histogram()
    assert counts == [3, 1, 0, 2]
    assert total == pytest.approx(0.308)


def test_single_calls_kept_pending_and_sorted_in_are_counted_once_each() -> None:
    from morsock.metrics import _PENDING_MAX

    observer = Observer(buckets=(0.001, 0.01, 0.1))
    calls = [0.0005, 0.001, 0.002, 0.05, 0.2] * (_PENDING_MAX // 2)  # sorted in 2x
    for seconds in calls[:-7]:
        observer.handler_done(seconds)
    observer.handler_done(0.03, 4)  # a run of 4, 7.5 ms each: counted at once
    for seconds in calls[-7:]:
        observer.handler_done(seconds)
    counts, total = observer.histogram()
    per_value = len(calls) // 5
    assert counts == [2 * per_value, per_value + 4, per_value, per_value]
    assert total == pytest.approx(sum(calls) + 0.03)
    assert observer.histogram() == (counts, total)  # reading takes nothing away


def test_pipelined_frames_are_counted_one_call_each(registry: CollectorRegistry) -> None:
    def handler(server: Server, client: object, data: bytes) -> bytes:
        if data == b"boom":
            raise RuntimeError("handler fails")
        return data

    payloads = [b"%d" % n for n in range(40)]
    payloads[17] = b"boom"
    with running_server(handler) as server, http_endpoint(registry) as url:
        reg = register(server, registry)
        with RawPeer.to(server) as peer:
            peer.send_raw(b"".join(encode_frame(p) for p in payloads))  # one write
            replies = [peer.recv_frame().payload for _ in range(39)]
            assert replies == payloads[:17] + payloads[18:]
        samples = scrape(url)
        reg.unregister()
    assert value(samples, "morsock_handler_duration_seconds_count", name="server") == 40
    assert value(samples, "morsock_handler_duration_seconds_bucket", name="server",
                 le="+Inf") == 40
    assert value(samples, "morsock_handler_duration_seconds_sum", name="server") > 0
    assert value(samples, "morsock_errors_total", name="server",
                 code="HANDLER_EXCEPTION") == 1


def test_send_queue_gauge_shows_what_a_peer_does_not_read(registry: CollectorRegistry) -> None:
    with running_server() as server, http_endpoint(registry) as url:
        reg = register(server, registry)
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect((LOCAL, server.port))
        try:
            wait_until(lambda: server.client_count == 1)
            (conn,) = server.clients.values()
            conn.send_data(b"z" * 4_000_000)  # far more than the kernel buffers hold
            wait_until(lambda: conn.send_queue_size > 0 and conn.send_queue_size ==
                       value(scrape(url), "morsock_send_queue_bytes", name="server"),
                       what="the gauge to show the queued bytes")
            assert 0 < conn.send_queue_size < 4_000_000 + 8
        finally:
            peer.close()
        reg.unregister()


# -- a client ----------------------------------------------------------------------------------
def test_client_metrics_traffic_errors_and_reconnects(registry: CollectorRegistry) -> None:
    got = Recorder()

    def on_message(sender: Client, data: bytes) -> None:
        got.add("message", data)
        if data == b"boom":
            raise RuntimeError("client handler fails")

    with running_server() as server, http_endpoint(registry) as url:
        client = Client(LOCAL, server.port, auto_reconnect=True,
                        reconnect_strategy=ReconnectStrategy.IMMEDIATE,
                        on_handle_command=on_message,
                        on_connect=got.handler("connect"), on_error=got.handler("error"))
        reg = register(client, registry, name="c1")
        with client:
            assert client.request(b"ping") == b"ping"
            wait_until(lambda: server.client_count == 1)
            for data in (b"one", b"boom"):
                server.broadcast_data(data)
            got.wait_count("message", 2)
            got.wait_count("error", 1)
            server.disconnect_all_clients()            # the client reconnects by itself
            got.wait_count("connect", 2)
            wait_until(lambda: client.connected)
            samples = scrape(url)
            label = {"name": "c1"}
            assert value(samples, "morsock_connections", **label) == 1
            assert value(samples, "morsock_messages_sent_total", **label) == 1
            assert value(samples, "morsock_messages_received_total", **label) == 3
            assert value(samples, "morsock_bytes_sent_total", **label) == frame_size(4)
            assert value(samples, "morsock_bytes_received_total", **label) == \
                frame_size(4) + frame_size(3) + frame_size(4)
            assert value(samples, "morsock_client_reconnects_total", **label) == 1
            assert value(samples, "morsock_errors_total", name="c1",
                         code="HANDLER_EXCEPTION") == 1
            assert value(samples, "morsock_handler_duration_seconds_count", **label) == 2
            assert value(samples, "morsock_send_queue_bytes", **label) == 0
            assert value(samples, "morsock_receive_backlog_bytes", **label) == 0
            assert 0 <= value(samples, "morsock_uptime_seconds", **label) <= \
                client.connected_time
            assert not any(k[0].startswith("morsock_connections_") for k in samples)
        samples = scrape(url)
        assert value(samples, "morsock_connections", name="c1") == 0
        assert value(samples, "morsock_uptime_seconds", name="c1") == 0
        reg.unregister()


def test_failed_reconnection_attempts_share_one_error_label(registry: CollectorRegistry) -> None:
    with running_server() as server:
        port = server.port
        client = Client(LOCAL, port, auto_reconnect=True, reconnect_max_attempts=2,
                        reconnect_strategy=ReconnectStrategy.IMMEDIATE)
        reg = register(client, registry)
        errors = Recorder()
        client.on_error = errors.handler("error")
        client.connect()
    # the server is gone: attempts 1 and 2 fail, then MAX_RECONNECT_ATTEMPTS
    errors.wait_for(lambda ev: any(e[2] == ErrorCode.MAX_RECONNECT_ATTEMPTS for e in ev))
    with http_endpoint(registry) as url:
        samples = scrape(url)
    client.disconnect()
    reg.unregister()
    assert value(samples, "morsock_errors_total", name="client",
                 code="RECONNECT_ATTEMPT_FAILED") == 2
    assert value(samples, "morsock_errors_total", name="client",
                 code="MAX_RECONNECT_ATTEMPTS") == 1
    assert value(samples, "morsock_client_reconnects_total", name="client") == 2


# -- counters never go down --------------------------------------------------------------------
def test_clear_statistics_never_lowers_a_counter(registry: CollectorRegistry) -> None:
    with running_server() as server, http_endpoint(registry) as url:
        reg = register(server, registry)
        with Client(LOCAL, server.port) as client:
            for payload in (b"one", b"two", b"three"):
                client.request(payload)
            before = scrape(url)
            assert value(before, "morsock_messages_received_total", name="server") == 3
            server.clear_statistics()
            client.request(b"four")
            assert server.total_messages_received == 1  # the component's own view restarts
            after = scrape(url)
            client.clear_statistics()
        reg.unregister()
    names = ("morsock_messages_received_total", "morsock_messages_sent_total",
             "morsock_bytes_received_total", "morsock_bytes_sent_total",
             "morsock_connections_total")
    for metric in names:
        assert value(after, metric, name="server") >= value(before, metric, name="server"), metric
    assert value(after, "morsock_messages_received_total", name="server") == 4
    assert value(after, "morsock_messages_sent_total", name="server") == 4
    assert value(after, "morsock_bytes_received_total", name="server") == \
        value(before, "morsock_bytes_received_total", name="server") + frame_size(4)
    assert value(after, "morsock_connections_total", name="server") == 1


# -- several components, registration ---------------------------------------------------------
def test_several_components_in_one_registry(registry: CollectorRegistry) -> None:
    with running_server() as first, running_server() as second, \
            http_endpoint(registry) as url:
        reg_a = register(first, registry, name="a")
        reg_b = register(second, registry, name="b")
        with pytest.raises(ValueError, match="'a' is already registered"):
            register(second, registry, name="a")
        with Client(LOCAL, first.port) as client:
            client.request(b"1")
            client.request(b"2")
        with Client(LOCAL, second.port) as client:
            client.request(b"3")
        samples = scrape(url)
        assert value(samples, "morsock_messages_received_total", name="a") == 2
        assert value(samples, "morsock_messages_received_total", name="b") == 1
        text = scrape_text(url)
        assert text.count("# TYPE morsock_messages_received_total counter") == 1
        reg_a.unregister()
        reg_a.unregister()  # idempotent
        samples = scrape(url)
        assert ("morsock_messages_received_total", frozenset({("name", "a")})) not in samples
        assert value(samples, "morsock_messages_received_total", name="b") == 1
        reg_b.unregister()
        assert not any(k[0].startswith("morsock_") for k in scrape(url))
    assert first._observer is None and second._observer is None


def test_one_component_in_two_registries_shares_its_observer() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    with running_server(boom_or_echo) as server:
        reg_one = register(server, one)
        reg_two = register(server, two, name="again")
        assert reg_one.observer is reg_two.observer is server._observer
        with Client(LOCAL, server.port) as client:
            client.request(b"x")
        reg_one.unregister()
        assert server._observer is reg_two.observer  # still used by the other registry
        with http_endpoint(two) as url:
            assert value(scrape(url), "morsock_handler_duration_seconds_count",
                         name="again") == 1
        reg_two.unregister()
        assert server._observer is None


def test_register_refuses_what_it_cannot_expose(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match="Server or Client, not str"):
        register("server", registry)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty str"):
        register(Server(0, LOCAL), registry, name="")
    assert Server(0, LOCAL)._observer is None and Client(LOCAL, 1)._observer is None


def test_default_registry_is_prometheus_clients_global_one() -> None:
    with running_server() as server:
        reg = register(server, name="global-test")
        try:
            assert reg.registry is prometheus_client.REGISTRY
            assert prometheus_client.REGISTRY.get_sample_value(
                "morsock_connections", {"name": "global-test"}) == 0
        finally:
            reg.unregister()
        assert prometheus_client.REGISTRY.get_sample_value(
            "morsock_connections", {"name": "global-test"}) is None


def test_import_without_prometheus_client_names_the_extra() -> None:
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "try:\n    import morsock.metrics\n"
            "except ImportError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=scaled(60), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "pip install 'morsock[metrics]'" in result.stdout


# -- promtool ----------------------------------------------------------------------------------
def test_promtool_accepts_the_exposition(registry: CollectorRegistry) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    with running_server(boom_or_echo) as server, http_endpoint(registry) as url:
        reg_server = register(server, registry)
        client = Client(LOCAL, server.port)
        reg_client = register(client, registry)
        with client:
            client.request(b"hello")
            client.send_data(b"boom")
            wait_until(lambda: server._observer.errors())
        text = scrape_text(url)
        reg_server.unregister()
        reg_client.unregister()
    assert 'code="HANDLER_EXCEPTION"' in text and "morsock_client_reconnects_total" in text
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=scaled(60))
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        f"promtool: {result.stdout} {result.stderr}"


# -- command line ------------------------------------------------------------------------------
def test_cli_metrics_port_serves_the_echo_servers_metrics(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    with child(["-m", "morsock", "server", "--host", LOCAL, "--port", "0", "--status", "off",
                "--port-file", str(port_file), "--metrics-port", "0"],
               stderr=subprocess.STDOUT) as server:
        url = server.expect(r"metrics at (http://127\.0\.0\.1:\d+/metrics)").group(1)
        port = wait_for_file(port_file, server)
        result = run(["-m", "morsock", "client", "--port", port, "one", "two words"])
        assert result.returncode == 0, result.stderr
        samples = scrape(url)
        assert value(samples, "morsock_messages_received_total", name="server") == 2
        assert value(samples, "morsock_bytes_sent_total", name="server") == \
            frame_size(3) + frame_size(9)
        assert value(samples, "morsock_handler_duration_seconds_count", name="server") == 2
        assert any(k[0] == "process_cpu_seconds_total" for k in samples)  # the global registry
        assert server.stop(signal.SIGTERM) == 0
    with pytest.raises(urllib.error.URLError):
        scrape_text(url)


def test_cli_metrics_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind((LOCAL, 0))
        taken.listen()
        result = run(["-m", "morsock", "server", "--host", LOCAL, "--port", "0",
                      "--status", "off", "--metrics-port", str(taken.getsockname()[1])])
    assert result.returncode == 1
    assert "error: metrics:" in result.stderr and "in use" in result.stderr


def test_cli_metrics_endpoint_stops_with_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["server", "--metrics-port", "0"])
    assert _serve_metrics(Server(0, LOCAL), build_parser().parse_args(["server"])) is None
    with running_server() as server:
        stop = _serve_metrics(server, args)
        assert stop is not None
        try:
            url = capsys.readouterr().err.split("metrics at ")[1].strip()
            assert value(scrape(url), "morsock_connections", name="server") == 0
        finally:
            stop()
        with pytest.raises(urllib.error.URLError):
            scrape_text(url)
        assert server._observer is None
    assert prometheus_client.REGISTRY.get_sample_value("morsock_connections",
                                                       {"name": "server"}) is None
    # no_leaks (conftest) checks that the HTTP thread and its socket are gone


def test_histogram_count_is_exact_with_handlers_on_every_worker(
        registry: CollectorRegistry) -> None:
    import threading

    per_client, clients = 150, 4
    with running_server(thread_pool_size=4) as server, http_endpoint(registry) as url:
        reg = register(server, registry)
        errors: list = []

        def talk(index: int) -> None:
            try:
                with Client(LOCAL, server.port) as client:
                    for n in range(per_client):
                        assert client.request(b"%d-%d" % (index, n)) == b"%d-%d" % (index, n)
            except BaseException as exc:  # reported below, on the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        assert not errors
        samples = scrape(url)
        reg.unregister()
    total = per_client * clients
    assert value(samples, "morsock_messages_received_total", name="server") == total
    assert value(samples, "morsock_handler_duration_seconds_count", name="server") == total
    assert value(samples, "morsock_handler_duration_seconds_bucket",
                 name="server", le="+Inf") == total
    assert len(reg.observer._shards) >= 1
