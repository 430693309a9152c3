"""The docs site from nbdev's processed notebooks (`_proc/`, after `nbdev-proc-nbs`): each notebook's page shows its
stored outputs without stderr or progress bars, the executed notebooks of a `make reproduce` run become results pages,
smalldocs renders the project, and KaTeX is served from the site.

    python tools/build_docs.py [--run outputs/<run-id>] [--proc _proc] [--out _docs]
"""
import argparse, ast, base64, hashlib, io, os, re, shutil, tarfile, tempfile, urllib.error, urllib.request
from pathlib import Path
import nbformat, yaml
from papermill.translators import PythonTranslator
from smalldocs import cli as smalldocs_cli, layout

ROOT = Path(__file__).resolve().parents[1]
# the notebooks tools/reproduce.sh executes: a folder with all of them and its metrics.json is a complete run
REPRODUCED = ["03_train_thinkdiff", "03_train_no-masking", "03_train_input-tokens", "04_rmsnorm_ablation", "05_cobsat",
              "06_generate",
              "10_train_clip", "11_composition"]
# the KaTeX release smalldocs' pages are written for (layout.KATEX), from the npm registry, checked against its
# integrity
KATEX_VERSION = "0.16.11"
KATEX_TARBALL = f"https://registry.npmjs.org/katex/-/katex-{KATEX_VERSION}.tgz"
KATEX_SHA512 = "RQrI8rlHY92OLf3rho/Ts8i/XvjgguEjOkO1BEXcU3N8BqPpSzBNwV/G0Ukr+P/l3ivvJUE/Fa/CwbS6HesGNQ=="
KATEX_FILES = ("katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts/", "LICENSE")
KATEX_CACHE = ROOT / ".cache" / f"katex-{KATEX_VERSION}"
# a tqdm bar as text: " 40%|████      | 4/10 [00:01<00:02, 2.9it/s]"
BAR = re.compile(r"\d+%\|.*\|")
WIDGET = "application/vnd.jupyter.widget-view+json"


# ---- which run

def is_complete_run(folder: Path) -> bool:
    "Whether `folder` holds every notebook `make reproduce` executes and the run's metrics.json."
    return (folder / "metrics.json").is_file() and all((folder / f"{n}.ipynb").is_file() for n in REPRODUCED)


def newest_run(outputs: Path) -> Path | None:
    "The most recently finished complete run under `outputs`, if any."
    runs = [d for d in outputs.glob("*/") if is_complete_run(d)]
    return max(runs, key=lambda d: (d / "metrics.json").stat().st_mtime, default=None)


# ---- a results page from an executed notebook

def is_progress(out: dict) -> bool:
    "Whether an output is a progress bar: a widget, or text that is only tqdm bars."
    if WIDGET in out.get("data", {}): return True
    return out.get("output_type") == "stream" and not without_bars(out["text"]).strip()


def without_bars(text: str) -> str:
    "Stream text as a terminal shows it (the last rewrite of each line), without tqdm bar lines."
    lines = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return "\n".join(line for line in lines if not BAR.search(line))


def clean_outputs(cell: dict) -> None:
    "Keep what a reader wants of a code cell's outputs: no stderr, no progress bars."
    outs = [o for o in cell.get("outputs", []) if not (o.get("name") == "stderr" or is_progress(o))]
    for o in outs:
        if o.get("output_type") == "stream": o["text"] = without_bars(o["text"])
    cell["outputs"] = outs


def tagged(cell: dict, tag: str) -> bool:
    "Whether a cell carries papermill's `tag`."
    return tag in cell.get("metadata", {}).get("tags", [])


def with_values(code: str, values: dict) -> str:
    "The parameters cell's code with each assignment's value replaced by the run's value, comments kept."
    lines = [line.encode() for line in code.split("\n")]  # ast columns count UTF-8 bytes
    nodes = [n for n in ast.parse(code).body if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None]
    for n in reversed(nodes):
        names = [t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
        if len(names) != 1 or names[0] not in values: continue
        v = n.value
        head, tail = lines[v.lineno - 1][:v.col_offset], lines[v.end_lineno - 1][v.end_col_offset:]
        new = head + PythonTranslator.translate(values[names[0]]).encode()
        if tail.lstrip().startswith(b"#"):  # keep the column of the inline comments
            tail = b" " * max(2, len(lines[v.end_lineno - 1]) - len(tail.lstrip()) - len(new)) + tail.lstrip()
        lines[v.lineno - 1:v.end_lineno] = [new + tail]
    return "\n".join(line.decode() for line in lines)


def settings_cells(params: dict | None, values: dict) -> list:
    "A 'Settings of this run' heading and one cell of the notebook's parameters at the run's values."
    if params is None and not values: return []
    note = ("Set for this run: " + ", ".join(f"`{k}`" for k in values) + "; the others are the notebook's defaults."
            if values else "The notebook's defaults.")
    cells = [nbformat.v4.new_markdown_cell(f"## Settings of this run\n{note}")]
    if params is None: return cells + [nbformat.v4.new_code_cell(PythonTranslator.codify(values, "Parameters"))]
    try: code = with_values(params.source, values)
    except SyntaxError: code = params.source + "\n" + PythonTranslator.codify(values, "Set for this run")
    extra = {k: v for k, v in values.items() if not re.search(rf"^{re.escape(k)}\s*[:=]", params.source, re.M)}
    if extra: code += "\n" + PythonTranslator.codify(extra, "Not parameters of the notebook")
    params.source = code  # the cell keeps its `parameters` tag and its outputs
    return cells + [params]


def split_title(cell: dict) -> tuple[str, str, str]:
    "The `# Title` cell's title, its `> description`, and the prose after them."
    lines = cell.source.split("\n")
    title = lines.pop(0).removeprefix("# ").strip()
    desc = lines.pop(0).removeprefix(">").strip() if lines and lines[0].startswith(">") else ""
    return title, desc, "\n".join(lines).strip()


def front_matter(title: str, desc: str) -> dict:
    "A raw cell of front matter, which smalldocs and Quarto read as the page's title and description."
    meta = {"title": title, **({"description": desc} if desc else {})}
    return nbformat.v4.new_raw_cell(f"---\n{yaml.safe_dump(meta, allow_unicode=True, width=1000)}---")


def variant(nb, path: Path) -> str:
    "What tells an executed notebook from others of the same source: `thinkdiff` for 03_train_thinkdiff of 03_train."
    src = Path(nb.metadata.get("papermill", {}).get("input_path") or path.name).stem
    return path.stem.removeprefix(src).strip("_- ") if path.stem.startswith(src) else ""


def results_page(path: Path, run_id: str):
    "An executed notebook made for reading: titled with its run, its settings once, no stderr or progress bars."
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    is_title = lambda c: c.cell_type == "markdown" and c.source.startswith("# ")
    title_cell = next((c for c in cells if is_title(c)), None)
    title, desc, prose = split_title(title_cell) if title_cell else (path.stem, "", "")
    v = variant(nb, path)
    head = [front_matter(f"{title}{f' ({v})' if v else ''} — results of run {run_id}", desc)]
    if prose: head.append(nbformat.v4.new_markdown_cell(prose))
    params = next((c for c in cells if tagged(c, "parameters")), None)
    values = nb.metadata.get("papermill", {}).get("parameters") or {}
    rest = [c for c in cells if c is not title_cell and c is not params and not tagged(c, "injected-parameters")]
    for c in rest:
        if c.cell_type == "code": clean_outputs(c)
    nb.cells = head + settings_cells(params, values) + rest
    return nb


def add_results(proc: Path, nbs: Path, run: Path | None) -> list[str]:
    "Write the run's results pages into `proc/results/` and the sidebar with a Results section; the pages written."
    folder = proc / "results"
    shutil.rmtree(folder, ignore_errors=True)
    # from the source each time: nbdev copies sidebar.yml only when the source is newer than its copy
    sidebar = yaml.safe_load((nbs / "sidebar.yml").read_text())
    written = []
    if run is not None:
        folder.mkdir(parents=True)
        for path in sorted(run.glob("*.ipynb")):
            nbformat.write(results_page(path, run.name), folder / path.name)
            written.append(f"results/{path.name}")
        sidebar["website"]["sidebar"]["contents"].append({"section": f"Results of run {run.name}", "contents": written})
    (proc / "sidebar.yml").write_text(yaml.safe_dump(sidebar, sort_keys=False, allow_unicode=True))
    return written


# ---- the notebooks' own pages

def clean_pages(proc: Path) -> list[str]:
    "Drop stderr and progress bars from the outputs `proc`'s notebooks store, as on results pages; the ones changed."
    changed = []
    for path in sorted(proc.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        before = nbformat.writes(nb)
        for c in nb.cells:
            if c.cell_type == "code": clean_outputs(c)
        if nbformat.writes(nb) != before:
            nbformat.write(nb, path)
            changed.append(path.name)
    return changed


# ---- KaTeX from the site

def katex_dist() -> Path:
    ("KaTeX's dist folder, fetched once from the npm registry into a git-ignored cache and checked against its "
     "integrity.")
    if (KATEX_CACHE / "katex.min.js").is_file(): return KATEX_CACHE
    try:
        with urllib.request.urlopen(KATEX_TARBALL, timeout=60) as r: data = r.read()
    except (urllib.error.URLError, TimeoutError) as e:
        raise SystemExit(f"KaTeX could not be fetched from {KATEX_TARBALL}: {e}")
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != KATEX_SHA512: raise SystemExit(f"{KATEX_TARBALL}: sha512 {digest} is not the pinned {KATEX_SHA512}")
    KATEX_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=KATEX_CACHE.parent) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar: tar.extractall(tmp, filter="data")
        # MIT: the notice goes with the copy
        Path(tmp, "package", "LICENSE").rename(Path(tmp, "package", "dist", "LICENSE"))
        Path(tmp, "package", "dist").rename(KATEX_CACHE)  # whole or not at all, should two builds race
    return KATEX_CACHE


def localise_katex(site: Path) -> int:
    "Copy KaTeX into `site/site_libs/katex` and point the pages at it instead of the CDN; the pages changed."
    dist, dest = katex_dist(), site / "site_libs" / "katex"
    for name in KATEX_FILES:
        src = dist / name
        if src.is_dir(): shutil.copytree(src, dest / name, dirs_exist_ok=True)
        else: (dest / name).parent.mkdir(parents=True, exist_ok=True); shutil.copy(src, dest / name)
    changed = 0
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        if layout.KATEX not in text: continue
        page.write_text(text.replace(layout.KATEX, os.path.relpath(dest, page.parent)), encoding="utf-8")
        changed += 1
    return changed


# ---- the build

def build(proc: Path, out: Path, run: Path | None, nbs: Path = ROOT / "nbs") -> list[str]:
    "Results pages, smalldocs and local KaTeX: the site in `out`; the results pages written."
    # each page shows its notebook's stored outputs, figures included, without stderr or progress bars
    clean_pages(proc)
    written = add_results(proc, nbs, run)
    if smalldocs_cli.main(["render", str(proc)]): raise SystemExit("smalldocs could not render the site")
    localise_katex(proc / "_docs")
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(proc / "_docs", out)
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path,
                   help="a run folder of executed notebooks (default: the newest complete run in outputs/)")
    p.add_argument("--proc", type=Path, default=ROOT / "_proc", help="nbdev's processed notebooks")
    p.add_argument("--out", type=Path, default=ROOT / "_docs", help="where the site goes")
    args = p.parse_args()
    run = args.run or newest_run(ROOT / "outputs")
    if args.run and not any(args.run.glob("*.ipynb")): raise SystemExit(f"{args.run} holds no executed notebooks")
    written = build(args.proc, args.out, run)
    print(f"results of {os.path.relpath(run)}: {len(written)} page(s)" if run
          else "no results pages: `make reproduce` makes a run of them")


if __name__ == "__main__": main()
