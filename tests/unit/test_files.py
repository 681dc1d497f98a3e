"""Unit tests for certrelay.files: only regular files are read, nothing else is opened."""

import os
import socket
import threading

import pytest

from certrelay import files

LIMIT = 64 * 1024


def content():
    return b"version=1\nname=herzbube.ch\n"


def read(path, limit=LIMIT):
    """Read `path` the way the spool reads an entry: by name, in its directory."""
    directory = os.open(os.path.dirname(str(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return files.read_regular(os.path.basename(str(path)), directory, limit)
    finally:
        os.close(directory)


def refusal_reading(path, **keywords):
    with pytest.raises(files.UnsafeFile) as caught:
        read(path, **keywords)
    return str(caught.value)


def test_regular_file_is_read(tmp_path):
    path = tmp_path / "herzbube.ch"
    path.write_bytes(content())

    assert read(path) == content()


@pytest.mark.parametrize("size", [0, 1, LIMIT])
def test_regular_file_up_to_the_limit_is_read_whole(tmp_path, size):
    path = tmp_path / "entry"
    path.write_bytes(b"x" * size)

    assert read(path) == b"x" * size


@pytest.mark.parametrize("size, limit", [(LIMIT + 1, LIMIT), (11, 10)])
def test_file_larger_than_the_limit_is_refused(tmp_path, size, limit):
    path = tmp_path / "entry"
    path.write_bytes(b"x" * size)

    assert refusal_reading(path, limit=limit) == f"larger than {limit} bytes"


@pytest.mark.parametrize("target", ["real", "missing"], ids=["to-a-regular-file", "dangling"])
def test_symbolic_link_is_refused_not_followed(tmp_path, target):
    (tmp_path / "real").write_bytes(content())
    link = tmp_path / "link"
    link.symlink_to(tmp_path / target)

    assert refusal_reading(link) == "not a regular file (symbolic link)"


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    outcome = []

    def read_in_thread():
        try:
            read(path)
        except files.UnsafeFile as error:
            outcome.append(str(error))

    reader = threading.Thread(target=read_in_thread, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():
        # Unblock the reader stuck in open(2), so that the test run can go on.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=10)
        pytest.fail("read_regular blocked on a FIFO")

    assert outcome == ["not a regular file (FIFO)"]


def test_directory_is_refused(tmp_path):
    (tmp_path / "dir").mkdir()

    assert refusal_reading(tmp_path / "dir") == "not a regular file (directory)"


def test_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))

        assert refusal_reading(path) == "not a regular file (socket)"


def test_character_device_is_refused():
    assert refusal_reading("/dev/null") == "not a regular file (character device)"


def test_missing_file_is_refused_as_unopenable(tmp_path):
    assert refusal_reading(tmp_path / "gone").startswith("cannot open: ")
