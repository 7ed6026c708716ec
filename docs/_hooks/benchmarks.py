"""MkDocs hook: fill the benchmarks page from ``benchmarks/results/``.

Each ``*.md`` table there is *included* with a ``pymdownx.snippets``
directive (never copied into docs/), and each ``*.png`` plot is published
under ``benchmarks/results/`` and shown below the table whose name it
starts with.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

MARKER = "<!-- benchmark-results -->"
RESULTS = Path("benchmarks") / "results"


def _results_dir(config):
    return Path(config["config_file_path"]).resolve().parent / RESULTS


def on_files(files, config):
    folder = _results_dir(config)
    for png in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        files.append(File.generated(config, (RESULTS / png.name).as_posix(), abs_src_path=str(png)))
    return files


def _section(table, plots):
    text = table.read_text(encoding="utf-8").lstrip()
    lines = [] if text.startswith("#") else [f"## {table.stem.replace('_', ' ').capitalize()}", ""]
    lines += [f'--8<-- "{(RESULTS / table.name).as_posix()}"', ""]
    lines += [f"![{p.stem}]({(RESULTS / p.name).as_posix()})\n" for p in plots]
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "benchmarks.md" or MARKER not in markdown:
        return markdown
    folder = _results_dir(config)
    tables = sorted(folder.glob("*.md")) if folder.is_dir() else []
    plots = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not tables and not plots:
        body = ('!!! note "No results yet"\n    Run the scripts in `benchmarks/`; they write their tables and '
                "plots to `benchmarks/results/`, and this page shows them on the next build.")
        return markdown.replace(MARKER, body)
    sections, used = [], set()
    for table in tables:
        mine = [p for p in plots if p.stem.startswith(table.stem) and p not in used]
        used.update(mine)
        sections.append(_section(table, mine))
    rest = [p for p in plots if p not in used]
    if rest:
        sections.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({(RESULTS / p.name).as_posix()})\n" for p in rest))
    return markdown.replace(MARKER, "\n\n".join(sections))


def on_serve(server, config, builder):
    folder = _results_dir(config)
    if folder.is_dir():
        server.watch(str(folder))
    return server
