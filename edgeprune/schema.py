"""Declarative validation of the user's JSON input files (rules, target profiles).

A schema is data: ``{field: Check}``. ``check_object`` walks one JSON object against it and raises one
`EdgepruneError` line that names the file and the field path, e.g.
``rules file my.json: rules[3].max_params must be an integer, got 'abc'``. ``read_json_file`` turns every
way a file can fail to be JSON (missing, a folder, binary, too big, too deeply nested) into one line too.

``safe_pattern`` bounds the cost of a user's layer-name regex. Python's ``re`` backtracks, so a pattern
with a quantifier inside a quantifier (``(a+)+``) or a quantified alternation (``(a|a)+``) takes time
exponential in the name's length, and k variable-length quantifiers in a row take about n^(k+1) for
``re.search`` on a name of n characters. The bound, checked when the rules file is read (no timers):
at most ``MAX_PATTERN_CHARS`` characters, no variable-length quantifier nested in another or applied to
an alternation, at most ``MAX_VARIABLE_REPEATS`` variable-length quantifiers. Measured worst case
within the bound (``\\w*\\w*\\w*!`` on 100 / 200 characters): 0.04 / 0.6 s per name; four took 0.7 / 24 s.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgepruneError

MAX_JSON_BYTES = 4 * 1024 * 1024  # rules and target files are hand-written: a few KB
MAX_PATTERN_CHARS = 200
MAX_VARIABLE_REPEATS = 3


def show(value: Any, limit: int = 40) -> str:
    """A value as the error message quotes it: JSON-ish, short."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# A check returns None when the value is fine, else the problem as "must be …, got …".
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Str:
    nonempty: bool = False

    def __call__(self, v: Any) -> str | None:
        if not isinstance(v, str) or (self.nonempty and not v):
            return f"must be a{' non-empty' if self.nonempty else ''} string, got {show(v)}"
        return None


@dataclass(frozen=True)
class Bool:
    def __call__(self, v: Any) -> str | None:
        return None if isinstance(v, bool) else f"must be true or false, got {show(v)}"


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None

    def __call__(self, v: Any) -> str | None:
        if not _is_int(v):
            return f"must be {'a positive' if (self.lo, self.hi) == (1, None) else 'an'} integer, got {show(v)}"
        if (self.lo, self.hi) == (1, None) and v < 1:
            return f"must be a positive integer, got {v}"
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            lo = "-inf" if self.lo is None else self.lo
            hi = "inf" if self.hi is None else self.hi
            return f"must be an integer in [{lo}, {hi}], got {v}"
        return None


@dataclass(frozen=True)
class Num:
    """A finite number in [lo, hi] (``lo_open``: (lo, hi])."""

    lo: float
    hi: float
    lo_open: bool = False

    def __call__(self, v: Any) -> str | None:
        if not _is_num(v):
            return f"must be a number, got {show(v)}"
        if not ((self.lo < v) if self.lo_open else (self.lo <= v)) or v > self.hi:
            return f"must be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}], got {v}"
        return None


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def __call__(self, v: Any) -> str | None:
        return (
            None
            if isinstance(v, str) and v in self.choices
            else f"must be one of {', '.join(self.choices)}, got {show(v)}"
        )


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose every item passes ``item`` (the first bad one is named by its index)."""

    item: Check
    what: str = "list"

    def __call__(self, v: Any) -> str | None:
        if not isinstance(v, list):
            return f"must be a {self.what}, got {show(v)}"
        for i, x in enumerate(v):
            problem = self.item(x)
            if problem:
                return f"[{i}] {problem}"
        return None


@dataclass(frozen=True)
class NameList:
    """A list of names from a fixed vocabulary (roles): unknown names are listed with the known ones."""

    choices: tuple[str, ...]
    noun: str

    def __call__(self, v: Any) -> str | None:
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return f"must be a list of {self.noun} names, got {show(v)}"
        bad = [x for x in v if x not in self.choices]
        if bad:
            return f"has unknown {self.noun}(s) {bad}; known {self.noun}s: {', '.join(self.choices)}"
        return None


@dataclass(frozen=True)
class Range01:
    """[min, max] with 0 <= min <= max < 1 (a sparsity range)."""

    def __call__(self, v: Any) -> str | None:
        if not (isinstance(v, list) and len(v) == 2 and all(_is_num(x) for x in v)):
            return f"must be [min, max] (two numbers), got {show(v)}"
        if not 0.0 <= v[0] <= v[1] < 1.0:
            return f"range [{float(v[0])}, {float(v[1])}] must satisfy 0 <= min <= max < 1"
        return None


@dataclass(frozen=True)
class Pattern:
    """A regex that compiles and is within `safe_pattern`'s bound."""

    def __call__(self, v: Any) -> str | None:
        if not isinstance(v, str):
            return f"must be a regex string, got {show(v)}"
        return safe_pattern(v)


def field_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def field_problems(raw: dict[str, Any], schema: dict[str, Check], path: str = "") -> list[str]:
    """Every field of ``raw`` that fails its check, as "path.field must be …, got …" (schema order)."""
    out = []
    for key, check in schema.items():
        if key in raw:
            problem = check(raw[key])
            if problem:
                out.append(f"{field_path(path, key)}{'' if problem.startswith('[') else ' '}{problem}")
    return out


def check_object(
    raw: Any,
    schema: dict[str, Check],
    where: str,
    path: str,
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """``raw`` as a dict after checking it against ``schema``; the first problem raises one line."""
    if not isinstance(raw, dict):
        raise EdgepruneError(f"{where}: {path or 'the file'} must be an object, got {show(raw)}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise EdgepruneError(f"{where}: {path or 'top level'}: unknown key(s) {unknown}; allowed: {sorted(schema)}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise EdgepruneError(f"{where}: {path or 'top level'}: missing {', '.join(missing)}")
    problems = field_problems(raw, schema, path)
    if problems:
        raise EdgepruneError(f"{where}: {problems[0]}")
    return raw


# ----------------------------------------------------------------------------------------------- files


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def read_json_file(path: str | Path, what: str) -> Any:
    """Parse a small user JSON file; ``what`` ("rules file", "target file") starts every error line."""
    path = Path(path)
    try:
        if path.is_dir():
            raise EdgepruneError(f"{what} {path} is a folder; pass the JSON file inside it")
        if path.exists() and not path.is_file():  # a FIFO or a device such as /dev/zero would never end
            raise EdgepruneError(f"{what} {path} is not a regular file; pass a JSON file")
        with path.open("rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise EdgepruneError(f"{what} {path} is over {MAX_JSON_BYTES:,} bytes; is it the right file?")
        text = raw.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except FileNotFoundError:
        raise EdgepruneError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise EdgepruneError(f"{what} {path} is not UTF-8 text (a binary file?); pass the JSON file") from None
    except json.JSONDecodeError as exc:
        raise EdgepruneError(f"{what} {path} is not valid JSON: {exc}") from None
    except _NonFinite as exc:
        raise EdgepruneError(f"{what} {path}: {exc} is not allowed in JSON; use a finite number") from None
    except RecursionError:
        raise EdgepruneError(f"{what} {path} nests too deeply to be a {what}; check its contents") from None
    except OSError as exc:
        raise EdgepruneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------------------------- regexes


def _children(av: Any) -> list:
    """The sub-patterns inside one parsed item's argument (groups, branches, lookarounds, repeats)."""
    from re import _parser  # the stdlib parser re.compile uses; its item shapes are stable across 3.11+

    if isinstance(av, _parser.SubPattern):
        return [av]
    if isinstance(av, (tuple, list)):
        return [c for x in av for c in _children(x)]
    return []


def _walk(items: Any, under_repeat: bool, counts: list[int]) -> str | None:
    from re import _constants as c

    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            lo, hi, body = av
            variable = lo != hi
            if variable:
                counts[0] += 1
                if under_repeat:
                    return "nests a quantifier inside a quantifier (like (a+)+), which can take exponential time"
            problem = _walk(body, under_repeat or variable, counts)
            if not problem and variable and any(sub_op == c.BRANCH for sub_op, _ in _flatten(body)):
                problem = "repeats an alternation (like (a|b)+), which can take exponential time; use a [class]"
        else:
            problem = next((p for sub in _children(av) if (p := _walk(sub, under_repeat, counts))), None)
        if problem:
            return problem
    return None


def _flatten(items: Any) -> list:
    """Every item of a parsed pattern, at any depth."""
    out = []
    for op, av in items:
        out.append((op, av))
        for sub in _children(av):
            out.extend(_flatten(sub))
    return out


def safe_pattern(pattern: str) -> str | None:
    """None when ``pattern`` compiles and is within the bound in the module docstring, else the problem."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed"
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"is not a valid regex ({exc}), got {show(pattern)}"
    from re import _parser

    counts = [0]
    problem = _walk(_parser.parse(pattern), False, counts)
    if problem is None and counts[0] > MAX_VARIABLE_REPEATS:
        problem = (
            f"has {counts[0]} variable-length quantifiers; at most {MAX_VARIABLE_REPEATS} are allowed "
            "(each multiplies the matching time by the name's length)"
        )
    return None if problem is None else f"{show(pattern)} {problem}"
