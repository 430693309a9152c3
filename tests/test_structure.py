"The package's shape: modules import only from notebooks before their own, and exported cells stay small."
import ast, json, re, statistics, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "thinkdiff_nb"

def notebook_of(module: Path) -> str:
    "The notebook a module is exported from, read from nbdev's header."
    return re.search(r"File to edit: \.\./nbs/(\S+)\.ipynb", module.read_text()).group(1)

def package_imports(module: Path) -> set[str]:
    "Every package module `module` imports, at its top or inside a function, by name."
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            name = node.module.removeprefix("thinkdiff_nb.") if node.level == 0 else node.module
            if node.level or node.module.startswith("thinkdiff_nb."): found.add(name)
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("thinkdiff_nb.") for a in node.names if a.name.startswith("thinkdiff_nb.")}
    return found

MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "_modidx")}

def test_every_module_imports_only_from_notebooks_before_its_own():
    order = {m: notebook_of(p) for m, p in MODULES.items()}
    upward = [(m, d) for m, p in MODULES.items() for d in package_imports(p) if order[d] >= order[m]]
    assert upward == [], f"imports of a later (or the same) notebook's module: {upward}"

def test_the_profile_registry_names_builders_without_importing_them():
    text = (PACKAGE / "backbones.py").read_text()
    assert "tiny_paper" not in package_imports(PACKAGE / "backbones.py")
    assert '"thinkdiff_nb.tiny_paper:tiny_paper_profile"' in text

def test_the_aligner_loads_with_torch_and_transformers_alone():
    assert package_imports(PACKAGE / "aligner.py") == {"runtime"}
    code = ("import sys; import thinkdiff_nb.aligner as a; "
            "others = ('diffusers', 'pandas', 'matplotlib', 'webdataset', 'thinkdiff_nb.backbones'); "
            "print(sorted(m for m in others if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out

def exported_cell_lengths() -> list[int]:
    "Lines (not blank, not `#|` directives) of every exported cell of the library notebooks."
    lengths = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "code" and re.search(r"^#\|\s*export", text, re.M):
                lengths.append(sum(1 for l in text.splitlines() if l.strip() and not l.startswith("#|")))
    return lengths

def test_exported_cells_are_small():
    lengths = exported_cell_lengths()
    assert statistics.median(lengths) <= 10, f"median exported cell {statistics.median(lengths)} lines"
    assert max(lengths) <= 40, f"largest exported cell {max(lengths)} lines"
