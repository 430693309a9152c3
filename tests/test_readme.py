("README.md is generated from nbs/index.ipynb (`make readme`): regenerated into a temporary folder, it and its figures "
 "equal the committed files.")
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_readme_matches_index_notebook(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "readme.py"), "--root", str(tmp_path)], check=True,
                   capture_output=True)
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text(), \
        "README.md differs from nbs/index.ipynb: run `make readme` after editing (and running) the notebook"
    images = sorted(p.relative_to(tmp_path) for p in (tmp_path / "nbs" / "images").glob("*.png"))
    assert images, "the index notebook's figure has no stored output: run the notebook before `make readme`"
    for image in images:
        assert (tmp_path / image).read_bytes() == (ROOT
                                                   / image).read_bytes(), f"{image} differs from the notebook's output"


def test_readme_keeps_the_quickstart():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in quickstart.splitlines()] == [["make", "reproduce"], ["make", "test"]]
