"""Refuse to package a module that is out of step with its notebook.

`thinkdiff_nb/*.py` are exported from `nbs/*.ipynb` by `nbdev-export` and never edited by hand, so a wheel or an sdist
built after a notebook changed but before the export would ship code that no notebook shows. Every metadata field lives
in `pyproject.toml`; this file only wraps setuptools' `build_py` and `sdist` commands with a check that needs no nbdev:

- each module that names its notebook ("File to edit: ../nbs/NN_topic.ipynb") is split at nbdev's cell markers
  (`# %% ../nbs/NN_topic.ipynb #<cell id>`);
- each piece must equal the notebook cell with that id, less its `#|` directive lines and with top-level imports of
  `thinkdiff_nb` made relative, as `nbdev-export` writes them;
- every `export`, `exports` and `exporti` cell of the notebook must have its piece in the module.

Editable installs (`pip install -e .`, used by `make setup`) read the working tree itself and skip the check, as does a
build from an sdist, which carries no notebooks: the sdist itself was checked when it was made. `make test`'s
`check-export` runs nbdev-export itself and is the stricter check during development.
"""
import json, re
from pathlib import Path
from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
PACKAGE = "thinkdiff_nb"
MARKER = re.compile(r"^# %% (\S+) #(\S+)$", re.M)  # nbdev's cell marker: source notebook, cell id ("auto" for __all__)
DIRECTIVE = re.compile(r"^\s*#\|\s*(\S+)")
EXPORTS = {"export", "exports", "exporti"}
OWN_IMPORT = re.compile(rf"^from {PACKAGE}(\.| import)", re.M)  # nbdev makes top-level imports of the package relative


def exported_cells(notebook: Path) -> dict:
    "Cell id -> the code `nbdev-export` writes for each exported cell of a notebook."
    cells = {}
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "code": continue
        lines = "".join(cell["source"]).splitlines()
        if not EXPORTS & {m.group(1) for line in lines if (m := DIRECTIVE.match(line))}: continue
        code = "\n".join(line for line in lines if not DIRECTIVE.match(line)).strip()
        cells[cell["id"]] = OWN_IMPORT.sub(lambda m: "from ." if m.group(1) == "." else "from . import", code)
    return cells


def module_cells(text: str) -> dict:
    "Cell id -> code of each exported piece of a module (the generated `__all__` piece left out)."
    parts = MARKER.split(text)
    return {cid: body.strip() for source, cid, body in zip(parts[1::3], parts[2::3], parts[3::3]) if source != "auto"}


def out_of_sync(root: Path = ROOT) -> list[str]:
    "What differs between the package's modules and their notebooks (empty when every module matches)."
    problems = []
    for module in sorted((root / PACKAGE).glob("*.py")):
        text = module.read_text()
        source = re.search(r"File to edit: (\S+?\.ipynb)", text)
        if not source: continue
        notebook = (module.parent / source.group(1)).resolve()
        if not notebook.exists():
            problems.append(f"{module.name}: its notebook {source.group(1)} does not exist")
            continue
        ours, theirs = module_cells(text), exported_cells(notebook)
        problems += [f"{module.name}: cell {c} is not an exported cell of {notebook.name}" for c in sorted(ours.keys() - theirs.keys())]
        problems += [f"{module.name}: lacks exported cell {c} of {notebook.name}" for c in sorted(theirs.keys() - ours.keys())]
        problems += [f"{module.name}: cell {c} differs from {notebook.name}" for c in sorted(ours.keys() & theirs.keys())
                     if ours[c] != theirs[c]]
    return problems


def check_sync():
    "Stop the build when a module differs from its notebook; pass when the notebooks are absent (a build from an sdist)."
    if not (ROOT / "nbs").is_dir(): return
    problems = out_of_sync()
    if problems:
        raise SystemExit("the package is out of step with the notebooks; run nbdev-export first:\n  " + "\n  ".join(problems))


class CheckedBuildPy(build_py):
    "build_py that first checks each module against its notebook (editable installs skip it)."
    def run(self):
        if not getattr(self, "editable_mode", False): check_sync()
        super().run()


class CheckedSdist(sdist):
    "sdist that first checks each module against its notebook."
    def run(self):
        check_sync()
        super().run()


setup(cmdclass={"build_py": CheckedBuildPy, "sdist": CheckedSdist})
