"""Task parameters: frozen dataclasses whose field metadata says what each value may be.

A field made with :func:`param` carries its help text, its choices or its
limits. From that one description :func:`check` validates a Params instance
(every task's ``__post_init__`` calls it), :func:`parse_value` turns command-line
text into the field's type, and the CLI flags and widget controls are built
or checked from :func:`describe`. Every refusal is a :class:`ParamError` that
names the parameter, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

from histoscope.errors import HistoScopeError


class ParamError(HistoScopeError, ValueError):
    """A parameter value is unknown, of the wrong type, out of range or not among the choices."""


def param(
    default: Any,
    help: str,  # noqa: A002 - the name argparse and magicgui use
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
    widget: bool = True,
) -> Any:
    """A dataclass field with its help, choices and limits in ``metadata``.

    Parameters
    ----------
    default
        Default value (tuples are fine: fields are frozen).
    help
        One line for ``--help`` and the widget's tooltip.
    choices
        Allowed values (an Enum's values are taken from its type when omitted).
    min, max
        Inclusive limits for numbers (each element of a tuple of numbers).
    widget
        Whether a panel shows it (``False`` for settings only scripts change).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "min": min, "max": max, "widget": widget}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """What one parameter is: name, type, default, help, choices and limits."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    min: float | None
    max: float | None
    widget: bool

    @property
    def optional(self) -> bool:
        """``None`` is allowed."""
        return _is_optional(self.type)

    def allowed(self) -> str:
        """What values are allowed, in words."""
        base = _base(self.type)
        if typing.get_origin(base) is tuple:
            text = _type_name(self.type)
            if self.min is not None and self.max is not None:
                text += f", each from {self.min} to {self.max}"
        elif self.choices:
            text = "one of " + ", ".join(str(_plain(c)) for c in self.choices)
        elif base is bool:
            text = "true or false"
        elif self.min is not None or self.max is not None:
            kind = "an integer" if base is int else "a number"
            if self.min is not None and self.max is not None:
                text = f"{kind} from {self.min} to {self.max}"
            elif self.min is not None:
                text = f"{kind} >= {self.min}"
            else:
                text = f"{kind} <= {self.max}"
        else:
            text = _type_name(self.type)
        return text + (" (or none)" if self.optional else "")


def _plain(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType | typing._UnionGenericAlias) and type(None) in (
        typing.get_args(tp)
    )  # type: ignore[attr-defined]


def _base(tp: Any) -> Any:
    """The type without ``| None``."""
    if _is_optional(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _type_name(tp: Any) -> str:
    b = _base(tp)
    if typing.get_origin(b) is tuple:
        args = typing.get_args(b)
        return f"{len(args)} comma-separated numbers" if Ellipsis not in args else "numbers"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(
        b, getattr(b, "__name__", str(b))
    )


def describe(cls: type) -> list[FieldInfo]:
    """The parameters of a Params dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        tp = hints[f.name]
        choices = m.get("choices")
        base = _base(tp)
        if choices is None and isinstance(base, type) and issubclass(base, Enum):
            choices = tuple(base)
        out.append(FieldInfo(f.name, tp, f.default, m.get("help", ""), choices, m.get("min"),
                             m.get("max"), m.get("widget", True)))  # fmt: skip
    return out


def _err(owner: str, name: str, value: Any, info: FieldInfo, why: str = "") -> ParamError:
    where = f"{owner}.{name}" if owner else name
    why = why or f"must be {info.allowed()}"
    return ParamError(f"{where}={_plain(value)!r}: {why}")


def _in_range(x: float, info: FieldInfo) -> bool:
    return (info.min is None or x >= info.min) and (info.max is None or x <= info.max)


def check_value(info: FieldInfo, value: Any, owner: str = "") -> Any:
    """``value`` checked (and coerced: int -> float, str -> Enum, list -> tuple) for ``info``."""
    if value is None:
        if info.optional:
            return None
        raise _err(owner, info.name, value, info)
    base = _base(info.type)
    if isinstance(base, type) and issubclass(base, Enum):
        try:
            value = base(_plain(value))
        except ValueError:
            raise _err(owner, info.name, value, info) from None
    elif base is bool:
        if not isinstance(value, bool | int) or value not in (0, 1):
            raise _err(owner, info.name, value, info)
        value = bool(value)
    elif base in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _err(owner, info.name, value, info)
        if base is int and float(value) != int(value):
            raise _err(owner, info.name, value, info, "must be an integer")
        value = base(value)
        if not math.isfinite(value) or not _in_range(value, info):
            raise _err(owner, info.name, value, info)
    elif typing.get_origin(base) is tuple:
        value = _check_tuple(info, value, owner)
    elif base is str:
        if not isinstance(value, str):
            raise _err(owner, info.name, value, info)
    if info.choices and _plain(value) not in [_plain(c) for c in info.choices]:
        raise _err(owner, info.name, value, info)
    return value


def _check_tuple(info: FieldInfo, value: Any, owner: str) -> tuple:
    args = [a for a in typing.get_args(_base(info.type)) if a is not Ellipsis]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _err(owner, info.name, value, info)
    fixed = Ellipsis not in typing.get_args(_base(info.type))
    if fixed and len(value) != len(args):
        raise _err(owner, info.name, value, info)
    kind = args[0] if args else float
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise _err(owner, info.name, value, info)
        if not _in_range(v, info):
            raise _err(owner, info.name, value, info)
        out.append(kind(v))
    return tuple(out)


def check(params: Any, owner: str = "") -> None:
    """Validate (and coerce in place) every field of a frozen Params instance.

    Raises
    ------
    ParamError
        Naming the first field whose value is not allowed.
    """
    owner = owner or getattr(params, "_task", "")
    for info in describe(type(params)):
        value = check_value(info, getattr(params, info.name), owner)
        object.__setattr__(params, info.name, value)


def parse_value(info: FieldInfo, text: str, owner: str = "") -> Any:
    """Command-line text for ``info`` as its type (checked)."""
    t = text.strip()
    if info.optional and t.lower() in ("none", ""):
        return None
    base = _base(info.type)
    try:
        if base is bool:
            low = t.lower()
            if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ValueError
            value: Any = low in ("true", "yes", "1", "on")
        elif base is int:
            value = int(t)
        elif base is float:
            value = float(t)
        elif typing.get_origin(base) is tuple:
            value = tuple(float(v) for v in t.split(",") if v.strip())
        else:
            value = t
    except ValueError:
        raise _err(owner, info.name, text, info) from None
    return check_value(info, value, owner)


def build(cls: type, values: Mapping[str, Any], owner: str = "") -> Any:
    """A ``cls`` instance from keyword values; unknown names are refused with the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"{owner}: " if owner else ""
        raise ParamError(
            f"{where}unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    infos = {i.name: i for i in describe(cls)}
    checked = {k: check_value(infos[k], v, owner) for k, v in values.items()}
    try:
        return cls(**checked)
    except ParamError:
        raise
    except (TypeError, ValueError) as exc:
        raise ParamError(f"{owner + ': ' if owner else ''}{exc}") from None
