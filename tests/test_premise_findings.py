("The findings notebook: one row per backbone change with finite measures, the shipped backbones as premise-broken, "
 "reruns read the rows, unknown changes named.")
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from thinkdiff_nb.backbones import get_profile
from thinkdiff_nb.aligner import t5_final_norm_weight

NBS = Path(__file__).parents[1] / "nbs"
TINY = dict(changes=["premise-broken", "uneven-norm", "native-t5-denoising"], backbone_steps=2, t5_steps=4,
            regression_steps=5, aligner_steps=3, aligner_batch_size=8, eval_batches=1,
            max_images=32, n_prompts=1, sample_steps=2, shots=[2])


def _run(out: Path, **params):
    import papermill as pm
    pm.execute_notebook(str(NBS / "08_premise_findings.ipynb"), str(out.with_suffix(".ipynb")), cwd=str(NBS),
                        progress_bar=False,
                        parameters={**TINY, **params, "output_dir": str(out)}, kernel_name="python3")
    return out


@pytest.mark.slow  # every premise trial end to end
def test_findings_notebook_tiny(tmp_path):
    out = _run(tmp_path / "findings")
    table = pd.read_csv(out / "findings.csv", index_col="change")
    assert list(table.index) == TINY["changes"]
    assert np.isfinite(table.to_numpy(float)).all()
    broken, uneven, native = (table.loc[c] for c in TINY["changes"])
    shipped_norm = t5_final_norm_weight(get_profile("mini").t5)
    # the shipped T5, saved
    assert torch.equal(t5_final_norm_weight(str(out / "premise-broken" / "backbones" / "t5")), shipped_norm)
    assert broken.norm_weight_std == pytest.approx(float(shipped_norm.std()), rel=1e-6)
    assert uneven.norm_weight_std > 10 * broken.norm_weight_std
    # the uneven norm is function-preserving: the changed T5 and image decoder draw the empty prompt's loss unchanged
    assert uneven.flow_loss_empty == pytest.approx(broken.flow_loss_empty, rel=1e-4)
    assert broken["vlm-text_2shot_both"] == uneven["vlm-text_2shot_both"]  # the VLM is never changed
    assert -1 <= broken.t5_cosine <= 1 and broken.aligned_rms > 0 and broken.states_rms > 0
    rates = [c for c in table if c.endswith("_both") or c.endswith("_accuracy")]
    assert len(rates) == 11 and ((table[rates] >= 0) & (table[rates] <= 1)).all().all()
    # the gates: the shipped T5 cannot write an answer back from its own states; the native T5 is a new model, read
    # by a fine-tuned image decoder
    assert broken.t5_gate_own_states_loss > 5 and not broken.t5_gate_passes
    assert not torch.equal(t5_final_norm_weight(str(out / "native-t5-denoising" / "backbones" / "t5")), shipped_norm)
    assert (out / "native-t5-denoising" / "decoder_ckpt.pt").exists()
    assert (table.image_gate_oracle_both == table["oracle_2shot_both"]).all()
    assert native["vlm-text_2shot_both"] == broken["vlm-text_2shot_both"]  # a new T5 leaves the VLM alone
    assert (out / "gates.png").exists() and list(pd.read_csv(out / "gates.csv", index_col="change").index) == TINY["changes"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"]["changes"] == TINY["changes"] and [r["change"] for r in metrics["rows"]] == TINY["changes"]
    assert (out / "findings.png").exists() and all(f"| {c} " in (out / "findings.md").read_text()
                                                   for c in TINY["changes"])
    # a rerun reads each trial's row instead of recomputing it
    written = {c: (out / c / "row.json").stat().st_mtime_ns for c in TINY["changes"]}
    _run(out)
    assert {c: (out / c / "row.json").stat().st_mtime_ns for c in TINY["changes"]} == written
    pd.testing.assert_frame_equal(pd.read_csv(out / "findings.csv", index_col="change"), table)


def test_findings_notebook_names_an_unknown_change(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match=r"parameter changes=.* has \['thinner-norm'\], not among"):
        _run(tmp_path / "unknown", changes=["premise-broken", "thinner-norm"])
    assert not (tmp_path / "unknown" / "premise-broken").exists()
