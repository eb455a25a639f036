"""Serialization of nested state (dicts, lists, numbers, strings, numpy arrays) without pickle.

The structure goes to JSON with each array replaced by a reference; the arrays go into
an ``.npz`` archive beside it. Loading never unpickles, so a tampered state file cannot
execute code.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

_REF = "__ndarray__"


def pack(obj: Any) -> bytes:
    """Encode ``obj`` to bytes."""
    arrays: list[np.ndarray] = []

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            arrays.append(x)
            return {_REF: len(arrays) - 1}
        if isinstance(x, dict):
            return {str(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    meta = json.dumps(walk(obj), allow_nan=False).encode()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta, dtype=np.uint8), **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    """Decode bytes made by :func:`pack`; raises ValueError on anything malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["__meta__"].tobytes())
            arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ValueError(f"not a state snapshot ({type(exc).__name__})") from None

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_REF}:
                return arrays[f"a{x[_REF]}"]
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    try:
        return walk(meta)
    except KeyError:
        raise ValueError("state snapshot references a missing array") from None
