"""The process that runs a trial: its identity, and whether it is gone (only on this machine can that be known)."""

from __future__ import annotations

import os
import socket

import pytest
from fixtures import dead_pid

from tinyopt.core import worker as workers


def test_identity_names_this_process():
    me = workers.identity()
    assert me["pid"] == os.getpid() and not workers.is_dead(me)


@pytest.mark.parametrize("worker, dead", [
    (lambda me: {**me, "pid": dead_pid()}, True),
    (lambda me: {**me, "started": -1}, True),  # the pid lives on, but in another process: it was reused
    (lambda me: me, False),
    (lambda me: {**me, "host": "another-machine", "pid": dead_pid()}, False),  # cannot be known from here
])
def test_is_dead(worker, dead):
    assert workers.is_dead(worker(workers.identity())) is dead


def test_identity_holds_the_host_and_the_start_time_of_this_process():
    me = workers.identity()
    assert set(me) == {"host", "pid", "started"}
    assert me["host"] == socket.gethostname()
    assert isinstance(me["started"], int) and workers.identity()["started"] == me["started"]
