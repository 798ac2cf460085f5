"""Reading a user's task file (JSONL or CSV): rows as dicts, one clear error per problem.

A leaf module (no dietprune imports but the error type), so the task registry can check a
custom task's fields and the data loader can read its rows without importing each other.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import DietpruneError


def read_file_fields(path: str | os.PathLike) -> list[str]:
    """Field names of a user task file (first record); clear errors for empty/malformed files."""
    rows = read_user_file(Path(path), limit=1)
    return list(rows[0])


def read_user_file(path: Path, limit: int | None = None) -> list[dict]:
    if not path.is_file():
        raise DietpruneError(f"task file not found: {path}")
    try:
        return _parse_user_file(path, limit)
    except UnicodeDecodeError as exc:
        raise DietpruneError(f"task file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise DietpruneError(f"cannot read task file {path}: {exc.strerror or exc}") from exc


def _parse_user_file(path: Path, limit: int | None) -> list[dict]:
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            try:
                for row in csv.DictReader(fh):
                    rows.append(row)
                    if limit and len(rows) >= limit:
                        break
            except csv.Error as exc:
                raise DietpruneError(f"task file {path}: malformed CSV ({exc})") from exc
    elif path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DietpruneError(f"task file {path}, line {lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DietpruneError(f"task file {path}, line {lineno}: expected a JSON object")
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    else:
        raise DietpruneError(f"task file {path}: use .jsonl or .csv")
    if not rows:
        raise DietpruneError(f"task file {path} is empty")
    return rows
