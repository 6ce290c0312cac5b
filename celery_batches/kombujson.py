"""kombu's JSON (with its types: dates, decimals, UUIDs...), through one encoder and one decoder.

``kombu.utils.json.dumps`` and ``loads`` build a new encoder or decoder at every call, which costs
more than encoding a job's arguments; a batch encodes and decodes them by the million. The text
and values are kombu's (types registered with kombu later are seen: the encoder and decoder ask
kombu's registry at each call)."""

from __future__ import annotations

import json

from kombu.utils import json as kjson

__all__ = ["dumps", "loads"]

dumps = kjson.JSONEncoder().encode
loads = json.JSONDecoder(object_hook=kjson.object_hook).decode
