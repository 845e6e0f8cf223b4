"""Regenerate the supported-ops listings from the op registry (``qcompile.ops``).

docs/ops.md holds the full table (ONNX op -> what it becomes inside the integer core),
between its ``<!-- ops-table:begin -->`` / ``<!-- ops-table:end -->`` markers; README.md
holds the op names alone, between ``<!-- ops-list:begin -->`` / ``<!-- ops-list:end -->``.
Both come from ``ops_table()``, which is also what `qcompile ops` prints.

    python tools/readme_ops.py          # rewrite both in place
    python tools/readme_ops.py --check  # exit 1 if either is stale
"""
from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcompile.ops import ops_table  # noqa: E402

TABLE = ("<!-- ops-table:begin -->\n", "<!-- ops-table:end -->")
LIST = ("<!-- ops-list:begin -->\n", "<!-- ops-list:end -->")


def op_list(table: str) -> str:
    """The table's op names, backquoted, comma-separated, wrapped at 88 columns."""
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    return textwrap.fill(", ".join(f"`{n}`" for n in names) + ".", width=88) + "\n"


def render(text: str, markers: tuple[str, str], body: str, name: str) -> str:
    begin, end = markers
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{name} has no {begin.strip()} ... {end} markers")
    return pattern.sub(lambda _: begin + body + end, text)


def main() -> int:
    table = ops_table()
    targets = [(ROOT / "docs" / "ops.md", TABLE, table), (ROOT / "README.md", LIST, op_list(table))]
    stale = []
    for path, markers, body in targets:
        name = path.relative_to(ROOT).as_posix()
        old = path.read_text()
        new = render(old, markers, body, name)
        if new == old:
            continue
        if "--check" in sys.argv[1:]:
            stale.append(name)
        else:
            path.write_text(new)
    for name in stale:
        print(f"{name}'s supported-ops listing is stale: run python tools/readme_ops.py")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
