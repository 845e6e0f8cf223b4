"""Rewrite README.md's supported-ops table from the importer's registry.

    python tools/readme_ops.py          # rewrite in place
    python tools/readme_ops.py --check  # exit 1 if the README is stale
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompile.onnx_import import ops_table  # noqa: E402

BEGIN, END = "<!-- ops-table:begin -->\n", "<!-- ops-table:end -->"


def render(readme: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit("README.md has no ops-table markers")
    return pattern.sub(lambda _: BEGIN + ops_table() + END, readme)


def main() -> int:
    path = ROOT / "README.md"
    old = path.read_text()
    new = render(old)
    if "--check" in sys.argv[1:]:
        if new != old:
            print("README.md's ops table is stale: run python tools/readme_ops.py")
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
