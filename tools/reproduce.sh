#!/usr/bin/env bash
# The main job on the mini profile: features, the three aligners, the RMSNorm ablation, CoBSAT, a generation example,
# and ThinkDiff-CLIP (its aligner on the shipped mini vision encoder, then its compositions scored), each notebook
# executed by papermill into outputs/<run-id>/ with its figures, tables and metrics.json.
# CoBSAT also scores the shipped image-loss aligner (beyond the paper; params/train_image_mini.yaml retrains it).
# Each aligner's folder is named after its method (thinkdiff_nb.methods.ALIGNER_METHODS).
set -euo pipefail
run_id=${1:?usage: tools/reproduce.sh RUN_ID}
run=outputs/$run_id
bin=.venv/bin
mkdir -p "$run"
# the kernel's inline backend embeds each cell's figures in the executed notebooks, which `make docs` publishes as
# results pages; a backend set in the environment (Agg) would leave them without images
unset MPLBACKEND
pm() { "$bin/papermill" --log-level WARNING "$@"; }
r=$run  # notebook paths resolve against the project folder
# The three aligners train 3,000 steps each, half of train_mini.yaml's full run (held-out continuation 0.956 at 6,000),
# with the same budget for all three so that the ablation compares like with like; this keeps the chain under 30 min.
steps=3000
data=$r/thinkdiff/data  # the image-caption set the first run renders; the later runs read its images

echo "== 1/8 ThinkDiff-LVLM aligner (features, masked training, T5-init norm)"
pm nbs/03_train.ipynb "$run/03_train_thinkdiff.ipynb" -f params/train_mini.yaml -p steps "$steps" \
   -p feature_cache "$r/features" -p output_dir "$r/thinkdiff"
echo "== 2/8 no-masking ablation"
pm nbs/03_train.ipynb "$run/03_train_no-masking.ipynb" -f params/train_mini.yaml -p steps "$steps" -p method no-masking \
   -p feature_cache "$r/features" -p data_dir "$data" -p output_dir "$r/no-masking"
echo "== 3/8 input-token ablation"
pm nbs/03_train.ipynb "$run/03_train_input-tokens.ipynb" -f params/train_mini.yaml -p steps "$steps" -p method input-tokens \
   -p feature_cache "$r/features" -p data_dir "$data" -p output_dir "$r/input-tokens"
echo "== 4/8 RMSNorm ablation"
pm nbs/04_rmsnorm_ablation.ipynb "$run/04_rmsnorm_ablation.ipynb" -f params/rmsnorm_mini.yaml \
   -p feature_cache "$r/features" -p output_dir "$r/rmsnorm"
echo "== 5/8 CoBSAT"
pm nbs/05_cobsat.ipynb "$run/05_cobsat.ipynb" -f params/cobsat_mini.yaml -p output_dir "$r/cobsat" \
   -y "aligners: {thinkdiff: $r/thinkdiff/aligner, no-masking: $r/no-masking/aligner, input-tokens: $r/input-tokens/aligner}"
echo "== 6/8 generation example"
pm nbs/06_generate.ipynb "$run/06_generate.ipynb" -y "aligners: {thinkdiff: $r/thinkdiff/aligner}" -p output_dir "$r/generate"
echo "== 7/8 ThinkDiff-CLIP aligner (the shipped mini vision encoder; the same seed gives the shipped aligner's weights)"
pm nbs/10_train_clip.ipynb "$run/10_train_clip.ipynb" -f params/train_clip_mini.yaml -p ship_aligner_dir "" \
   -p output_dir "$r/train-clip"
echo "== 8/8 ThinkDiff-CLIP compositions"
pm nbs/11_composition.ipynb "$run/11_composition.ipynb" -f params/composition_mini.yaml -p clip_aligner "$r/train-clip/aligner" \
   -p output_dir "$r/composition"

"$bin/python" - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
train = {m: json.loads((run / m / "metrics.json").read_text())["metrics"]["heldout"] for m in ("thinkdiff", "no-masking", "input-tokens")}
cobsat = json.loads((run / "cobsat" / "metrics.json").read_text())
clip = json.loads((run / "train-clip" / "metrics.json").read_text())["metrics"]
composition = json.loads((run / "composition" / "metrics.json").read_text())["metrics"]["table"]
summary = {"aligner_heldout": train, "cobsat_both_right_mean": cobsat["both_right_mean"],
           "rmsnorm": json.loads((run / "rmsnorm" / "metrics.json").read_text())["metrics"],
           "clip_aligner_heldout": clip["heldout"], "composition": composition}
(run / "metrics.json").write_text(json.dumps(summary, indent=2))
print(f"\nrun {run}: held-out continuation token accuracy " + ", ".join(f"{m} {v['token_accuracy']:.3f}" for m, v in train.items()))
shots = list(cobsat["both_right_mean"])
print(f"\n| method | " + " | ".join(f"{s} all | {s} held-out" for s in shots) + " |")
print("| --- |" + " --- |" * (2 * len(shots)))
for method in cobsat["both_right_mean"][shots[0]]["all"]:
    cells = [f"{cobsat['both_right_mean'][s][split][method]:.3f}" for s in shots for split in ("all", "heldout")]
    print(f"| {method} | " + " | ".join(cells) + " |")
print(f"\nThinkDiff-CLIP held-out suffix token accuracy: " + ", ".join(f"{m} {v['token_accuracy']:.3f}" for m, v in clip["heldout"].items()))
print("\n| composition | conditioning | both | from images | from text |\n| --- | --- | --- | --- | --- |")
for row in composition:
    print(f"| {row['kind']} | {row['conditioning']} | {row['both']:.3f} | {row['from_images']:.3f} | {row['from_text']:.3f} |")
PY
