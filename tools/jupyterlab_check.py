"""The explorer notebook in JupyterLab, in Debian's chromium: run all cells, change the prompt index in the page, check
that the explorer redraws, then do the same with the probe of its Composition tab, and save a screenshot of each
(the second beside the first, named <stem>-composition.png).

    .venv/bin/python tools/jupyterlab_check.py [screenshot.png]   # default outputs/explorer-jupyterlab.png

JupyterLab serves a copy of the notebook from a temporary folder on 127.0.0.1 (a free port, a random token), so the
repository's notebook is never saved with outputs; the server and its kernel are shut down however the check ends.
"""
import argparse, json, os, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium as root, headless; without the networking flags it keeps trying to reach its own services
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SETTINGS = {  # JupyterLab user settings: every cell rendered (the page is searched), no news or update checks
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    "A TCP port free on 127.0.0.1 now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def write_settings(folder: Path):
    "JupyterLab user settings under `folder`."
    for name, value in SETTINGS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True); (folder / name).write_text(json.dumps(value))


def start_lab(root: Path, work: Path, port: int, token: str) -> subprocess.Popen:
    "JupyterLab serving `root` on 127.0.0.1:`port`, its config, runtime files, settings and log kept under `work`."
    write_settings(work / "settings")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={work / 'settings'}", f"--LabApp.workspaces_dir={work / 'workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=open(work / "lab.log", "w"), stderr=subprocess.STDOUT)


def api(port: int, token: str, path: str, method: str = "GET"):
    "A JupyterLab REST call: (status, the JSON it returned or None)."
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
        return r.status, json.loads(body) if body else None


def wait_for_lab(lab: subprocess.Popen, port: int, token: str, timeout: float = 60):
    "Block until the server answers, or fail if it exits or does not answer in `timeout` seconds."
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lab.poll() is not None: raise RuntimeError(f"JupyterLab exited with code {lab.returncode}")
        try:
            if api(port, token, "/api/status")[0] == 200: return
        except OSError: time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer on port {port} within {timeout} s")


def wait_for_kernel(port: int, token: str, timeout: float):
    "Block until a kernel is idle with the page connected to it: cells run before that are silently dropped."
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(k["execution_state"] == "idle" and k["connections"] > 0 for k in api(port, token, "/api/kernels")[1]):
            return
        time.sleep(0.3)
    raise TimeoutError(f"no kernel was ready within {timeout} s")


def stop_lab(lab: subprocess.Popen, port: int, token: str):
    "Shut the server down through its API (which stops its kernels), then terminate it if it lingers."
    try: api(port, token, "/api/shutdown", "POST")
    except OSError: pass
    try: lab.wait(20)
    except subprocess.TimeoutExpired:
        lab.terminate()
        try: lab.wait(10)
        except subprocess.TimeoutExpired: lab.kill(); lab.wait()


PROMPTS = "() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)"
ALL_RUN = """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent);
                     return p.length > 0 && p.every(t => /\\[\\d+\\]/.test(t)); }"""


def settled(locator, timeout: float = 20, pause: float = 0.3) -> bytes:
    ("A screenshot of `locator` once two taken `pause` seconds apart agree: new images render a moment after they "
     "arrive.")
    shots, deadline = [locator.screenshot()], time.time() + timeout
    while time.time() < deadline:
        time.sleep(pause); shots.append(locator.screenshot())
        if shots[-1] == shots[-2]: return shots[-1]
    raise TimeoutError(f"the picture kept changing for {timeout} s")


def check_in_browser(url: str, kernel_ready, profile_dir: Path, shot: Path, timeout_ms: int = 120_000) -> dict:
    "Open the notebook, run all cells, change the prompt index in the page; the times taken (s) and what was seen."
    from playwright.sync_api import sync_playwright
    seen, t0 = {}, time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(profile_dir), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_ms)
            kernel_ready()
            seen["opened_s"] = time.time() - t0
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.get_by_text("Run All Cells", exact=True).click()
            page.wait_for_function(ALL_RUN, timeout=timeout_ms)
            seen["ran_all_s"] = time.time() - t0
            errors = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "Traceback" in t]
            if errors: raise AssertionError("a cell failed:\n" + errors[0][-2000:])
            explorer, status = page.locator(".thinkdiff-explorer"), page.locator(".thinkdiff-explorer .explorer-status")
            explorer.wait_for(timeout=timeout_ms)
            methods = explorer.locator(".explorer-methods img")
            methods.first.wait_for(timeout=timeout_ms)
            seen["methods_shown"] = methods.count()
            box = explorer.locator(".explorer-prompt input")
            before = {"status": status.inner_text(), "pixels": settled(explorer.locator(".explorer-methods"))}
            new = (int(box.input_value()) + 1) % 1000
            t_change = time.time()
            box.fill(str(new)); box.press("Enter")  # the text box sends its value on Enter
            page.wait_for_function("([s, n]) => document.querySelector(s).innerText.includes(`prompt #${n}:`)",
                                   arg=[".thinkdiff-explorer .explorer-status", new], timeout=timeout_ms)
            seen["change_s"] = time.time() - t_change
            kernel_ready()  # the kernel has sent everything the change made
            after = {"status": status.inner_text(), "pixels": settled(explorer.locator(".explorer-methods"))}
            if after["status"] == before["status"]: raise AssertionError("the status line did not change")
            if after["pixels"] == before["pixels"]: raise AssertionError("the method images did not change on the page")
            if methods.count() != seen["methods_shown"]:
                raise AssertionError(f"{methods.count()} images after the change")
            seen["status"] = after["status"]
            explorer.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.mouse.move(0, 0)  # no hover highlight in the picture
            page.screenshot(path=str(shot))
            seen.update(check_composition_tab(page, shot.with_name(f"{shot.stem}-composition{shot.suffix}"),
                                              kernel_ready, timeout_ms))
        except Exception:
            failed = shot.with_name(f"{shot.stem}-failed.png")
            page.screenshot(path=str(failed)); print(f"the page when the check failed: {failed}", file=sys.stderr)
            print(page.evaluate(PROMPTS), file=sys.stderr)
            raise
        finally:
            browser.close()
    seen["total_s"] = time.time() - t0
    return seen


def check_composition_tab(page, shot: Path, kernel_ready, timeout_ms: int) -> dict:
    "Open the explorer's Composition tab, change the probe in the page, check that its images change; what was seen."
    page.locator(".lm-TabBar-tab", has_text="Composition").first.click()
    composer = page.locator(".thinkdiff-composer").first  # the tab's; the notebook's last cell shows none
    images, status = composer.locator(".composer-images img"), composer.locator(".composer-status")
    images.first.wait_for(state="visible", timeout=timeout_ms)
    seen = {"composition_images": images.count()}
    box = composer.locator(".composer-probe input")
    before = {"status": status.inner_text(), "pixels": settled(composer.locator(".composer-images"))}
    new = (int(box.input_value()) + 1) % 1000
    t_change = time.time()
    box.fill(str(new)); box.press("Enter")
    page.wait_for_function("([n]) => [...document.querySelectorAll('.thinkdiff-composer .composer-status')]"
                           ".some(e => e.innerText.includes(`probe #${n} (`))", arg=[new], timeout=timeout_ms)
    seen["composition_change_s"] = time.time() - t_change
    kernel_ready()
    after = {"status": status.inner_text(), "pixels": settled(composer.locator(".composer-images"))}
    if after["pixels"] == before["pixels"]: raise AssertionError("the composition images did not change on the page")
    if images.count() != seen["composition_images"]:
        raise AssertionError(f"{images.count()} composition images after the change")
    seen["composition_status"] = after["status"]
    composer.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.mouse.move(0, 0)
    page.screenshot(path=str(shot))
    return seen


def main(shot: Path, notebook: Path, timeout: float = 120) -> dict:
    "Serve a copy of `notebook`, check the explorer in the browser, save the screenshot to `shot`; what was seen."
    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="explorer-lab-") as tmp:
        tmp = Path(tmp); root = tmp / "root"; root.mkdir()
        shutil.copy(notebook, root / notebook.name)
        lab = start_lab(root, tmp, port, token)
        try:
            wait_for_lab(lab, port, token)
            url = f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}"
            return check_in_browser(url, lambda: wait_for_kernel(port, token, timeout), tmp / "chromium", shot,
                                    int(timeout * 1000))
        except Exception:
            print((tmp / "lab.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stop_lab(lab, port, token)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screenshot", nargs="?", default=str(ROOT / "outputs" / "explorer-jupyterlab.png"))
    parser.add_argument("--notebook", default=str(ROOT / "nbs" / "09_explorer.ipynb"))
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each step in the page")
    args = parser.parse_args()
    seen = main(Path(args.screenshot).resolve(), Path(args.notebook).resolve(), args.timeout)
    print(json.dumps(seen, indent=1))
    print(f"screenshot: {Path(args.screenshot).resolve()}")
