"""The per-file line budget (``make lint``): no source file over the budget's ``max``
lines, except those in its ``allow`` table, which may not grow past their ceiling.

The budget lives in pyproject.toml (``[tool.qcompile.line-budget]``). Exit 1, with one
line per offending file, when a file is over; an allowed file that has shrunk under the
budget is reported too, so the table only ever shrinks.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


def check(root: Path = ROOT) -> list[str]:
    """One line per problem: a file over its limit, or an allowed file back under ``max``."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["qcompile"]["line-budget"]
    limit, allow = int(cfg["max"]), {k: int(v) for k, v in cfg.get("allow", {}).items()}
    problems = []
    for top in cfg["paths"]:
        for path in sorted((root / top).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            n = len(path.read_text().splitlines())
            ceiling = allow.get(name, limit)
            if n > ceiling:
                problems.append(f"{name}: {n} lines, over its budget of {ceiling}")
            elif name in allow and n <= limit:
                problems.append(f"{name}: {n} lines, under {limit}: drop it from the allow list")
    missing = [name for name in allow if not (root / name).is_file()]
    return problems + [f"{name}: in the allow list but missing" for name in missing]


def main() -> int:
    problems = check()
    for line in problems:
        print(f"line budget: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
