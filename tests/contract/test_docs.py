"""Docs that cannot drift: README's configuration table is the settings object's own description."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_matches_settings() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
