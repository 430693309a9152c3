"Pipeline notebooks run with their defaults from the repository root or from nbs/, and write only under outputs/."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # every pipeline notebook with its defaults, twice

ROOT = Path(__file__).parents[1]
PAPERMILL = str(Path(sys.executable).parent / "papermill")


@pytest.mark.parametrize("notebook, smoke, cwd",
                         [("05_cobsat", "cobsat-smoke", ROOT), ("03_train", "train-smoke", ROOT / "nbs")])
def test_defaults_run_from_anywhere_and_write_inside_the_repository(tmp_path, notebook, smoke, cwd):
    out = ROOT / "outputs" / smoke
    shutil.rmtree(out, ignore_errors=True)  # a stale smoke run would be resumed instead of rerun
    around = {p.name for p in ROOT.parent.iterdir()}
    command = [PAPERMILL, str(ROOT / "nbs" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb")]
    if cwd != ROOT: command[1:1] = ["--cwd", str(cwd)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr[-3000:]
    # the shipped data, found by the package
    assert json.loads((out / "metrics.json").read_text())["params"]["profile"] == "mini"
    # no ../outputs beside the repository; the parent may be a shared folder (/tmp) where other programs add entries
    assert "outputs" not in {p.name for p in ROOT.parent.iterdir()} - around
    assert not (ROOT / "nbs" / "outputs").exists()
