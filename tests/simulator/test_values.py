import itertools
import random
import statistics

from mqfleet.simulator import MetricsModel


def _samples(seed: int, count: int, interval_s: float = 10.0):
    rng = random.Random(seed)  # noqa: S311 - simulated values
    model = MetricsModel(rng, interval_s=interval_s)
    return model, [model.next_sample() for _ in range(count)]


def test_values_stay_in_the_protocol_ranges():
    for seed in range(50):
        _, samples = _samples(seed, 500)
        for s in samples:
            assert 0.0 <= s.cpu_usage <= 100.0
            assert 0.0 <= s.memory_usage <= 100.0
            assert 0.0 <= s.disk_usage <= 100.0
            assert s.load_average >= 0.0


def test_same_seed_gives_the_same_series():
    assert _samples(7, 100)[1] == _samples(7, 100)[1]
    assert _samples(7, 100)[1] != _samples(8, 100)[1]


def test_cpu_moves_but_stays_near_its_baseline():
    model, samples = _samples(3, 2000)
    cpu = [s.cpu_usage for s in samples]
    assert len(set(cpu)) > 100  # not a constant
    # Mean reversion: the long-run mean is the baseline (plus rare bursts), not a drift.
    first, second = statistics.mean(cpu[:1000]), statistics.mean(cpu[1000:])
    assert abs(first - second) < 10.0
    assert abs(first - model._cpu_base) < 12.0


def test_load_follows_cpu_times_cores():
    model, samples = _samples(11, 3000)
    load = statistics.mean(s.load_average for s in samples[100:])
    cpu = statistics.mean(s.cpu_usage for s in samples[100:])
    assert abs(load - cpu / 100.0 * model.cores) < 0.25 * model.cores


def test_disk_fills_slowly_then_is_cleaned_up():
    rng = random.Random(5)  # noqa: S311 - simulated values
    model = MetricsModel(rng, interval_s=10.0)
    model._disk_rate = 0.5  # fill fast, for the test
    disk = [model.next_sample().disk_usage for _ in range(400)]
    rises = sum(1 for a, b in itertools.pairwise(disk) if b >= a)
    drops = [a - b for a, b in itertools.pairwise(disk) if b < a]
    assert rises > 0.9 * len(disk)
    assert drops
    assert all(d >= 19.0 for d in drops)  # a cleanup frees 20-40 %, never a jitter
    assert max(disk) <= 95.5
