"""The test tree collects as one session: pytest's default ("prepend") import mode, with no `__init__.py` in the test
folders, imports each test module by its basename, so two files of one name in different folders stop the whole run
at collection."""

from collections import Counter
from pathlib import Path


def test_test_module_names_are_unique():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
