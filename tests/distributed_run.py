"""Run by test_distributed, alone or under `accelerate launch`: feature extraction into OUT/features, then aligner
training that is killed at step CRASH_AT (-1: never) and resumed; the main process writes OUT/result.json.
With PROCESS_GROUP_TIMEOUT (seconds) the process group times out that soon, and SLOW_SAMPLE_SECONDS makes reading the
last sample (in the main process's last shard) that slow: the other process waits longer than a collective may."""
import json, os, sys, time
from datetime import timedelta
from pathlib import Path
from accelerate import PartialState
import torch
from safetensors.torch import save_file
from thinkdiff_nb.aligner import Aligner
from thinkdiff_nb.runtime import process_state
from thinkdiff_nb.backbones import DESCRIBE_INSTRUCTIONS, get_profile, load_t5, load_vlm
from thinkdiff_nb.data import MemorySource
from thinkdiff_nb.features import extract_features
from thinkdiff_nb.loop import Schedule, fit
from thinkdiff_nb.train import AlignerBatches, aligner_loss_fn
from thinkdiff_nb.world import THEMES, render


def train(cache, t5, t5_tokenizer, vlm_tokenizer, out: Path, crash_at: int):
    "Six steps at a global batch of 4, checkpointing every 2; raises KeyboardInterrupt at call `crash_at`."
    torch.manual_seed(0)
    aligner = Aligner(cache.width, t5.config.d_model)
    loss = aligner_loss_fn(t5, AlignerBatches(cache, "thinkdiff", vlm_tokenizer, t5_tokenizer, batch_size=4))
    calls = iter(range(100))
    def dying(model, g):
        if next(calls) == crash_at: raise KeyboardInterrupt(f"killed at step {crash_at}")
        return loss(model, g)
    return aligner, fit(aligner, dying, Schedule(steps=6, ckpt_every=2, warmup=1), out / "checkpoint.pt",
                        log_csv=out / "loss.csv")


class SlowLastSample(MemorySource):
    "A source whose last sample takes SLOW_SAMPLE_SECONDS to read."
    def __getitem__(self, i: int) -> dict:
        if i == len(self) - 1: time.sleep(float(os.environ.get("SLOW_SAMPLE_SECONDS", 0)))
        return super().__getitem__(i)


if __name__ == "__main__":
    out, crash_at = Path(sys.argv[1]), int(sys.argv[2])
    if "PROCESS_GROUP_TIMEOUT" in os.environ:  # before anything joins the group: accelerate's state is shared
        PartialState(cpu=True, timeout=timedelta(seconds=float(os.environ["PROCESS_GROUP_TIMEOUT"])))
    state = process_state()
    profile = get_profile("tiny-random")  # every process builds the same seeded weights
    (vlm, processor), (t5, t5_tokenizer) = load_vlm(profile), load_t5(profile)
    theme = THEMES["color_object"]
    rows = [{"theme": theme.name, "subject": theme.subjects[i % 10], "attribute": theme.attributes[i // 3 % 10],
             "caption": "x"}
            for i in range(14)]
    source = SlowLastSample([render(theme, r["subject"], r["attribute"], seed=i) for i, r in enumerate(rows)], rows)
    cache = extract_features(vlm, processor, source, out / "features", DESCRIBE_INSTRUCTIONS, shard_size=3,
                             batch_size=3, max_new_tokens=5)
    if crash_at >= 0:
        try: train(cache, t5, t5_tokenizer, processor.tokenizer, out, crash_at)
        except KeyboardInterrupt: pass
    aligner, run = train(cache, t5, t5_tokenizer, processor.tokenizer, out, -1)
    if state.is_main_process:
        save_file({k: v.contiguous() for k, v in aligner.state_dict().items()}, str(out / "aligner.safetensors"))
        (out / "result.json").write_text(json.dumps({
            "processes": state.num_processes, "losses": run.losses,
            "generators": len(torch.load(out / "checkpoint.pt")["generators"])}))
