"""Checks of values that come from outside: config.json fields, routers metadata, arguments of
the Python API and of the command line. One place, so that every layer refuses the same bad
value with the same one-line message: what was wrong, what is allowed.

A leaf module (it imports nothing of the project but `polar_jax.errors`), so that `models`,
`convert` and `routers` may use it.
"""

from __future__ import annotations

import argparse
import math
import numbers
import textwrap
from typing import Any, Callable, Mapping

from polar_jax.errors import PolarJaxError


def describe(value: Any) -> str:
    """`value` for a message: its repr on one line, cut to 60 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _range(low, high, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"<= {high}"
    return ""


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, floats and strings are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        allowed = " ".join(filter(None, ("an integer", _range(low, high))))
        raise PolarJaxError(f"{name} must be {allowed}, got {describe(value)}")
    return int(value)


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`); ints are
    accepted, bools and strings refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = not ((low is not None and (value <= low if low_open else value < low))
                  or (high is not None and value > high))
    if not ok:
        allowed = " ".join(filter(None, ("a finite number", _range(low, high, low_open))))
        raise PolarJaxError(f"{name} must be {allowed}, got {describe(value)}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolarJaxError(f"{name} must be true or false, got {describe(value)}")
    return value


def string(name: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or (choices is not None and value not in choices):
        allowed = f"one of {', '.join(choices)}" if choices else "a string"
        raise PolarJaxError(f"{name} must be {allowed}, got {describe(value)}")
    return value


def mapping(name: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise PolarJaxError(f"{name} must be a JSON object (a mapping), got {describe(value)}")
    return value


def listing(name: str, value: Any, length: int | None = None) -> list:
    """`value` as a list (a JSON array; tuples too), of `length` items when given."""
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        allowed = "a list" + (f" of {length} items" if length is not None else "")
        raise PolarJaxError(f"{name} must be {allowed}, got {describe(value)}")
    return list(value)


def cli_type(check: Callable[..., Any], parse: Callable[[str], Any], **limits) -> Callable[[str], Any]:
    """An argparse `type=` that parses the text with `parse` and applies `check` with `limits`,
    so the command line refuses what the Python API refuses, with the same words."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(parse, parse.__name__)
            raise argparse.ArgumentTypeError(f"cannot read {text!r} as {kind}") from None
        try:
            return check("the value", value, **limits)
        except PolarJaxError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("the value ")) from None

    convert.__name__ = check.__name__  # argparse names the type in its messages
    return convert


def cli_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse `type=` for a comma-separated list of one or more items, each read by the
    argparse type `item` (a `cli_type`): `cli_list(cli_type(integer, int, low=1))` reads
    "1,16,64" as [1, 16, 64] and refuses "", "," and "1,,2" as well as "1,0"."""

    def convert(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError("must be a comma-separated list of one or more "
                                             f"values (no empty item), got {text!r}")
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as err:
                where = f" (in the list {text!r})" if len(parts) > 1 else ""
                raise argparse.ArgumentTypeError(f"{err}{where}") from None
        return values

    convert.__name__ = f"list of {item.__name__}"
    return convert


class HelpFormatter(argparse.HelpFormatter):
    """Help pages of every command: a description's paragraphs filled (a paragraph with
    indented lines, a list or a command, kept as written), and each option's default shown
    where it has one (not None, not a flag's False) and its help does not already say it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = textwrap.dedent(text).strip().split("\n\n")
        return "\n\n".join(
            textwrap.indent(p, indent) if any(line[:1].isspace() for line in p.splitlines())
            else textwrap.fill(" ".join(p.split()), width, initial_indent=indent,
                               subsequent_indent=indent)
            for p in paragraphs)

    def _get_help_string(self, action):
        help_ = action.help or ""
        unset = action.default is None or action.default is False  # not 0, which == False
        if unset or action.default == argparse.SUPPRESS or not action.option_strings \
                or "default" in help_:
            return action.help
        return f"{help_} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, as every other error is:
    `polar-jax: error: MESSAGE (see `PROG --help`)`, exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message: str):
        self.exit(2, f"polar-jax: error: {message} (see `{self.prog} --help`)\n")
