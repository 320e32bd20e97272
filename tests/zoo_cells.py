"""The zoo tier's test body, shared by tests/test_zoo_*.py (split in files so that pytest-xdist's
two workers share the load): each model is saved in every format once per module, every cell runs
every verb, and each cell's result must be all ✓ and equal the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import zoo

pytest.importorskip("transformers", reason="the zoo tier needs the test extra (transformers)")

README = Path(__file__).resolve().parents[1] / "README.md"


def make_tests(names: list[str]):
    @pytest.fixture(scope="module")
    def zoo_results(tmp_path_factory):
        return {}

    def cell(zoo_results, tmp_path_factory, name, fmt):
        entry = zoo.ZOO[name]
        if name not in zoo_results:
            zoo_results[name] = zoo.run_model(entry, tmp_path_factory.mktemp(name))
        res = zoo_results[name][(name, fmt)]
        readme = zoo.readme_cells(README.read_text()).get((name, fmt))
        assert readme == zoo.cell_text(res, entry.why_not.get(fmt, "")), \
            f"README's zoo table says {readme!r} for {name}/{fmt}; run python scripts/zoo_table.py"
        if res is None:
            pytest.skip(f"{name} cannot be saved as {fmt}: {entry.why_not[fmt]}")
        bad = {v: r for v, r in res.items() if r not in ("ok", "n/a")}
        gap = zoo.KNOWN_GAPS.get((name, fmt))
        if gap:
            assert bad, f"{name}/{fmt} now passes: remove it from tests/zoo.py KNOWN_GAPS and rerun scripts/zoo_table.py"
            pytest.xfail(f"known gap: {gap} ({bad})")
        assert not bad, f"{name}/{fmt}: {bad}"

    params = [(n, f) for n in names for f in zoo.FORMATS]
    test = pytest.mark.parametrize("name,fmt", params, ids=[f"{n}-{f}" for n, f in params])(cell)
    return zoo_results, test
