"""Peak host memory of loading Flan-T5 for aligner training (a benchmark, not a test), from one run on one machine.

A Flan-T5-shaped checkpoint (gated GELU, untied lm_head, float32, 5 safetensors shards with an index: the layout of
google/flan-t5-xxl, at a width this machine holds) is loaded in a fresh process per variant, and the growth of the
peak resident set over the process's size after imports is compared with the bytes of the decoder side (decoder,
shared embedding, lm_head) in the target dtype:
1. `t5_decoder_only` (what training uses; target: at most 1.2x),
2. `T5ForConditionalGeneration.from_pretrained` in the target dtype (the whole model),
3. the official code's route: the whole model in float32, then the encoder deleted and the rest cast.
Run with nothing else on the machine: `make benchmark` (or `.venv/bin/python tools/benchmark_t5_load.py --help`).
"""
import argparse, json, platform, subprocess, sys, tempfile
from pathlib import Path

VARIANTS = ("decoder-only", "whole", "official")

LOAD = r"""
import gc, json, sys, time, torch
from transformers import T5ForConditionalGeneration
from thinkdiff_nb.backbones import t5_decoder_only
def status_kib(key):  # VmRSS: resident now; VmHWM: its peak in this process (getrusage's maxrss survives exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
variant, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
gc.collect(); base = status_kib("VmRSS"); start = time.perf_counter()
if variant == "decoder-only": model = t5_decoder_only(path, "cpu", dtype)
elif variant == "whole": model = T5ForConditionalGeneration.from_pretrained(path, dtype=dtype)
else:  # the official route: all of it in float32, then the encoder goes and the rest is cast
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    del model.encoder; model = model.to(dtype)
seconds = time.perf_counter() - start
print(json.dumps({"base_kib": base, "peak_kib": status_kib("VmHWM"), "seconds": seconds}))
"""


def write_checkpoint(folder: Path, d_model: int, layers: int, shards: int) -> dict:
    "A random Flan-T5-shaped float32 checkpoint in `shards` safetensors files; returns its parameter counts."
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=int(d_model * 2.75), num_layers=layers,
                      num_decoder_layers=layers, num_heads=d_model // 64, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)  # Flan-T5-XXL: 4096 wide, d_ff 10240, 64 heads, 24 + 24 layers
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.02)  # untied, as in Flan-T5
    total = sum(p.numel() for p in model.parameters())
    decoder_side = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))
    size = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{int(size / shards * 1.05) // 2 ** 20}MB")  # a little over 1/shards
    return {"parameters": total, "decoder_side_parameters": decoder_side}


def measure(variant: str, folder: Path, dtype: str) -> dict:
    "Load the checkpoint one way in a fresh Python process; its base and peak resident set."
    out = subprocess.run([sys.executable, "-c", LOAD, variant, str(folder), dtype], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024, help="T5 width (Flan-T5-XXL: 4096)")
    parser.add_argument("--layers", type=int, default=24, help="encoder and decoder layers each (Flan-T5-XXL: 24)")
    parser.add_argument("--shards", type=int, default=5, help="safetensors shards (flan-t5-xxl: 5)")
    parser.add_argument("--dtype", default="bfloat16", help="the dtype training loads T5 in")
    parser.add_argument("--out", default="outputs/benchmark/t5_decoder_load.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flan_t5_shaped.") as tmp:
        folder = Path(tmp)
        counts = write_checkpoint(folder, args.d_model, args.layers, args.shards)
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        bytes_per = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
        decoder_bytes = counts["decoder_side_parameters"] * bytes_per
        results = {}
        for variant in VARIANTS:
            m = measure(variant, folder, args.dtype)
            growth = (m["peak_kib"] - m["base_kib"]) * 1024
            results[variant] = {"peak_growth_bytes": growth, "ratio_to_decoder_bytes": growth / decoder_bytes,
                                "seconds": m["seconds"]}
    report = {"machine": platform.platform(), "python": platform.python_version(), "args": vars(args), **counts,
              "checkpoint_files": files, "checkpoint_bytes_float32": counts["parameters"] * 4,
              "decoder_side_bytes": decoder_bytes, "results": results}
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(report, indent=2))
    print(f"Flan-T5-shaped checkpoint: {counts['parameters'] / 1e6:.0f} M parameters in {len(files)} float32 shards; "
          f"decoder side {decoder_bytes / 2 ** 30:.2f} GiB in {args.dtype}")
    for variant, r in results.items():
        print(f"{variant:13s} peak host memory growth {r['peak_growth_bytes'] / 2 ** 30:6.2f} GiB = "
              f"{r['ratio_to_decoder_bytes']:.2f}x the decoder side ({r['seconds']:.1f} s)")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
