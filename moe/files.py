"""Files written whole or not at all, and JSON-lines files read with one-line errors.

Every file or folder the package writes (checkpoints, caches, exports) goes through
`atomic_write` or `atomic_folder`: the content is written beside its destination under a
hidden temporary name, fsynced, then renamed into place in one step, so a crash at any moment
leaves either the whole new thing or the old one, never half of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """`with atomic_folder(final) as tmp:` fill `tmp`; on leaving, every file in it is fsynced and
    the folder renamed to `final` (replacing an empty or older `final`). On an error the
    temporary folder is removed and `final` is left as it was."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        mode = 0o666 & ~current_umask()  # what open() gives; some writers (safetensors) make files 0600
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(mode)
            fsync(path)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSON-lines file; a line that is not a
    JSON object holding every `required` key is a one-line error naming the file and line."""
    path = Path(path)
    keys = [f'"{key}"' for key in required] + [f'optional "{key}"' for key in optional]
    expected = "a JSON object" + (" with " + " and ".join(keys) if keys else "")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or any(key not in record for key in required):
            raise ValueError(f"{path}:{number}: expected {expected}")
        records.append((number, record))
    return records
