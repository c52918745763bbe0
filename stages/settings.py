"""A stage's settings are one frozen dataclass: the single definition of each setting.

A field made with :func:`setting` carries its default, its JSON schema and its
description; the DAG's trigger-form params (``operators.params.params_of``), the
operators' templated arguments and the stage function's parameters all come from it,
under the field's name. Deployment defaults come from ``LAION_*`` environment variables,
read once, here, when the dataclass is defined.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")
PARAM = "param"  # the metadata key of a field's JSON schema and description


def setting(default: Any, *, description: str | None = None, env: str | None = None, **schema: Any) -> Any:
    """A dataclass field that is also a DAG param.

    ``env`` names the ``LAION_*`` variable whose value, when set, replaces ``default``
    (a comma-separated list for list settings). ``schema`` is the param's JSON schema
    (``type``, ``minimum``, ``enum`` ...).
    """
    if env and os.environ.get(env):
        default = from_env(os.environ[env], default, env)
    metadata = {PARAM: {"description": description, **schema}}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def from_env(text: str, default: Any, name: str) -> Any:
    if isinstance(default, list):
        return [item for item in text.split(",") if item]
    if isinstance(default, bool) or default is None or isinstance(default, str):
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r}: expected {type(default).__name__}") from None


def param_fields(settings_class: type) -> list[dataclasses.Field]:
    """The fields of ``settings_class`` (and of settings dataclasses nested in it) that are params."""
    found = []
    for field in dataclasses.fields(settings_class):
        nested = nested_class(field)
        if nested is not None:
            found.extend(param_fields(nested))
        elif PARAM in field.metadata:
            found.append(field)
    return found


def nested_class(field: dataclasses.Field) -> type | None:
    factory = field.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def settings_from(settings_class: Callable[..., T], values: Mapping[str, Any]) -> T:
    """``settings_class`` from the params' rendered ``values`` (by field name; missing: default).

    Values rendered from templates may arrive as text ("256", "None"): each is converted
    to its field's type, and the dataclass validates the result.
    """
    arguments: dict[str, Any] = {}
    for field in dataclasses.fields(settings_class):  # type: ignore[arg-type]
        nested = nested_class(field)
        if nested is not None:
            arguments[field.name] = settings_from(nested, values)
        elif field.name in values:
            arguments[field.name] = converted(values[field.name], default_of(field), field.name)
    return settings_class(**arguments)


def converted(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, list):
        return [value] if isinstance(value, str) else list(value)
    if default is None:  # an optional setting: a template renders None as text
        return None if value in (None, "", "None") else value
    if isinstance(value, type(default)) and isinstance(value, bool) == isinstance(default, bool):
        return value
    if isinstance(default, bool) and str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name} = {value!r}: expected {type(default).__name__}") from None
