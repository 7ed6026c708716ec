"""Atomic replacement of a save directory (two renames) and cleanup after killed saves."""

from __future__ import annotations

import hashlib
import os
import shutil

# ------------------------------------------------------------------ file handling


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


TMP_MARK = ".rmkit-tmp-"


def temp_prefix(target):
    return f".{target.name}{TMP_MARK}"


def swap_into_place(tmp, target):
    """Make ``tmp`` the new ``target``; afterwards ``tmp`` holds the previous save (if any).

    Two plain renames (portable): the previous save is first renamed aside to
    ``<tmp>-previous``, then ``tmp`` takes its place; if the second rename
    fails the previous save is put back. Readers never see a mix of the two
    saves (:func:`load` checks the tensors against the manifest it read and
    retries while a save is in flight), and a process killed between the two
    renames leaves the previous save aside, where the next :func:`save` or
    :func:`load` puts it back.
    """
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = tmp.with_name(tmp.name + "-previous")
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, tmp)


def host_tag():
    """A short tag of this machine: temporary folders of other hosts (or containers) are judged by age."""
    import socket

    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _temp_in_use(p, target, *, max_age=3600.0):
    """Whether the temporary folder ``p`` may still belong to a running save."""
    import time

    parts = p.name[len(temp_prefix(target)):].split("-")
    try:
        pid = int(parts[0])
    except ValueError:
        pid = None
    if pid is not None and len(parts) > 2 and parts[1] == host_tag():
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    try:  # another machine or container (its PIDs mean nothing here), or an unknown name: by age
        return time.time() - p.stat().st_mtime < max_age
    except OSError:
        return False


def remove_stale_temps(target):
    """Clean what saves whose process died left beside ``target``.

    A half-written copy is removed; a previous save left aside by a process
    killed between its two renames is put back when ``target`` is missing
    (it is the last committed save). Folders of live processes are left
    alone. Errors (a read-only parent) are ignored: the temporary folders are
    hidden and never loaded as saves.
    """
    try:
        temps = sorted(target.parent.glob(temp_prefix(target) + "*"))
    except OSError:
        return
    for p in temps:
        if _temp_in_use(p, target):
            continue
        try:
            if p.name.endswith("-previous") and not target.exists():
                os.rename(p, target)
            else:
                shutil.rmtree(p)
        except OSError:
            pass


def save_in_flight(target):
    """True while a live process has a temporary folder beside ``target``."""
    try:
        return any(_temp_in_use(p, target) for p in target.parent.glob(temp_prefix(target) + "*"))
    except OSError:
        return False


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
