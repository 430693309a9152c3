"The docs site (`make docs`) in a real browser: every page loads from loopback with its title, its figures decode, and no request fails or error is logged."
import functools, http.server, shutil, subprocess, threading
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
CHROMIUM = shutil.which("chromium")
# Debian's chromium as root, headless; without the networking flags it keeps trying to reach its own services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    "Serves files without logging each request."
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def site():
    "The built site, served on 127.0.0.1 for the module's tests."
    subprocess.run(["make", "-s", "docs"], cwd=ROOT, check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(ROOT / "_docs")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ROOT / "_docs", f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def pages(folder: Path) -> list[str]:
    "The site's top-level pages: one per notebook."
    return sorted(p.name for p in folder.glob("*.html"))


def test_one_page_per_notebook(site):
    folder, _ = site
    assert pages(folder) == sorted(f"{nb.stem}.html" for nb in (ROOT / "nbs").glob("*.ipynb"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_every_page_in_chromium(site):
    from playwright.sync_api import sync_playwright
    folder, base = site
    problems, seen = [], {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("console", lambda m: problems.append(f"{page.url}: console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("requestfailed", lambda r: problems.append(f"{page.url}: failed request {r.url} ({r.failure})"))
        page.on("response", lambda r: problems.append(f"{page.url}: {r.status} for {r.url}") if r.status >= 400 else None)
        for name in pages(folder):
            page.goto(f"{base}/{name}", wait_until="networkidle")
            heading = page.locator("h1").first.inner_text().strip()
            images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
            seen[name] = (page.title(), heading, images)
        browser.close()
    assert not problems, "\n".join(problems)
    for name, (title, heading, images) in seen.items():
        assert heading and title.startswith(heading), f"{name}: title {title!r}, heading {heading!r}"
        assert all(images), f"{name}: {images.count(False)} of {len(images)} images did not decode"
    assert seen["index.html"][1] == "thinkdiff_nb"
    headings = [heading for _, heading, _ in seen.values()]
    assert len(set(headings)) == len(headings), f"pages share a heading: {sorted(h for h in headings if headings.count(h) > 1)}"


def test_sidebar_lists_every_notebook_once():
    import yaml
    def files(items): return [f for i in items for f in (files(i["contents"]) if isinstance(i, dict) else [i])]
    listed = files(yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])
    assert sorted(listed) == sorted(nb.name for nb in (ROOT / "nbs").glob("*.ipynb"))
