"""tests/README.md maps every module of ``chunkflow/`` to the test files that exercise it; this keeps that
map true: a module added, removed or renamed, a test file renamed or deleted, and the map fails here."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "tests" / "README.md"
ROW = re.compile(r"^\|\s*`(chunkflow/[^`]+\.py)`\s*\|(.*)\|\s*$")
TEST_FILE = re.compile(r"`(tests/[^`]+\.py)`")


def parse(text: str) -> dict[str, list[str]]:
    """The map's rows: module path -> the test files its row names (in order). A module listed twice
    is an error."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            module, tests = match.group(1), TEST_FILE.findall(match.group(2))
            assert module not in rows, f"tests/README.md lists {module} twice"
            rows[module] = tests
    return rows


def problems(rows: dict[str, list[str]], root: Path = ROOT) -> list[str]:
    """What is wrong with the map against the files under ``root``; empty when it is right. A module
    whose name is unique in ``chunkflow/`` and has a ``tests/test_<name>.py`` must name that file."""
    modules = {p.relative_to(root).as_posix() for p in (root / "chunkflow").rglob("*.py")}
    stems = [Path(m).stem for m in modules]
    found = [f"{m} is not in the map in tests/README.md" for m in sorted(modules - set(rows))]
    found += [f"tests/README.md lists {m}, which does not exist" for m in sorted(set(rows) - modules)]
    for module, tests in sorted(rows.items()):
        if not tests:
            found.append(f"tests/README.md names no test file for {module}")
        found += [f"tests/README.md names {t} for {module}; it does not exist" for t in tests
                  if not (root / t).is_file()]
        stem = Path(module).stem
        mirror = f"tests/test_{stem}.py"   # a module's own test file, where its name is unique in chunkflow/
        if stems.count(stem) == 1 and (root / mirror).is_file() and mirror not in tests:
            found.append(f"tests/README.md does not name {mirror} for {module}")
    return found


def test_the_map_covers_every_module_and_names_only_test_files_that_exist():
    rows = parse(MAP.read_text())
    assert rows, "no table rows found in tests/README.md"
    assert problems(rows) == []


def test_the_check_fails_on_a_missing_module_a_stale_module_and_a_missing_test_file():
    """The check itself can fail: the real map with one row taken out, one made up, one test renamed."""
    rows = parse(MAP.read_text())
    rows.pop("chunkflow/bbox.py")
    rows["chunkflow/gone.py"] = ["tests/test_bbox.py"]
    rows["chunkflow/units.py"] = ["tests/test_renamed_units.py"]
    assert problems(rows) == [
        "chunkflow/bbox.py is not in the map in tests/README.md",
        "tests/README.md lists chunkflow/gone.py, which does not exist",
        "tests/README.md names tests/test_renamed_units.py for chunkflow/units.py; it does not exist",
        "tests/README.md does not name tests/test_units.py for chunkflow/units.py",
    ]


def test_a_row_must_name_a_test_file_and_appear_once():
    text = "| `chunkflow/units.py` | `tests/test_units.py` |\n| `chunkflow/bbox.py` | nothing yet |\n"
    assert parse(text) == {"chunkflow/units.py": ["tests/test_units.py"], "chunkflow/bbox.py": []}
    assert "tests/README.md names no test file for chunkflow/bbox.py" in problems(parse(text))
    twice = text + "| `chunkflow/units.py` | `tests/test_units.py` |\n"
    try:
        parse(twice)
    except AssertionError as err:
        assert "lists chunkflow/units.py twice" in str(err)
    else:
        raise AssertionError("a module listed twice was accepted")
