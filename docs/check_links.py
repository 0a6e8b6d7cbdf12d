"""Check every internal link of the built site: the file exists and so does the anchor.

``mkdocs build --strict`` checks the Markdown's links; this checks what the HTML finally holds (the
theme's navigation, links written as HTML, the generated reference's anchors) and that no page gives
one id twice (a link would land on the first). Run by ``make docs`` after the build:

    python docs/check_links.py site
"""

from __future__ import annotations

import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Attributes that hold a link, per tag.
LINK_ATTRS = {"a": "href", "link": "href", "img": "src", "script": "src", "source": "src"}


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.append(str(values["name"]))
        link = values.get(LINK_ATTRS.get(tag, ""))
        if link:
            self.links.append(link)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def broken_links(site: Path) -> list[str]:
    """One line per broken internal link or duplicate id, naming the page."""
    pages = {path.resolve(): parse(path) for path in sorted(site.rglob("*.html"))}
    problems = []
    for path, page in pages.items():
        where = path.relative_to(site.resolve())
        problems += [f"{where}: id {name!r} given {n} times" for name, n in Counter(page.ids).items() if n > 1]
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:  # another site: not ours to check offline
                continue
            if not parts.path:
                target = path
            elif parts.path.startswith("/"):  # from the site's root (404.html, served at any depth)
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{where}: link {link!r}: no file {target}")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else parse(target).ids
                if unquote(parts.fragment) not in ids:
                    problems.append(f"{where}: link {link!r}: no anchor #{parts.fragment} in {target.name}")
    return problems


def main(argv: list[str]) -> int:
    site = Path(argv[0] if argv else "site")
    if not (site / "index.html").is_file():
        print(f"{site}: no built site (run `make docs`)", file=sys.stderr)
        return 2
    problems = broken_links(site)
    for line in problems:
        print(line, file=sys.stderr)
    n = sum(len(parse(p).links) for p in site.rglob("*.html"))
    print(f"{site}: {n} links checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
