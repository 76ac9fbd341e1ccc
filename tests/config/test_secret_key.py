"""The secret key generated into the data directory when none is configured
(config/settings.py): private from its creation, and one key however many
processes start at once."""

from __future__ import annotations

import secrets
import stat
import threading

import pytest

import config.settings as conveyor_settings
from tests.conftest import wait_until


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "data"
    monkeypatch.setattr(conveyor_settings, "DATA_DIR", path)
    return path


def test_the_first_start_creates_a_private_key_file_that_later_starts_read(data_dir):
    key = conveyor_settings._local_secret_key()

    path = data_dir / "secret_key"
    assert len(key) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert conveyor_settings._local_secret_key() == key
    assert [p.name for p in data_dir.iterdir()] == ["secret_key"]  # no temporary file left


def test_two_first_starts_at_once_read_the_same_key(data_dir, monkeypatch):
    """Both find no file and generate a key; the second writes only once the
    first has finished. Both must come away with the one key the file keeps."""
    both_generated = threading.Barrier(2, timeout=20)
    first_done = threading.Event()
    given: dict[threading.Thread, str] = {}
    names = iter(["key-of-the-first-start", "key-of-the-second-start"])
    lock = threading.Lock()

    def token_urlsafe(nbytes=None) -> str:
        with lock:
            key = given[threading.current_thread()] = next(names)
        both_generated.wait()
        if key == "key-of-the-second-start":
            wait_until(first_done.is_set, timeout=20, message="the first start")
        return key

    monkeypatch.setattr(secrets, "token_urlsafe", token_urlsafe)
    read: dict[str, str] = {}

    def start(name: str) -> None:
        read[name] = conveyor_settings._local_secret_key()
        if given.get(threading.current_thread()) == "key-of-the-first-start":
            first_done.set()

    threads = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert set(read) == {"a", "b"}
    assert read["a"] == read["b"] == (data_dir / "secret_key").read_text().strip()
    assert stat.S_IMODE((data_dir / "secret_key").stat().st_mode) == 0o600
    assert [p.name for p in data_dir.iterdir()] == ["secret_key"]
