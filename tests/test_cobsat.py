("CoBSAT: the inference path, the scoring rule, the released-image layout, the evaluation notebook, its determinism "
 "over processes.")
import json, os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from thinkdiff_nb.world import TASKS, task_prompts
from thinkdiff_nb.backbones import get_profile
from thinkdiff_nb.judges import load_cobsat_judge
from thinkdiff_nb.aligner import Aligner, save_readout
from thinkdiff_nb.methods import ALIGNER_METHODS, METHODS
from thinkdiff_nb.inference import ThinkDiff, conditioning, respond
from thinkdiff_nb.cobsat import (CobsatImages, accuracy_table, cobsat_image_path, evaluate, evaluate_block, score,
                                 write_cobsat_folder)

NBS = Path(__file__).parents[1] / "nbs"


@pytest.fixture(scope="module")
def aligners(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligners")
    torch.manual_seed(0)
    for name in ALIGNER_METHODS:
        Aligner(32, 32).save_pretrained(root / name)
    # as 03_train writes beside a generated-token aligner
    save_readout(torch.eye(33, 32) + 0.01 * torch.randn(33, 32), root / "thinkdiff")
    return root


@pytest.fixture(scope="module")
def tiny_td(aligners):
    return ThinkDiff.load(get_profile("tiny-random"), {n: aligners / n for n in ALIGNER_METHODS})


def test_inference_path_end_to_end(tiny_td):
    prompts = task_prompts(TASKS[5], 4, 2)
    responses = respond(tiny_td, prompts, n_tokens=6, methods=METHODS)  # with the answers TBDN's rows ask for
    assert all(r["generated_features"].shape == (6, 32) for r in responses)  # EOS ignored: always n_tokens states
    assert all(set(r["prompted_answers"]) == {"tbdn-base", "tbdn-hint", "tbdn-qcd", "tbdn"} for r in responses)
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
    readout = tiny_td.readouts["thinkdiff"]
    assert torch.allclose(conditioning(tiny_td, "thinkdiff-readout", prompts, responses)[0],
                          aligned @ readout[:-1] + readout[-1])
    with pytest.raises(ValueError, match="unknown method"):
        conditioning(tiny_td, "magic", prompts, responses)


def test_both_right_scoring_on_hand_made_judge_outputs():
    prompts = task_prompts(TASKS[6], 2, 5)  # Action-I: targets (theta animal, x_query action)
    t = [p.target for p in prompts]
    judged = [t[0], (t[1][0], "cry" if t[1][1] != "cry" else "run"),
              ("zebra" if t[2][0] != "zebra" else "cat", t[2][1]),
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
    judges = {"mini": load_cobsat_judge("tiny-random", "mini")}
    kwargs = dict(shots=(2,), n_prompts=3, methods=("thinkdiff", "text-bridge"), tasks=TASKS[:2], n_tokens=4, steps=2,
                  batch_size=2)
    a = evaluate(tiny_td, judges, tmp_path / "a", **kwargs)
    b = evaluate(tiny_td, judges, tmp_path / "b", **kwargs)
    pd.testing.assert_frame_equal(a, b)
    (tmp_path / "a" / "shot2_task02.csv").unlink()  # a stopped run: task 2 missing
    pd.testing.assert_frame_equal(evaluate(tiny_td, judges, tmp_path / "a", **kwargs), a)
    assert set(a["method"]) == {"vlm-text", "thinkdiff", "text-bridge"} and len(a) == 3 * 3 * 2
    assert a[a["method"] == "thinkdiff"]["prompt"].tolist() == [0, 1, 2] * 2  # blocks 0-1 and 2 joined in prompt order


def test_a_block_stopped_halfway_resumes_to_the_same_records(tiny_td, tmp_path):
    "Blocks already written are kept; the missing one is computed with its own seeds, whichever process would have."
    judges = {"mini": load_cobsat_judge("tiny-random", "mini")}
    kwargs = dict(shots=(4,), n_prompts=3, methods=("thinkdiff",), tasks=TASKS[4:5], n_tokens=4, steps=2, batch_size=2)
    whole = evaluate(tiny_td, judges, tmp_path / "whole", **kwargs)
    part = tmp_path / "part"; part.mkdir()
    prompts = task_prompts(TASKS[4], 4, 3)
    block = evaluate_block(tiny_td, judges, TASKS[4], 4, 2, prompts[2:], ("thinkdiff",), n_tokens=4, steps=2)[0]
    block.to_csv(part / "shot4_task05.block0002.csv", index=False)  # the second process's block, written before a stop
    pd.testing.assert_frame_equal(evaluate(tiny_td, judges, part, **kwargs), whole)
    assert sorted(p.name for p in part.iterdir()) == ["shot4_task05.csv"]


def test_released_layout_is_read_and_a_missing_image_is_named(tmp_path):
    folder = write_cobsat_folder(tmp_path / "cobsat", sizes=(40, 56))
    prompt = task_prompts(TASKS[3], 4, 1)[0]  # Background-II: the latent is the background
    demos = CobsatImages(folder).demonstrations(prompt)
    assert [d.shape[:2] for d in demos] != [(64, 64)] * 4 and all(d.dtype == np.uint8 for d in demos)
    s, a = prompt.demo_pairs[0]
    assert (cobsat_image_path(folder, "background_animal", s, a)
            == folder / "datasets" / f"background_{s}" / f"{a}_{s}.jpg")
    cobsat_image_path(folder, "background_animal", s, a).write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"{a}_{s}.jpg cannot be read"):
        CobsatImages(folder).demonstrations(prompt)
    cobsat_image_path(folder, "texture_object", "cup", "lace").unlink()
    with pytest.raises(FileNotFoundError,
                       match="1 of CoBSAT's 500 images are missing, e.g. .*texture_cup/lace_cup.jpg"):
        CobsatImages(folder)
    with pytest.raises(FileNotFoundError, match="no datasets/ folder"):
        CobsatImages(tmp_path)


def _run_cobsat(tmp_path, trained, name, **params):
    import papermill as pm
    base = dict(profile="tiny-random", aligners={n: str(trained / n) for n in ALIGNER_METHODS}, methods=list(METHODS),
                n_prompts=2, n_tokens=4, sample_steps=2, shots=[2], output_dir=str(tmp_path / name))
    pm.execute_notebook(str(NBS / "05_cobsat.ipynb"), str(tmp_path / f"{name}.ipynb"), parameters={**base, **params},
                        cwd=str(NBS), progress_bar=False, kernel_name="python3")
    return tmp_path / name


def test_cobsat_notebook_rejects_bad_parameters(tmp_path, aligners):
    "Each bad input in a run of its own, the runs at once (each spends its time starting a kernel and importing)."
    import papermill as pm
    runs = {"shots": ("parameter shots", dict(shots=[3])),
            "judge": ("parameter judge='gpt' is not one of", dict(judge="gpt")),
            "cobsat": ("no datasets/ folder", dict(cobsat_dir=str(tmp_path))),
            "missing": ("no trained aligner", dict(aligners={**{n: str(aligners / n) for n in ALIGNER_METHODS},
                                                             "no-masking": str(tmp_path / "nowhere")}))}
    def refused(name, match, params):
        with pytest.raises(pm.PapermillExecutionError, match=match): _run_cobsat(tmp_path, aligners, name, **params)
    def generate_refused():
        with pytest.raises(pm.PapermillExecutionError,
                           match=r"need aligners \['no-masking'\]: give them in parameter aligners"):
            pm.execute_notebook(str(NBS / "06_generate.ipynb"), str(tmp_path / "out.ipynb"), cwd=str(NBS),
                                progress_bar=False, parameters=dict(profile="tiny-random", methods=["no-masking"],
                                                                    output_dir=str(tmp_path / "gen")),
                                kernel_name="python3")
    with ThreadPoolExecutor(3) as pool:
        done = [pool.submit(refused, name, match, params) for name, (match, params) in runs.items()]
        done.append(pool.submit(generate_refused))
    for future in done: future.result()


@pytest.mark.slow  # two accelerate processes
def test_cobsat_notebook_deterministic_over_runs_and_processes(tmp_path, aligners):
    ("Two runs, one of one process and one of two under accelerate launch, write the same records and tables; only "
     "the main process writes, and a rerun with another seed is refused.")
    import papermill as pm
    root = Path(__file__).parents[1]
    aligner_folders = ", ".join(f"{n}: {aligners / n}" for n in ALIGNER_METHODS)
    params = ["-p", "profile", "tiny-random", "-p", "n_prompts", "2", "-p", "batch_size", "1", "-p", "n_tokens", "4",
              "-p", "sample_steps", "2", "-y", f"shots: [2]\nmethods: [{', '.join(METHODS)}]",
              "-y", f"aligners: {{{aligner_folders}}}"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / "papermill"), "nbs/05_cobsat.ipynb", str(tmp_path / "one.ipynb"), *params,
                     "-p", "output_dir", str(tmp_path / "one")],
                    [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                     "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
                     "tools/papermill_ranks.py",
                     "nbs/05_cobsat.ipynb", str(tmp_path / "two" / "05_cobsat.ipynb"), *params, "-p", "output_dir",
                     str(tmp_path / "two")]):
        done = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    for unit in [f"shot2_task{t:02d}.csv" for t in range(1, 11)]:
        assert (one / "records" / unit).read_text() == (two / "records" / unit).read_text()
    for name in ("table_2shot_all_both.csv", "table_2shot_heldout_both.csv", "table_2shot_all_subject.csv"):
        assert (one / name).read_text() == (two / name).read_text()
    assert json.loads((two / "metrics.json").read_text())["run"]["processes"] == 2
    table = pd.read_csv(one / "table_2shot_all_both.csv", index_col=0)
    assert list(table.index) == ["vlm-text", *METHODS] and table.shape[1] == 11
    assert (one / "accuracy_by_task.png").exists() and (one / "figure5_2shot.png").exists()
    beside = pd.read_csv(one / "table_2shot_with_published.csv", index_col=0)  # ours, then the published means
    assert list(beside.index[-7:]) == [f"{m} (published)" for m in ("thinkdiff", "no-masking", "input-tokens",
                                                                    "tbdn-base", "tbdn-hint", "tbdn-qcd", "tbdn")]
    assert beside.loc["thinkdiff (published)", "mean"] == pytest.approx(0.417)
    assert beside.loc["tbdn (published)", "mean"] == pytest.approx(0.693)
    metrics = json.loads((one / "metrics.json").read_text())
    assert metrics["params"]["n_prompts"] == 2 and metrics["run"]["vlm_sampling"]["tbdn"]["contrast"] == 0.5
    with pytest.raises(pm.PapermillExecutionError, match=r"other settings \(then -> now\): seed 0 -> 7; remove it"):
        _run_cobsat(tmp_path, aligners, "one", seed=7, batch_size=1)  # its records/ hold blocks drawn with seed 0


@pytest.mark.slow  # FluxPipeline and LLaVA on tiny-paper
def test_cobsat_notebook_on_tiny_paper_with_released_images_and_the_llava_judge(tmp_path):
    "The paper's path end to end: released-layout images, FluxPipeline, CoBSAT's LLaVA questions and CLIP metric."
    import papermill as pm
    folder = write_cobsat_folder(tmp_path / "cobsat", sizes=(40, 64, 96))
    params = dict(profile="tiny-paper", judge="llava", secondary_judges=["clip"], judge_max_new_tokens=3,
                  cobsat_dir=str(folder),
                  methods=["thinkdiff", "text-bridge"], n_prompts=2, n_tokens=4, sample_steps=2, shots=[2],
                  batch_size=2)
    out = tmp_path / "run"
    pm.execute_notebook(str(NBS / "05_cobsat.ipynb"), str(tmp_path / "run.ipynb"),
                        parameters={**params, "output_dir": str(out)},
                        progress_bar=False, kernel_name="python3")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["judges"] == ["llava", "clip"] and metrics["run"]["demonstrations"] == str(folder)
    assert metrics["run"]["pipeline_class"] == "FluxPipeline"
    records = pd.concat(pd.read_csv(p) for p in sorted((out / "records").glob("*.csv")))
    drawn = records[records["method"] != "vlm-text"]
    assert len(drawn) == 10 * 2 * 2 and drawn["reply_subject"].notna().all()  # LLaVA's raw replies are kept
    assert (drawn["clip_similarity"] >= 0).all() and set(drawn["clip_both"]) <= {True, False}
    assert (out / "table_2shot_all_clip_both.csv").exists()
    # the paper's scale keeps every drawn image: judged again by CLIP alone, from the files, the run's CLIP columns
    # return
    assert metrics["run"]["keep_images"] and metrics["run"]["vlm_sampling"]["features"]["repetition_penalty"] == 1.0
    again = tmp_path / "again"
    pm.execute_notebook(str(NBS / "05_cobsat.ipynb"), str(tmp_path / "again.ipynb"), progress_bar=False,
                        kernel_name="python3",
                        parameters=dict(profile="tiny-paper", judge="clip", judge_from=str(out), output_dir=str(again)))
    rejudged = pd.concat(pd.read_csv(p) for p in sorted((again / "records").glob("*.csv")))
    rejudged = rejudged[rejudged["method"] != "vlm-text"]
    for column in ("subject", "attribute", "both", "subject_answer", "attribute_answer"):
        assert rejudged[column].tolist() == drawn[f"clip_{column}"].tolist(), column
    assert rejudged["clip_similarity"].tolist() == drawn["clip_similarity"].tolist()
    judged_again = json.loads((again / "metrics.json").read_text())["run"]
    assert judged_again["judged_from"] == str(out) and judged_again["judges"] == ["clip"]
    assert (again / "figure5_2shot.png").exists()  # from the kept images and answers
    cobsat_image_path(folder, "action_animal", "dog", "sing").unlink()
    with pytest.raises(pm.PapermillExecutionError, match="action_dog/sing_dog.jpg"):
        pm.execute_notebook(str(NBS / "05_cobsat.ipynb"), str(tmp_path / "missing.ipynb"),
                            parameters={**params, "output_dir": str(tmp_path / "missing")}, progress_bar=False,
                            kernel_name="python3")
