"""What lmlab may write over: only what it can prove it wrote.

Every verb that writes a folder checks it first, before any work, with :func:`check_output`:

- a folder that does not exist, or is empty, is fine (it is created when the first file is written);
- a folder that is lmlab's own output of the same kind is fine: lmlab replaces its own files there and
  leaves every other file alone. "Its own" is proved by what lmlab writes, never by a name alone: a
  run folder holds lmlab's marker (:data:`MARKER`) or step checkpoints, a data folder a manifest of
  lmlab's format, a checkpoint a ``config.json`` with ``lmlab_model_config``, and so on (each kind's
  test lives beside the code that writes that kind);
- anything else is a one-line error naming the folder, unless ``overwrite``: then lmlab writes its
  files into it, replacing files of the same names, and still deletes nothing else;
- output inside a folder the verb reads (its source checkpoint, run or data) is refused;
- the folder must be writable, checked by creating (and removing) a file there before the work starts.

Temporaries are named ``.tmp-NAME-pidPID-XXXXXXXX`` (and ``.old-…`` for a folder being swapped out), so
a later run in the same folder can tell its own leftovers from a live writer's and clean them
(:func:`clean_stale`). What lmlab writes gets the permissions the umask gives (0644 under the usual
022), as any program's files do: not ``mkstemp``'s or safetensors' 0600 (:func:`honour_umask`), so a
server running as another user can read an export.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable, Sequence

from lmlab.errors import LmlabError

logger = logging.getLogger(__name__)

MARKER = ".lmlab.json"  # {"lmlab_output": KIND, "version": 1}: lmlab made this folder, as a KIND
_STALE = re.compile(r"^\.(?:tmp|old)-.+-pid(\d+)-[0-9a-f]{8}$")
_LEGACY_STALE = re.compile(r"^\.(?:tmp|old)-(?:.+-[0-9a-f]{8}|[a-z0-9_]{8})$")  # names lmlab used before


def temp_name(name: str, kind: str = "tmp") -> str:
    """A hidden name for a temporary beside ``name``: ``.tmp-NAME-pidPID-XXXXXXXX``."""
    return f".{kind}-{name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"


def umask_mode(directory: bool = False) -> int:
    """The permissions a new file (0666) or folder (0777) gets under the current umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def honour_umask(path: str | Path) -> None:
    """Give ``path`` (and, for a folder lmlab just wrote, everything in it) the umask's permissions:
    some writers (safetensors) create their files 0600 whatever the umask."""
    path = Path(path)
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if not entry.is_symlink():
            entry.chmod(dir_mode if entry.is_dir() else file_mode)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def clean_stale(folder: str | Path, name: str | None = None) -> list[str]:
    """Delete lmlab's own temporaries in ``folder`` left by killed runs (their process is gone; names
    from before this scheme, without a process id, count as stale); with ``name``, only the temporaries
    of that entry (``.tmp-NAME-…``). Returns the names removed."""
    folder = Path(folder)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if name is not None and not entry.name.startswith((f".tmp-{name}-", f".old-{name}-")):
            continue
        m = _STALE.match(entry.name)
        if not (m and not _alive(int(m.group(1)))) and not (m is None and _LEGACY_STALE.match(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        logger.warning(
            "%s: removed %d temporary file(s) left by an interrupted lmlab run (%s)",
            folder,
            len(removed),
            ", ".join(sorted(removed)[:3]),
        )
    return removed


def move_into_place(tmp: Path, out: Path) -> None:
    """Make the finished temporary folder ``tmp`` the folder ``out`` (an empty one there is replaced),
    readable as the umask says."""
    honour_umask(tmp)  # safetensors writes 0600: a server running as another user must read the output
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of it (a
    temporary beside it, fsync, rename; the temporary is removed if anything fails). The file gets the
    umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: object) -> Path:
    """Write JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[object]) -> Path:
    """Write one JSON object per line to ``path`` atomically (see :func:`write_text_atomic`)."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_marker(folder: str | Path, kind: str) -> None:
    """Mark ``folder`` as lmlab's output of ``kind`` (a run, an evaluation, a report …)."""
    write_json_atomic(Path(folder) / MARKER, {"lmlab_output": kind, "version": 1})


def marker_kind(folder: str | Path) -> str | None:
    """The kind :func:`write_marker` recorded in ``folder``, or None (no marker, or not lmlab's)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("lmlab_output") if isinstance(data, dict) and isinstance(data.get("lmlab_output"), str) else None


def owned_as(kind: str, files: Sequence[str], key: str) -> Callable[[Path], bool]:
    """The ownership test of a folder of ``files`` that lmlab marks as ``kind``: its marker, or (made by an
    lmlab from before the marker) nothing but ``files``, the first a JSON object holding ``key``."""

    def owned(folder: Path) -> bool:
        if marker_kind(folder) == kind:
            return True
        try:
            data = json.loads((folder / files[0]).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and key in data and holds_only(folder, files)

    return owned


def holds_only(folder: Path, names: Iterable[str]) -> bool:
    """Every entry of ``folder`` is one of ``names``, lmlab's marker or an lmlab temporary."""
    allowed = set(names) | {MARKER}
    return all(e.name in allowed or _STALE.match(e.name) or _LEGACY_STALE.match(e.name) for e in folder.iterdir())


def is_empty(folder: Path) -> bool:
    return holds_only(folder, ())


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def check_sources(path: Path, sources: Iterable[str | Path | None], param: str = "out") -> None:
    """Output at ``path`` must not land in (or be) a folder the command reads."""
    for source in sources:
        if source is not None and Path(source).exists() and _inside(path, Path(source)):
            raise LmlabError(
                f"{param} {path} is inside {source}, which this command reads: choose a folder outside it", params=param
            )


def check_writable(path: str | Path, param: str = "out") -> None:
    """``path`` (a folder, existing or to be made) can receive files: a probe file is created in it, or
    in its nearest existing parent, and removed. A one-line error otherwise, before any work."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise LmlabError(f"{param} {path}: {probe_dir} is not a folder; expected a folder path", params=param)
    try:
        fd, name = tempfile.mkstemp(prefix=temp_name("probe"), dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise LmlabError(
            f"{param} {path}: cannot write in {probe_dir} ({err.strerror or err}); choose a writable folder",
            params=param,
        ) from None


def check_output(
    path: str | Path,
    kind: str,
    owned: Callable[[Path], bool],
    *,
    overwrite: bool = False,
    param: str = "out",
    sources: Iterable[str | Path | None] = (),
) -> Path:
    """Check, before any work, that ``path`` may receive lmlab's output of ``kind`` (see the module's
    rules); ``owned(folder)`` says whether an existing folder is lmlab's own output of that kind.
    Cleans lmlab's stale temporaries there. Returns ``path`` as a Path."""
    path = Path(path)
    check_sources(path, sources, param)
    if path.exists() and not path.is_dir():
        raise LmlabError(f"{param} {path} exists and is not a folder: choose a new or empty folder", params=param)
    if path.is_dir() and not is_empty(path) and not owned(path) and not overwrite:
        raise LmlabError(
            f"{param} {path} exists and is not an lmlab {kind}: choose an empty or new {param}, or pass overwrite "
            "(lmlab then writes its own files there and deletes nothing else)",
            params=f"{param} overwrite",
        )
    check_writable(path, param)
    clean_stale(path)
    return path


def check_output_file(path: str | Path, *, overwrite: bool = False, param: str = "output") -> Path:
    """Check, before any work, that a file may be written at ``path``: not a folder, not an existing
    file unless ``overwrite``, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise LmlabError(f"{param} {path} is a folder: expected a file name", params=param)
    if path.exists() and path.stat().st_size > 0 and not overwrite:
        raise LmlabError(
            f"{param} {path} exists: choose a new file name, or pass overwrite to replace it",
            params=f"{param} overwrite",
        )
    check_writable(path.parent, param)
    return path
