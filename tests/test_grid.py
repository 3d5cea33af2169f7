"""PollingGrid's waiting loop, over a double of Flower's abstract Grid whose nodes answer after
set delays (real time, small numbers). The real path, over Flower's HttpGrid and a SuperLink,
runs in every simulation test (tests/test_simulation.py)."""

from __future__ import annotations

import math
import time
import uuid

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

import server.grid as grid_module
from common.config import ConfigError, RunConfig
from server.grid import PollingGrid

SLACK = 0.15  # scheduling noise on a shared 2-core machine


class DelayedNodes(Grid):
    """Node ``n`` replies ``delays[n]`` seconds after the push (``math.inf``: never)."""

    def __init__(self, delays: dict[int, float]) -> None:
        self.delays = delays
        self.due: dict[str, tuple[float, Message]] = {}  # message id → (ready at, reply)
        self.pulls: list[float] = []  # when each pull happened

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return sorted(self.delays)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            reply = Message(RecordDict(), reply_to=msg)
            self.due[mid] = (time.monotonic() + self.delays[msg.metadata.dst_node_id], reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        self.pulls.append(now)
        ready = [mid for mid in message_ids if mid in self.due and self.due[mid][0] <= now]
        return [self.due.pop(mid)[1] for mid in ready]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PollingGrid must not call the wrapped grid's send_and_receive")


def _queries(nodes):
    return [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]


def test_all_replies_returned_and_polling_stops_when_the_last_arrives():
    inner = DelayedNodes({1: 0.0, 2: 0.1, 3: 0.3})
    grid = PollingGrid(inner, max_interval=0.2)
    started = time.monotonic()
    replies = grid.send_and_receive(_queries([1, 2, 3]), timeout=None)
    elapsed = time.monotonic() - started
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert not inner.due  # nothing left unanswered
    # the pull that got the last reply was the last pull, at most one interval after it arrived
    assert len([t for t in inner.pulls if t >= started + 0.3]) == 1
    assert 0.3 <= elapsed < 0.3 + 0.2 + SLACK


def test_generator_input_is_pushed_whole_and_nothing_sent_means_no_pull():
    inner = DelayedNodes({1: 0.0, 2: 0.0})
    grid = PollingGrid(inner, max_interval=0.2)
    replies = grid.send_and_receive(m for m in _queries([1, 2]))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert len(inner.pulls) == 1
    assert list(grid.send_and_receive([], timeout=None)) == []
    assert len(inner.pulls) == 1


def test_timeout_returns_what_arrived_by_the_deadline():
    # Node 2 answers just before the deadline, between two widely spaced pulls; node 3 never.
    inner = DelayedNodes({1: 0.0, 2: 0.45, 3: math.inf})
    grid = PollingGrid(inner, max_interval=1.0)
    started = time.monotonic()
    replies = grid.send_and_receive(_queries([1, 2, 3]), timeout=0.5)
    elapsed = time.monotonic() - started
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert 0.5 <= elapsed < 0.5 + SLACK  # no sleep past the deadline
    assert inner.pulls[-1] >= started + 0.5  # one last pull at the deadline


def test_interval_backs_off_to_the_cap(monkeypatch):
    slept = []
    real_sleep = time.sleep

    def recording_sleep(seconds):
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(grid_module.time, "sleep", recording_sleep)
    inner = DelayedNodes({1: 0.8})
    PollingGrid(inner, max_interval=0.1).send_and_receive(_queries([1]))
    assert slept[:3] == pytest.approx([0.05, 0.075, 0.1])
    assert max(slept) == pytest.approx(0.1) and len(slept) >= 7
    # a cap below the first interval is the interval from the start
    slept.clear()
    PollingGrid(DelayedNodes({1: 0.1}), max_interval=0.02).send_and_receive(_queries([1]))
    assert set(slept) == {0.02}


def test_unpushed_messages_are_not_waited_for():
    inner = DelayedNodes({1: 0.0, 2: 0.0})
    inner_push = inner.push_messages
    inner.push_messages = lambda msgs: [*inner_push(msgs)[:1], ""]  # the 2nd was refused
    replies = PollingGrid(inner, max_interval=0.2).send_and_receive(_queries([1, 2]))
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert len(inner.pulls) == 1


def test_everything_else_is_delegated():
    inner = DelayedNodes({4: 0.0, 9: 0.0})
    grid = PollingGrid(inner, max_interval=0.2)
    grid.set_run("run-object")
    assert grid.run == "run-object"
    assert list(grid.get_node_ids()) == [4, 9]
    assert [n.node_id for n in grid.get_nodes()] == [4, 9]
    msg = grid.create_message(RecordDict(), MessageType.QUERY, 4, "g")
    assert msg.metadata.dst_node_id == 4 and msg.metadata.group_id == "g"
    (mid,) = grid.push_messages([msg])
    assert [r.metadata.reply_to_message_id for r in grid.pull_messages([mid])] == [mid]


def test_reply_poll_interval_must_be_positive():
    assert RunConfig().reply_poll_interval == 0.2
    assert RunConfig.from_mapping({"reply-poll-interval": 3}).reply_poll_interval == 3.0
    with pytest.raises(ConfigError, match="reply-poll-interval must be > 0 seconds"):
        RunConfig.from_mapping({"reply-poll-interval": 0})
    with pytest.raises(ValueError):
        PollingGrid(DelayedNodes({}), max_interval=0)
