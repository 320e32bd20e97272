"""Run the zoo tier (tests/zoo.py) and write its architectures x formats x verbs table into the README.

    python scripts/zoo_table.py            # rewrite the README's table from a fresh run
    python scripts/zoo_table.py --check    # exit 1 if the README's table differs from the run
    python scripts/zoo_table.py --models bert --times --check   # one model, and where its time goes

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
    ap.add_argument("--times", action="store_true",
                    help="print the wall and CPU seconds of every step (save, each verb) per model and format")
    args = ap.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"zoo: {name}", file=sys.stderr, flush=True)
            res = zoo.run_model(zoo.ZOO[name], Path(tmp) / name)
            for key, r in res.items():
                if r and any(v not in ("ok", "n/a") for v in r.values()):
                    print(f"  {key[1]}: {r}", file=sys.stderr)
            results.update(res)
    if args.times:
        print_times(zoo.TIMES)
    if set(args.models) != set(zoo.ZOO):  # a partial run: compare its cells with the README's, write nothing
        cells = zoo.readme_cells((ROOT / "README.md").read_text())
        differ = [k for k, r in results.items()
                  if cells.get(k) != zoo.cell_text(r, zoo.ZOO[k[0]].why_not.get(k[1], ""))]
        for k in differ:
            print(f"  {k[0]}/{k[1]}: README {cells.get(k)!r}, this run {zoo.cell_text(results[k])!r}", file=sys.stderr)
        return 1 if args.check and differ else 0
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


def print_times(times: dict) -> None:
    """Seconds per step, wall (CPU): one row per model and format, then the totals per step."""
    steps = ["save", *zoo.VERBS]
    print("| model | format | " + " | ".join(steps) + " | total |", file=sys.stderr)
    print("|" + "---|" * (len(steps) + 3), file=sys.stderr)
    rows = sorted({(m, f) for m, f, _ in times if f})
    per_step = {s: [0.0, 0.0] for s in steps}
    for m, f in rows:
        cells, tw, tc = [], 0.0, 0.0
        for s in steps:
            w, c = times.get((m, f, s), (0.0, 0.0))
            per_step[s][0] += w
            per_step[s][1] += c
            tw, tc = tw + w, tc + c
            cells.append(f"{w:.1f} ({c:.1f})")
        print(f"| {m} | {f} | " + " | ".join(cells) + f" | {tw:.1f} ({tc:.1f}) |", file=sys.stderr)
    tw = sum(v[0] for v in per_step.values())
    tc = sum(v[1] for v in per_step.values())
    print("| all | | " + " | ".join(f"{w:.1f} ({c:.1f})" for w, c in per_step.values()) + f" | {tw:.1f} ({tc:.1f}) |",
          file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
