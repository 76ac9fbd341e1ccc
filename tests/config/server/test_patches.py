"""Every patch of a third-party internal goes through config/server/patching.py:
it installs on the versions it was written for, leaves the library alone with
one warning on any other, and each patched internal still has the shape the
patch relies on (these fail first when an upgrade changes it)."""

from __future__ import annotations

import inspect
import logging
import multiprocessing.queues
import socket

import psycopg
import pytest
from daphne.http_protocol import WebRequest
from django.core.handlers.asgi import ASGIHandler
from django.db import connection
from django.db.backends.utils import CursorDebugWrapper, CursorWrapper
from django_q.cluster import Cluster, Sentinel
from django_q.queues import Queue as TaskQueue
from django_q.signals import pre_execute
from django_q.signing import SignedPackage
from django_q.status import Stat
from twisted.internet import abstract, protocol, tcp
from twisted.internet.testing import MemoryReactor
from twisted.web import http

from config.server import form_parsing, handler, patching, prepared_cursor, tcp_writes
from jobs.djangoq import broker, cluster, delivery
from tests.config.server.test_form_parsing import make_request

TASK = {"id": "abc", "name": "job:x", "func": "math.floor", "args": ("x",), "kwargs": {}, "timeout": 30}


def _prepared_in_use() -> bool:
    from jobs.db import sql

    with sql.cursor() as c:
        return isinstance(c, prepared_cursor._Prepared)


# name -> (install it, is it in place?).  Installing again is harmless: each
# install is idempotent on the classes it patches.
PATCHES = {
    tcp_writes.NAME: (tcp_writes.install, lambda: tcp.Server.write is tcp_writes._write),
    form_parsing.NAME: (form_parsing.install, lambda: make_request()._parsePOSTFormSubmission is False),
    handler.NAME: (
        lambda: isinstance(handler.application(), handler.ThreadPoolASGIHandler),
        lambda: isinstance(handler.application(), handler.ThreadPoolASGIHandler),
    ),
    prepared_cursor.NAME: (prepared_cursor.available, _prepared_in_use),
    cluster.NAME: (cluster.install, lambda: hasattr(Sentinel.spawn_cluster, "__wrapped__")),
    delivery.NAME: (delivery.install, lambda: patching.installed(delivery.NAME)),
    broker.SIGNING_PATCH: (lambda: broker._sign(dict(TASK)), lambda: patching.installed(broker.SIGNING_PATCH)),
}


@pytest.fixture
def undecided(monkeypatch):
    """A process where no patch has been decided yet (restored afterwards)."""
    monkeypatch.setattr(patching, "_decided", {})


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(PATCHES))
def test_each_patch_installs_on_the_pinned_versions(name, undecided, caplog):
    install, in_place = PATCHES[name]

    install()

    assert patching.installed(name)
    assert in_place()
    assert not [r for r in caplog.records if r.name == patching.__name__]


def test_the_gate_installs_once_and_names_what_it_found_otherwise(undecided, monkeypatch, caplog):
    calls = []
    assert patching.guarded(
        "a", package="Django", versions=(patching.version("Django"),), install=lambda: calls.append(1)
    )
    assert patching.guarded("a", package="Django", versions=("0",), install=lambda: calls.append(2))
    assert calls == [1]

    with caplog.at_level(logging.WARNING, logger=patching.__name__):
        for _ in range(2):
            assert not patching.guarded(
                "b", package="Django", versions=("9.9",), also={"no-such-package": ("1",)}, install=calls.append
            )
    assert calls == [1]
    [line] = [r.getMessage() for r in caplog.records if r.name == patching.__name__]
    assert line == (
        "patch b not installed: written for Django 9.9, no-such-package 1, found Django "
        f"{patching.version('Django')}, no-such-package missing; using the library's own behaviour"
    )


# --- on another version: one warning, the library's own behaviour -------------


@pytest.fixture
def other_versions(undecided, monkeypatch, caplog):
    """Every package at a version no patch was written for; gives the gate's
    warning lines about one patch."""
    monkeypatch.setattr(patching, "version", lambda package: "0.0.1")
    caplog.set_level(logging.WARNING, logger=patching.__name__)

    def lines(name: str) -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.name == patching.__name__]
        return [line for line in found if line.startswith(f"patch {name} ")]

    return lines


def test_twisted_writes_stay_twisted_s_on_another_version(other_versions, monkeypatch):
    for name in ("write", "writeSequence"):  # as Twisted ships it: inherited from tcp.Connection
        if name in vars(tcp.Server):
            monkeypatch.delattr(tcp.Server, name)

    assert tcp_writes.install() is False
    assert tcp_writes.install() is False

    assert "write" not in vars(tcp.Server) and "writeSequence" not in vars(tcp.Server)
    [line] = other_versions(tcp_writes.NAME)
    assert line.startswith(f"patch {tcp_writes.NAME} not installed: written for Twisted 26.10.0, found Twisted 0.0.1")


def test_daphne_requests_parse_forms_as_twisted_does_on_another_version(other_versions, monkeypatch):
    monkeypatch.setattr(WebRequest, "__init__", inspect.unwrap(WebRequest.__init__))

    assert form_parsing.install() is False

    assert make_request()._parsePOSTFormSubmission is True
    assert len(other_versions(form_parsing.NAME)) == 1


def test_django_s_own_asgi_handler_serves_on_another_version(other_versions):
    assert type(handler.application()) is ASGIHandler
    assert type(handler.application()) is ASGIHandler
    assert len(other_versions(handler.NAME)) == 1


@pytest.mark.django_db
def test_statements_go_through_django_s_cursor_on_another_version(other_versions):
    from jobs.db import sql

    assert sql.fetchone("SELECT %s::int + 1", [41]) == (42,)
    with sql.cursor() as c:
        assert type(c) in (CursorWrapper, CursorDebugWrapper)
    assert len(other_versions(prepared_cursor.NAME)) == 1


def test_the_cluster_runs_as_django_q2_ships_it_on_another_version(other_versions, monkeypatch):
    monkeypatch.setattr(cluster, "_install", lambda: pytest.fail("installed on another version"))
    monkeypatch.setattr(delivery, "install", lambda: False)

    assert cluster.install() is False
    assert len(other_versions(cluster.NAME)) == 1


def test_the_monitor_acknowledges_every_row_on_another_version(other_versions, make_job):
    """The runner's receiver is muted: the task keeps its ack_id for Django-Q2's
    monitor, and the job still runs (as a direct call would)."""
    from jobs.models import Job
    from jobs.worker import runner

    try:
        assert delivery.install() is False
        job = make_job("demo.noop")
        task = {**broker_rows_task(job), "ack_id": 12345}
        pre_execute.send(sender="django_q", func=task["func"], task=task)
        task["func"](*task["args"], **task["kwargs"])

        assert task["ack_id"] == 12345
        assert Job.objects.get(id=job.id).state == "succeeded"
        assert len(other_versions(delivery.NAME)) == 1
    finally:
        pre_execute.disconnect(dispatch_uid=delivery.RUNNER_RECEIVER)
        pre_execute.connect(runner._note_delivery, dispatch_uid=delivery.RUNNER_RECEIVER)


def broker_rows_task(job) -> dict:
    from django_q.models import OrmQ

    return OrmQ.objects.get(key=job.queue).task


def test_django_q2_signs_the_tasks_on_another_version(other_versions, monkeypatch):
    signed = []
    monkeypatch.setattr(SignedPackage, "dumps", lambda task: signed.append(task) or "signed")

    assert broker._sign(dict(TASK)) == "signed"
    assert signed == [TASK]
    assert len(other_versions(broker.SIGNING_PATCH)) == 1


# --- the shapes the patches rely on -------------------------------------------


def _params(function) -> list[str]:
    return list(inspect.signature(inspect.unwrap(function)).parameters)


def test_shape_of_twisted_s_tcp_write_path():
    assert _params(abstract.FileDescriptor.write) == ["self", "data"]
    assert _params(tcp.Connection.write) == ["self", "bytes"]
    assert _params(tcp.Connection.writeSequence) == ["self", "iovec"]
    ours, theirs = socket.socketpair()
    try:
        server = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 1, MemoryReactor())
        for name in ("TLS", "connected", "disconnecting", "_writeDisconnected", "_tempDataLen", "offset", "socket"):
            assert hasattr(server, name), name
        assert isinstance(server.dataBuffer, bytes)
    finally:
        ours.close()
        theirs.close()


def test_shape_of_daphne_smake_request():
    original = inspect.unwrap(WebRequest.__init__)
    kinds = [p.kind for p in inspect.signature(original).parameters.values()]
    assert kinds[1:] == [inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD]
    assert "http.Request.__init__(self, *args, **kwargs)" in inspect.getsource(original)
    assert inspect.signature(http.Request.__init__).parameters["parsePOSTFormSubmission"].default is True


def test_shape_of_django_s_asgi_handler():
    assert _params(ASGIHandler.__call__) == ["self", "scope", "receive", "send"]
    assert _params(ASGIHandler.handle) == ["self", "scope", "receive", "send"]
    assert _params(ASGIHandler.get_response_async) == ["self", "request"]
    assert _params(ASGIHandler.get_response) == ["self", "request"]
    assert _params(ASGIHandler.load_middleware) == ["self", "is_async"]
    # The handler forces sync middleware where Django asks for async, and
    # handle() reaches get_response_async, which it runs on its threads.
    assert "self.load_middleware(is_async=True)" in inspect.getsource(ASGIHandler.__init__)
    assert "self.run_get_response(request)" in inspect.getsource(ASGIHandler.handle)
    assert "self.get_response_async(request)" in inspect.getsource(ASGIHandler.run_get_response)


def test_shape_of_django_s_cursor_wrapper():
    from django.db.backends.postgresql.base import ServerBindingCursor

    assert _params(CursorWrapper._execute) == ["self", "sql", "params", "ignored_wrapper_args"]
    assert "self._execute_with_wrappers(" in inspect.getsource(CursorWrapper.execute)
    assert _params(CursorDebugWrapper.execute) == ["self", "sql", "params"]
    assert _params(CursorDebugWrapper.debug_sql)[:3] == ["self", "sql", "params"]
    assert "prepare" in inspect.signature(psycopg.Cursor.execute).parameters
    assert issubclass(ServerBindingCursor, psycopg.Cursor)
    for name in ("validate_no_broken_transaction", "wrap_database_errors", "close_if_health_check_failed"):
        assert hasattr(connection, name), name
    assert hasattr(psycopg.Connection, "prepare_threshold")


def test_shape_of_django_q2_s_cluster_internals():
    from django_q.cluster import get_mp_context

    assert _params(Sentinel.spawn_cluster) == ["self"]
    assert _params(Cluster.sig_handler) == ["self", "signum", "frame"]
    assert _params(Stat.__init__) == ["self", "sentinel"]
    assert callable(get_mp_context)
    for name in ("task_queue", "stop_event", "queue_name"):
        assert name in inspect.getsource(Sentinel), name
    # Django-Q2's get() counts down its `size` after multiprocessing's get(),
    # whose blocking path _recording_get repeats.
    assert "self.size.increment(-1)" in inspect.getsource(inspect.unwrap(TaskQueue.get))
    blocking = inspect.getsource(multiprocessing.queues.Queue.get)
    for step in ("if self._closed:", "with self._rlock:", "res = self._recv_bytes()", "self._sem.release()"):
        assert step in blocking, step
    assert "_ForkingPickler.loads(res)" in blocking
    # waking_pusher: Django-Q2's spawn_pusher, with our pusher in its place.
    from django_q.pusher import pusher

    assert _params(pusher) == ["task_queue", "event", "broker"]
    spawn_pusher = inspect.getsource(inspect.unwrap(Sentinel.spawn_pusher))
    assert "self.spawn_process(pusher, self.task_queue, self.event_out, self.broker)" in spawn_pusher
    assert "if event.is_set():" in inspect.getsource(pusher)


def test_shape_of_django_q2_s_task_handling_for_ack_id():
    from django_q import monitor, worker

    assert 'pre_execute.send(sender="django_q", func=f, task=task)' in inspect.getsource(worker.worker)
    assert "result_queue.put(task)" in inspect.getsource(worker.worker)
    assert 'task.pop("ack_id", False)' in inspect.getsource(monitor)


def test_shape_of_django_q2_s_signed_task():
    from django.core import signing
    from django_q.conf import Conf

    assert _params(SignedPackage.dumps) == ["obj", "compressed"]
    assert hasattr(signing, "b62_encode")
    assert Conf.PREFIX and Conf.SECRET_KEY
    assert SignedPackage.loads(broker._sign(dict(TASK))) == TASK
