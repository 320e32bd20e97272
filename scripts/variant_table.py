"""Regenerate the README's variant table from `dropcli variants --json`.

Run from the repository root after adding a variant: `python scripts/variant_table.py`.
tests/test_examples.py checks that the table lists every registered variant.
"""

import json
import subprocess
import sys

ORDER = ["standard", "vanilla", "gaussian", "alpha", "spatial", "dropblock", "cutout", "droppath", "dropact",
         "dropinv", "dropcorr", "maxdrop"]


def main() -> None:
    d = json.loads(subprocess.check_output([sys.executable, "-m", "dropcli.cli.main", "variants", "--json"]))
    d.sort(key=lambda v: (ORDER.index(v["name"]) if v["name"] in ORDER else len(ORDER), v["attaches"], v["name"]))
    rows = ["| name | train rule | test rule | attaches | params | paper |", "|---|---|---|---|---|---|"]
    for v in d:
        name = f"`{v['name']}`" + (f" (aliases: {', '.join(v['aliases'])})" if v["aliases"] else "")
        params = ", ".join(f"`{p['flag']}` (default {p['default']})" for p in v["parameters"])
        if v.get("replaces"):
            att = "replaces " + ", ".join(v["replaces"]) + (f" (+ the {'/'.join(v['absorbs'])} after it)" if v.get("absorbs") else "")
        else:
            att = v["attaches"] + (f" (rank {', '.join(map(str, v['ranks']))})" if v.get("ranks") else "")
        f = v["formula"].replace("|", "\\|")
        t = v["test_rule"].replace("|", "\\|")
        rows.append(f"| {name} | `{f}` | `{t}` | {att} | {params} | {v['paper']} |")
    s = open("README.md").read()
    start = s.index("| name | train rule |")
    end = s.index("\n## MC-dropout uncertainty")
    s = s[:start] + "\n".join(rows) + "\n" + s[end:]
    open("README.md", "w").write(s)


if __name__ == "__main__":
    main()
