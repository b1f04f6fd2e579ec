"""The Session's plan cache: never a plan for another fetch, bounded, least recently used out."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import needle.static as st


def test_constant_fetches_made_in_a_loop_give_their_own_values():
    # constant folding leaves the fetched node out of the plan; a cache keyed by the ids of
    # nodes it did not keep alive replayed another constant's plan
    with st.Graph():
        sess = st.Session()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the growing-graph warning
            values = [float(sess.run(st.constant(np.float32(k)) * 2)) for k in range(100)]
    assert values == [2.0 * k for k in range(100)]


def test_plans_are_bounded_and_the_least_recently_used_goes_first():
    with st.Graph():
        x = st.placeholder((None,))
        fetches = [x * float(k) for k in range(3)]
        sess = st.Session(max_cached_plans=2)
        feed = {x: np.ones(2, np.float32)}
        sess.run(fetches[0], feed)
        sess.run(fetches[1], feed)
        sess.run(fetches[0], feed)  # fetches[0] is now the most recent
        sess.run(fetches[2], feed)  # drops fetches[1]'s plan
        assert len(sess._runners) == 2
        kept = {runner.keys[0][0] for runner in sess._runners.values()}
        assert kept == {fetches[0], fetches[2]}
        np.testing.assert_array_equal(sess.run(fetches[1], feed), [1.0, 1.0])


def test_max_cached_plans_must_be_positive():
    with st.Graph(), pytest.raises(ValueError, match="max_cached_plans"):
        st.Session(max_cached_plans=0)
