"""One run record for every pipeline: each parameter checked before anything loads, a folder's settings guarded across
reruns, minutes summed over legs; CoBSAT's block seeds apart; a corrupt feature shard recovered as its error advises."""
import json, re, shlex, subprocess, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import nbformat
import pytest
import yaml
from thinkdiff_nb.backbones import DESCRIBE_INSTRUCTIONS, get_profile, load_vlm
from thinkdiff_nb.cobsat import block_seed
from thinkdiff_nb.data import MemorySource
from thinkdiff_nb.features import FeatureCache, cache_complete, extract_features
from thinkdiff_nb.parameters import LEGS, SETTINGS, claim_folder, notebook_parameters, open_run, positive
from thinkdiff_nb.world import TASKS, THEMES, render

ROOT = Path(__file__).parents[1]
NBS = ROOT / "nbs"
PIPELINES = ["01c_pretrain_run", "03_train", "04_rmsnorm_ablation", "05_cobsat", "06_generate", "07_premise",
             "08_premise_findings", "10_train_clip", "11_composition", "12_compose"]


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_opens_its_run_through_the_record_after_its_title(name):
    cells = nbformat.read(NBS / f"{name}.ipynb", as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")  # the title, then the parameters cell
    assert "parameters" in cells[1].metadata.get("tags", [])
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert f'open_run(notebook="{name}.ipynb", namespace=globals()' in code
    assert "record.write_metrics(" in code or "write_metrics(" in code
    for copied in ('versions = {"python"', '"metrics.json").write_text', "platform.python_version"):
        assert copied not in code, copied
    assert notebook_parameters(f"{name}.ipynb")["output_dir"] == "str"


def test_block_seeds_are_distinct_over_the_paper_configuration_and_across_seeds():
    paper = yaml.safe_load((ROOT / "params" / "cobsat_paper.yaml").read_text())
    shots, prompts, size = paper["shots"], paper["n_prompts"], paper["batch_size"]
    assert (shots, prompts, size) == ([2, 4], 1000, 8)
    for seeds in ((paper["seed"], paper["seed"] + 1), (0, 1)):
        bases = [block_seed(s, t.id, shot, start)
                 for s in seeds for t in TASKS for shot in shots for start in range(0, prompts, size)]
        assert len(bases) == 2 * 10 * 2 * 125 and len(set(bases)) == len(bases)
        ordered = sorted(bases)
        assert all(b - a >= size for a, b in zip(ordered, ordered[1:]))  # row k draws with base + k: none repeats
        assert all(0 <= b < 2 ** 63 for b in bases)
    assert block_seed(0, 1, 2, 0) == block_seed(0, 1, 2, 0) != block_seed(0, 1, 2, 8)  # its place alone


def test_a_corrupt_shard_recovers_by_following_its_error_literally(tmp_path):
    (vlm, processor) = load_vlm(get_profile("tiny-random"))
    theme = THEMES["color_object"]
    rows = [{"theme": theme.name, "subject": theme.subjects[i], "attribute": "red", "caption": "x"} for i in range(8)]
    source = MemorySource([render(theme, r["subject"], "red", seed=i) for i, r in enumerate(rows)], rows)
    extract = lambda: extract_features(vlm, processor, source, tmp_path / "f", DESCRIBE_INSTRUCTIONS, shard_size=4,
                                       batch_size=4, max_new_tokens=4)
    first = extract()
    shard = tmp_path / "f" / first.shards[1]["file"]
    data = bytearray(shard.read_bytes()); data[-10] ^= 0xFF; shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt") as error:
        FeatureCache(tmp_path / "f")[5]
    advice = str(error.value)
    command = re.search(r"delete it \((rm '[^']+')\)", advice).group(1)
    assert "run what extracted the cache again with the same parameters" in advice
    subprocess.run(shlex.split(command), check=True)  # the advice, word for word
    assert not cache_complete(tmp_path / "f")  # so a pipeline's feature_caches extracts again
    rebuilt = extract()
    assert rebuilt.shards == first.shards and rebuilt[5]["text"] == first[5]["text"]


def _refused_before_loading(tmp_path, notebook: str, match: str, **params):
    "Run a pipeline with bad parameters: the error names them, and no cell after the one that opens the run ran."
    import papermill as pm
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / notebook
    with pytest.raises(pm.PapermillExecutionError, match=match):
        pm.execute_notebook(str(NBS / notebook), str(out), parameters={"output_dir": str(tmp_path / "run"), **params},
                            progress_bar=False, kernel_name="python3")
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    opened = next(i for i, c in enumerate(cells) if "open_run(" in c.source)
    assert all(c.execution_count is None for c in cells[opened + 1:]), notebook
    assert "get_profile(" not in cells[opened].source.split("open_run(")[0]  # nothing loads before the check
    assert not (tmp_path / "run").exists()


def test_bad_numeric_parameters_are_named_before_any_model_loads(tmp_path):
    "Each pipeline in a run of its own, the runs at once (each spends its time starting a kernel and importing)."
    runs = {  # notebook: (what the error says, parameters)
        "03_train.ipynb": (r"parameter lr must be of type float, got 'abc' \(str\); "
                           r"parameter warmup must be non-negative, got -3$",
                           dict(lr="abc", warmup=-3)),
        "05_cobsat.ipynb": (r"parameter sample_steps must be non-negative, got -3; "
                            r"parameter guidance must be non-negative, got -1.5; "
                            r"parameter image_size must be 0 \(the default\) or a multiple of 16, got 40; "
                            r"parameter text_length must be in \[0, 512\], got -1",
                            dict(sample_steps=-3, guidance=-1.5, image_size=40, text_length=-1)),
        "10_train_clip.ipynb": (r"parameter steps must be of type int, got 2.5 \(float\); "
                                r"parameter lr must be positive, got 0",
                                dict(steps=2.5, lr=0))}
    with ThreadPoolExecutor(len(runs)) as pool:
        done = [pool.submit(_refused_before_loading, tmp_path / Path(nb).stem, nb, match, **params)
                for nb, (match, params) in runs.items()]
    for future in done: future.result()


def _tiny_pipeline(folder: Path) -> Path:
    "A pipeline notebook of four parameters, as the pipelines' parameters cells declare them."
    source = 'method: str = "thinkdiff"\nsteps: int = 20\nseed: int = 0\ndevice: str = "auto"\noutput_dir: str = "x"'
    kernel = {"kernelspec": {"name": "python3", "language": "python", "display_name": "python3"}}
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, metadata={"tags": ["parameters"]})],
                                        metadata=kernel)
    folder.mkdir(parents=True, exist_ok=True); nbformat.write(notebook, folder / "tiny.ipynb")
    return folder


def test_minutes_are_summed_over_every_leg_of_a_resumed_run(tmp_path):
    notebooks = _tiny_pipeline(tmp_path / "nbs")
    namespace = dict(method="thinkdiff", steps=20, seed=3, device="cpu", output_dir=str(tmp_path / "run"))
    run_again = lambda: open_run("tiny.ipynb", namespace, {"steps": positive}, ("output_dir", "device"), notebooks)
    stopped = run_again()  # a leg stopped after writing a checkpoint 1.2 s in: it counts until that file
    time.sleep(1.2); (stopped.folder / "checkpoint.pt").write_bytes(b"1")
    finished = run_again()
    time.sleep(0.6)
    record = finished.write_metrics({"metrics": {"loss": 0.5}})
    assert [leg["minutes"] * 60 for leg in record["legs"]] == [pytest.approx(1.2, abs=0.2), pytest.approx(0.6, abs=0.2)]
    assert record["minutes"] == sum(leg["minutes"] for leg in record["legs"]) and record["seed"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == record
    assert json.loads((tmp_path / "run" / SETTINGS).read_text()) == {"method": "thinkdiff", "steps": 20, "seed": 3}
    assert {"python", "torch", "transformers", "diffusers", "accelerate", "thinkdiff_nb"} == set(record["versions"])
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # written whole, then renamed


def test_a_folder_is_refused_naming_each_setting_and_taken_over_only_when_empty(tmp_path):
    folder = tmp_path / "run"
    claim_folder(folder, {"method": "thinkdiff", "lr": 0.01})
    claim_folder(folder, {"method": "no-masking", "lr": 0.01})  # nothing written yet: the folder is free
    (folder / "records").mkdir()
    with pytest.raises(ValueError, match=r"\(then -> now\): method 'no-masking' -> 'thinkdiff', lr 0.01 -> 0.05"):
        claim_folder(folder, {"method": "thinkdiff", "lr": 0.05})
    legacy = tmp_path / "legacy"; legacy.mkdir()  # a run from before settings.json: its metrics.json's params judge it
    (legacy / "metrics.json").write_text(json.dumps({"params": {"seed": 0, "sample_steps": 12, "output_dir": "x"}}))
    with pytest.raises(ValueError, match=r"\(then -> now\): seed 0 -> 7; remove it"):
        claim_folder(legacy, {"seed": 7, "n_prompts": 2})
    claim_folder(legacy, {"seed": 0, "n_prompts": 2})  # the parameters it recorded agree: it resumes
    assert json.loads((legacy / SETTINGS).read_text()) == {"seed": 0, "n_prompts": 2}
    (tmp_path / "unknown").mkdir(); (tmp_path / "unknown" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="but no settings.json"):
        claim_folder(tmp_path / "unknown", {"seed": 0})


def test_other_processes_wait_for_the_main_process_settings(tmp_path):
    folder = tmp_path / "run"
    main = threading.Timer(0.5, lambda: claim_folder(folder, {"seed": 0}))
    main.start()
    assert claim_folder(folder, {"seed": 0}, main=False) == {"seed": 0}  # waited for the file, then checked it
    (folder / "records").mkdir()
    with pytest.raises(ValueError, match="seed 0 -> 1"):
        claim_folder(folder, {"seed": 1}, main=False)
    assert not (folder / LEGS).exists()  # only the main process writes
