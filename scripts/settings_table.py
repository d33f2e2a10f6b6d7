#!/usr/bin/env python3
"""Print README's "Configuration" table from the one settings object, so the table cannot drift from the code.

    python scripts/settings_table.py            # print the table
    python scripts/settings_table.py --check    # exit 1 when README.md's table differs (the docs test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "server"))

from grym_synth.settings import Settings  # noqa: E402

HEADER = "| flag | environment | default | meaning |\n|---|---|---|---|\n"


def _default(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        return str(value) if value.is_absolute() else f"./{value}"
    return str(value)


def table() -> str:
    rows = []
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        flags = f"`{flag}` / `--no-{flag[2:]}`" if info.annotation is bool else f"`{flag}`"
        rows.append(f"| {flags} | `GRYM_{name.upper()}` | `{_default(info.default)}` | {info.description} |")
    return HEADER + "\n".join(rows) + "\n"


def readme_table(readme: str) -> str:
    start = readme.index(HEADER)
    end = readme.index("\n\n", start)
    return readme[start:end + 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md instead of printing")
    parser.add_argument("--write", action="store_true", help="replace README.md's table")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    if args.write:
        readme_path.write_text(readme.replace(readme_table(readme), table()))
        return 0
    if args.check:
        if readme_table(readme) != table():
            print("README.md's Configuration table is out of date: run scripts/settings_table.py --write",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
