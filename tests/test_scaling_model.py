"""The cost formulas of benchmarks/scaling_model.py against values computed by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scaling_model as sm  # noqa: E402


def test_ring_allreduce_alpha_beta_formula():
    net = sm.Network("test", latency_s=1e-5, bytes_per_s=1e9)
    # N = 4: 2(N-1) = 6 latencies, 2(N-1)/N = 1.5 passes over 1 MB at 1 GB/s
    assert sm.ring_allreduce_seconds(1e6, 4, net) == pytest.approx(6e-5 + 1.5e-3)
    # N = 2: 2 latencies, one pass
    assert sm.ring_allreduce_seconds(2e6, 2, net) == pytest.approx(2e-5 + 2e-3)
    # the bandwidth term tends to 2 n / beta for large N
    assert sm.ring_allreduce_seconds(1e6, 1000, net) == pytest.approx(1998e-5 + 1.998e-3)
    assert sm.ring_allreduce_seconds(1e6, 1, net) == 0.0
    assert sm.ring_allreduce_seconds(0, 8, net) == 0.0
    with pytest.raises(ValueError, match="workers"):
        sm.ring_allreduce_seconds(1e6, 0, net)


def test_ethernet_bandwidth_is_line_rate_times_efficiency():
    net = sm.Network.ethernet(25, latency_s=2e-5, efficiency=0.9)
    assert net.bytes_per_s == pytest.approx(25e9 / 8 * 0.9)  # 2.8125 GB/s
    assert net.latency_s == 2e-5 and net.name == "25 Gb/s"


def test_fit_alpha_beta_recovers_the_model():
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7, 6.4e7]
    net = sm.Network("true", 7e-6, 3e9)
    times = [sm.ring_allreduce_seconds(n, 2, net) for n in sizes]
    alpha, beta = sm.fit_alpha_beta(sizes, times, workers=2)
    assert alpha == pytest.approx(7e-6, rel=1e-6)
    assert beta == pytest.approx(3e9, rel=1e-6)
    with pytest.raises(ValueError, match="two"):
        sm.fit_alpha_beta([1e3], [1e-5])


def test_buckets_hold_at_most_the_cap():
    # 10 + 20 > 25: new bucket; 20 + 5 fits; 30 alone (larger than the cap); 1 after it
    assert sm.assign_buckets([10, 20, 5, 30, 1], 25) == [[0], [1, 2], [3], [4]]
    assert sm.assign_buckets([25, 1], 25) == [[0], [1]]
    assert sm.assign_buckets([12, 13, 1], 25) == [[0, 1], [2]]
    assert sm.assign_buckets([1, 1, 1], 100) == [[0, 1, 2]]
    assert sm.assign_buckets([], 25) == []
    with pytest.raises(ValueError, match="bucket"):
        sm.assign_buckets([1], 0)


def test_fifo_schedule_and_exposed_time():
    # bucket 0 ready at 1 runs 1..4; bucket 1 (ready 2) waits for the network: 4..5;
    # bucket 2 ready at 10 runs 10..11
    assert sm.allreduce_schedule([1, 2, 10], [3, 1, 1]) == [4, 5, 11]
    assert sm.exposed_comm_seconds([1, 2, 10], [3, 1, 1], backward_s=10, overlap=True) == 1
    assert sm.exposed_comm_seconds([1, 2, 10], [3, 1, 1], backward_s=10, overlap=False) == 5
    # everything done before the backward ends: nothing exposed
    assert sm.exposed_comm_seconds([1, 2], [0.5, 0.5], backward_s=10, overlap=True) == 0


def test_predict_by_hand():
    # two 4 MiB gradients ready 1 s and 2 s into a 2 s backward; 4 MiB buckets; at N = 2
    # each allreduce moves 2(N-1)/N * 4 MiB = 4 MiB at 4 MiB/s: 1 s, no latency
    mib4 = 4 * 2**20
    profile = sm.StepProfile("toy", batch=10, forward_s=1.0, backward_s=2.0, update_s=0.0,
                             grad_bytes=[mib4, mib4], ready_s=[1.0, 2.0])
    net = sm.Network("toy", 0.0, mib4)
    on = sm.predict(profile, 2, net, overlap=True, bucket_mb=4)
    assert on.buckets == 2 and on.comm_s == pytest.approx(2.0)
    assert on.exposed_s == pytest.approx(1.0)  # bucket 1 runs 2..3, the backward ends at 2
    assert on.step_s == pytest.approx(4.0)
    assert on.efficiency == pytest.approx(0.75)
    assert on.samples_per_s == pytest.approx(2 * 10 / 4.0)
    assert on.hidden == pytest.approx(0.5)
    off = sm.predict(profile, 2, net, overlap=False, bucket_mb=4)
    assert off.step_s == pytest.approx(5.0) and off.efficiency == pytest.approx(0.6)
    one = sm.predict(profile, 1, net, overlap=False, bucket_mb=4)
    assert one.efficiency == 1.0 and one.samples_per_s == pytest.approx(10 / 3.0)


def test_resnet_tables_match_the_published_parameter_counts():
    # torchvision's resnet50 / resnet101 (1000 classes): 25,557,032 and 44,549,160 parameters
    assert sum(layer.params for layer in sm.resnet_layers(50)) == 25_557_032
    assert sum(layer.params for layer in sm.resnet_layers(101)) == 44_549_160
    # forward multiply-adds at 224x224: 4.09 G and 7.8 G (the "GFLOPS" torchvision lists)
    assert sum(layer.macs for layer in sm.resnet_layers(50)) == pytest.approx(4.09e9, rel=0.01)
    assert sum(layer.macs for layer in sm.resnet_layers(101)) == pytest.approx(7.8e9, rel=0.01)


def test_flop_timeline_ends_with_the_backward():
    layers = [sm.Layer("first", 10, 100, input_grad=False), sm.Layer("bn", 2, 0),
              sm.Layer("last", 30, 100)]
    grad_bytes, ready = sm.flop_timeline(layers, backward_s=3.0)
    # backward order: last (200 units), bn (0), first (100 units: no input gradient)
    assert grad_bytes == [120, 8, 40]
    np.testing.assert_allclose(ready, [2.0, 2.0, 3.0])


def test_p100_times_and_interpolation():
    assert sm.p100_seconds_per_image(50) == pytest.approx(1 / 219)
    t101 = sm.p100_seconds_per_image(101)
    assert 1 / 219 < t101 < 1 / 91.8
    profile = sm.resnet_profile(101, "p100")
    assert profile.batch == 64 and profile.backward_s == pytest.approx(2 * profile.forward_s)
    assert profile.compute_s == pytest.approx(64 * t101)


def test_overlap_never_hurts_and_efficiency_is_at_most_one():
    profile = sm.resnet_profile(50, "p100")
    for net in sm.networks():
        for n in (2, 16, 256):
            on = sm.predict(profile, n, net, overlap=True)
            off = sm.predict(profile, n, net, overlap=False)
            assert on.step_s <= off.step_s + 1e-12
            assert 0 < off.efficiency <= on.efficiency <= 1


def test_implied_hidden_fraction_inverts_predict():
    profile = sm.resnet_profile(101, "p100")
    net = sm.Network.ethernet(25)
    for overlap in (False, True):
        p = sm.predict(profile, 64, net, overlap)
        assert sm.implied_hidden_fraction(profile, 64, net, p.efficiency) == \
            pytest.approx(p.hidden if overlap else 0.0, abs=1e-9)
    # an efficiency of 1 means everything was hidden
    assert sm.implied_hidden_fraction(profile, 64, net, 1.0) == pytest.approx(1.0)
