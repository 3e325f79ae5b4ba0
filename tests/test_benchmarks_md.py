"""tools/benchmarks_md.py, which every benchmark tool writes BENCHMARKS.md through: a tool's run replaces its own
section and leaves the others' tables and the prose between them as they were."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from benchmarks_md import replace_section, write_section  # noqa: E402

SPEED = ("<!-- speed:begin -->", "<!-- speed:end -->")
BREAKDOWN = ("<!-- breakdown:begin -->", "<!-- breakdown:end -->")


def test_a_section_is_replaced_and_the_rest_of_the_repository_file_kept(tmp_path):
    text = (REPO / "BENCHMARKS.md").read_text()
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(text)
    body = text.split(SPEED[0], 1)[1].split(SPEED[1], 1)[0]
    write_section(path, body, *SPEED)
    assert path.read_text() == text  # the same body gives the same file, byte for byte

    write_section(path, "| new | table |\n", *SPEED)
    new = path.read_text()
    assert f"{SPEED[0]}\n| new | table |\n{SPEED[1]}" in new
    before, after = text.split(SPEED[0], 1)[0], text.split(SPEED[1], 1)[1]
    assert new.startswith(before) and new.endswith(after)
    assert body.strip() not in new


def test_a_file_without_the_markers_gets_the_section_after_its_title(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nprose that stays\n")
    write_section(path, "breakdown table", *BREAKDOWN)
    assert path.read_text() == f"# Benchmarks\n\n{BREAKDOWN[0]}\nbreakdown table\n{BREAKDOWN[1]}\n\nprose that stays\n"
    write_section(path, "second run", *BREAKDOWN)
    assert path.read_text().count(BREAKDOWN[0]) == 1 and "breakdown table" not in path.read_text()

    missing = tmp_path / "new.md"
    write_section(missing, "speed table\n", *SPEED)
    assert missing.read_text() == f"# Benchmarks\n\n{SPEED[0]}\nspeed table\n{SPEED[1]}\n"


def test_markers_out_of_order_or_alone_are_not_a_section():
    assert replace_section("a <!-- speed:end --> b <!-- speed:begin --> c", *SPEED, "x") is None
    assert replace_section("a <!-- speed:begin --> b", *SPEED, "x") is None
    assert replace_section("no markers", *SPEED, "x") is None
