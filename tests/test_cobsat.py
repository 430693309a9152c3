"CoBSAT on MiniCoBSAT: the inference path, the scoring rule, the evaluation notebook and its determinism."
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from thinkdiff_nb.world import TASKS, task_prompts
from thinkdiff_nb.backbones import get_profile, load_judge
from thinkdiff_nb.aligner import Aligner, save_readout
from thinkdiff_nb.inference import METHODS, ThinkDiff, conditioning, respond
from thinkdiff_nb.cobsat import accuracy_table, evaluate, score

NBS = Path(__file__).parents[1] / "nbs"


@pytest.fixture(scope="module")
def aligners(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligners")
    torch.manual_seed(0)
    for name in ("masked", "full", "input", "image"):
        Aligner(32, 32).save_pretrained(root / name)
    save_readout(torch.eye(33, 32) + 0.01 * torch.randn(33, 32), root / "masked")  # as 03_train writes beside a generated-token aligner
    return root


@pytest.fixture(scope="module")
def tiny_td(aligners):
    return ThinkDiff.load(get_profile("tiny-random"), {n: aligners / n for n in ("masked", "full", "input", "image")})


def test_inference_path_end_to_end(tiny_td):
    prompts = task_prompts(TASKS[5], 4, 2)
    responses = respond(tiny_td, prompts, n_tokens=6)
    assert all(r["generated_features"].shape == (6, 32) for r in responses)  # EOS ignored: always n_tokens states
    lengths = {}
    for method in METHODS:
        embeds, pooled = conditioning(tiny_td, method, prompts, responses)
        lengths[method] = embeds.shape[1]
        images = tiny_td.decoder.draw(embeds, pooled, steps=2)
        assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert lengths["thinkdiff"] == lengths["no-masking"] == lengths["image-loss"] == 6
    assert lengths["hybrid"] == lengths["thinkdiff"] + lengths["text-bridge"]  # aligned tokens first, then T5 text
    hybrid = conditioning(tiny_td, "hybrid", prompts, responses)[0]
    aligned = conditioning(tiny_td, "thinkdiff", prompts, responses)[0]
    assert torch.allclose(hybrid[:, :6], aligned)
    readout = tiny_td.readouts["masked"]
    assert torch.allclose(conditioning(tiny_td, "thinkdiff-readout", prompts, responses)[0], aligned @ readout[:-1] + readout[-1])
    with pytest.raises(ValueError, match="unknown method"):
        conditioning(tiny_td, "magic", prompts, responses)


def test_both_right_scoring_on_hand_made_judge_outputs():
    prompts = task_prompts(TASKS[6], 2, 5)  # Action-I: targets (theta animal, x_query action)
    t = [p.target for p in prompts]
    judged = [t[0], (t[1][0], "cry" if t[1][1] != "cry" else "run"), ("zebra" if t[2][0] != "zebra" else "cat", t[2][1]),
              (None, None), t[4]]
    s = score(judged, prompts)
    assert s["both"].tolist() == [True, False, False, False, True]
    assert s["subject"].tolist() == [True, True, False, False, True]
    assert s["attribute"].tolist() == [True, False, True, False, True]
    records = s.assign(method="thinkdiff", task=TASKS[6].name, shot=2, heldout=[True, False, True, False, True])
    table = accuracy_table(records, 2)
    assert table.loc["thinkdiff", "Action-I"] == pytest.approx(0.4)
    assert accuracy_table(records, 2, heldout_only=True).loc["thinkdiff", "Action-I"] == pytest.approx(2 / 3)


def test_evaluation_is_deterministic_and_resumable(tiny_td, tmp_path):
    judge = load_judge(get_profile("tiny-random"))
    kwargs = dict(shots=(2,), n_prompts=3, methods=("thinkdiff", "text-bridge"), tasks=TASKS[:2], n_tokens=4, steps=2)
    a = evaluate(tiny_td, judge, tmp_path / "a", **kwargs)
    b = evaluate(tiny_td, judge, tmp_path / "b", **kwargs)
    pd.testing.assert_frame_equal(a, b)
    (tmp_path / "a" / "shot2_task02.csv").unlink()  # a stopped run: task 2 missing
    pd.testing.assert_frame_equal(evaluate(tiny_td, judge, tmp_path / "a", **kwargs), a)
    assert set(a["method"]) == {"vlm-text", "thinkdiff", "text-bridge"} and len(a) == 3 * 3 * 2


def _run_cobsat(tmp_path, aligners, name, **params):
    import papermill as pm
    base = dict(profile="tiny-random", **{f"aligner_{n}": str(aligners / n) for n in ("masked", "full", "input", "image")},
                n_prompts=2, n_tokens=4, sample_steps=2, shots=[2], output_dir=str(tmp_path / name))
    pm.execute_notebook(str(NBS / "05_cobsat.ipynb"), str(tmp_path / f"{name}.ipynb"), parameters={**base, **params},
                        cwd=str(NBS), progress_bar=False, kernel_name="python3")
    return tmp_path / name


def test_cobsat_notebook_tiny_and_deterministic(tmp_path, aligners):
    first = _run_cobsat(tmp_path, aligners, "first")
    second = _run_cobsat(tmp_path, aligners, "second")
    for name in ("table_2shot_all_both.csv", "table_2shot_heldout_both.csv", "table_2shot_all_subject.csv"):
        assert (first / name).read_text() == (second / name).read_text()
    table = pd.read_csv(first / "table_2shot_all_both.csv", index_col=0)
    assert list(table.index) == ["vlm-text", *METHODS] and table.shape[1] == 11
    assert (first / "accuracy_by_task.png").exists() and (first / "figure5_2shot.png").exists()
    assert json.loads((first / "metrics.json").read_text())["params"]["n_prompts"] == 2


def test_cobsat_notebook_rejects_bad_parameters(tmp_path, aligners):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="parameter shots"):
        _run_cobsat(tmp_path, aligners, "bad", shots=[3])
    with pytest.raises(pm.PapermillExecutionError, match="no trained aligner"):
        _run_cobsat(tmp_path, aligners, "missing", aligner_full=str(tmp_path / "nowhere"))


def test_generate_notebook_names_an_aligner_it_does_not_load(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match=r"needs the \['full'\] aligner"):
        pm.execute_notebook(str(NBS / "06_generate.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(NBS), progress_bar=False,
                            parameters=dict(profile="tiny-random", methods=["no-masking"], output_dir=str(tmp_path / "gen")),
                            kernel_name="python3")
