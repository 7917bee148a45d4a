"""The README and the documentation site say what the code does (their Python runs in test_readme.py).

Every ``sbmoe`` command line in a ``bash`` block names a verb and flags that exist; every flag and
verb written in the text exists; every link reaches a file; every page is in the navigation; the
README's quickstarts are the pages' own; the README stays a guide; the site builds with
``mkdocs build --strict`` (when mkdocs is installed: it is in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sbmoe.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
# The studies as `sbmoe report` wrote them: linked from the site, not edited, so not checked here.
WRITTEN_BY_REPORT = DOCS / "results"
# Flags of other programs that the pages show beside sbmoe's.
OTHER_PROGRAMS_FLAGS = {
    # torchrun
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--master_addr",
    "--master_port",
    "--standalone",
    "--logdir",  # tensorboard
    "--strict",  # mkdocs build
}


def pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if WRITTEN_BY_REPORT not in path.parents)


def guides() -> list[Path]:
    return [README, *pages()]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def command_lines(block: str) -> list[list[str]]:
    """The arguments after ``sbmoe`` (or ``-m sbmoe.cli``) of each command in a bash block."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"(?:^|[\s;&|(])(?:\S*/)?(?:sbmoe|-m sbmoe\.cli)\s+(.*)", line):
            rest = re.split(r"\s(?:#|&&|\|\||;|&|\|)\s?|\s&$", match.group(1))[0]
            try:
                commands.append(shlex.split(rest))
            except ValueError:  # an unbalanced quote in a comment-like line
                commands.append(rest.split())
    return commands


def test_the_readme_is_a_guide_not_a_book():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250 and len(text) <= 25_000, (len(text.splitlines()), len(text))


def test_every_sbmoe_command_line_names_a_verb_and_its_flags():
    known, checked = verbs(), 0
    common = options(build_parser())
    for path in guides():
        for block in blocks(path.read_text(encoding="utf-8"), "bash"):
            for arguments in command_lines(block):
                if not arguments or arguments[0].startswith("-"):
                    continue  # `sbmoe --help`
                verb = arguments[0]
                assert verb in known, f"{path.relative_to(REPO)}: `sbmoe {verb}` is no verb"
                for token in arguments[1:]:
                    flag = token.strip("[]").split("=")[0]
                    if flag.startswith("--"):
                        assert flag in options(known[verb]) | common, (
                            f"{path.relative_to(REPO)}: `sbmoe {verb}` has no flag {flag}"
                        )
                checked += 1
    assert checked >= 40, checked  # the pages' examples, not a parser that found nothing


def test_every_flag_and_verb_in_the_text_exists():
    known = verbs()
    every_flag = set().union(options(build_parser()), *(options(parser) for parser in known.values()))
    for path in guides():
        text = prose(path.read_text(encoding="utf-8"))
        for code in re.findall(r"`([^`\n]+)`", text):
            if re.search(r"\.py\b", code):
                continue  # a benchmark script's own flags
            for flag in re.findall(r"(?:^|\s|\[)(--[a-z][a-z0-9_-]*)", code):
                assert flag in every_flag | OTHER_PROGRAMS_FLAGS, (
                    f"{path.relative_to(REPO)}: {flag} in `{code}`"
                )
            for verb in re.findall(r"^sbmoe ([a-z][a-z-]*)", code):
                assert verb in known, f"{path.relative_to(REPO)}: `sbmoe {verb}` in `{code}`"


def test_the_command_line_page_lists_every_verb():
    table = (DOCS / "guide" / "command-line.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `sbmoe ([a-z-]+)` \| (.*?) \|", table, flags=re.MULTILINE)
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert listed == [(action.dest, action.help) for action in subparsers._choices_actions]


def test_json_lines_in_the_examples_parse():
    for path in guides():
        for block in blocks(path.read_text(encoding="utf-8"), "bash"):
            for line in block.splitlines():
                if line.startswith("{"):
                    json.loads(line)


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_links(text: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", link)]


def test_every_relative_link_reaches_a_file():
    for link in relative_links(README.read_text(encoding="utf-8")):
        assert (REPO / link.split("#")[0]).is_file(), f"README.md: {link}"
    site_link = hooks().site_link
    for path in DOCS.rglob("*.md"):  # the results pages too: the site has to reach what they link
        source = path.relative_to(DOCS).as_posix()
        for link in relative_links(path.read_text(encoding="utf-8")):
            target = Path(os.path.normpath(path.parent / site_link(source, link.split("#")[0])))
            assert target.is_file() and DOCS in target.parents, f"docs/{source}: {link}"


def navigation(entries) -> list[str]:
    found = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found.extend(navigation(value) if isinstance(value, list) else [value])
    return found


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = navigation(config["nav"])
    assert len(listed) == len(set(listed))
    on_disk = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert set(listed) == on_disk


def test_the_readme_quickstarts_are_the_pages_own():
    readme = README.read_text(encoding="utf-8")
    [python] = blocks(readme, "python")
    assert python in blocks((DOCS / "python-api.md").read_text(encoding="utf-8"), "python")
    command_line = [block for block in blocks(readme, "bash") if "sbmoe train" in block]
    assert command_line and command_line[0] in blocks(
        (DOCS / "guide" / "command-line.md").read_text(encoding="utf-8"), "bash"
    )


def test_the_site_builds_with_strict_checks(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    environment = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "site" / "bench-results.html").is_file()  # bench/RESULTS.md, as a page


def test_the_presets_table_gives_a_plain_bert_the_token_limit_it_gets(tiny_bert_dir, tmp_path):
    """docs/model.md said plain transformers backbones get 256 tokens; they get their own 512 positions."""
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from sbmoe.config.model import ModelConfig
    from sbmoe.model.retriever import Retriever

    table = (DOCS / "model.md").read_text(encoding="utf-8")
    documented = re.search(r"plain transformers: [^|]*?\(BERT: (\d+)", table)
    assert documented, "docs/model.md's presets table lost a plain BERT's token limit"
    bert = tmp_path / "bert"
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    config.max_position_embeddings = 512  # BERT's; its tokenizer says 512 too
    BertModel(config).save_pretrained(bert)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(bert)
    resolved = Retriever.from_config(ModelConfig(backbone=str(bert)), device="cpu").config
    assert resolved.max_query_length == resolved.max_doc_length == int(documented.group(1))
