"""The documentation holds: the rendered tables equal their JSON, every relative link
resolves, the README stays a front door, and its Python example runs."""

import importlib.util
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOK = ROOT / "benchmarks" / "NOTEBOOK.md"
DOC_PAGES = [README, NOTEBOOK, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "render_notebook", ROOT / "benchmarks" / "render_notebook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (duplicates get -1, -2, ...)."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_pages_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {
        "method-and-api.md",
        "dreambooth-and-sdxl.md",
        "control.md",
        "exports-and-uis.md",
        "training-features.md",
        "evaluation.md",
        "world-and-bundled-models.md",
        "performance.md",
    } <= names
    assert NOTEBOOK.is_file()


def test_readme_is_at_most_300_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"


def test_committed_tables_equal_their_rendering():
    render = _render_module()
    assert NOTEBOOK in render.PAGES
    stale = [
        p.relative_to(ROOT) for p in render.PAGES if render.render(p.read_text()) != p.read_text()
    ]
    assert not stale, f"{stale} differ from their JSON: run python benchmarks/render_notebook.py"
    # every marker names a known table, and the notebook renders a good share of them
    used = [m.group("name") for p in render.PAGES for m in render.MARKER.finditer(p.read_text())]
    assert set(used) <= set(render.TABLES)
    assert len(render.MARKER.findall(NOTEBOOK.read_text())) >= 15


def test_render_check_mode_fails_on_a_drifted_table(tmp_path, monkeypatch, capsys):
    render = _render_module()
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- table: world_base -->\n| stale |\n<!-- /table -->\n")
    monkeypatch.setattr(render, "PAGES", [page])
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert render.main(["--check"]) == 1
    assert "differ from their rendering" in capsys.readouterr().out
    assert render.main([]) == 0  # rewrites it
    assert render.main(["--check"]) == 0
    assert "| seen | 96 |" in page.read_text()


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## In Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = _readme_example()
    assert len(code.splitlines()) <= 30
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, "README.md:In Python", "exec"), namespace)
    assert (tmp_path / "out" / "quick" / "hra_weights.safetensors").is_file()
    assert len(namespace["names"]) > 0
    assert float(namespace["diff"]) < 1e-4
    assert "max difference" in out.getvalue()
