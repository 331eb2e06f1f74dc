"""Errors a user can fix, and the words each front end gives them.

Every error a user can fix by changing what they asked for (a flag, a DAG param, a file, a setting) derives
from ``UserError``: the CLI prints it as one line with exit code 2, a DAG task fails with its message. The
library names what is at fault by its field name (``budget_usd``), which is also the DAG param's name; a
front end with other names for them words the message in its own terms (``worded``: the CLI's flags).

Standard library only: the CLI checks its flags with these before it imports anything heavy.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping


class UserError(Exception):
    """A mistake in what was asked, with the fix in the message. ``fields``: the request fields the message
    names verbatim (e.g. ``budget_usd``), so that a front end can put its own names for them in their place."""

    def __init__(self, message: str, *, fields: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each of its fields replaced by ``names[field]`` (where there is one)."""
        text = str(self)
        for name in self.fields:
            if name in names:
                text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", names[name], text)
        return text


class ContractError(UserError, ValueError):
    """Input that breaks its contract (a frame, a request, a backend's settings); the message names the
    frame, column, field or flag and the fix."""


def closest_first(name: str, known: Iterable[str]) -> list[str]:
    """``known`` ordered by likeness to ``name`` (a typo's intended name first), for 'known names are ...'."""
    # ties alphabetical, so the order is the same whatever order the names came in
    return sorted(set(known), key=lambda k: (-difflib.SequenceMatcher(None, name, k).ratio(), k))


def unknown_name(what: str, name: str, known: Iterable[str], *, field: str | None = None) -> ContractError:
    """'unknown backend 'openia': known are openai, bedrock, replay' (closest first), naming ``field``."""
    label = field or what
    return ContractError(
        f"unknown {label} {name!r}: the known {what}s are {', '.join(closest_first(name, known))}",
        fields=(field,) if field else (),
    )
