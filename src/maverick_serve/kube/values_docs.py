"""The chart's values.schema.json and the values table of its README, both from `HelmValues`."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from maverick_serve.config.helm_values import HelmValues, values_schema


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if key == "cluster":
            rows.append((key, "ClusterConfig", "The application; see the top-level README's Configuration."))
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(_rows(ann, f"{key}."))
        else:
            default: Any = info.get_default(call_default_factory=True)
            rows.append((key, json.dumps(default, default=str), info.description or ""))
    return rows


def values_table() -> str:
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, default, desc in _rows(HelmValues, ""):
        cells = [c.replace("|", r"\|") for c in (default, desc)]
        lines.append(f"| `{key}` | `{cells[0]}` | {cells[1]} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- values-table:begin -->", "<!-- values-table:end -->"


def with_values_table(readme: str) -> str:
    """The chart README with the table between its markers replaced by the generated one."""
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{values_table()}{END}{tail}"
