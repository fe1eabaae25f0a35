"""Prometheus metrics of servers and clients (optional extra ``morsock[metrics]``).

:func:`register` exposes a :class:`~morsock.Server`'s or :class:`~morsock.Client`'s
statistics through ``prometheus_client`` (docs/guide/metrics.rst). The counters and gauges are read
from the component's own exact statistics when the registry is scraped (no work per
message); the handler-duration histogram and the error counter are fed by an
:class:`Observer` the component calls on its hot path.

Every metric carries the label ``name`` (from ``register(..., name=...)``), so several
components can share one registry.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "morsock.metrics needs prometheus_client, which morsock's 'metrics' extra "
        "installs: pip install 'morsock[metrics]'") from _exc

from .client import Client
from .enums import ErrorCode
from .server import Server

__all__ = ["register", "Registration", "Observer", "DURATION_BUCKETS"]

#: Upper bounds (seconds) of the ``morsock_handler_duration_seconds`` buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The ``code`` label of a client's failed reconnection attempt (its on_error code is
#: the attempt number, 1, 2 ...; one label for all keeps the label set bounded).
RECONNECT_ATTEMPT_FAILED = "RECONNECT_ATTEMPT_FAILED"


def code_label(code: int) -> str:
    """The ``code`` label of an on_error code: the ErrorCode name (``"TIMEOUT"``),
    :data:`RECONNECT_ATTEMPT_FAILED` for a positive code, else the number as text."""
    if code > 0:
        return RECONNECT_ATTEMPT_FAILED
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(int(code))


#: Single-call durations a thread keeps before it sorts them into its buckets at once
#: (sorting a run of them costs less per call than a bisect each).
_PENDING_MAX = 256


def _sort_into(bounds: Sequence[float], durations: Sequence[float], counts: list[int]) -> float:
    """Add to ``counts[i]`` the *durations* of bucket *i* (``bounds[i-1] < d <=
    bounds[i]``; the last bucket is above every bound); return their sum."""
    ordered = sorted(durations)
    below = 0
    for index, bound in enumerate(bounds):
        upto = bisect.bisect_right(ordered, bound)
        counts[index] += upto - below
        below = upto
    counts[-1] += len(ordered) - below
    return sum(ordered)


class _ThreadShard(threading.local):
    """The calling thread's share of an :class:`Observer`'s histogram: its
    ``handler_done`` counts into lists only this thread writes (no lock per call). A
    single call's duration waits in ``pending`` until ``_PENDING_MAX`` of them are
    sorted into the buckets (under the observer's lock, so that a reader never sees one
    both pending and counted). Made on a thread's first use, when it adds its lists to
    the observer's."""

    def __init__(self, observer: Observer) -> None:
        counts = [0] * (len(observer.buckets) + 1)
        total = [0.0]
        pending: list[float] = []
        bounds, find, lock, append = observer.buckets, bisect.bisect_left, observer._lock, \
            pending.append

        def handler_done(seconds: float, calls: int = 1) -> None:
            if calls == 1:
                append(seconds)
                if len(pending) >= _PENDING_MAX:
                    with lock:
                        total[0] += _sort_into(bounds, pending, counts)
                        del pending[:]
            else:  # the first bound >= the mean duration
                counts[find(bounds, seconds / calls)] += calls
                total[0] += seconds

        with lock:
            observer._shards.append((counts, total, pending))
        self.handler_done = handler_done


class Observer:
    """The hot-path hooks of one component, installed as its ``_observer``.

    ``handler_done(seconds, calls=1)`` after ``on_handle_command`` calls (worker
    threads): *calls* calls handled back to back took *seconds* in all. They count as
    *calls* observations of their mean duration: the histogram's count is exact per
    call, its sum exact, and a call's bucket is its run's mean (a server times each run
    of plaintext frames of a batch as a whole, so that the hot path reads the clock
    twice per batch, not per frame). ``error(code)`` for each reported error (any
    library thread). Both are safe from several threads at once; reading
    (:meth:`histogram`, :meth:`errors`, :meth:`quantile`) is safe from any thread.

    Each thread counts into a shard of its own, ``shard.handler_done`` (the calling
    thread's; :attr:`handler_done` is the same), and a reader adds the shards up at
    scrape time. A caller on the hot path may keep the function it got for the rest of
    its batch (same thread).
    """

    def __init__(self, buckets: Sequence[float] = DURATION_BUCKETS) -> None:
        # guards _shards (the list), _errors, and each shard sorting in its pending ones
        self._lock = threading.Lock()
        self.buckets = tuple(buckets)
        #: per thread: (counts per bucket, the last one above every bound; [sum];
        #: durations not yet in the counts)
        self._shards: list[tuple[list[int], list[float], list[float]]] = []
        self._errors: dict[str, int] = {}
        self._users = 0  # registrations that share this observer
        #: The calling thread's shard (a ``threading.local``): ``shard.handler_done``.
        self.shard = _ThreadShard(self)

    @property
    def handler_done(self) -> Callable[..., None]:
        """``handler_done(seconds, calls=1)``: *calls* ``on_handle_command`` calls took
        *seconds* in all (the calling thread's recorder, ``shard.handler_done``)."""
        return self.shard.handler_done

    def error(self, code: int) -> None:
        """An error with this on_error *code* was reported."""
        label = code_label(code)
        with self._lock:
            self._errors[label] = self._errors.get(label, 0) + 1

    def histogram(self) -> tuple[list[int], float]:
        """``(counts, sum)``: the count of each bucket (not cumulative; the last one is
        above every bound) and the sum of all durations."""
        with self._lock:  # no shard sorts its pending durations meanwhile
            shards = [(list(counts), total[0], list(pending))
                      for counts, total, pending in self._shards]
        counts = [0] * (len(self.buckets) + 1)
        total = 0.0
        for shard_counts, shard_total, pending in shards:
            for index, count in enumerate(shard_counts):
                counts[index] += count
            total += shard_total + _sort_into(self.buckets, pending, counts)
        return counts, total

    def errors(self) -> dict[str, int]:
        """``{code label: count}`` of every error observed so far."""
        with self._lock:
            return dict(self._errors)

    def quantile(self, q: float) -> float | None:
        """An estimate of the *q* quantile (0..1) of the handler durations, interpolated
        within its bucket as Prometheus' ``histogram_quantile`` does; None before the
        first call. Above the last bound it answers that bound."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be within 0..1, not {q!r}")
        counts, _ = self.histogram()
        total = sum(counts)
        if not total:
            return None
        rank = q * total
        seen = 0
        for index, count in enumerate(counts):
            if count and seen + count >= rank:
                if index == len(self.buckets):
                    return self.buckets[-1]
                lower = self.buckets[index - 1] if index else 0.0
                upper = self.buckets[index]
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
        return self.buckets[-1]  # pragma: no cover - rank <= total ends the loop above


class _Monotonic:
    """A counter built on a statistic that :meth:`clear_statistics` may take back to 0:
    a drop is taken as such a reset, and what had been read before it is kept, so the
    exposed value never goes down."""

    __slots__ = ("base", "last")

    def __init__(self) -> None:
        self.base = 0
        self.last = 0

    def read(self, raw: int) -> int:
        if raw < self.last:
            self.base += self.last
        self.last = raw
        return self.base + raw


_SERVER_COUNTERS = (
    ("morsock_connections_total", "Connections accepted (refused ones excluded).",
     "total_connections"),
    ("morsock_connections_rejected_total", "Connections refused because of max_connections.",
     "total_rejected_connections"),
    ("morsock_messages_received_total", "Frames received.", "total_messages_received"),
    ("morsock_messages_sent_total", "Frames sent.", "total_messages_sent"),
    ("morsock_bytes_received_total", "Wire bytes received, frame headers included.",
     "total_bytes_received"),
    ("morsock_bytes_sent_total", "Wire bytes sent, frame headers included.",
     "total_bytes_sent"),
)
_CLIENT_COUNTERS = (
    ("morsock_messages_received_total", "Frames received.", "messages_received"),
    ("morsock_messages_sent_total", "Frames sent.", "messages_sent"),
    ("morsock_bytes_received_total", "Wire bytes received, frame headers included.",
     "total_bytes_received"),
    ("morsock_bytes_sent_total", "Wire bytes sent, frame headers included.",
     "total_bytes_sent"),
    ("morsock_client_reconnects_total", "Automatic reconnection attempts started.",
     "_reconnects"),
)
_HELP = {
    "morsock_connections": "Connections open now (a client: 1 while connected).",
    "morsock_errors_total": "Errors reported through on_error, by code (ErrorCode name).",
    "morsock_handler_duration_seconds": "Time spent in on_handle_command per message.",
    "morsock_receive_backlog_bytes":
        "Bytes read from the peers and not yet handled (back-pressure starts at "
        "max_receive_backlog).",
    "morsock_send_queue_bytes": "Bytes accepted for sending, not yet handed to the kernel.",
    "morsock_uptime_seconds":
        "A server: seconds since it started listening; a client: seconds the current "
        "connection has lasted (0 while not connected).",
}


class _Entry:
    """One registered component and the monotonic state of its counters."""

    def __init__(self, component: Server | Client, name: str, observer: Observer) -> None:
        self.component = component
        self.name = name
        self.observer = observer
        self.counters = _SERVER_COUNTERS if isinstance(component, Server) else _CLIENT_COUNTERS
        self.monotonic = {metric: _Monotonic() for metric, _, _ in self.counters}

    def gauges(self) -> dict[str, float]:
        component = self.component
        if isinstance(component, Server):
            values: dict[str, float] = {
                "morsock_connections": component.client_count,
                "morsock_uptime_seconds": component.up_time,
            }
        else:
            connected = component.connected
            values = {
                "morsock_connections": 1 if connected else 0,
                "morsock_uptime_seconds": component.connected_time if connected else 0.0,
            }
        values["morsock_send_queue_bytes"] = component._send_queue_bytes()
        values["morsock_receive_backlog_bytes"] = component._receive_backlog_bytes()
        return values


class _Collector(Collector):
    """The one morsock collector of a registry: every component registered there, each
    told apart by its ``name`` label (a registry refuses two collectors that expose the
    same metric names, so all components share this one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _entries and the monotonic state
        self._entries: dict[str, _Entry] = {}

    def add(self, entry: _Entry) -> None:
        with self._lock:
            if entry.name in self._entries:
                raise ValueError(f"a component named {entry.name!r} is already registered in "
                                 f"this registry: pass another name= to register()")
            self._entries[entry.name] = entry

    def remove(self, entry: _Entry) -> bool:
        """Forget *entry*; True when no component is left."""
        with self._lock:
            if self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
            return not self._entries

    def describe(self) -> list[Metric]:
        return []  # names checked by add(); nothing to collect before the first scrape

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client on every scrape (its thread)."""
        families: dict[str, Metric] = {}

        def family(metric: str, kind: type[Metric], help_text: str, **kw: Any) -> Any:
            found = families.get(metric)
            if found is None:
                found = families[metric] = kind(metric, help_text, **kw)
            return found

        with self._lock:
            for entry in self._entries.values():
                labels = [entry.name]
                for metric, help_text, attribute in entry.counters:
                    raw = int(getattr(entry.component, attribute))
                    family(metric, CounterMetricFamily, help_text, labels=["name"]).add_metric(
                        labels, entry.monotonic[metric].read(raw))
                for metric, value in entry.gauges().items():
                    family(metric, GaugeMetricFamily, _HELP[metric],
                           labels=["name"]).add_metric(labels, value)
                errors = family("morsock_errors_total", CounterMetricFamily,
                                _HELP["morsock_errors_total"], labels=["name", "code"])
                for code, count in sorted(entry.observer.errors().items()):
                    errors.add_metric([entry.name, code], count)
                counts, total = entry.observer.histogram()
                cumulative, buckets = 0, []
                for bound, count in zip((*entry.observer.buckets, float("inf")), counts):
                    cumulative += count
                    buckets.append((_bound_text(bound), cumulative))
                family("morsock_handler_duration_seconds", HistogramMetricFamily,
                       _HELP["morsock_handler_duration_seconds"],
                       labels=["name"]).add_metric(labels, buckets, total)
        yield from families.values()


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


_collectors: dict[int, tuple[CollectorRegistry, _Collector]] = {}
_collectors_lock = threading.Lock()


class Registration:
    """What :func:`register` returns: ``observer`` (the component's :class:`Observer`)
    and :meth:`unregister`."""

    def __init__(self, registry: CollectorRegistry, entry: _Entry) -> None:
        self.registry = registry
        self.name = entry.name
        self.observer = entry.observer
        self._entry: _Entry | None = entry

    def unregister(self) -> None:
        """Take the component out of the registry and, once no registration uses it,
        its observer off the component (the hot path is then as without metrics).
        Idempotent; any thread."""
        entry, self._entry = self._entry, None
        if entry is None:
            return
        with _collectors_lock:
            registry, collector = _collectors[id(self.registry)]
            if collector.remove(entry):
                registry.unregister(collector)
                del _collectors[id(self.registry)]
            entry.observer._users -= 1
            if not entry.observer._users and entry.component._observer is entry.observer:
                entry.component._observer = None


def register(component: Server | Client, registry: CollectorRegistry | None = None,
             name: str | None = None) -> Registration:
    """Expose *component*'s statistics in *registry* (default: prometheus_client's
    global ``REGISTRY``), labelled ``name=`` *name* (default ``"server"`` or
    ``"client"``). Raises ValueError when that name is already registered there,
    TypeError for anything but a Server or a Client. Any thread, running or not."""
    if not isinstance(component, (Server, Client)):
        raise TypeError(f"register() takes a morsock Server or Client, not "
                        f"{type(component).__name__}")
    if name is None:
        name = "server" if isinstance(component, Server) else "client"
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, not {name!r}")
    registry = REGISTRY if registry is None else registry
    with _collectors_lock:
        observer = component._observer
        if not isinstance(observer, Observer):
            observer = Observer()
        entry = _Entry(component, name, observer)
        pair = _collectors.get(id(registry))
        if pair is None:
            collector = _Collector()
            collector.add(entry)
            registry.register(collector)
            _collectors[id(registry)] = (registry, collector)
        else:
            pair[1].add(entry)
        observer._users += 1
        component._observer = observer
    return Registration(registry, entry)

