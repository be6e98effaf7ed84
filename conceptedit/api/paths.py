"""Path text from recipes and command lines, checked before the operating system sees it.

``Path("a\\0b").is_file()`` raises ``ValueError`` and a 5,000-character name raises ``OSError``
from the first ``stat``; a recipe holding either must get a recipe error naming the field, not
a traceback from deep inside a check. Every place that turns user text into a path asks
:func:`path_text_problem` first.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

#: Longest single file or folder name, in bytes, on the file systems conceptedit runs on (ext4,
#: xfs, btrfs, APFS, NTFS all allow 255).
NAME_MAX = 255
#: Longest whole path, in bytes, that Linux system calls accept (PATH_MAX, terminator included).
PATH_MAX = 4096

_SEPARATORS = re.compile(rb"[/\\]")


def path_text_problem(text: str) -> str | None:
    """What makes ``text`` unusable as a path on any file system, or None if nothing does.

    The answer completes a sentence that starts with the field, e.g. "model.id holds a NUL
    character".
    """
    if "\x00" in text:
        return "holds a NUL character (\\0), which no file name can contain"
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        return "holds characters the file system cannot encode (lone surrogates)"
    if len(raw) >= PATH_MAX:
        return f"is {len(raw):,} bytes long; a path may be at most {PATH_MAX - 1:,}"
    longest = max((len(part) for part in _SEPARATORS.split(raw)), default=0)
    if longest > NAME_MAX:
        return f"has a file or folder name of {longest:,} bytes; each name may be at most {NAME_MAX}"
    return None


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages that quote user input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 12] + f"...({len(text):,} chars)"


def _usable_path_text(value: str) -> str:
    problem = path_text_problem(value)
    if problem is not None:
        raise PydanticCustomError("path_text", "the path {problem}", {"problem": problem})
    return value


def _path_as_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


#: A recipe field or method parameter that names a file or folder: text the operating system
#: can take as a path (no NUL, not over the length limits), checked when the recipe loads.
#: ``pathlib.Path`` values given from Python are taken as their text.
PathText = Annotated[str, BeforeValidator(_path_as_text), AfterValidator(_usable_path_text)]
