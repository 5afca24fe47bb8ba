"""A `user_config` section read over its dataclass's defaults (serving/capture.py's
`capture`, serving/drift.py's `drift`): what every such section checks first."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def over_defaults(section: str, raw: Any, defaults: Any, error: type[ValueError]) -> dict[str, Any]:
    """`raw`'s settings over the dataclass instance `defaults`' values; `error` names the
    section when `raw` is not a mapping or names a setting the dataclass has not."""
    if not isinstance(raw, dict):
        raise error(f"{section}: expected a mapping, got {raw!r}")
    unknown = sorted(set(raw) - set(type(defaults).__dataclass_fields__))
    if unknown:
        raise error(f"{section}: unknown setting(s) {', '.join(unknown)}")
    return {**asdict(defaults), **raw}
