"""kombu's JSON (with its types: dates, decimals, UUIDs...), through one encoder and one decoder.

``kombu.utils.json.dumps`` and ``loads`` build a new encoder or decoder at every call, which costs
more than encoding a job's arguments; a batch encodes and decodes them by the million. The text
and values are kombu's (types registered with kombu later are seen: the encoder and decoder ask
kombu's registry at each call)."""

from __future__ import annotations

import json
from typing import Any

from kombu.utils import json as kjson

__all__ = ["dumps", "keep", "loads"]

dumps = kjson.JSONEncoder().encode
_decode = json.JSONDecoder(object_hook=kjson.object_hook).decode


def loads(text: str | bytes) -> Any:
    """kombu's JSON back to values; bytes (what Redis hands back) are UTF-8 text, as kombu reads them."""
    return _decode(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)


def keep(value: Any, max_bytes: int) -> tuple[str | None, str | None]:
    """A job's return value as the JSON a ``results=True`` batch keeps, or why it cannot be kept."""
    try:
        text = dumps(value)  # ASCII (the rest is escaped): its length is its size in bytes
    except Exception as exc:  # noqa: BLE001 - whatever a value's encoding raises, the run records why
        return None, (f"result not kept: a {type(value).__name__} is not JSON serializable "
                      f"({type(exc).__name__}: {exc})")
    if len(text) > max_bytes:
        return None, f"result not kept: its JSON is {len(text)} bytes, more than result_max_bytes ({max_bytes})"
    return text, None
