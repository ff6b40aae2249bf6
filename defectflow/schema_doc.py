"""Generate the campaign YAML reference (docs/campaign-reference.md) from the pydantic models.

    defectflow schema --markdown > docs/campaign-reference.md
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from defectflow.campaign import Campaign, ResourceSpec
from defectflow.engines import SETTINGS


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        d = field.default
        return "null" if d is None else f"`{d!r}`" if not isinstance(d, BaseModel) else "see below"
    if field.default_factory is not None:
        try:
            d = field.default_factory()
        except TypeError:
            return "—"
        if isinstance(d, BaseModel):
            return "see below"
        return f"`{d!r}`"
    return "**required**"


def _table(model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = field.description or ""
        if not desc and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            desc = (field.annotation.__doc__ or "").strip().splitlines()[0]
        desc = desc.replace("|", "\\|")
        type_name = _type_name(field.annotation).replace("|", "\\|")
        lines.append(f"| `{name}` | {type_name} | {_default(field)} | {desc} |")
    return lines


def campaign_reference_markdown() -> str:
    out = [
        "# Campaign file reference",
        "",
        "Generated from the pydantic models by `defectflow schema --markdown`; do not edit by hand.",
        "A test fails when this file and the code disagree.",
        "",
        "## Top level",
        "",
        *(_table(Campaign)),
        "",
    ]
    for name, field in Campaign.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            doc = (ann.__doc__ or "").strip().splitlines()[0]
            out += [f"## `{name}`", "", doc, "", *_table(ann), ""]
            for sub_name, sub in ann.model_fields.items():
                sub_ann = sub.annotation
                if isinstance(sub_ann, type) and issubclass(sub_ann, BaseModel):
                    out += [f"### `{name}.{sub_name}`", "", *_table(sub_ann), ""]
    out += ["## Engines (`fidelities.low` / `fidelities.high`)", "",
            "Each fidelity is one engine with its settings, selected by `engine:`.", ""]
    for engine, cls in SETTINGS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out += [f"### `engine: {engine}`", "", doc, "", *_table(cls), ""]

    out += ["## `execution.resources.<step>`", "", *_table(ResourceSpec), ""]
    return "\n".join(out)
