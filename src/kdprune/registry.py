"""One small generic registry: models, recipes and importance criteria register by name; config
choice types carry the name YAML and the CLI use for them."""
from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map with a decorator and errors that suggest close names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator that registers an object under `name` (default: its __name__)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered as `name`, or raise KeyError naming the known ones."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Typed choices (allocation modes, importance criteria, optimisers, ensemble reductions...): a
# config field holds an instance of one of a few small frozen dataclasses (or an Enum member), and
# code dispatches on its type. Names exist only at the YAML/CLI boundary, so each choice type is
# tagged with the lowercase name that files and flags use for it.
CHOICE_ATTR = "__choice_name__"


def choice(name: str, into: "Registry[Any] | None" = None) -> Callable[[type], type]:
    """Class decorator: tag a config choice type with its YAML/CLI name (and register it)."""

    def deco(cls: type) -> type:
        if name != name.lower():
            raise ValueError(f"choice names are lowercase, got {name!r}")
        setattr(cls, CHOICE_ATTR, name)
        if into is not None:
            into.register(name)(cls)
        return cls

    return deco


def choice_name(obj: Any) -> str | None:
    """The YAML/CLI name of a choice type, instance or Enum member (None if it is no choice)."""
    if isinstance(obj, enum.Enum):
        return str(obj.value)
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__dict__.get(CHOICE_ATTR)


def choices_of(tp: Any) -> dict[str, Any]:
    """name -> choice type (or Enum member) of a field type: a union of tagged types, one tagged
    type, or an Enum whose values are names; {} when ``tp`` is no choice field."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {str(m.value): m for m in tp}
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        members = [tp]
    names = {m: choice_name(m) for m in members if isinstance(m, type)}
    if not members or len(names) != len(members) or None in names.values():
        return {}
    return {n: m for m, n in names.items()}


def check_choice(value: Any, tp: Any, what: str) -> None:
    """ValueError unless ``value`` is an instance of one of ``tp``'s choices (names the choices:
    a string here means a name was passed where the typed object belongs)."""
    options = choices_of(tp)
    ok = [m for m in options.values() if (value is m if isinstance(m, enum.Enum) else isinstance(value, m))]
    if not ok:
        shown = ", ".join(_spell(m) for _, m in sorted(options.items()))
        hint = ""
        if isinstance(value, str):  # a YAML/CLI name where the typed object belongs
            named = options.get(value.lower())
            hint = f" (pass {_spell(named)}: names are read from YAML/CLI only)" if named else ""
        raise ValueError(f"{what} must be one of {shown}, got {value!r}{hint}")


def _spell(m: Any) -> str:
    return f"{type(m).__name__}.{m.name}" if isinstance(m, enum.Enum) else f"{m.__name__}()"


def check_choice_fields(obj: Any) -> None:
    """check_choice on every field of the dataclass ``obj`` whose type is a choice (a recipe's
    ``mode``, ``teacher_mode``...), so a wrong value fails when the config is built."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if choices_of(hints[f.name]):
            check_choice(getattr(obj, f.name), hints[f.name], f"{type(obj).__name__}.{f.name}")
