"""Peak host memory of aligner training from webdataset tars (a benchmark, not a test), from one run on one machine.

Two cc_sbu-style shard sets of MiniCoBSAT renders at random widths and heights (100-300 px by default) are written,
one with 4x the training images of the other (256 and 1024), and `03_train` runs on each: the tiny-paper profile in
method image-loss, so that both feature extraction and the image loss read the tars, each run in a fresh papermill
process whose kernel records its peak resident set (`ru_maxrss`) in metrics.json. If nothing holds a split, the two
peaks agree although the larger split's decoded images take 4x the bytes (printed beside them for scale).

What keeps the measurement honest:
- both sets have tars of the same size (`--per-tar` samples) and the same validation split, and wids keeps at most
  `WebDatasetSource`'s default of 2 tars open (memory-mapped; the touched pages of an open tar count as resident), so
  what wids maps is bounded alike in both runs;
- extraction writes feature shards of `--shard-size` samples, so both runs span several shards (4 and 16 by default)
  and hold one shard's features at a time; the feature cache itself is memory-mapped and grows with the split (its
  size is printed: a few MiB);
- every run is a fresh papermill process and kernel; the kernel's `ru_maxrss` also covers the papermill process it was
  forked from, which is far smaller than the kernel.
Run with nothing else on the machine: `make benchmark` (or `.venv/bin/python tools/benchmark_streaming.py --help`)."""
import argparse, json, os, platform, subprocess, sys, tempfile
from pathlib import Path
from thinkdiff_nb.data import WebDatasetSource, write_webdataset

ROOT = Path(__file__).resolve().parents[1]


def train_once(data: Path, out: Path, args) -> dict:
    "Run 03_train on one shard set in a fresh papermill process; its metrics.json."
    params = dict(profile=args.profile, method="image-loss", data_dir=str(data), max_images=0,
                  shard_size=args.shard_size,
                  max_new_tokens=args.max_new_tokens, extract_batch_size=args.extract_batch_size, steps=args.steps,
                  batch_size=args.batch_size, eval_batches=args.validation // args.batch_size, ckpt_every=args.steps,
                  seed=args.seed, output_dir=str(out))
    command = [str(Path(sys.executable).parent / "papermill"), "--log-level", "WARNING",
               str(ROOT / "nbs" / "03_train.ipynb"),
               str(out.with_suffix(".ipynb"))] + [x for k, v in params.items() for x in ("-p", k, str(v))]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True)
    return json.loads((out / "metrics.json").read_text())


def split_bytes(folder: Path) -> int:
    "Bytes the split's images take decoded (uint8 RGB), read from each sample's json."
    source = WebDatasetSource(folder)
    return sum(3 * row["width"] * row["height"] for row in map(source.row, range(len(source))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, nargs=2, default=[256, 1024],
                        help="training images of the two sets")
    parser.add_argument("--validation", type=int, default=64,
                        help="validation images of both sets (a multiple of --batch-size)")
    parser.add_argument("--sides", type=int, nargs=2, default=[100, 300], help="range of each image's width and height")
    parser.add_argument("--per-tar", type=int, default=64, help="samples per tar")
    parser.add_argument("--shard-size", type=int, default=64, help="feature samples per shard")
    parser.add_argument("--profile", default="tiny-paper")
    parser.add_argument("--steps", type=int, default=100,
                        help="aligner steps (image loss): 1,600 image reads at batch 16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--extract-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/benchmark/streaming.json", help="where the measured numbers go")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.train_images:
            data = write_webdataset(Path(tmp) / f"data-{n}", n, args.validation, per_tar=args.per_tar,
                                    sides=tuple(args.sides),
                                    seed=args.seed)
            metrics = train_once(data, Path(tmp) / f"run-{n}", args)
            features = Path(tmp) / f"run-{n}" / "features"
            runs[n] = {"train_images": n, "tars": len(list((data / "train").glob("*.tar"))),
                       "tar_mib": sum(p.stat().st_size for p in (data / "train").glob("*.tar")) / 2 ** 20,
                       "feature_shards": len(list((features / "train").glob("*.safetensors"))),
                       "feature_cache_mib": sum(p.stat().st_size for p in features.rglob("*.safetensors")) / 2 ** 20,
                       "held_split_mib": split_bytes(data / "train") / 2 ** 20,
                       "peak_host_memory_mib": metrics["run"]["peak_host_memory_mib"],
                       "extract_minutes": metrics["metrics"]["extract_minutes"],
                       "train_minutes": metrics["metrics"]["train_minutes"]}
    small, large = (runs[n] for n in args.train_images)
    ratios = {"train_images": large["train_images"] / small["train_images"],
              "held_split": large["held_split_mib"] / small["held_split_mib"],
              "peak_host_memory": large["peak_host_memory_mib"] / small["peak_host_memory_mib"]}
    print(f"03_train ({args.profile}, image-loss, {args.steps} steps at batch {args.batch_size}) from webdataset tars "
          "of "
          f"{args.per_tar} images, {args.sides[0]}-{args.sides[1]} px a side; feature shards of {args.shard_size}; "
          "wids LRU of 2 tars:")
    print(f"  {'train images':>12} {'tars':>5} {'tar MiB':>8} {'feature shards':>14} {'cache MiB':>9} "
          f"{'held split MiB':>14} "
          f"{'peak host MiB':>13}")
    for r in runs.values():
        print(f"  {r['train_images']:12d} {r['tars']:5d} {r['tar_mib']:8.1f} {r['feature_shards']:14d} "
              f"{r['feature_cache_mib']:9.1f} "
              f"{r['held_split_mib']:14.1f} {r['peak_host_memory_mib']:13.1f}")
    print(f"  ratio large / small: images {ratios['train_images']:.2f}, held split {ratios['held_split']:.2f}, "
          f"peak host memory {ratios['peak_host_memory']:.3f} "
          f"({large['peak_host_memory_mib'] - small['peak_host_memory_mib']:+.1f} MiB)")
    out = ROOT / args.output; out.parent.mkdir(parents=True, exist_ok=True)
    record = {"params": vars(args), "python": platform.python_version(), "runs": list(runs.values()), "ratios": ratios}
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(record, indent=2)); tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
