"""MkDocs hooks: the pages that live outside docs/ and the links that point there.

``bench/RESULTS.md`` stays beside the benchmark scripts that write it; the site shows it as
``bench-results.md``. Links written relative to the repository (``../../bench/RESULTS.md`` from
``docs/results/``, ``../docs/results/query-side.md`` from ``bench/``) are rewritten to the page
that the site has for them, so ``mkdocs build --strict`` checks them like any other link.

Pages written by ``sbmoe report`` and the studies (``docs/results/``) nest lists by 2 spaces, as
GitHub reads them; Python-Markdown nests by 4, and would flatten them. Their indentation is doubled
as the site reads them, so the files stay as they were written.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

# Repository files that the site shows as a page: repository path -> page in docs/.
OUTSIDE_PAGES = {"bench/RESULTS.md": "bench-results.md"}
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.) ")


def repository_path(page_source: str, link: str) -> str:
    """Where ``link``, written in the repository file shown as ``page_source``, points in the repository."""
    shown = {page: source for source, page in OUTSIDE_PAGES.items()}
    source = shown.get(page_source, "docs/" + page_source)
    return posixpath.normpath(posixpath.join(posixpath.dirname(source), link))


def site_link(page_source: str, link: str) -> str:
    """``link`` as the site resolves it from ``page_source``: unchanged unless it leaves docs/."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", link):
        return link
    path, _, anchor = link.partition("#")
    target = repository_path(page_source, path)
    if target in OUTSIDE_PAGES:
        target = "docs/" + OUTSIDE_PAGES[target]
    if not target.startswith("docs/"):
        return link  # mkdocs --strict reports it
    relative = posixpath.relpath(target[len("docs/") :], posixpath.dirname(page_source) or ".")
    return relative + ("#" + anchor if anchor else "")


def nest_lists_by_four(markdown: str) -> str:
    """Double the indentation inside lists of a page that nests them by 2 spaces (outside code)."""
    lines = markdown.splitlines()
    if not any(re.match(r"^  (?:[-*+]|\d+\.) ", line) for line in lines):
        return markdown
    out, in_list, fence = [], False, False
    for line in lines:
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence or line.lstrip().startswith("```"):
            out.append(line)
            continue
        if LIST_ITEM.match(line) and not line.startswith(" "):
            in_list = True
        elif line.strip() and not line.startswith(" "):
            in_list = False
        if in_list and line.startswith(" "):
            line = " " * (2 * (len(line) - len(line.lstrip(" ")))) + line.lstrip(" ")
        out.append(line)
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else "")


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = page.file.src_uri
    if source in OUTSIDE_PAGES.values():
        [outside] = [path for path, shown in OUTSIDE_PAGES.items() if shown == source]
        markdown = (Path(config["docs_dir"]).parent / outside).read_text(encoding="utf-8")
    markdown = nest_lists_by_four(markdown)
    return LINK.sub(lambda m: m.group(1) + site_link(source, m.group(2)) + m.group(3), markdown)
