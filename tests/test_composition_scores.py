("ThinkDiff-CLIP's compositions: the 11_composition pipeline on mini and, chained after 10_train_clip, on tiny-paper "
 "with video.")
import json, sys
from pathlib import Path
import nbformat
import pandas as pd
import papermill as pm
import pytest
from thinkdiff_nb.backbones import get_profile
from thinkdiff_nb.composition import read_video
from thinkdiff_nb.composition_scores import COMPOSITION_KINDS
from thinkdiff_nb.methods import CONDITIONINGS

sys.path.insert(0, str(Path(__file__).parent))
from official_layout import projector, write_official  # noqa: E402

NBS = Path(__file__).parents[1] / "nbs"


@pytest.fixture(autouse=True)
def inline_figures(monkeypatch):
    # the kernel's inline backend, as a reader's: figures land in the notebook
    monkeypatch.delenv("MPLBACKEND", raising=False)


def _compose(tmp_path, name="run", **params):
    base = dict(n_probes=10, batch_size=5, grid_probes=1, output_dir=str(tmp_path / name))
    pm.execute_notebook(str(NBS / "11_composition.ipynb"), str(tmp_path / f"{name}.ipynb"),
                        parameters={**base, **params},
                        progress_bar=False, kernel_name="python3")
    return tmp_path / name


def _figures(notebook: Path) -> int:
    cells = nbformat.read(notebook, as_version=4).cells
    return sum("image/png" in o.get("data", {}) for c in cells if c.cell_type == "code" for o in c.outputs)


def test_mini_scores_every_kind_under_every_conditioning(tmp_path):
    run = _compose(tmp_path)
    table = pd.read_csv(run / "composition_table.csv")
    assert list(zip(table.kind, table.conditioning)) == [(k, c) for k in COMPOSITION_KINDS for c in CONDITIONINGS]
    assert (table.probes == 10).all()
    oracle = table[table.conditioning == "oracle"]
    assert (oracle.both >= 0.5).all(), oracle  # the target's own prompt draws the target: the judge and decoder work
    assert table.loc[table.kind == "two-images", "from_text"].isna().all()
    records = pd.read_csv(run / "records.csv")
    assert len(records) == 3 * 10 * len(CONDITIONINGS) and records.both.dtype == bool
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["params"]["n_probes"] == 10 and metrics["seed"] == 0 and "diffusers" in metrics["versions"]
    assert (metrics["run"]["clip_aligner"] == "data/mini/aligners/thinkdiff-clip"
            and metrics["metrics"]["tokens_per_image"] == 17)
    assert metrics["metrics"]["video"] is None  # the mini profile names no video pipeline
    for f in ("composition_table.md", "composition_scores.png", "composition_grid.png"):
        assert (run / f).stat().st_size > 0, f
    assert _figures(tmp_path / "run.ipynb") == 2  # the scores and the grid, inline
    # a rerun resumes: a block lost (as if the run had stopped there) is drawn again, the same
    first = (run / "records.csv").read_text()
    (run / "blocks" / "two-images.block0005.csv").unlink()
    _compose(tmp_path)
    assert (run / "records.csv").read_text() == first
    with pytest.raises(pm.PapermillExecutionError, match=r"other settings \(then -> now\): sample_steps 0 -> 3"):
        _compose(tmp_path, sample_steps=3)  # not mixed into blocks drawn with the decoder's own steps


def test_bad_inputs_are_named(tmp_path):
    "Each bad input in a run of its own, the runs at once (each spends its time starting a kernel and importing)."
    from concurrent.futures import ThreadPoolExecutor
    tiny = get_profile("tiny-paper")  # its CLIP aligner reads 48-wide BLIP-2 tokens, the mini encoder writes 64
    runs = {"kinds": (r"parameter kinds=\['three-images'\] has \['three-images'\], not among "
                      r".*parameter judge='gemini' is not one of", dict(kinds=["three-images"], judge="gemini")),
            "probes": ("parameter n_probes must be positive, got 0", dict(n_probes=0)),
            "widths": ("reads 48-wide tokens but the vision encoder writes 64-wide ones",
                       dict(clip_aligner=tiny.clip_aligner)),
            "missing": ("no aligner at", dict(clip_aligner=str(tmp_path / "absent")))}
    def refused(name, match, params):
        with pytest.raises(pm.PapermillExecutionError, match=match): _compose(tmp_path, name, **params)
    with ThreadPoolExecutor(3) as pool:
        done = [pool.submit(refused, name, match, params) for name, (match, params) in runs.items()]
    for future in done: future.result()


def test_two_processes_share_the_blocks_and_agree_with_one(tmp_path):
    "Blocks shared over two workers (rank 0 and 1 of 2, as two accelerate processes) give one process's records."
    from concurrent.futures import ThreadPoolExecutor
    from thinkdiff_nb.aligner import load_aligner
    from thinkdiff_nb.clip import load_vision
    from thinkdiff_nb.image_decoders import load_image_decoder
    from thinkdiff_nb.judges import load_cobsat_judge
    from thinkdiff_nb.composition_scores import evaluate_compositions
    mini = get_profile("mini")
    models = dict(decoder=load_image_decoder(mini), judge=load_cobsat_judge(mini, "mini"),
                  vision=load_vision(mini.vision),
                  aligner=load_aligner(mini.clip_aligner).eval())
    run = lambda out, share: evaluate_compositions(out_dir=out, kinds=["two-images+text"], n_probes=4, batch_size=2,
                                                   share=share,
                                                   poll_seconds=0.1, **models)
    one = run(tmp_path / "one", (0, 1))
    with ThreadPoolExecutor(2) as pool:
        shared = [f.result() for f in [pool.submit(run, tmp_path / "two", (rank, 2)) for rank in (0, 1)]]
    for records in shared: pd.testing.assert_frame_equal(records, one)


@pytest.mark.slow
def test_tiny_paper_trains_composes_and_draws_a_video(tmp_path):
    ("10_train_clip on tiny-paper (BLIP-2's tower), its aligner through 11_composition with FLUX, the CLIP judge and "
     "CogVideoX.")
    pm.execute_notebook(str(NBS / "10_train_clip.ipynb"), str(tmp_path / "train.ipynb"), progress_bar=False,
                        kernel_name="python3",
                        parameters=dict(profile="tiny-paper", steps=3, batch_size=4, eval_batches=1, ckpt_every=2,
                                        warmup=1,
                                        max_images=40, keep_tokens=False, output_dir=str(tmp_path / "train")))
    trained = json.loads((tmp_path / "train" / "metrics.json").read_text())["metrics"]
    assert trained["vision"]["tokens_per_image"] == 65  # 257 BLIP-2 tokens pooled as in the paper
    run = _compose(tmp_path, profile="tiny-paper", clip_aligner=str(tmp_path / "train" / "aligner"), judge="clip",
                   n_probes=2, batch_size=2, sample_steps=2, video_frames=9, video_height=32, video_width=48,
                   video_steps=2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["decoder"] == "FluxPipeline" and metrics["run"]["judge"] == "clip"
    assert (metrics["metrics"]["tokens_per_image"] == 65 and len(pd.read_csv(run / "records.csv")) == 3 * 2
            * len(CONDITIONINGS))
    assert read_video(run / "video.mp4").shape == (9, 32, 48, 3)
    # FLUX and the judge released before CogVideoX loaded
    assert metrics["metrics"]["resident_at_video"] == ["vision", "aligner"]
    assert ({k: metrics["metrics"]["video"][k] for k in ("frames", "height", "width")}
            == {"frames": 9, "height": 32, "width": 48})
    assert _figures(tmp_path / "run.ipynb") == 3  # scores, grid, video frames
    # the released thinkdiff_clip.pth layout, at tiny-paper's widths, in place of the trained folder
    released = write_official(tmp_path / "thinkdiff_clip.pth", projector(48, 32, seed=3))
    run = _compose(tmp_path, name="released", profile="tiny-paper", clip_aligner=str(released), kinds=["image+text"],
                   n_probes=2, batch_size=2, sample_steps=2, video_frames=9, video_height=32, video_width=32,
                   video_steps=2)
    assert json.loads((run / "metrics.json").read_text())["run"]["clip_aligner"] == str(released)
    assert read_video(run / "video.mp4").shape == (9, 32, 32, 3)
