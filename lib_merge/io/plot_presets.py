"""Saved X/Y/Z plot settings: the shipped examples plus the user's own file (the only one ever written).

The format is the seed's `xyzpresets.json` idea: `{name: {x_type, x_values, y_type, y_values, z_type, z_values}}`.
A user entry of the same name replaces a shipped one; deleting it brings the shipped one back.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import MergeError
from ..core.untrusted_json import loads
from .write import atomic_output

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "xyz_presets.json"
FIELDS = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values")
MAX_FILE = 1_000_000
MAX_NAME = 100


def _read(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    try:
        data = loads(path.read_bytes(), MAX_FILE)
    except (OSError, ValueError) as e:
        raise MergeError(f"Cannot read the plot presets file {path}: {e}. Fix or delete it.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise MergeError(f"The plot presets file {path} must hold {{name: {{x_type, x_values, ...}}}}.")
    return {str(k): {f: str(v.get(f, "")) for f in FIELDS} for k, v in data.items()}


class PlotPresets:
    def __init__(self, user_path: str | Path, shipped: str | Path = SHIPPED):
        self.user_path = Path(user_path)
        self.shipped = Path(shipped)
        if self.user_path.resolve() == self.shipped.resolve():
            raise MergeError(f"The user's plot presets file cannot be the shipped one ({self.shipped}).")

    def all(self) -> dict[str, dict[str, str]]:
        return {**_read(self.shipped), **_read(self.user_path)}

    def names(self) -> list[str]:
        return sorted(self.all())

    def get(self, name: str) -> dict[str, str]:
        found = self.all().get((name or "").strip())
        if found is None:
            raise MergeError(f"No plot preset named {name!r}; choose one of: {', '.join(self.names()) or 'none'}.")
        return found

    def save(self, name: str, axes: dict[str, str]) -> None:
        """Add or replace `name` in the user's file (written whole, atomically)."""
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME:
            raise MergeError(f"Give the plot preset a name (1-{MAX_NAME} characters).")
        user = _read(self.user_path)
        user[name] = {f: str(axes.get(f) or "") for f in FIELDS}
        self._write(user)

    def delete(self, name: str) -> None:
        user = _read(self.user_path)
        if (name or "").strip() not in user:
            shipped = (name or "").strip() in _read(self.shipped)
            raise MergeError(f"{name!r} is a shipped plot preset; only your own can be deleted." if shipped
                             else f"No plot preset of yours is named {name!r}.")
        del user[name.strip()]
        self._write(user)

    def _write(self, user: dict) -> None:
        self.user_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.user_path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(user, indent=1, ensure_ascii=False), encoding="utf-8")
