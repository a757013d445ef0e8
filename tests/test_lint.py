"""The code must also run on Python 3.10 (the WebUI's venv): ruff checks syntax and style with target py310."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    paths = [p for p in ("lib_merge", "tests", "bench", "scripts", "install.py") if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_does_not_import_the_webui():
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "lib_merge").rglob("*.py")
        if p.name != "host_a1111.py" and any(
            line.lstrip().startswith(("import modules", "from modules")) for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_python_version_supported():
    assert sys.version_info >= (3, 10)
