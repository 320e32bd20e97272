"""Run the zoo tier (tests/zoo.py) and write its architectures x formats x verbs table into the README.

    python scripts/zoo_table.py            # rewrite the README's table from a fresh run
    python scripts/zoo_table.py --check    # exit 1 if the README's table differs from the run

The table is what the tier measured, never typed by hand; tests/test_zoo_*.py fail when a cell's
result differs from the README's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import zoo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--models", nargs="*", default=list(zoo.ZOO))
    args = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"zoo: {name}", file=sys.stderr, flush=True)
            res = zoo.run_model(zoo.ZOO[name], Path(tmp) / name)
            for key, r in res.items():
                if r and any(v not in ("ok", "n/a", "not run") for v in r.values()):
                    print(f"  {key[1]}: {r}", file=sys.stderr)
            results.update(res)
    table = zoo.render_table(results)
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(zoo.TABLE_BEGIN, 1)
    old, tail = rest.split(zoo.TABLE_END, 1)
    new = f"{head}{zoo.TABLE_BEGIN}\n{table}\n{zoo.TABLE_END}{tail}"
    if args.check:
        if new != readme:
            print("the README's zoo table differs from this run", file=sys.stderr)
            return 1
        return 0
    (ROOT / "README.md").write_text(new)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
