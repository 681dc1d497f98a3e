"""The README and docs/ hold together: every relative link leads to a file that exists,
every doc is linked from the README, and the README stays what a newcomer reads."""

import os
import re

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")
DOCS = sorted(name for name in os.listdir(os.path.join(REPOSITORY, "docs")) if name.endswith(".md"))


def read(relative):
    with open(os.path.join(REPOSITORY, relative), encoding="utf-8") as file:
        return file.read()


@pytest.mark.parametrize("document", ["README.md"] + [f"docs/{name}" for name in DOCS])
def test_every_relative_link_leads_to_a_file(document):
    base = os.path.dirname(os.path.join(REPOSITORY, document))
    targets = [target for target, _ in LINK.findall(read(document)) if "://" not in target]

    missing = [target for target in targets if not os.path.exists(os.path.normpath(os.path.join(base, target)))]

    assert missing == [], f"{document} links to missing files: {missing}"


def test_the_readme_links_every_doc_and_stays_short():
    readme = read("README.md")

    assert [name for name in DOCS if f"(docs/{name})" not in readme] == []
    assert len(readme.splitlines()) < 250
    assert "## Quick start\n\n```sh\nmake demo\nmake test\n```\n" in readme
