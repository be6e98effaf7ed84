"""Keeping other libraries' chatter out of conceptedit's own output.

diffusers, transformers and huggingface_hub draw their own progress bars ("Loading pipeline
components", "Loading weights", "Writing model shards") and log notices that say nothing
about the run; around rich's tables and bars they read as noise or as errors. The command
line turns them off unless ``--verbose`` or ``CONCEPTEDIT_VERBOSE=1`` asks for them. Their
warnings and errors still print: only the notices listed here are dropped.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "CONCEPTEDIT_VERBOSE"

#: Substrings of third-party log records that are harmless for every conceptedit command.
HARMLESS_NOTICES = (
    # transformers: image processors fall back to PIL without torchvision; conceptedit uses none
    "requires torchvision (not installed)",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in HARMLESS_NOTICES)


def verbose_requested() -> bool:
    """True when the environment asks for third-party output (``CONCEPTEDIT_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def drop_harmless_notices() -> None:
    """Filter :data:`HARMLESS_NOTICES` out of the loggers that make them (cheap: imports nothing).

    Records are filtered by the logger that makes them, not by its parents, so the filter goes
    on the emitting loggers themselves; call this before those libraries are imported.
    """
    drop = _DropHarmless()
    for name in ("transformers.utils.import_utils", "transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).addFilter(drop)


def show_third_party_progress(show: bool) -> None:
    """Turn diffusers', transformers' and huggingface_hub's progress bars on or off for this process."""
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    if show:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
    else:
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
