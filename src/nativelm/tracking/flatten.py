"""Turn nested parameters into MLflow params, leaving secrets out."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

# leaf names that may hold credentials: never logged, whatever section they are in
SECRET_KEY = re.compile(r"(password|passphrase|secret|api_key|access_key|private_key|credential|auth)", re.I)
MAX_PARAM_CHARS = 6000  # MLflow's limit for one param value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to dotted keys with string values, secrets dropped."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, sort_keys=True) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def params_hash(tree: dict[str, Any]) -> str:
    """Stable short hash of a parameter tree (canonical JSON), for tags and comparisons."""
    canon = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]
