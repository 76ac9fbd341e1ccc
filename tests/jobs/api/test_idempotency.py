"""Idempotency-Key on POST /jobs: replays, reuse with another body, races."""

from __future__ import annotations

import threading

from django.db import connection

from jobs.models import Job
from tests.jobs.api.conftest import ApiClient, assert_problem

SLEEP = {"kind": "demo.sleep", "payload": {"seconds": 1}}


def test_the_same_key_and_body_answers_200_with_the_first_job(api):
    first = api.post("/jobs", SLEEP, **{"Idempotency-Key": "k1"})
    again = api.post("/jobs", SLEEP, **{"Idempotency-Key": "k1"})

    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first
    assert again.status_code == 200
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again["Location"] == first["Location"]
    assert again.json()["idempotency_key"] == "k1"
    assert Job.objects.count() == 1


def test_the_same_key_with_another_body_is_a_422(api):
    api.post("/jobs", SLEEP, **{"Idempotency-Key": "k1"})

    response = api.post("/jobs", {**SLEEP, "priority": 9}, **{"Idempotency-Key": "k1"})

    assert_problem(response, 422, "idempotency-key-reused")
    assert Job.objects.count() == 1


def test_a_key_over_255_characters_is_a_400(api):
    response = api.post("/jobs", SLEEP, **{"Idempotency-Key": "k" * 256})

    assert_problem(response, 400, "invalid-idempotency-key")
    assert api.post("/jobs", SLEEP, **{"Idempotency-Key": "k" * 255}).status_code == 202


def test_an_empty_key_is_a_400(api):
    assert_problem(api.post("/jobs", SLEEP, **{"Idempotency-Key": ""}), 400, "invalid-idempotency-key")


def test_keys_belong_to_their_owner(make_key):
    one, other = ApiClient(make_key(name="one")), ApiClient(make_key(name="other"))

    a = one.post("/jobs", SLEEP, **{"Idempotency-Key": "shared"})
    b = other.post("/jobs", SLEEP, **{"Idempotency-Key": "shared"})

    assert (a.status_code, b.status_code) == (202, 202)
    assert a.json()["id"] != b.json()["id"]


def test_two_concurrent_posts_with_one_key_make_one_job(transactional_db, make_key):
    key = make_key()
    barrier = threading.Barrier(2)
    responses = []

    def post() -> None:
        try:
            barrier.wait(timeout=10)
            responses.append(ApiClient(key).post("/jobs", SLEEP, **{"Idempotency-Key": "race"}))
        finally:
            connection.close()  # each thread has its own connection

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(r.status_code for r in responses) == [200, 202]
    assert len({r.json()["id"] for r in responses}) == 1
    assert Job.objects.count() == 1
