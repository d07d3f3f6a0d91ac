"""Checks of what a user gives, numbers, choices and ``KEY=VALUE`` option texts: one message
shape everywhere, and nan and inf are never numbers. Each check raises ``SmiError`` naming the
option, the bad value and a valid example."""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Iterable

from smi_engine.errors import SmiError


def _fail(flag: str, value: Any, problem: str, example: Any) -> None:
    raise SmiError(f"{flag} {value} {problem}: pass e.g. {flag} {example}")


def number(flag: str, value: Any, example: Any, *, low: float | None = None, high: float | None = None,
           exclusive: str = "", integer: bool = False) -> None:
    """``value`` is a finite number (an integer if ``integer``) within the given bounds, which
    it may equal unless ``exclusive`` names them: ``"low"``, ``"high"`` or ``"both"``."""
    low_open, high_open = exclusive in ("low", "both"), exclusive in ("high", "both")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        _fail(flag, repr(value), "is not " + ("a whole number" if integer else "a number"), example)
    if not math.isfinite(value):
        _fail(flag, value, "is not a finite number", example)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if high is None:
            bound = f"above {low:g}" if low_open else f"at least {low:g}"
        elif low is None:
            bound = f"below {high:g}" if high_open else f"at most {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        _fail(flag, value, f"must be {bound}", example)


def at_least(flag: str, value: Any, minimum: int, example: Any) -> None:
    """A whole number of at least ``minimum`` (counts, sizes, epochs)."""
    number(flag, value, example, low=minimum, integer=True)


def positive(flag: str, value: Any, example: Any) -> None:
    number(flag, value, example, low=0, exclusive="low")


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def flag_value(option: str, value: Any) -> bool:
    """A yes/no option given as a bool or as text (``true``/``false``, ``yes``/``no``, ``1``/``0``);
    ``option`` is how the user writes it, e.g. ``--selection-option pri.keep_remaining``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise SmiError(f"{option}={value} is not true or false: pass e.g. {option}=true")


def choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``, given as text; ``option`` is how the user writes it."""
    word = str(value).strip().lower()
    if word not in choices:
        raise SmiError(f"{option}={value} is not one of {', '.join(choices)}: pass e.g. {option}={choices[0]}")
    return word


def parse_pairs(text: str | None, flag: str, example: str) -> dict[str, Any]:
    """``k=v,k=v`` -> dict; values are Python literals where they parse (32, 0.1, True, (4, 4)),
    text otherwise. ``flag`` and ``example`` name the option in errors: one syntax for every
    option, and each error names its own flag."""
    if not text:
        return {}
    pairs: dict[str, Any] = {}
    for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SmiError(f"bad {flag} {item!r}: write KEY=VALUE pairs, e.g. {flag} {example}")
        try:
            pairs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pairs[key] = value.strip()
    return pairs


def named_options(texts: Iterable[str], flag: str, noun: str, chosen: Iterable[str], choose_flag: str,
                  example: str) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` texts (``--loss-option``, ``--selection-option``, ``--sink-option``,
    ``--scheme-option``) grouped by the NAME they are for, which must be one ``chosen``."""
    names = list(chosen)
    grouped: dict[str, dict[str, Any]] = {name: {} for name in names}
    for text in texts:
        target, sep, rest = text.partition(".")
        if not sep or "=" not in rest:
            raise SmiError(f"bad {flag} {text!r}: write NAME.KEY=VALUE, e.g. {flag} {example}")
        if target not in grouped:
            used = " ".join(f"{choose_flag} {name}" for name in names) or f"no {choose_flag}"
            raise SmiError(f"{flag} {text!r} is for {noun} {target!r}, which this run does not use ({used}): "
                           f"pass {choose_flag} {target}")
        grouped[target].update(parse_pairs(rest, flag, example))
    return grouped
