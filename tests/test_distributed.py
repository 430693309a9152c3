("Data-parallel runs on two CPU processes (accelerate launch, gloo) compute what one process does, and only the main "
 "one writes.")
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from thinkdiff_nb.aligner import Aligner
from thinkdiff_nb.loop import Schedule, fit

pytestmark = pytest.mark.slow  # two accelerate processes per run

ROOT = Path(__file__).parents[1]
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(command: list, cwd=ROOT, **env):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "Agg", **env})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The script alone (one process, never killed) and under two processes (killed at step 3, then resumed), where the
    main process's last shard outlasts the process group's timeout (a GPU shard can outlast NCCL's 10 minutes)."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _run([sys.executable, str(ROOT / "tests" / "distributed_run.py"), str(one), "-1"])
    _run(ACCELERATE + ["--main_process_port", "29517", str(ROOT / "tests" / "distributed_run.py"), str(two), "3"],
         PROCESS_GROUP_TIMEOUT="6", SLOW_SAMPLE_SECONDS="9")
    return one, two


def test_extraction_over_two_processes_writes_the_one_process_cache(one_and_two):
    "The process done first waits on the file system, not in a collective that would time out."
    one, two = one_and_two
    manifests = [json.loads((d / "features" / "manifest.json").read_text()) for d in one_and_two]
    for m in manifests: m["params"].pop("model")  # each run's temporary profile folder
    # 14 samples in shards of 3, same checksums
    assert len(manifests[0]["shards"]) == 5 and manifests[0] == manifests[1]
    assert not list((two / "features").glob("*.entry.json"))  # every entry folded into the manifest


def test_two_processes_killed_and_resumed_train_like_one(one_and_two):
    results = [json.loads((d / "result.json").read_text()) for d in one_and_two]
    assert [r["processes"] for r in results] == [1, 2] and [r["generators"] for r in results] == [1, 2]
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-5, abs=1e-6)
    a, b = (load_file(str(d / "aligner.safetensors")) for d in one_and_two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    lr = [line.split(",")[2] for d in one_and_two for line in (d / "loss.csv").read_text().splitlines()]
    assert lr[:7] == lr[7:]  # the schedule advances once per optimiser step, whatever the process count


def test_a_checkpoint_resumes_only_with_its_process_count(one_and_two):
    _, two = one_and_two
    with pytest.raises(ValueError, match="written by 2 processes; resume it with as many, not 1"):
        fit(Aligner(32, 32), lambda model, g: model(torch.zeros(1, 1, 32)).sum(), Schedule(steps=6),
            two / "checkpoint.pt")


def test_train_notebook_over_two_processes(tmp_path):
    "03_train under accelerate: the same loss curve as one process, one set of outputs, each rank's notebook apart."
    params = ["-p", "profile", "tiny-random", "-p", "steps", "4", "-p", "batch_size", "4", "-p", "max_images", "12",
              "-p", "eval_batches", "1", "-p", "ckpt_every", "2", "-p", "warmup", "1", "-p", "max_new_tokens", "5",
              "-p", "extract_batch_size", "12", "-p", "diagnostics", "False"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(Path(sys.executable).parent / "papermill"), "nbs/03_train.ipynb", str(tmp_path / "one.ipynb"), *params,
          "-p", "output_dir", str(one)])
    _run(ACCELERATE + ["--main_process_port", "29518", "tools/papermill_ranks.py", "nbs/03_train.ipynb",
                       str(two / "03_train.ipynb"),
                       *params, "-p", "output_dir", str(two), "-p", "feature_cache", str(one / "features"),
                       "-p", "data_dir", str(one / "data")])
    assert (one / "loss.csv").read_text() == (two / "loss.csv").read_text()
    assert json.loads((two / "metrics.json").read_text())["run"]["processes"] == 2
    assert sorted(p.name for p in two.iterdir()) == ["03_train.ipynb", "03_train.rank1.ipynb", "aligner",
                                                     "checkpoint.pt",
                                                     "legs.json", "loss.csv", "loss.png", "metrics.json",
                                                     "settings.json"]
