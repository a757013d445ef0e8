"""JSON that comes from outside (a model's header and metadata, a history row, the hash cache, a pasted recipe),
decoded by one function so that every kind of bad text fails the same clean way.

Python's json decoder recurses once per nesting level: a few thousand `[` raise RecursionError (not ValueError),
and a value nested just under the interpreter's limit decodes but breaks later, when it is printed, searched or
written back. So the length is checked before decoding and the depth after it, and both failures are a
`ValueError`, like any other bad JSON, for the caller to turn into its own message.
"""

from __future__ import annotations

import json

#: Deeper than anything this project writes or reads (a safetensors header is 3 levels, a model tree about 5).
MAX_DEPTH = 64


class UntrustedJSONError(ValueError):
    """The text is too long or nested too deeply to be what it claims to be."""


def loads(text: str | bytes, limit: int, max_depth: int = MAX_DEPTH, **options) -> object:
    """`json.loads(text, **options)` for text of at most `limit` characters (bytes) nested at most `max_depth` deep.

    Raises ValueError (json.JSONDecodeError, UnicodeDecodeError or UntrustedJSONError) for anything else.
    """
    if len(text) > limit:
        raise UntrustedJSONError(f"it is {len(text):,} characters long, more than the {limit:,} allowed")
    try:
        value = json.loads(text, **options)
    except RecursionError:
        raise UntrustedJSONError(f"it is nested more than {max_depth} levels deep") from None
    if depth(value, max_depth) > max_depth:
        raise UntrustedJSONError(f"it is nested more than {max_depth} levels deep")
    return value


def depth(value: object, stop: int) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, `[]` is 1), counted without recursion; stops past `stop`."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if deepest > stop:
            break
        pending.extend((child, level) for child in children)
    return deepest
