"""README.md and docs/: every results table is what benchmarks/render.py renders from its
committed JSON, and every relative link points to a file (and heading) that exists."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import render  # noqa: E402

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


def test_every_committed_table_is_what_its_json_renders():
    stale = {}
    for doc in render.documents():
        text = doc.read_text()
        if render.rendered(text) != text:
            stale[doc.name] = True
    assert not stale, f"run python benchmarks/render.py: {sorted(stale)} differ from their results JSON"


def test_every_table_marker_names_a_known_table_and_every_table_is_shown():
    shown = set()
    for doc in render.documents():
        for m in render.MARKER.finditer(doc.read_text()):
            assert m["name"] in render.TABLES, f"{doc.name}: unknown table {m['name']}"
            shown.add(m["name"])
    assert shown == set(render.TABLES), f"tables never shown: {sorted(set(render.TABLES) - shown)}"


def test_a_changed_json_changes_the_rendered_table(tmp_path, monkeypatch):
    # the check can fail: a figure edited in the JSON no longer matches the committed table
    doc = ROOT / "docs" / "scaling.md"
    text = doc.read_text()
    import json
    data = json.loads((ROOT / "benchmarks/results/scaling.json").read_text())
    data["rows"][0]["train_samples_per_second"] += 100
    fake = tmp_path / "scaling.json"
    fake.write_text(json.dumps(data))
    monkeypatch.setitem(render.TABLES, "scaling", (str(fake), render.TABLES["scaling"][1]))
    monkeypatch.setattr(render, "ROOT", Path("/"))
    assert render.rendered(text) != text


@pytest.mark.parametrize("doc", render.documents(), ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    for target in links(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to a missing file {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{doc.name}: no heading #{anchor} in {file.name}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_a_run_that_adds_rows_names_every_command_in_the_provenance():
    from benchmarks.provenance import stamp
    first = stamp({})["provenance"]["command"]
    assert first.startswith("python ") and "; then" not in first
    assert stamp({}, earlier="python benchmarks/x.py --a")["provenance"]["command"] == \
        f"python benchmarks/x.py --a; then {first}"
