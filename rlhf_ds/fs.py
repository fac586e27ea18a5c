"""Directories that appear whole or not at all (built models, SFT results, anything cached).

A directory is built under a temporary name beside its final place, gets its marker file last, and is
then renamed into place. A reader that sees the marker sees a finished directory; a build killed half
way leaves only a temporary directory, which the next build ignores.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def publish_directory(final: str | os.PathLike, build: Callable[[Path], object], marker: str,
                      marker_text: str) -> Path:
    """Run ``build(tmp_dir)``, write ``tmp_dir/marker``, then rename ``tmp_dir`` to ``final``.

    A finished ``final`` (marker present) is kept and returned at once. A ``final`` without its marker
    is left over from an interrupted older layout and is replaced. Concurrent builders (several ranks
    resolving the same name) are safe: the first rename wins and the others discard their copy.
    """
    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        (tmp / marker).write_text(marker_text)
        if final.exists() and not (final / marker).exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fsync_tree(root: str | os.PathLike, files: bool = True) -> None:
    """Flush ``root`` to disk: every file below it (``files``) and every directory entry, so that a
    rename that publishes it is never seen before its contents survive a crash."""
    for folder, _, names in os.walk(root):
        if files:
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not files:
            break


def replace_directory(final: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Build a new version of ``final`` beside it and swap it in: a reader sees the old directory or the
    whole new one, never a half-written one (at worst, after a crash between the two renames, the old
    one under ``.<name>.old`` and no ``final``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = final.parent / f".{final.name}.old"
    try:
        build(tmp)
        fsync_tree(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_tree(final.parent, files=False)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
