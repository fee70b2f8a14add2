"""One strict registry idiom for every named part of sparselearn (criteria, inits, methods, ...)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def did_you_mean(text: str, choices: Iterable[str], n: int = 1) -> str:
    """``"; did you mean 'momentum'?"``: the closest of ``choices`` to ``text`` (the same name in
    another case first; up to ``n`` of them), or ``""`` where none is close. The one helper
    behind every error message that suggests a name."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = [lowered[text.lower()]] if text.lower() in lowered else []
    close = close or difflib.get_close_matches(text, choices, n=n, cutoff=0.6)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def unknown_name_message(kind: str, name: object, choices: list[str]) -> str:
    """``unknown growth 'momentun'; did you mean 'momentum'? (choices: gradient, momentum)``."""
    text = str(name)
    hint = did_you_mean(text, choices)
    return f"unknown {kind} {text!r}{hint} (choices: {', '.join(choices) or 'none'})"


class Registry(Generic[T]):
    """Maps names to registered items. Duplicates raise; unknown names raise with a close match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name must start with a letter and contain only letters, digits, "
                f"'_' or '-', got {name!r}"
            )
        if name in self._items:
            raise ValueError(
                f"{self.kind} {name!r} is already registered; pick another name "
                f"(or unregister the existing one first)"
            )
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object under ``name``."""

        def register(item: T) -> T:
            return self.register(name, item)

        return register

    def unregister(self, name: str) -> T:
        """Remove and return a registered item (for replacing a built-in, or cleaning up tests)."""
        if name not in self._items:
            raise ValueError(unknown_name_message(self.kind, name, self.names()))
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(unknown_name_message(self.kind, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
