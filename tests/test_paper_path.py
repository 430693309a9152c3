("The paper's code path on the tiny-paper profile: FluxPipeline drawing, the decoder-only Flan-T5, the pipelines end "
 "to end.")
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from thinkdiff_nb.backbones import get_profile, load_t5, t5_decoder_only
from thinkdiff_nb.image_decoders import FluxDecoder
from thinkdiff_nb.inference import ThinkDiff, conditioning, respond
from thinkdiff_nb.methods import METHODS
from thinkdiff_nb.world import TASKS, task_prompts
from official_layout import projector, write_official

pytestmark = pytest.mark.slow  # pipelines on the tiny-paper profile

NBS = Path(__file__).parents[1] / "nbs"
SMALL = dict(profile="tiny-paper", sample_steps=2, n_tokens=6)


@pytest.fixture(scope="module")
def paper():
    return get_profile("tiny-paper")


def _papermill(notebook: str, tmp_path, **params):
    import papermill as pm
    pm.execute_notebook(str(NBS / notebook), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False,
                        kernel_name="python3")
    return json.loads((Path(params["output_dir"]) / "metrics.json").read_text())


def test_flux_decoder_follows_the_papers_conditioning(paper):
    td = ThinkDiff.load(paper, {"thinkdiff": paper.aligners["thinkdiff"]})
    assert isinstance(td.decoder, FluxDecoder) and td.decoder.pipeline_class == "FluxPipeline"
    prompts = task_prompts(TASKS[2], 2, 2)
    responses = respond(td, prompts, n_tokens=5)
    aligned, pooled = conditioning(td, "thinkdiff", prompts, responses)
    hybrid, hybrid_pooled = conditioning(td, "hybrid", prompts, responses)
    text, text_pooled = td.decoder.encode_prompt([r["answer"] for r in responses])
    assert aligned.shape == (2, 5, 32) and text.shape == (2, 128, 32)  # FLUX's T5 pads text to 128, pads kept
    assert torch.equal(hybrid, torch.cat([aligned, text], 1))  # aligned tokens first, then T5 text tokens
    assert torch.equal(pooled, td.decoder.encode_prompt(["", ""])[1])  # aligned tokens pool as the empty prompt
    assert torch.equal(hybrid_pooled, text_pooled)  # text pools as itself
    images = td.decoder.draw(aligned, pooled, steps=2, size=32, seed=7)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    alone = td.decoder.draw(aligned[1:], pooled[1:], steps=2, size=32, seed=8)  # image i is seeded seed + i
    assert np.array_equal(images[1], alone[0])


def test_decoder_only_flan_t5_reads_like_the_whole_model(paper):
    whole, _ = load_t5(paper)
    side, tokenizer = load_t5(paper, encoder=False)
    assert side.lm_head.weight is not side.shared.weight and not side.config.scale_decoder_outputs
    assert not any(n.startswith("encoder.") for n, _ in side.named_parameters())
    labels = tokenizer(["a red car", "a dog in a forest"], padding=True, return_tensors="pt").input_ids
    states = torch.randn(2, 7, 32)
    assert torch.allclose(side(encoder_outputs=(states,), labels=labels).loss,
                          whole(encoder_outputs=(states,), labels=labels).loss)
    bf16 = t5_decoder_only(paper.t5, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_generate_notebook_draws_through_flux_with_the_released_weights_layout(tmp_path, paper):
    # the release's layout, at tiny widths
    released = write_official(tmp_path / "thinkdiff_lvlm.pth", projector(48, 32))
    metrics = _papermill("06_generate.ipynb", tmp_path, **SMALL, samples=2, aligners={"thinkdiff": str(released)},
                         output_dir=str(tmp_path / "generate"))
    assert (metrics["run"]["pipeline_class"] == "FluxPipeline"
            and metrics["run"]["aligners"]["thinkdiff"] == str(released))
    assert metrics["metrics"]["image_shape"] == [2, 32, 32, 3]
    assert (tmp_path / "generate" / "Color-I_2shot_0.png").exists()


def test_cobsat_notebook_at_tiny_paper_size(tmp_path):
    metrics = _papermill("05_cobsat.ipynb", tmp_path, **SMALL, n_prompts=1, shots=[2], methods=list(METHODS),
                         output_dir=str(tmp_path / "cobsat"))
    assert metrics["run"]["pipeline_class"] == "FluxPipeline" and metrics["run"]["image_size"] == 32
    table = (tmp_path / "cobsat" / "table_2shot_all_both.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + len(METHODS) and table[0].endswith(",mean")  # vlm-text and every method
    assert metrics["run"]["vlm_sampling"]["tbdn"]["contrast"] == 0.5  # TBDN's rows through Qwen2-VL and FluxPipeline
    assert {"tbdn-base", "tbdn-hint", "tbdn-qcd", "tbdn"} <= {line.split(",")[0] for line in table}


def test_train_notebook_on_tiny_paper_then_from_the_cache_loads_only_the_t5_decoder(tmp_path):
    base = dict(profile="tiny-paper", steps=3, batch_size=4, max_images=12, eval_batches=1, ckpt_every=2, warmup=1,
                max_new_tokens=6, extract_batch_size=12)
    first = _papermill("03_train.ipynb", tmp_path, **base, output_dir=str(tmp_path / "first"))
    assert first["run"]["loaded"]["t5"] == "whole" and first["run"]["loaded"]["image_decoder"] == "FluxPipeline"
    assert first["run"]["loaded"]["vlm"] and np.isfinite(first["metrics"]["image_decoder_flow_loss"]["aligned"])
    second = _papermill("03_train.ipynb", tmp_path, **base, diagnostics=False,
                        feature_cache=str(tmp_path / "first" / "features"),
                        data_dir=str(tmp_path / "first" / "data"), output_dir=str(tmp_path / "second"))
    assert second["run"]["loaded"] == {"t5": "decoder only", "vlm": None, "image_decoder": None}
    # the notebook reloads it and asserts it bit-equal
    assert (tmp_path / "second" / "aligner" / "config.json").exists()


def test_premise_notebook_measures_the_released_layout_against_both_t5s(tmp_path):
    ("07_premise on tiny-paper: a released-layout aligner, answers to mixed-size webdataset images, Flan-T5's and "
     "FLUX's T5.")
    from thinkdiff_nb.data import write_webdataset
    data = write_webdataset(tmp_path / "wds", n_train=0, n_validation=10, per_tar=4)
    released = write_official(tmp_path / "thinkdiff_lvlm.pth", projector(48, 32))
    metrics = _papermill("07_premise.ipynb", tmp_path, profile="tiny-paper", aligner=str(released), data_dir=str(data),
                         samples=8, max_new_tokens=6, extract_batch_size=8, batch_size=4, eval_batches=1,
                         output_dir=str(tmp_path / "premise"))
    spaces = metrics["metrics"]["t5_space"]
    assert (set(spaces) == {"Flan-T5 encoder", "image decoder's T5"}
            and metrics["run"]["pipeline_class"] == "FluxPipeline")
    for space in spaces.values():  # Qwen's BPE and T5's SentencePiece paired through character offsets
        assert space["matched_share"] == 1.0 and space["rows"] >= 8 and -1 <= space["cosine"] <= 1
    assert spaces["Flan-T5 encoder"]["states_rms"] != spaces["image decoder's T5"]["states_rms"]  # two different T5s
    flow = metrics["metrics"]["image_decoder_flow_loss"]
    assert (np.isfinite(flow["aligned"]) and np.isfinite(flow["empty_prompt"])
            and flow["aligned"] != flow["empty_prompt"])
    assert 0 <= metrics["metrics"]["t5_decoder_read_back"]["token_accuracy"] <= 1
    assert (tmp_path / "premise" / "premise.png").exists() and (tmp_path / "premise" / "t5_space.md").exists()
