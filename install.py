"""Block Merger's installer hook: the WebUI runs it (`python install.py`, cwd = the WebUI's folder) at launch.

It installs only the runtime requirements the WebUI's environment lacks, with our version ranges, so it never
replaces a package the WebUI pinned. torch is the WebUI's own build and is never touched. Usually nothing happens:
the WebUI already has everything Block Merger uses.
"""

import re
from pathlib import Path

import launch

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
NEVER_INSTALL = {"torch"}


def requirements() -> list[tuple[str, str]]:
    """(distribution name, requirement) for each line of requirements.txt."""
    out = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            out.append((re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0], requirement))
    return out


for name, requirement in requirements():
    if name.lower() not in NEVER_INSTALL and not launch.is_installed(name):
        launch.run_pip(f'install "{requirement}"', f"{name} for Block Merger")
