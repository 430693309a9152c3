"""The docs site (`make docs`) in a real browser: every page, results pages included, loads from loopback with its
title, its figures decode, maths renders with the site's own KaTeX, no table on a prose page is wider than its box, and
no request fails, errs or leaves 127.0.0.1. Every notebook's page shows the outputs the notebook stores."""
import ast, functools, html, http.server, importlib.util, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urlsplit
import nbformat, pytest, yaml

pytestmark = pytest.mark.slow  # the whole site built and loaded in chromium

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium")
# Debian's chromium as root, headless; without the networking flags it keeps trying to reach its own services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# the quickest pipeline notebook that draws a figure: about 17 s with these settings, kernel start-up included
RESULTS_NB = "06_generate"
RESULTS_SETTINGS = {"samples": 1, "methods": ["thinkdiff"], "sample_steps": 2, "judge": "none"}
# the pages of prose, whose tables must fit the page's column (no part of them scrolled out of sight)
PROSE_PAGES = ["index.html", "provenance.html", "findings.html", "paper_scale.html", "tooling.html"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    "Serves files without logging each request."
    def log_message(self, *args): pass


def execute_pipeline(run: Path, work: Path, log) -> subprocess.Popen:
    "Start papermill on the results notebook, as `make reproduce` runs it: no MPLBACKEND, so figures are inline."
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    settings = yaml.safe_dump({**RESULTS_SETTINGS, "output_dir": str(work)})
    cmd = [BIN / "papermill", "--no-progress-bar", "--log-level", "WARNING", ROOT / "nbs" / f"{RESULTS_NB}.ipynb",
           run / f"{RESULTS_NB}.ipynb", "-y", settings]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site built as `make docs` builds it, with a run of one executed notebook, in a temporary folder on 127.0.0.1."
    tmp = tmp_path_factory.mktemp("docs")
    run = tmp / "outputs" / "test-run"
    run.mkdir(parents=True)
    with open(tmp / "papermill.log", "w") as log:
        papermill = execute_pipeline(run, tmp / "work", log)
        # nbdev's processed notebooks are a cache in the project (`make docs` keeps them there); the build goes to tmp
        subprocess.run([BIN / "nbdev-proc-nbs"], cwd=ROOT, check=True, capture_output=True)
        assert papermill.wait() == 0, (tmp / "papermill.log").read_text()[-3000:]
    shutil.copytree(ROOT / "_proc", tmp / "_proc", ignore=shutil.ignore_patterns("_docs", "results"))
    subprocess.run([sys.executable, ROOT / "tools" / "build_docs.py", "--run", run, "--proc", tmp / "_proc", "--out",
                    tmp / "_docs"], cwd=ROOT, check=True, capture_output=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(tmp / "_docs")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def pages(folder: Path, under: str = "") -> list[str]:
    "The site's pages in one folder: one per notebook."
    return sorted(p.relative_to(folder).as_posix() for p in (folder / under).glob("*.html"))


def test_one_page_per_notebook(site):
    tmp, _ = site
    assert pages(tmp / "_docs") == sorted(f"{nb.stem}.html" for nb in (ROOT / "nbs").glob("*.ipynb"))
    assert pages(tmp / "_docs", "results") == [f"results/{RESULTS_NB}.html"]


def sidebar_files(items: list) -> list[str]:
    "Every file a sidebar lists, through its sections."
    return [f for i in items for f in (sidebar_files(i["contents"]) if isinstance(i, dict) else [i])]


def test_sidebar_lists_every_notebook_once():
    listed = sidebar_files(yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])
    assert sorted(listed) == sorted(nb.name for nb in (ROOT / "nbs").glob("*.ipynb"))


def test_built_sidebar_adds_the_results(site):
    tmp, _ = site
    contents = yaml.safe_load((tmp / "_proc" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    assert sorted(sidebar_files(contents[:-1])) == sorted(nb.name for nb in (ROOT / "nbs").glob("*.ipynb"))
    assert contents[-1] == {"section": "Results of run test-run", "contents": [f"results/{RESULTS_NB}.ipynb"]}


def test_results_page_is_cleaned(site):
    tmp, _ = site
    cells = json.loads((tmp / "_proc" / "results" / f"{RESULTS_NB}.ipynb").read_text())["cells"]
    source = lambda c: "".join(c["source"])
    tagged = lambda tag: [c for c in cells if tag in c["metadata"].get("tags", [])]
    outs = [o for c in cells for o in c.get("outputs", [])]
    assert cells[0]["cell_type"] == "raw" and "— results of run test-run" in source(cells[0])
    assert not [o for o in outs if o.get("name") == "stderr"
                or "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not tagged("injected-parameters")
    assert len(tagged("parameters")) == 1 and "sample_steps: int = 2" in source(tagged("parameters")[0])
    assert [o for o in outs if "image/png" in o.get("data", {})], "the executed notebook has no inline figure"


# each page's heading, title, images, maths and tables (each one's width, and its box's visible and scrolled widths),
# read once it has loaded and its fonts are ready
PAGE_STATE = """async () => { await document.fonts.ready; return {
  heading: (document.querySelector('h1') || {innerText: ''}).innerText.trim(), title: document.title,
  images: [...document.images].map(i => i.complete && i.naturalWidth > 0),
  maths: document.querySelectorAll('.math .katex').length,
  katexFonts: [...document.fonts].filter(f => f.family.includes('KaTeX') && f.status === 'loaded').length,
  tables: [...document.querySelectorAll('table')].map(t => ({width: Math.ceil(t.getBoundingClientRect().width),
    box: t.parentElement.clientWidth, scrolled: t.parentElement.scrollWidth,
    head: (t.querySelector('th') || {innerText: ''}).innerText.trim()}))}; }"""


def is_loopback(url: str) -> bool:
    "Whether a request stays on this machine: 127.0.0.1, or data the page already holds."
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname == "127.0.0.1"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_every_page_in_chromium(site):
    from playwright.sync_api import sync_playwright
    tmp, base = site
    problems, seen, requests = [], {}, []

    def route(r):
        requests.append(r.request.url)
        r.continue_() if is_loopback(r.request.url) else r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.route("**/*", route)
        page.on("console",
                lambda m: problems.append(f"{page.url}: console {m.type}: {m.text}") if m.type == "error" else None)
        # moving on to the next page cancels (net::ERR_ABORTED) what the last one fetches after `load`, such as its
        # favicon
        page.on("requestfailed", lambda r: problems.append(f"{page.url}: failed request {r.url} ({r.failure})")
                if r.failure != "net::ERR_ABORTED" else None)
        page.on("response",
                lambda r: problems.append(f"{page.url}: {r.status} for {r.url}") if r.status >= 400 else None)
        for name in pages(tmp / "_docs") + pages(tmp / "_docs", "results"):
            page.goto(f"{base}/{name}", wait_until="load")
            seen[name] = page.evaluate(PAGE_STATE)
        browser.close()
    assert not [u for u in requests if not is_loopback(u)], "requests leave 127.0.0.1"
    assert not problems, "\n".join(problems)
    for name, s in seen.items():
        assert s["heading"] and s["title"].startswith(s["heading"]), (f"{name}: title {s['title']!r}, heading "
                                                                      f"{s['heading']!r}")
        assert all(s["images"]), f"{name}: {s['images'].count(False)} of {len(s['images'])} images did not decode"
    assert seen["index.html"]["heading"] == "thinkdiff_nb"
    assert seen["index.html"]["tables"], "the home page has no table"
    for name in PROSE_PAGES:
        wide = [t for t in seen[name]["tables"] if max(t["width"], t["scrolled"]) > t["box"]]
        assert not wide, f"{name}: tables wider than their box, their right-hand columns out of sight: {wide}"
    headings = [s["heading"] for s in seen.values()]
    assert len(set(headings)) == len(headings), ("pages share a heading: "
                                                 f"{sorted(h for h in headings if headings.count(h) > 1)}")
    results = seen[f"results/{RESULTS_NB}.html"]
    assert results["heading"].endswith("— results of run test-run") and results["images"], (
        "the results page has no figure")
    with_maths = {name: s for name, s in seen.items() if s["maths"]}
    assert with_maths, "no page renders maths with KaTeX"
    assert all(s["katexFonts"] for s in with_maths.values()), f"KaTeX's fonts not loaded on {sorted(with_maths)}"
    assert any("/site_libs/katex/fonts/" in u for u in requests), "KaTeX's fonts do not come from the site"


@functools.cache
def tool(name: str):
    "A script of tools/ as a module."
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rerun_by_nbdev(code: str) -> bool:
    "Whether `nbdev-proc-nbs` runs a cell again for the docs (it imports, or calls show_doc), replacing what it stored."
    try: tree = ast.parse(code)
    except SyntaxError: return False  # magics: left as stored
    return "show_doc" in code or any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))


def shown_outputs(path: Path) -> list:
    "The stored outputs a notebook's page shows as stored: of its shown code cells that nbdev does not run again."
    readme, clean_outputs = tool("readme"), tool("build_docs").clean_outputs
    outs = []
    for cell in nbformat.read(path, as_version=4).cells:
        d = readme.directives(cell.source) if cell.cell_type == "code" else {"hide": "true"}
        hidden = d.keys() & {"hide", "export", "exporti"}  # nbdev shows no exported code, only its show_doc
        if hidden or any(d.get(k, "").lower() == "false" for k in ("include", "output")): continue
        if rerun_by_nbdev(readme.code_of(cell.source)): continue
        clean_outputs(cell)
        outs += cell.outputs
    return outs


def marks(out) -> list[str]:
    "What a page that shows an output holds verbatim: a picture's base64, or the first line of its text, escaped."
    data = out.get("data", {})
    if "image/png" in data: return ["".join(data["image/png"]).strip()]
    text = "".join(out.get("text", "") if out.get("output_type") == "stream" else
                   data.get("text/plain", "") if not data.keys() & {"text/html", "text/markdown", "text/latex"} else "")
    first = next((line for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()), None)
    return [html.escape(first)] if first else []


def test_pages_show_stored_outputs(site):
    "Each notebook that stores outputs (its demos' figures, tables, printed values), 02a_aligner too, shows them."
    tmp, _ = site
    stored = {}
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        outs, page = shown_outputs(path), (tmp / "_docs" / f"{path.stem}.html").read_text()
        if not outs: continue
        stored[path.stem] = sum("image/png" in o.get("data", {}) for o in outs)
        assert page.count('class="cell-output') >= len(outs), f"{path.stem}.html shows fewer outputs than it stores"
        missing = [m[:80] for o in outs for m in marks(o) if m not in page]
        assert not missing, f"{path.stem}.html lacks outputs its notebook stores: {missing}"
    assert stored, "no notebook stores outputs: run the library notebooks and keep their outputs"
    assert sum(stored.values()), "no notebook stores a figure, so none is checked on its page"
