("12_compose: a researcher's own image files composed by ThinkDiff-CLIP through FLUX and CogVideoX, on mini and "
 "tiny-paper.")
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import nbformat
import papermill as pm
import pytest
from PIL import Image
from thinkdiff_nb.composition import read_video
from thinkdiff_nb.world import render

NBS = Path(__file__).parents[1] / "nbs"
KINDS = ["image+text", "two-images", "two-images+text"]


@pytest.fixture(autouse=True)
def inline_figures(monkeypatch):
    # the kernel's inline backend, as a reader's: figures land in the notebook
    monkeypatch.delenv("MPLBACKEND", raising=False)


@pytest.fixture
def own_images(tmp_path) -> list[str]:
    "A researcher's files: a PNG 80 wide and 48 high, a JPEG 40 wide and 64 high."
    png, jpg = tmp_path / "leaf.png", tmp_path / "car.jpg"
    Image.fromarray(render("color_object", "leaf", "yellow", 48)).resize((80, 48)).save(png)
    Image.fromarray(render("color_object", "car", "red", 64)).resize((40, 64)).save(jpg, quality=90)
    return [str(png), str(jpg)]


def _compose(tmp_path, name="run", **params) -> Path:
    pm.execute_notebook(str(NBS / "12_compose.ipynb"), str(tmp_path / f"{name}.ipynb"), progress_bar=False,
                        kernel_name="python3",
                        parameters={"output_dir": str(tmp_path / name), **params})
    return tmp_path / name


def _refused(tmp_path, match: str, name="refused", **params):
    "The run stops with an error matching `match` before the models cell runs."
    with pytest.raises(pm.PapermillExecutionError, match=match):
        _compose(tmp_path, name, **params)
    cells = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4).cells
    assert next(c for c in cells if "load_vision(" in c.source).execution_count is None  # no model loaded


def _figures(notebook: Path) -> int:
    cells = nbformat.read(notebook, as_version=4).cells
    return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.outputs)


def _drawn(run: Path, metrics: dict, size: int):
    "Each kind's image and the grid decode; each kind's image has the requested size."
    for kind in KINDS:
        with Image.open(run / f"{kind}.png") as image: assert image.size == (size, size), kind
        assert metrics["kinds"][kind]["file"] in metrics["files"] and metrics["kinds"][kind]["seconds"] > 0
    with Image.open(run / "compose_grid.png") as grid: grid.load()
    assert "compose_grid.png" in metrics["files"]


def test_mini_composes_own_images_and_refuses_a_rerun_with_other_settings(tmp_path, own_images):
    run = _compose(tmp_path, images=own_images, text="green", sample_steps=2)
    record = json.loads((run / "metrics.json").read_text())
    metrics = record["metrics"]
    assert record["params"]["images"] == own_images and record["seed"] == 42
    assert {"torch", "transformers", "diffusers", "accelerate"} <= set(record["versions"])
    assert {k: record["run"][k] for k in ("decoder", "vision", "clip_aligner", "video_pipeline")} == {
        "decoder": "FluxTransformer2DModel (pixel space)", "vision": "data/mini/vision",
        "clip_aligner": "data/mini/aligners/thinkdiff-clip", "video_pipeline": None}  # the shipped encoder and aligner
    assert [(i["width"], i["height"]) for i in metrics["inputs"]] == [(80, 48), (40, 64)]
    _drawn(run, metrics, 32)
    # 17 mini vision tokens per image, the mini T5's 24 text tokens
    assert {k: m["prompt_embeds"] for k, m in metrics["kinds"].items()} == {
        "image+text": [1, 17 + 24, 128], "two-images": [1, 17 + 17 + 24, 128],
        "two-images+text": [1, 17 + 17 + 24, 128]}
    assert [metrics["kinds"][k]["text"] for k in KINDS] == ["green", "", "green"]
    # mini names no video pipeline
    assert metrics["video"] is None and metrics["resident_at_video"] == ["vision", "aligner"]
    assert _figures(tmp_path / "run.ipynb") == 1  # the grid, inline
    _refused(tmp_path, r"holds a run made with other settings \(then -> now\): sample_steps 2 -> 3; remove it",
             name="run", images=own_images, text="green", sample_steps=3)


def test_bad_inputs_are_named_before_any_model_loads(tmp_path, own_images):
    "Each bad input in a run of its own, the three runs at once (each spends its time starting a kernel and importing)."
    (tmp_path / "notes.txt").write_text("not an image")
    runs = {  # name: (what the error says, parameters)
        "kind": (r"parameter kinds=\['three-images'\] has \['three-images'\], not among", dict(kinds=["three-images"])),
        "files": (r"cannot read 2 image file\(s\): \S*absent.png \(no such file\); \S*notes.txt \(not an image",
                  dict(images=[str(tmp_path / "absent.png"), str(tmp_path / "notes.txt")], kinds=["image+text"])),
        "one-image": (r"parameter images lists 1 file but kinds \['two-images'\] read two",
                      dict(images=own_images[:1], kinds=["image+text", "two-images"]))}
    with ThreadPoolExecutor(len(runs)) as pool:
        done = [pool.submit(_refused, tmp_path, match, name=name, **params) for name, (match, params) in runs.items()]
    for future in done: future.result()


@pytest.mark.slow
def test_tiny_paper_composes_own_images_and_draws_a_video_after_releasing_flux(tmp_path, own_images):
    run = _compose(tmp_path, profile="tiny-paper", images=own_images, text="a panda playing a guitar", sample_steps=2,
                   video_frames=9, video_height=32, video_width=32, video_steps=2)
    record = json.loads((run / "metrics.json").read_text())
    metrics = record["metrics"]
    assert record["run"]["decoder"] == "FluxPipeline" and Path(record["run"]["video_pipeline"]).name == "cogvideox"
    _drawn(run, metrics, 32)
    # the official lengths: 65 BLIP-2 tokens per image, FLUX's T5 text at 128
    assert {k: m["prompt_embeds"] for k, m in metrics["kinds"].items()} == {
        "image+text": [1, 193, 32], "two-images": [1, 258, 32], "two-images+text": [1, 258, 32]}
    assert read_video(run / "video.mp4").shape == (9, 32, 32, 3)
    assert {k: metrics["video"][k] for k in ("frames", "height", "width")} == {"frames": 9, "height": 32, "width": 32}
    assert metrics["resident_at_video"] == ["vision", "aligner"]  # FLUX released before CogVideoX loaded
    assert {"video.mp4", "video_frames.png"} <= set(metrics["files"])
    assert _figures(tmp_path / "run.ipynb") == 2  # the grid and the video's frames
