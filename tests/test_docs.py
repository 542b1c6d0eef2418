"""The manual (mkdocs.yml, docs/) and the README, its front door: the site builds with `mkdocs build --strict`; every
internal link of the built site reaches a page and, with `#anchor`, an element of that id; every relative link of the
README reaches a file (and a heading); the README stays small and keeps the install and test commands; and every
command of the tutorial runs, as written.

The tutorial's commands are its fenced `bash` blocks, one command a line, run in order by bash in an empty folder
whose `.venv` is the environment running the tests. The install steps of its first command (`python3 -m venv .venv`,
`.venv/bin/pip install -e ".[dev]"`) are not run again: `.ci/run` runs them before the tests, and the tutorial's
command is checked to be the README's. Everything after them (the main job, the report, predictions) runs for real.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]"'
MAIN_JOB = f"{INSTALL} && .venv/bin/python -m mcn.pipeline experiment=quickstart"
TESTS = ".venv/bin/python -m pytest"
README_LIMIT = 12 * 1024  # bytes: a front door, the manual holds the rest
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)


class Page(HTMLParser):
    """One built page: its element ids, its links and its text (tags dropped, entities decoded)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.parts: list[str] = []
        self.feed(text)
        self.text = "".join(self.parts)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href") is not None:
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.parts.append(data)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def built_pages(site: Path) -> dict[Path, Page]:
    return {p: Page(p.read_text(encoding="utf-8")) for p in site.rglob("*.html") if p.name != "404.html"}


def target_file(page: Path, path: str) -> Path:
    """The file a relative link of a built page points at (`../how-to/slurm/` is that folder's index.html)."""
    target = (page.parent / unquote(path)).resolve() if path else page
    return target / "index.html" if target.is_dir() else target


def test_every_internal_link_of_the_built_site_reaches_its_page_and_anchor(site):
    pages = built_pages(site)
    assert len(pages) > 20, sorted(pages)
    broken = []
    for page, parsed in pages.items():
        for href in parsed.links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith("mailto:"):
                continue
            target = target_file(page, parts.path)
            where = f"{page.relative_to(site)}: {href}"
            if not target.is_file():
                broken.append(f"{where} (no file {target})")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else Page(target.read_text(encoding="utf-8")).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where} (no id {parts.fragment!r} in {target.relative_to(site)})")
    assert not broken, "broken links in the built manual:\n" + "\n".join(broken)


def test_home_and_tutorial_hold_the_install_and_test_commands(site):
    for page in (site / "index.html", site / "tutorial" / "index.html"):
        text = Page(page.read_text(encoding="utf-8")).text
        assert MAIN_JOB in text, f"{page.relative_to(site)} lacks the install-and-main-job command"
        assert TESTS in text, f"{page.relative_to(site)} lacks the test command"


def test_the_built_config_reference_lists_every_key_of_the_schema(site):
    """Every key of every schema dataclass, prefixed by its block or group, is on the rendered page."""
    import dataclasses

    from mcn.configs import SCHEMAS, MCNConfig

    text = Page((site / "config" / "index.html").read_text(encoding="utf-8")).text

    def keys(kind: type, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(kind):
            nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
            if f.metadata.get("group"):
                continue
            out += keys(f.default_factory, f"{prefix}{f.name}.") if nested else [f"{prefix}{f.name}"]
        return out

    wanted = keys(MCNConfig, "") + [k for (group, _), kind in SCHEMAS.items() for k in keys(kind, f"{group}.")]
    missing = [k for k in wanted if k not in text]
    assert len(wanted) > 150 and not missing, f"not on the rendered config reference: {missing}"


def test_the_readme_is_a_front_door_with_the_install_and_test_commands():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= README_LIMIT, f"README.md is {len(readme)} bytes, over {README_LIMIT}: move it to docs/"
    blocks = [body.strip() for _, body in FENCE.findall(readme.decode())]
    assert blocks[:2] == [MAIN_JOB, TESTS]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TESTS in ci, ".ci/run must run exactly the README's test command"
    assert any("mkdocs build --strict" in line for line in ci)
    assert "mkdocs serve" in readme.decode() and "mkdocs build" in readme.decode()


def github_slugs(markdown: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (outside code blocks), as it renders them."""
    text = FENCE.sub("", markdown.read_text(encoding="utf-8"))
    slugs: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        plain = re.sub(r"[`*]|(?<!\w)_+|_+(?!\w)", "", heading)  # inline code and emphasis markers
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", plain)
        slug = re.sub(r"[^\w\- ]", "", html.unescape(plain).lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.add(slug)
    return slugs


def test_every_relative_link_of_the_readme_resolves():
    text = FENCE.sub("", (ROOT / "README.md").read_text(encoding="utf-8"))
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) > 20
    broken = []
    for link in links:
        parts = urlsplit(link)
        if parts.scheme or parts.netloc:
            continue
        target = (ROOT / unquote(parts.path)).resolve() if parts.path else ROOT / "README.md"
        if not target.exists():
            broken.append(f"{link} (no file)")
        elif parts.fragment and target.suffix == ".md" and parts.fragment not in github_slugs(target):
            broken.append(f"{link} (no heading with anchor {parts.fragment!r} in {target.relative_to(ROOT)})")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)


def tutorial_commands() -> list[str]:
    text = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    lines = [line.strip() for lang, body in FENCE.findall(text) if lang == "bash" for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_tutorial_starts_with_the_readmes_install_and_main_job():
    commands = tutorial_commands()
    assert commands[0] == MAIN_JOB
    assert all(".venv/bin/" in c for c in commands), "the tutorial's commands use the venv it made"


def test_every_command_of_the_tutorial_runs(tmp_path):
    """Each command as the tutorial writes it, in order, in an empty folder (its outputs/ and digit_images/ land
    there); the install steps are .ci/run's (see the module's docstring)."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's mcn and conf/, whichever the venv has installed
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        # the main job shares the cores with the other pytest workers: its share of threads (mcn.training.runtime)
        "MCN_LOCAL_JOBS": os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"),
    }
    for command in tutorial_commands():
        steps = command.split(" && ")
        run = " && ".join(s for s in steps if s not in INSTALL.split(" && "))
        start = time.monotonic()
        proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        took = time.monotonic() - start
        assert proc.returncode == 0, f"{command}\nfailed (exit {proc.returncode}) after {took:.0f} s:\n" + (
            proc.stdout[-3000:] + proc.stderr[-5000:]
        )
        print(f"{took:6.1f} s  {command[:100]}")
    run_dir = tmp_path / "outputs/runs/pipeline/experiment-quickstart_22564123"
    assert (run_dir / "summary_study.md").is_file(), sorted(p.name for p in run_dir.iterdir())
    predictions = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + 20, predictions[:3]


def test_hydra_help_points_at_the_manual_and_keeps_its_listing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mcn.train", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "docs/index.md" in out and "mkdocs serve" in out
    assert "== Configuration groups ==" in out and "fusion: TransformerBase" in out  # Hydra's own listing
    assert "\ntrainer:\n" in out  # and the composed config
    for page in re.findall(r"docs/[\w/-]+\.md", out):
        assert (ROOT / page).is_file(), f"--help names {page}, which does not exist"
