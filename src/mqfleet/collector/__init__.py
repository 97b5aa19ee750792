"""The mqfleet collector: subscribes to the fleet and persists it."""

from mqfleet.collector.service import Collector, CollectorStats, run_collector

__all__ = ["Collector", "CollectorStats", "run_collector"]
