"""The one rule for where dietprune may write, and what ``--overwrite`` may replace.

A checkpoint is written to a temporary folder and renamed into place, so the only destructive
step is replacing an existing folder. That step is allowed only for a folder that holds nothing
but a checkpoint (what ``save_pretrained``, a tokenizer and dietprune write), and never for the
current directory, one of its parents, the home or root directory, or a folder that holds or
lies inside the input model. Everything is checked before any work starts.
"""

from __future__ import annotations

import fnmatch
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import DietpruneError

# every file a checkpoint folder written by save_pretrained (model, tokenizer) or dietprune holds
CHECKPOINT_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "dietprune.json", "dietprune_mask.safetensors", "model.gguf",
)


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in CHECKPOINT_PATTERNS)


def _nonempty(output, what: str) -> Path:
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise DietpruneError(f"{what} must be a path, got {output!r}")
    if output is None or not str(output).strip():
        raise DietpruneError(f"{what} path is empty")
    return Path(output).expanduser().absolute()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def foreign_files(folder: Path) -> list[str]:
    """Entries of `folder` that a checkpoint does not hold (a user's notes, subfolders, data)."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                  if p.is_dir() or not _is_checkpoint_file(p.name))


def check_replaceable(out: Path, protect=()) -> None:
    """Raise unless replacing the existing folder `out` can lose nothing but a checkpoint."""
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, real):
        raise DietpruneError(f"refusing to replace {out}: it is the current directory or one of its parents")
    if real in (Path.home().resolve(), Path(real.anchor)):
        raise DietpruneError(f"refusing to replace {out}: it is the home or root directory")
    for p in protect:
        if p is not None and (_within(Path(p).expanduser().resolve(), real)):
            raise DietpruneError(f"refusing to replace {out}: it holds the input model {p}")
    extra = foreign_files(real)
    shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    if not (real / "config.json").is_file():
        raise DietpruneError(f"refusing to replace {out}: it does not hold a checkpoint (no config.json"
                             + (f"; it holds {shown})" if extra else ")"))
    if extra:
        raise DietpruneError(f"refusing to replace {out}: it holds files that are not part of a checkpoint "
                             f"({shown}); move them or choose another output")


def check_output_dir(output, overwrite: bool, protect=()) -> Path:
    """The absolute output folder, after every check that can be made before any work.

    `protect`: paths of the input (model folder or file); the output may neither hold them nor
    lie inside them.
    """
    out = _nonempty(output, "output")
    for p in protect:
        if p is None:
            continue
        src = Path(p).expanduser().resolve()
        real = out.resolve()
        if _within(real, src) or _within(src, real):
            raise DietpruneError(f"output {out} overlaps the input model {p}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise DietpruneError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DietpruneError(f"output folder {out} exists and is not empty (use --overwrite to replace it)")
        check_replaceable(out, protect)
    elif out.is_dir() and _within(Path.cwd().resolve(), out.resolve()):
        raise DietpruneError(f"output {out} is the current directory or one of its parents")
    parent = out.parent
    if not parent.is_dir():
        raise DietpruneError(f"cannot write output: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DietpruneError(f"cannot write output: folder {parent} is not writable")
    return out


def check_output_file(output, what: str = "output", replaceable=None) -> Path:
    """The absolute path of an output file whose folder exists and is writable.

    `replaceable(path) -> bool`: an existing file is replaced only when it says yes (a file this
    tool wrote before), so an output path that names a user's document is refused, not lost.
    """
    out = _nonempty(output, what)
    if out.is_dir():
        raise DietpruneError(f"{what} {out} is a folder; give a file name")
    if replaceable is not None and (out.exists() or out.is_symlink()) and not (out.is_file() and replaceable(out)):
        raise DietpruneError(f"refusing to replace {out}: it is not a {what} file dietprune wrote "
                             "(remove it or choose another name)")
    if not out.parent.is_dir():
        raise DietpruneError(f"cannot write {what}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DietpruneError(f"cannot write {what}: folder {out.parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise DietpruneError(f"cannot write {what}: {out} is not writable")
    return out


def input_paths(model) -> list[Path]:
    """The local files or folders a model spec reads (none for a preset name, a hub id or an object)."""
    if isinstance(model, (str, os.PathLike)) and str(model).strip():
        p = Path(model).expanduser()
        if p.exists():
            return [p]
    return []


def publish_mode(path) -> None:
    """Give a written file the mode a new file gets here (0666 less the umask), as every other
    output file has (safetensors' writer makes its files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_file(path, what: str = "output"):
    """Yield a temporary path beside `path` for a writer; when the block ends it replaces `path`.

    The temporary name is unique (mkstemp), so it never meets a user's ``PATH.tmp`` or another
    writer's file; on an error, Ctrl-C or SIGTERM (dietprune.signals) it is removed, and `path` is
    either the old file or the complete new one. The file gets the usual mode (`publish_mode`).
    """
    import tempfile

    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DietpruneError(f"cannot write {what} to {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DietpruneError(f"cannot write {what} to {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_scores_file(path: Path) -> bool:
    """A safetensors file whose header says it is a dietprune scores file."""
    import json as _json

    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100 * 2**20:
                return False
            header = _json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and (header.get("__metadata__") or {}).get("format") == "dietprune-profile"


def is_results_file(path: Path) -> bool:
    """A JSON object with a 'tasks' object (what `dietprune eval --output` writes)."""
    import json as _json

    try:
        data = _json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("tasks"), dict)


_IMAGE_MAGIC = {".png": (b"\x89PNG",), ".pdf": (b"%PDF",), ".svg": (b"<?xml", b"<svg"), ".jpg": (b"\xff\xd8",),
                ".jpeg": (b"\xff\xd8",)}


def is_image_file(path: Path) -> bool:
    """An image of the type its suffix names (a plot written before)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return any(head.startswith(m) for m in _IMAGE_MAGIC.get(Path(path).suffix.lower(), ()))
