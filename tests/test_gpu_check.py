"`make gpu-check` on a CPU: every step of the paper path runs on the tiny-paper profile and lands in gpu_check.json."
import json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
STEPS = ["environment", "load_inference", "vlm_generation", "row_semantics", "flux_image", "tbdn_answers",
         "extract_answers",
         "released_aligner", "judges", "cobsat_block", "t5_decoder", "training_steps", "premise", "flux_offload",
         "video"]


@pytest.mark.slow  # every paper-scale model class once, on tiny weights
def test_gpu_check_runs_every_step_on_tiny_paper(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--profile", "tiny-paper", "--out",
                           str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [l for l in done.stdout.splitlines() if l.startswith("[")]
    assert [l.split()[1] for l in lines] == STEPS and all(l.startswith("[ok]") for l in lines)  # one line per step
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["profile"] == "tiny-paper" and report["failed"] == [] and list(steps) == STEPS
    assert steps["environment"]["pins_match"]
    assert (steps["vlm_generation"]["end_tokens_inside"] == 0
            and steps["vlm_generation"]["hub_file"]["repetition_penalty"] == 1.05)
    assert (steps["vlm_generation"]["applied"]["repetition_penalty"] == 1.0
            and steps["vlm_generation"]["applied"]["top_k"] == 0)
    assert steps["row_semantics"]["rows_predicting_their_token"] == 1.0
    widths = steps["released_aligner"]["widths"]
    assert steps["released_aligner"]["parameters"] == widths[0] * widths[1] + 2 * widths[1] + widths[1] ** 2 + widths[1]
    assert steps["t5_decoder"]["loss_decoder_only"] == pytest.approx(steps["t5_decoder"]["loss_whole_model"], rel=1e-4)
    assert (len(steps["training_steps"]["losses"]) == 5
            and set(steps["training_steps"]["loss_by_t5_dtype"]) == {"bfloat16", "float32"})
    for t5 in ("vs_flan_t5_encoder", "vs_flux_t5_v1_1"): assert -1 <= steps["premise"][t5]["cosine"] <= 1
    assert set(steps["premise"]["flux_flow_loss"]) == {"aligned", "empty_prompt"}
    assert set(steps["judges"]) >= {"llava", "clip"} and steps["cobsat_block"]["full_run_gpu_hours_at_this_rate"] > 0
    assert (steps["video"]["frames"], steps["video"]["height"]) == (9, 32) and (tmp_path / "video.mp4").exists()
    assert (tmp_path / "flux.png").exists()
    assert steps["tbdn_answers"]["time_ratio"] > 0 and steps["tbdn_answers"]["query_contrast"]["seconds"] > 0
