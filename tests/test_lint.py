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


#: the only modules that may import the WebUI's (or Forge's) code
WEBUI_HOSTS = {"lib_merge/hosts/a1111.py", "lib_merge/hosts/forge.py"}
WEBUI_PACKAGES = ("modules", "modules_forge", "backend")


def test_only_the_host_modules_import_the_webui():
    offenders = [
        p.relative_to(ROOT).as_posix() for p in (ROOT / "lib_merge").rglob("*.py")
        if p.relative_to(ROOT).as_posix() not in WEBUI_HOSTS and any(
            line.lstrip().startswith(tuple(f"{kw} {pkg}" for kw in ("import", "from") for pkg in WEBUI_PACKAGES))
            for line in p.read_text().splitlines())
    ]
    assert offenders == []


def test_the_webui_hosts_exist():
    """The allow-list names real files, so a move cannot silently turn the check above into a no-op."""
    assert all((ROOT / path).is_file() for path in WEBUI_HOSTS)


def test_python_version_supported():
    assert sys.version_info >= (3, 10)
