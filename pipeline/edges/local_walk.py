"""Walking a local input folder so that no single entry can stop the walk.

Raw datasets on a shared disk hold more than image files: links to nothing,
links in a loop, FIFOs (opening one waits for a writer, forever), sockets,
devices, files and sub-folders this user may not read. Each becomes one `Bad`
entry with a reason; the walk goes on. Links to folders are followed, and a
folder's (device, inode) pair names it whatever path reaches it, so one already
on the path from the root is a loop, not descended into again. Names starting
with "." are skipped, as in every listing of `pipeline.edges.storage`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple


class File(NamedTuple):
    """A regular file this user may read."""

    relpath: str
    size: int


class Bad(NamedTuple):
    """An entry with no bytes to read, and why."""

    relpath: str
    reason: str
    """`broken_link`, `link_loop`, `not_a_regular_file`, `permission_denied` or
    `unreadable` (any other error of the file system, named in `detail`)."""
    detail: str


class NotAFolder(Exception):
    """The root of the walk is missing, or not a folder; the message says which."""


def walk(root: Path) -> tuple[list[File], list[Bad]]:
    """Every file below `root` and every other entry, each sorted by relative path.

    Raises NotAFolder for a missing root (or a file), and the OSError of listing
    the root itself (PermissionError: it may not be listed): that is not one
    entry but the whole walk.
    """
    try:
        top = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise NotAFolder("no such folder") from None
    if not stat.S_ISDIR(top.st_mode):
        raise NotAFolder("not a folder")
    files: list[File] = []
    bad: list[Bad] = []
    # Folders still to list: (path, relpath, the folders above it and itself).
    todo = [(str(root), "", frozenset({(top.st_dev, top.st_ino)}))]
    while todo:
        folder, rel, above = todo.pop()
        try:
            with os.scandir(folder) as scan:
                entries = [e for e in scan if not e.name.startswith(".")]
        except OSError as e:
            if not rel:
                raise
            if e.errno != errno.ENOENT:  # a folder deleted meanwhile lists nothing
                bad.append(Bad(rel, *_os_reason(e, "list")))
            continue
        for entry in entries:
            relpath = f"{rel}/{entry.name}" if rel else entry.name
            found = _entry(entry, relpath, above)
            if isinstance(found, File):
                files.append(found)
            elif isinstance(found, Bad):
                bad.append(found)
            elif found is not None:
                todo.append((entry.path, relpath, above | {found}))
    return sorted(files), sorted(bad)


def _entry(
    entry: os.DirEntry[str], relpath: str, above: frozenset[tuple[int, int]]
) -> File | Bad | tuple[int, int] | None:
    """One listed entry: a readable regular file, a bad entry, a folder to descend
    into (its device and inode), or None for one deleted since its folder was
    listed (it is no longer there to account for)."""
    try:
        st = entry.stat()  # follows links: a link is what it points at
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            if not entry.is_symlink():
                return None  # the entry itself is gone
            return Bad(relpath, "broken_link", f"{_what(entry)}, which is missing")
        if e.errno == errno.ELOOP:
            return Bad(relpath, "link_loop", f"{_what(entry)}, in a loop of links")
        return Bad(relpath, *_os_reason(e, "stat"))
    if stat.S_ISDIR(st.st_mode):
        folder = (st.st_dev, st.st_ino)
        if folder in above:
            return Bad(relpath, "link_loop", f"{_what(entry)}, a folder that contains it")
        return folder
    if not stat.S_ISREG(st.st_mode):
        return Bad(relpath, "not_a_regular_file", f"{_kind(st.st_mode)}, not a file")
    # access() answers for this user without opening the file; the read still
    # handles a refusal (permissions can change after listing).
    if not os.access(entry.path, os.R_OK):
        return Bad(relpath, "permission_denied", "this user may not read the file")
    return File(relpath, st.st_size)


def _os_reason(e: OSError, action: str) -> tuple[str, str]:
    """(reason, detail) for an entry the file system refused to `action`."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission_denied", f"this user may not {action} it"
    return "unreadable", f"cannot {action} it: {e.strerror or e}"


def _what(entry: os.DirEntry[str]) -> str:
    """`a link to <target>`; a folder met twice without a link is a bind mount."""
    try:
        return f"a link to {os.readlink(entry.path)}"
    except OSError:
        return "a mount of a folder"


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a FIFO (named pipe)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), f"mode {mode:o}")
