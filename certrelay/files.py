"""Reading files that the container wrote, where any name may be a trap; replacing a
host file atomically; and whether root may trust a host file.

A name is first opened with O_PATH|O_NOFOLLOW, which opens nothing: not a FIFO (no
blocking), not a device (no side effect), not a link's target. Only once fstat() says
it is a regular file is that very inode reopened for reading through /proc/self/fd,
so nothing can be swapped in between.
"""

import os
import stat

KINDS = (
    (stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
)


def is_inside(path, directory):
    """Return True if `path` resolves to a place inside `directory`."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def trust_problems(path, file_stat):
    """Return why a root process must not trust the file at `path` (whose stat is
    `file_stat`), if it must not: the file or its directory is not root's, or others may
    write it. Used for the rules file, which chooses what root runs."""
    problems = []
    directory = os.path.dirname(os.path.abspath(path))
    for what, where, info in (
        ("rules file", path, file_stat),
        ("directory", directory, os.stat(directory)),
    ):
        if info.st_uid != 0:
            problems.append(
                f"{path}: refused: the {what} {where} is owned by uid {info.st_uid}, not root,"
                f" so that user could choose what root runs; fix: chown root {where}"
            )
        sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            problems.append(
                f"{path}: refused: the {what} {where} is writable by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}), so they could choose what root"
                f" runs; fix: chmod go-w {where}"
            )
    return problems


READ_AHEAD = 64  # files read before any of them is parsed: see read_ahead()


def read_ahead(items, read):
    """Yield (item, read(item)) for each of `items` (a sequence) in order, calling `read`
    for READ_AHEAD items before yielding the first of them.

    For many files, reading and parsing in turn measured a fifth to a quarter slower
    than reading a batch, then parsing it (likely the CPU caches, holding both kinds of
    work). The bound keeps what a hostile spool or live/ can make certrelay hold in
    memory (at most 64 KiB a file) to 4 MiB.
    """
    for start in range(0, len(items), READ_AHEAD):
        batch = items[start:start + READ_AHEAD]
        yield from zip(batch, [read(item) for item in batch])


class UnsafeFile(Exception):
    """The file is not a regular file, is too large, or cannot be opened; says why."""


def open_path(name, directory):
    """Return (O_PATH descriptor, stat) of `name` in the directory descriptor
    `directory`, without following a symbolic link. Raise UnsafeFile if it cannot be opened."""
    try:
        descriptor = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as error:
        raise UnsafeFile(f"cannot open: {error.strerror}") from None
    return descriptor, os.fstat(descriptor)


def kind(mode):
    """Return a word for the kind of file `mode` describes."""
    return next((word for test, word in KINDS if test(mode)), "regular file")


def read_opened(descriptor, info, limit):
    """Return the content of the regular file behind the O_PATH `descriptor` (whose
    stat is `info`), at most `limit` bytes; raise UnsafeFile otherwise."""
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(f"not a regular file ({kind(info.st_mode)})")
    if info.st_size > limit:
        raise UnsafeFile(f"larger than {limit} bytes")
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    reading = os.open(f"/proc/self/fd/{descriptor}", flags)
    try:
        data = os.read(reading, limit + 1)
    finally:
        os.close(reading)
    if len(data) > limit:
        raise UnsafeFile(f"larger than {limit} bytes")
    return data


def read_regular(name, directory, limit):
    """Return the bytes of the regular file `name` in the directory descriptor
    `directory`, at most `limit` of them; raise UnsafeFile if it is anything else."""
    descriptor, info = open_path(name, directory)
    try:
        return read_opened(descriptor, info, limit)
    finally:
        os.close(descriptor)


def write_atomically(path, content, mode):
    """Replace the file `path` by the bytes `content` with permissions `mode`: a
    dot-prefixed temp file in the same directory (node_exporter and haproxy skip
    dotfiles), written, given its mode, fsynced, renamed over `path`, and the directory
    fsynced. Readers see the old file or the new one, never a part. Return the new
    file's os.stat_result. Raise OSError; the temp file is removed then."""
    directory, base = os.path.split(path)
    directory = directory or "."
    temporary = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(temporary, flags, 0o600)
    except FileExistsError:  # left by a crashed process that had our PID
        os.unlink(temporary)
        descriptor = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
            written = os.fstat(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory_descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)
    return written
