("The explorer on the mini profile: widget values drive the prompt, the VLM's answer, every method's image and T5's "
 "read-backs; and the notebook in JupyterLab in a real browser.")
import importlib.util, io, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from thinkdiff_nb.world import TASKS, task_prompts
from thinkdiff_nb.methods import ALIGNER_METHODS, CONDITIONINGS
from thinkdiff_nb.inference import ThinkDiff, conditioning, rendered_demonstrations, respond
from thinkdiff_nb.explorer import Explorer, read_back, torch_threads
from thinkdiff_nb.composition_scores import aligned_images, composition_probes, score_block

ROOT = Path(__file__).parents[1]
PAPER_METHODS = {"thinkdiff", "no-masking", "input-tokens", "image-loss", "text-bridge", "oracle"}  # at least these


@pytest.fixture(scope="module")
def ex():
    "One explorer on the mini profile, its models loaded once for the module."
    return Explorer("mini")


def set_values(ex, **values):
    "Set widget values as a page would; each change recomputes through the widget's observer."
    for name, value in values.items(): ex.controls[name].value = value


def png_shape(image_widget) -> tuple:
    return np.asarray(Image.open(io.BytesIO(image_widget.value))).shape


def test_widgets_drive_every_output(ex):
    task, shot, index, seed = TASKS[3], 4, 17, 5
    set_values(ex, task=task.name, shot=shot, prompt=index, seed=seed)
    prompt = task_prompts(task, shot, index + 1)[index]
    assert ex.prompt == prompt
    # the demonstrations: one per shot, the renderer's images of this prompt, each shown with its text
    assert len(ex.demonstrations) == shot and len(ex.demo_box.children) == shot
    for shown, expected, tile, text in zip(ex.demonstrations, rendered_demonstrations(prompt), ex.demo_box.children,
                                           prompt.texts):
        np.testing.assert_array_equal(shown, expected)
        assert png_shape(tile.children[0]) == (32 * ex.scale, 32
                                               * ex.scale, 3) and text.strip() in tile.children[1].value
    # the answer is the VLM's, sampled under the same seed (on the explorer's thread count: the sums must match bit for
    # bit)
    with torch_threads(ex.threads): expected = respond(ex.td, [prompt], ex.n_tokens, seed=seed)[0]
    assert ex.response["answer"] == expected["answer"] and expected["answer"] in ex.status.value
    # one image per method, all the paper's methods among them
    assert PAPER_METHODS <= set(ex.methods) and list(ex.images) == ex.methods
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in ex.images.values())
    assert [tile.children[1].value for tile in ex.method_box.children] == [f"<small>{m}</small>" for m in ex.methods]
    assert {png_shape(tile.children[0]) for tile in ex.method_box.children} == {(32 * ex.scale, 32 * ex.scale, 3)}
    # a read-back per aligner method: what T5 decodes from that method's tokens, shown under its image
    aligner_methods = [m for m in ex.methods if m in ALIGNER_METHODS]
    assert (set(aligner_methods) >= {"thinkdiff", "no-masking", "input-tokens", "image-loss"}
            and list(ex.read_backs) == aligner_methods)
    with torch_threads(ex.threads):
        for m in aligner_methods:
            tokens = conditioning(ex.td, m, [prompt], [expected])[0]
            assert ex.read_backs[m] == read_back(ex.t5, ex.t5_tokenizer, tokens, ex.n_tokens)[0]
    for m, tile in zip(ex.methods, ex.method_box.children):
        assert len(tile.children) == (3 if m in ALIGNER_METHODS else 2)
        if m in ALIGNER_METHODS: assert "T5 reads:" in tile.children[2].value


def test_changing_the_prompt_changes_the_outputs(ex):
    before = (ex.prompt, ex.status.value, [d.copy() for d in ex.demonstrations],
              {m: i.copy() for m, i in ex.images.items()})
    new = (ex.prompt.index + 1) % 1000
    set_values(ex, prompt=new)
    assert ex.prompt.index == new and ex.prompt != before[0] and ex.status.value != before[1]
    assert any(not np.array_equal(a, b) for a, b in zip(before[2], ex.demonstrations))
    redrawn = [m for m in ex.methods if not np.array_equal(before[3][m], ex.images[m])]
    assert len(redrawn) == len(ex.methods), f"unchanged images: {sorted(set(ex.methods) - set(redrawn))}"
    # about a second on two idle cores; generous for busy ones
    assert ex.seconds < 30, f"one change took {ex.seconds:.1f} s"


def test_only_the_methods_the_aligners_allow(ex):
    bare = ThinkDiff(ex.td.profile, ex.td.vlm, ex.td.processor, ex.td.decoder)  # the same models, no aligners
    text_only = Explorer(td=bare)
    assert not set(text_only.methods) & set(ALIGNER_METHODS) and {"text-bridge", "oracle"} <= set(text_only.methods)
    assert text_only.read_backs == {}
    with pytest.raises(ValueError, match="cannot run"): Explorer(td=bare, methods=["thinkdiff"])


def test_composition_tab(ex):
    ("The second tab: widget values pick the probe; its inputs, T5's read-backs, every conditioning's image and "
     "verdict follow.")
    cm = ex.composer
    assert ex.widget.children[1] is cm.widget and ex.widget.titles == ("CoBSAT prompt", "Composition")
    set_values(cm, kind="two-images+text", probe=42, seed=3)
    probe = composition_probes("two-images+text", 43)[42]
    assert cm.probe == probe and probe.text in cm.status.value and " / ".join(probe.target) in cm.status.value
    assert len(cm.input_box.children) == len(probe.renders) == 2
    for shown, expected in zip(cm.inputs, probe.images()): np.testing.assert_array_equal(shown, expected)
    with torch_threads(cm.threads):
        records, drawn = score_block(ex.td.decoder, cm.judge, [probe], CONDITIONINGS, cm.vision, cm.aligner,
                                     steps=cm.controls["steps"].value, seed=3)
        reads = [read_back(cm.t5, cm.t5_tokenizer, aligned_images(cm.vision, cm.aligner, [probe], k), cm.n_tokens)[0]
                 for k in (0, 1)]
    assert list(cm.images) == list(CONDITIONINGS)
    for c, tile in zip(CONDITIONINGS, cm.image_box.children):
        np.testing.assert_array_equal(cm.images[c], drawn[c][0])
        row = records[records.conditioning == c].iloc[0]
        assert tile.children[1].value == f"<small>{c}</small>" and (f"{row.subject_answer} / "
                                                                    f"{row.attribute_answer}") in tile.children[2].value
    assert cm.read_backs == reads and all(f"T5 reads: {r}" in t.children[2].value for r,
                                          t in zip(reads, cm.input_box.children))


CHROMIUM = shutil.which("chromium")
PLAYWRIGHT = importlib.util.find_spec("playwright") is not None


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
@pytest.mark.skipif(not PLAYWRIGHT, reason="Python playwright is not installed (it comes with the dev extra)")
@pytest.mark.slow  # JupyterLab driven through chromium
def test_explorer_in_jupyterlab(tmp_path):
    shot = tmp_path / "explorer-jupyterlab.png"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "jupyterlab_check.py"), str(shot)], capture_output=True,
                         text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # the CoBSAT prompt tab, then Composition
    for picture in (shot, shot.with_name("explorer-jupyterlab-composition.png")):
        image = np.asarray(Image.open(picture).convert("RGB"))
        assert image.shape[0] >= 300 and image.shape[1] >= 600, image.shape
        # a page with pictures, not a blank
        assert image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 200
