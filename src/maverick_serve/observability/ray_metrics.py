"""`ray.util.metrics` objects built from the catalogue's specs, so a replica cannot export a name,
type, label or bucket that the catalogue (and so the dashboards and alerts) does not know."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from maverick_serve.observability.catalogue import MetricSpec


class MetricSet:
    """The Ray metrics of `specs`, addressed by catalogue name. Without Ray (plain Python, unit
    tests) every call is a no-op and `enabled` is False; values stay wherever the caller keeps
    its own counters (`EngineStats`, `RouterStats`)."""

    def __init__(self, specs: Iterable[MetricSpec], default_tags: Mapping[str, str] | None = None) -> None:
        self.specs = {s.name: s for s in specs}
        self.default_tags = dict(default_tags or {})
        self._metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics
        except ImportError:  # no Ray: callers keep their own counters
            return
        if not ray.is_initialized():  # plain Python (unit tests, bench): nothing to export to
            return
        # Inside Ray a metric that cannot be made is a catalogue bug: fail loudly, not silently.
        for s in self.specs.values():
            if s.kind == "counter":
                m: Any = metrics.Counter(s.name, s.description, tag_keys=s.labels)
            elif s.kind == "gauge":
                m = metrics.Gauge(s.name, s.description, tag_keys=s.labels)
            else:
                m = metrics.Histogram(s.name, s.description, list(s.buckets), tag_keys=s.labels)
            if self.default_tags:
                m.set_default_tags({k: v for k, v in self.default_tags.items() if k in s.labels})
            self._metrics[s.name] = m
            if s.kind == "counter":
                self._seed(s, m)

    def _seed(self, spec: MetricSpec, metric: Any) -> None:
        """Counters at 0 from the start where every label value is known (default tags, plus the
        spec's seed label). Ray's public inc() refuses 0, so this records through _record, the
        call inc() itself ends in; a Ray without it only loses the early zero."""
        free = [label for label in spec.labels if label not in self.default_tags]
        seed_label, values = spec.seed or ("", ())
        if free and free != [seed_label]:
            return
        tag_sets = [{seed_label: v} for v in values] if free else [{}]
        for tags in tag_sets:
            with contextlib.suppress(Exception):
                metric._record(0.0, tags=tags or None)

    @property
    def enabled(self) -> bool:
        return bool(self._metrics)

    def _tags(self, name: str, tags: Mapping[str, str] | None) -> dict[str, str] | None:
        if not tags:
            return None
        allowed = self.specs[name].labels
        unknown = set(tags) - set(allowed)
        if unknown:  # a programming error: the catalogue is the contract
            raise KeyError(f"{name} has no labels {sorted(unknown)} (catalogue: {allowed})")
        return dict(tags)

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None and value > 0:
            m.inc(value, self._tags(name, tags))

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None:
            m.set(value, self._tags(name, tags))

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        m = self._metrics.get(name)
        if m is not None:
            m.observe(value, self._tags(name, tags))


class CumulativeCounters:
    """Turns the cumulative totals an engine reports into counter increments (Ray counters take
    increments). A total that goes backwards (engine restarted) restarts the baseline."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def delta(self, name: str, total: float, tags: Mapping[str, str] | None = None) -> float:
        key = (name, tuple(sorted((tags or {}).items())))
        last = self._last.get(key, 0.0)
        self._last[key] = total
        return total - last if total >= last else total
