"""The watchdog's timing policy (pure); its behaviour under MPI is in test_mpi.py."""

from ddtrain.parallel.watchdog import (DEADLINE_FLOOR, HEARTBEAT_TIMEOUT, STARTUP_DEADLINE, collective_deadline,
                                   heartbeat_timeout)


def test_deadline_without_timeout_follows_the_steps():
    assert collective_deadline(None, []) == STARTUP_DEADLINE
    assert collective_deadline(None, [0.01, 0.01]) == STARTUP_DEADLINE  # too few steps timed
    assert collective_deadline(None, [0.01, 0.02, 0.01]) == DEADLINE_FLOOR  # fast steps: the floor
    assert collective_deadline(None, [2.0, 2.0, 90.0]) == 40.0  # 20 median steps; one slow outlier
    assert DEADLINE_FLOOR > HEARTBEAT_TIMEOUT  # a stopped rank is named before peers time out


def test_explicit_timeout_wins_except_at_exit():
    assert collective_deadline(3.0, []) == 3.0
    assert collective_deadline(3.0, [100.0] * 5) == 3.0
    assert collective_deadline(3.0, [], closing=True) == STARTUP_DEADLINE
    assert collective_deadline(500.0, [], closing=True) == 500.0


def test_heartbeat_timeout():
    assert heartbeat_timeout(None) == HEARTBEAT_TIMEOUT
    assert heartbeat_timeout(4.0) == 2.0
    assert heartbeat_timeout(600.0) == HEARTBEAT_TIMEOUT
