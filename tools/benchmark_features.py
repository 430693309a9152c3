"""Feature capture and the feature cache, timed (a benchmark, not a test): prints, from one run on one machine,
1. extraction with feature capture (forward hook on the final norm; generate's hidden states) against plain `generate`
   on the same prompts and sampling seeds (target: at most 1.10), and
2. aligner training step time reading the memory-mapped feature cache against the same batches already in memory
   (target: at most 1.05).
Rounds alternate between the variants so that drift of the machine hits all of them; an untimed first round warms
caches (and checks the shards' checksums), then the median of the timed rounds is reported.
Run with nothing else on the machine: `make benchmark` (or `.venv/bin/python tools/benchmark_features.py --help`)."""
import argparse, json, platform, random, statistics, tempfile, time
from pathlib import Path
import torch
from thinkdiff_nb.aligner import Aligner, init_norm_from_t5, t5_final_norm_weight
from thinkdiff_nb.backbones import description_messages, get_profile, load_t5, load_vlm
from thinkdiff_nb.data import MemorySource
from thinkdiff_nb.features import extract_features, generate_with_features
from thinkdiff_nb.loop import Schedule, fit
from thinkdiff_nb.data import load_bank
from thinkdiff_nb.train import AlignerBatches, aligner_loss_fn
from thinkdiff_nb.world import write_image_caption_set


def renders(n: int, seed: int, workdir: Path):
    "The first n training images (and rows) of a MiniCoBSAT image-caption set written under `workdir`."
    # 450 training pairs per render
    root = write_image_caption_set(workdir / "data", n_per_pair=-(-n // 450), seed=seed)
    images, rows = load_bank(root, "train")
    if len(rows) < n: raise ValueError(f"asked for {n} images, the rendered set has {len(rows)}")
    return images[:n], rows[:n]


def time_generation(vlm, processor, images, args) -> dict:
    "Median seconds per capture variant over alternating rounds, and whether every variant sampled the same answers."
    rng = random.Random(args.seed)
    messages = [description_messages(rng.choice(get_profile(args.profile).describe_instructions)) for _ in images]
    seconds, texts = {c: [] for c in (None, "hook", "hidden_states")}, {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for capture in seconds:
            torch.manual_seed(args.seed)
            start, answers = time.perf_counter(), []
            for b in range(0, len(images), args.batch_size):
                answers += generate_with_features(vlm, processor, messages[b:b + args.batch_size],
                                                  [[im] for im in images[b:b + args.batch_size]], args.max_new_tokens,
                                                  capture=capture)
            if round_: seconds[capture].append(time.perf_counter() - start)
            texts[capture] = [a["text"] for a in answers]
    return {"plain": statistics.median(seconds[None]), "hook": statistics.median(seconds["hook"]),
            "hidden_states": statistics.median(seconds["hidden_states"]),
            "same_answers": texts[None] == texts["hook"] == texts["hidden_states"]}


def train_steps(source, t5, t5_source, vlm_tokenizer, t5_tokenizer, args, ckpt: Path) -> tuple[float, list[float]]:
    "Seconds of the project's training loop (`fit`) for `args.train_steps` aligner steps on `source`, and the losses."
    torch.manual_seed(args.seed)
    aligner = Aligner(source[0]["generated_features"].shape[-1], t5.config.d_model)
    init_norm_from_t5(aligner, t5_final_norm_weight(t5_source))
    batches = AlignerBatches(source, "thinkdiff", vlm_tokenizer, t5_tokenizer, args.train_batch_size)
    ckpt.unlink(missing_ok=True)  # fit resumes from a checkpoint; every round starts fresh
    schedule = Schedule(steps=args.train_steps, lr=1e-3, warmup=10, weight_decay=0.05, ckpt_every=args.train_steps,
                        seed=args.seed)
    run = fit(aligner, aligner_loss_fn(t5, batches), schedule, ckpt, desc="aligner")
    return run.seconds, run.losses


def time_training(vlm, processor, images, rows, args, workdir: Path) -> dict:
    "Median seconds of the training loop on the memory-mapped cache and on the same samples held in memory."
    profile = get_profile(args.profile)
    t5, t5_tokenizer = load_t5(profile)
    cache = extract_features(vlm, processor, MemorySource(images, rows), workdir / "features",
                             profile.describe_instructions,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             vision_id=profile.describe_vision_id)
    in_memory = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in cache[i].items()} for i in range(len(cache))]
    seconds, losses = {"memory_mapped": [], "in_memory": []}, {}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, source in (("memory_mapped", cache), ("in_memory", in_memory)):
            s, losses[name] = train_steps(source, t5, profile.t5, processor.tokenizer, t5_tokenizer, args,
                                          workdir / "checkpoint.pt")
            if round_: seconds[name].append(s)
    return {name: statistics.median(s) for name, s in seconds.items()} | {
        "same_losses": losses["memory_mapped"] == losses["in_memory"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="mini", help="backbone profile (mini or tiny-random)")
    parser.add_argument("--images", type=int, default=1024, help="prompts generated per round")
    parser.add_argument("--batch-size", type=int, default=64, help="generation batch size")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--train-steps", type=int, default=200, help="aligner steps per round")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/benchmark/benchmark.json", help="where the measured numbers go")
    args = parser.parse_args()
    vlm, processor = load_vlm(get_profile(args.profile))
    with tempfile.TemporaryDirectory() as tmp:
        images, rows = renders(args.images, args.seed, Path(tmp))
        generation = time_generation(vlm, processor, images, args)
        training = time_training(vlm, processor, images, rows, args, Path(tmp))
    ratios = {"capture_hook_vs_plain": generation["hook"] / generation["plain"],
              "capture_hidden_states_vs_plain": generation["hidden_states"] / generation["plain"],
              "training_memory_mapped_vs_in_memory": training["memory_mapped"] / training["in_memory"]}
    print(f"generation of {args.images} answers ({args.max_new_tokens} new tokens max, batch {args.batch_size}), "
          f"median of {args.repeats} rounds:")
    print(f"  plain generate            {generation['plain']:7.2f} s")
    print(f"  capture by final-norm hook {generation['hook']:6.2f} s   ratio {ratios['capture_hook_vs_plain']:.3f}  "
          "(target <= 1.10)")
    print(f"  capture by hidden_states  {generation['hidden_states']:7.2f} s   ratio "
          f"{ratios['capture_hidden_states_vs_plain']:.3f}")
    print(f"  same sampled answers in all three: {generation['same_answers']}")
    print(f"aligner training, {args.train_steps} steps at batch {args.train_batch_size}, median of {args.repeats} "
          "rounds:")
    print(f"  in memory                 {training['in_memory']:7.2f} s")
    print(f"  memory-mapped cache       {training['memory_mapped']:7.2f} s   ratio "
          f"{ratios['training_memory_mapped_vs_in_memory']:.3f}  (target <= 1.05)")
    print(f"  identical losses: {training['same_losses']}")
    out = Path(args.output); out.parent.mkdir(parents=True, exist_ok=True)
    record = {"params": vars(args), "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "threads": torch.get_num_threads(), "generation_seconds": generation, "training_seconds": training,
              "ratios": ratios}
    tmp = out.with_name(f".{out.name}.tmp"); tmp.write_text(json.dumps(record, indent=2)); tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
