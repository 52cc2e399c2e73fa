"""Where the queue file lives and who may read it (issue 11, item 13)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from segproxy.config import load
from segproxy.queue.files import private_dir, private_file


def test_a_relative_queue_path_is_under_data_dir_and_an_absolute_one_is_kept(
    tmp_path: Path,
) -> None:
    env = {"SEGPROXY_DATA_DIR": "/srv/segproxy"}
    assert load(env=env).queue.path == "/srv/segproxy/queue.db"
    assert load(env={**env, "SEGPROXY_QUEUE_PATH": "q/events.db"}).queue.path == (
        "/srv/segproxy/q/events.db"
    )
    assert load(env={**env, "SEGPROXY_QUEUE_PATH": "/var/q.db"}).queue.path == "/var/q.db"
    config = tmp_path / "segproxy.toml"
    config.write_text('data_dir = "/data"\n[queue]\npath = "mine.db"\n')
    assert load(config, env={}).queue.path == "/data/mine.db"
    assert load(env={}).queue.path == os.path.join(load(env={}).data_dir, "queue.db")


def test_directories_segproxy_makes_are_0700_and_existing_ones_are_left_alone(
    tmp_path: Path,
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chmod(theirs, 0o755)
    old = os.umask(0)
    try:
        private_dir(theirs / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(theirs.stat().st_mode) == 0o755
    assert stat.S_IMODE((theirs / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((theirs / "a" / "b").stat().st_mode) == 0o700


def test_a_new_queue_file_is_0600_and_an_existing_readable_one_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = os.umask(0)
    try:
        private_file(tmp_path / "new.db")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.db").stat().st_mode) == 0o600
    shared = tmp_path / "shared.db"
    shared.write_bytes(b"")
    os.chmod(shared, 0o644)
    with caplog.at_level(logging.WARNING, logger="segproxy.queue"):
        private_file(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644  # the operator's: left as it is
    assert "readable by others" in caplog.text
