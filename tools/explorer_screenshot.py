"""The picture of the explorer on its docs page (nbs/images/explorer.png): the explorer on the mini profile, run in
JupyterLab in Debian's chromium, photographed as it renders and saved as a palette PNG.

    .venv/bin/python tools/explorer_screenshot.py [out.png] [--task NAME] [--shot 2|4] [--prompt N] [--seed N]

A two-cell notebook (`Explorer("mini")`, then its widget at the chosen prompt) runs in a temporary folder, served by
JupyterLab on 127.0.0.1 as tools/jupyterlab_check.py serves it; the server and its kernel are shut down however the
screenshot ends.
"""
import argparse, io, json, secrets, sys, tempfile, time
from pathlib import Path
import nbformat
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jupyterlab_check as lab  # noqa: E402  (the JupyterLab and chromium helpers)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "nbs" / "images" / "explorer.png"
COLOURS = 256  # a palette PNG: the page is flat colour and 32-pixel renders, so 256 colours lose nothing visible


def notebook(task: str, shot: int, prompt: int, seed: int) -> nbformat.NotebookNode:
    "The explorer at one prompt, as a reader would open it."
    setup = "from thinkdiff_nb.explorer import Explorer\nex = Explorer(\"mini\")"
    chosen = dict(task=task, shot=shot, prompt=prompt, seed=seed)
    values = ", ".join(f"{k}={v!r}" for k, v in chosen.items() if v is not None)
    show = f"for name, value in dict({values}).items(): ex.controls[name].value = value\nex.widget"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(show)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def palette_png(png: bytes) -> bytes:
    "The screenshot as an optimised 256-colour PNG."
    buf = io.BytesIO()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def photograph(url: str, kernel_ready, profile_dir: Path, timeout_ms: int) -> bytes:
    "Open the notebook, run all cells, and return a screenshot of the explorer's output once it has settled."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile_dir), executable_path=lab.CHROMIUM,
                                                       args=lab.CHROMIUM_ARGS, headless=True,
                                                       viewport={"width": 1200, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_ms)
            kernel_ready()
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.get_by_text("Run All Cells", exact=True).click()
            page.wait_for_function(lab.ALL_RUN, timeout=timeout_ms)
            errors = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
            if errors: raise RuntimeError("a cell failed:\n" + errors[0][-2000:])
            page.locator(".thinkdiff-explorer .explorer-methods img").first.wait_for(timeout=timeout_ms)
            kernel_ready()  # every picture of the last change has been sent
            output = page.locator(".jp-OutputArea-output", has=page.locator(".thinkdiff-explorer")).last
            output.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.mouse.move(0, 0)  # no hover highlight in the picture
            return lab.settled(output)
        finally:
            browser.close()


def main(out: Path, task: str | None = None, shot: int | None = None, prompt: int | None = None,
         seed: int | None = None, timeout: float = 120) -> dict:
    "Run the explorer in JupyterLab and save its picture to `out`; the picture's size and the seconds taken."
    t0, port, token = time.time(), lab.free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="explorer-shot-") as tmp:
        tmp = Path(tmp); root = tmp / "root"; root.mkdir()
        nbformat.write(notebook(task, shot, prompt, seed), root / "explorer.ipynb")
        server = lab.start_lab(root, tmp, port, token)
        try:
            lab.wait_for_lab(server, port, token)
            url = f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?token={token}"
            ready = lambda: lab.wait_for_kernel(port, token, timeout)  # noqa: E731
            png = photograph(url, ready, tmp / "chromium", int(timeout * 1000))
        except Exception:
            print((tmp / "lab.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            lab.stop_lab(server, port, token)
    data = palette_png(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return {"path": str(out), "size": Image.open(io.BytesIO(data)).size, "kb": round(len(data) / 1024, 1),
            "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(OUT), help="where the PNG goes")
    parser.add_argument("--task", help="a CoBSAT task's name (default: the explorer's first)")
    parser.add_argument("--shot", type=int, choices=(2, 4))
    parser.add_argument("--prompt", type=int, help="the prompt's index, 0..999")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each step in the page")
    args = parser.parse_args()
    print(json.dumps(main(Path(args.out).resolve(), args.task, args.shot, args.prompt, args.seed, args.timeout)))
