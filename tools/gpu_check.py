"""Before anything long on GPUs: does this set-up do what the official ThinkDiff run does, and what will it cost?

One line per step, each with the figure it measured, then gpu_check.json. On a GPU it reads the paper's checkpoints
(`--profile paper`, with the released aligners' paths); on a CPU it runs the same steps on the tiny-paper profile.
    python tools/gpu_check.py --aligner /path/to/thinkdiff_lvlm.pth --clip-aligner /path/to/thinkdiff_clip.pth
    python tools/gpu_check.py --profile tiny-paper --out outputs/gpu-check      (what `make gpu-check` runs on a CPU)
A step that fails says why and the others still run; the exit code is the number of failed steps.
"""
import argparse, dataclasses, gc, json, platform, random, resource, sys, tempfile, time, traceback
from importlib.metadata import version
from pathlib import Path
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from thinkdiff_nb.aligner import load_aligner  # noqa: E402
from thinkdiff_nb.runtime import process_state, resolve_device, resolve_dtype
from thinkdiff_nb.backbones import get_profile, load_t5  # noqa: E402
from thinkdiff_nb.clip import load_vision, vision_tokens  # noqa: E402
from thinkdiff_nb.cobsat import CobsatImages, evaluate_block, write_cobsat_folder  # noqa: E402
from thinkdiff_nb.composition import image_text_video, load_video_pipeline, read_video  # noqa: E402
from thinkdiff_nb.data import MemorySource  # noqa: E402
from thinkdiff_nb.features import end_token_ids, extract_features, generate_with_features  # noqa: E402
from thinkdiff_nb.image_decoders import load_image_decoder  # noqa: E402
from thinkdiff_nb.inference import ThinkDiff, answer_settings, asked, conditioning, draw, respond  # noqa: E402
from thinkdiff_nb.methods import PROMPTED, TBDN_QCD  # noqa: E402
from thinkdiff_nb.judges import judge_dtype, load_cobsat_judge  # noqa: E402
from thinkdiff_nb.train import (ALIGNER_SCHEDULE, AlignerBatches, AlignerTraining, ImageBatches,  # noqa: E402
                                aligner_loss, decoder_states, encoder_states, image_loss_metrics, t5_space_agreement,
                                train_aligner)
from thinkdiff_nb.world import TASKS, THEMES, caption, render, task_prompts  # noqa: E402

PAPER_PARAMETERS = 31_469_568  # 3584 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096: ThinkDiff-LVLM's aligner
# per profile kind: VLM tokens, image side and steps, CoBSAT block, training batch, answers for the premise, video
SIZES = {"paper": dict(n_tokens=128, size=512, steps=28, block=8, train_batch=32, answers=64, answer_tokens=64,
                       judged_pairs=4, video_frames=9, video_side=0, video_steps=50),
         "tiny": dict(n_tokens=8, size=32, steps=2, block=2, train_batch=4, answers=8, answer_tokens=8,
                      judged_pairs=1, video_frames=9, video_side=32, video_steps=2)}
COBSAT = dict(prompts=1000, tasks=10, shots=2)  # a full CoBSAT run: 1000 prompts per task and shot


def gpu() -> bool: return torch.cuda.is_available()


def reset_peak():
    if gpu(): torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()


def peak() -> dict:
    "Peak GPU memory since the last reset and the process's peak host RSS, in GiB."
    out = {"peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)}
    if gpu(): out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def release(*names, scope: dict):
    "Drop the named models and give their memory back."
    for name in names: scope.pop(name, None)
    gc.collect()
    if gpu(): torch.cuda.empty_cache()


def sources(n: int, size: int, seed: int = 0) -> MemorySource:
    "n MiniCoBSAT renders with their captions: images whose content is known."
    rng, items, rows = np.random.default_rng(seed), [], []
    themes = list(THEMES.values())
    for i in range(n):
        theme = themes[i % len(themes)]
        s, a = theme.subjects[rng.integers(10)], theme.attributes[rng.integers(10)]
        items.append(render(theme, s, a, size, seed=i))
        rows.append({"image": f"render-{i}", "theme": theme.name, "subject": s, "attribute": a,
                     "caption": caption(theme, s, a, random.Random(i))})
    return MemorySource(items, rows)


def flat(figures: dict, prefix: str = "") -> dict:
    "Nested figures on one level, their keys joined by dots."
    out = {}
    for k, v in figures.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


class Check:
    "Runs the steps, printing one line each and keeping their figures."
    def __init__(self, args):
        self.args, self.results = args, {}
        profile = get_profile(args.profile)
        overrides = {k: v for k,
                     v in dict(vlm=args.vlm, t5=args.t5, decoder=args.flux, llava=args.llava, clip=args.clip,
                                            vision=args.vision, video=args.video).items() if v}
        self.profile = dataclasses.replace(profile, **overrides)
        self.kind = "paper" if args.profile == "paper" else "tiny"
        self.sizes = SIZES[self.kind]
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        self.out = Path(args.out); self.out.mkdir(parents=True, exist_ok=True)
        self.models = {}

    def step(self, name: str, run):
        start = time.time(); reset_peak()
        try:
            figures = run() or {}
            self.results[name] = {"ok": True, **figures, "seconds": round(time.time() - start, 2), **peak()}
            shown = ", ".join(f"{k} {v}" for k, v in flat(self.results[name]).items() if k not in ("ok", "answer"))
            print(f"[ok]     {name:18s} {shown}", flush=True)
        except Exception as e:
            self.results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                  "seconds": round(time.time() - start, 2)}
            print(f"[FAILED] {name:18s} {type(e).__name__}: {e}", flush=True)
            if self.args.verbose: traceback.print_exc()

    # --- the steps
    def environment(self):
        versions = {p: version(p) for p in ("torch", "transformers", "diffusers", "accelerate", "tokenizers",
                                            "safetensors")}
        pinned = {p: v for p, v in ((p, version(p)) for p in ("transformers", "diffusers", "accelerate"))
                  if f'"{p}=={v}"' in (ROOT / "pyproject.toml").read_text()}
        figures = {"python": platform.python_version(), **versions, "pins_match": len(pinned) == 3,
                   "device": str(self.device), "dtype": str(self.dtype), "profile": self.profile.name}
        if gpu(): figures |= {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                              "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)}
        return figures

    def load_inference(self):
        aligners = {"thinkdiff": self.args.aligner or self.profile.aligners["thinkdiff"]}
        self.models["td"] = ThinkDiff.load(self.profile, aligners, device=self.device, dtype=self.dtype,
                                           cpu_offload=self.args.cpu_offload)
        td = self.models["td"]
        return {"vlm": type(td.vlm).__name__, "decoder": td.decoder.pipeline_class}

    def vlm_generation(self):
        "The settings `generate` applies after merging the checkpoint's own file, and end tokens inside N tokens."
        td, n = self.models["td"], self.sizes["n_tokens"]
        hub = {k: getattr(td.vlm.generation_config, k, None) for k in ("repetition_penalty", "temperature", "top_k",
                                                                       "top_p")}
        applied = answer_settings(td, n)["features"]
        prompts = task_prompts(TASKS[0], 2, self.sizes["block"])
        answers = respond(td, prompts, n, seed=42, demonstrations=self.demonstrations)
        ends = set(end_token_ids(td.vlm, td.processor.tokenizer))
        inside = sum(int(t) in ends for a in answers for t in a["generated_ids"])
        self.models["answers"] = (prompts, answers)
        if inside: raise AssertionError(f"{inside} end tokens inside {n}-token answers (expected 0)")
        return {"end_tokens_inside": inside, "tokens_per_answer": n, "hub_file": hub,
                "applied": {k: applied[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                                    "min_new_tokens", "max_new_tokens")},
                "answer": answers[0]["answer"][:120]}

    def row_semantics(self):
        "Greedy, end tokens masked: each row's lm_head arg-max is the token it predicted, in the run's dtype."
        td, n = self.models["td"], self.sizes["n_tokens"]
        prompt = task_prompts(TASKS[0], 2, 1)[0]
        from thinkdiff_nb.backbones import icl_messages
        out = generate_with_features(td.vlm, td.processor, [icl_messages(prompt.texts)], [self.demonstrations(prompt)],
                                     n,
                                     sample=False, ignore_eos=True, image_size=td.profile.vlm_image_size)[0]
        rows = out["generated_features"].to(td.vlm.device, td.vlm.dtype)
        with torch.no_grad(): logits = td.vlm.lm_head(rows).float()
        logits[:, end_token_ids(td.vlm, td.processor.tokenizer)] = -float("inf")
        agree = float((logits.argmax(-1).cpu() == out["generated_ids"]).float().mean())
        # bf16 ties: a row or two
        if agree < 0.98: raise AssertionError(f"only {agree:.3f} of rows predict their own token")
        return {"rows_predicting_their_token": agree, "dtype": str(td.vlm.dtype)}

    def released_aligner(self):
        path = self.args.aligner or self.profile.aligners["thinkdiff"]
        aligner = load_aligner(path)
        d_in, d_out = aligner.config.d_vlm, aligner.config.d_t5
        expected = d_in * d_out + d_out + d_out * d_out + d_out + d_out
        count = sum(p.numel() for p in aligner.parameters())
        if count != expected: raise AssertionError(f"{count:,} parameters, expected {expected:,} for {d_in} -> {d_out}")
        return {"path": str(path), "parameters": count, "paper_parameters": PAPER_PARAMETERS, "widths": [d_in, d_out]}

    def flux_image(self):
        td, (prompts, answers) = self.models["td"], self.models["answers"]
        embeds, pooled = conditioning(td, "thinkdiff", prompts[:1], answers[:1])
        image = draw(td.decoder, embeds, pooled, steps=self.sizes["steps"], seed=42, size=self.sizes["size"])[0]
        Image.fromarray(image).save(self.out / "flux.png")
        return {"size": self.sizes["size"], "steps": self.sizes["steps"], "offload": self.args.cpu_offload,
                "tokens": list(embeds.shape), "file": "flux.png"}

    def judges(self):
        ("CoBSAT's judges on ground-truth images (the released ones with --cobsat-dir; else MiniCoBSAT renders in "
         "their layout).")
        figures = {}
        for name in ("llava", "clip"):
            judge = load_cobsat_judge(self.profile, name, device=self.device, max_new_tokens=8)
            right, n, start = 0, 0, time.time()
            for task in TASKS[::2]:  # one per theme, a few pairs each, every image at its own size
                theme, pairs = task.theme, self.sizes["judged_pairs"]
                for s, a in zip(theme.subjects[:pairs], theme.attributes[:pairs]):
                    answer = judge.answer(self.cobsat.image(theme, s, a)[None], theme, [(s, a)]).iloc[0]
                    right += int(answer["subject_answer"] == s and answer["attribute_answer"] == a); n += 1
            figures[name] = {"both_right": round(right / n, 3), "images": n,
                             "dtype": str(judge_dtype(name, self.device)),
                             "seconds_per_image": round((time.time() - start) / n, 3)}
            self.models[f"judge_{name}"] = judge
        return figures

    def cobsat_block(self):
        ("One block of CoBSAT prompts through the VLM, ThinkDiff and the text bridge, judged: time and memory for a "
         "full run.")
        td, block, start = self.models["td"], self.sizes["block"], time.time()
        judges = {"llava": self.models["judge_llava"], "clip": self.models["judge_clip"]}
        prompts = task_prompts(TASKS[0], 2, block)
        records, _ = evaluate_block(td, judges, TASKS[0], 2, 0, prompts, ("thinkdiff", "text-bridge"),
                                    n_tokens=self.sizes["n_tokens"], steps=self.sizes["steps"], seed=42,
                                    size=self.sizes["size"], demonstrations=self.demonstrations)
        seconds = time.time() - start
        blocks = COBSAT["prompts"] * COBSAT["tasks"] * COBSAT["shots"] / block
        return {"prompts": block, "methods": 2,
                "both_right": records.groupby("method")["both"].mean().round(3).to_dict(),
                "full_run_gpu_hours_at_this_rate": round(seconds * blocks / 3600, 1),
                "full_run_note": "1000 prompts x 10 tasks x 2 shots, two methods, one GPU; N GPUs share the blocks"}

    def tbdn_answers(self):
        ("TBDN's query-contrastive decoding against a plain answer on one CoBSAT block, measured in one run: the "
         "VLM's time and peak memory for each, and the ratio.")
        td, prompts = self.models["td"], task_prompts(TASKS[0], 2, self.sizes["block"])
        images, figures = [self.demonstrations(p) for p in prompts], {}
        for name, prompting in (("plain", None), ("query_contrast", PROMPTED[TBDN_QCD])):
            reset_peak(); start = time.time(); torch.manual_seed(42)
            generate_with_features(td.vlm, td.processor, images=images, max_new_tokens=self.sizes["n_tokens"],
                                   min_new_tokens=0, capture=None, image_size=td.profile.vlm_image_size,
                                   **asked(prompts, prompting))
            figures[name] = {"seconds": round(time.time() - start, 2), **peak()}
        figures["time_ratio"] = round(figures["query_contrast"]["seconds"] / figures["plain"]["seconds"], 2)
        return figures

    def extract(self):
        "Answers to description prompts with their states: the input of the training and premise steps."
        td = self.models["td"]
        self.models["source"] = sources(self.sizes["answers"], 224 if self.kind == "paper" else 32)
        cache = extract_features(td.vlm, td.processor, self.models["source"], Path(tempfile.mkdtemp()) / "features",
                                 self.profile.describe_instructions,
                                 shard_size=self.sizes["answers"], batch_size=min(16, self.sizes["answers"]),
                                 max_new_tokens=self.sizes["answer_tokens"], seed=0,
                                 image_size=self.profile.vlm_image_size,
                                 vision_id=self.profile.describe_vision_id)
        self.models["cache"] = cache
        return {"answers": len(cache),
                "mean_tokens": round(float(np.mean([len(cache[i]["generated_ids"]) for i in range(len(cache))])), 1)}

    def t5_decoder(self):
        "The decoder-only Flan-T5 against the whole model: memory, and the same loss on a fixed batch."
        decoder_only, tokenizer = load_t5(self.profile, self.device, self.dtype, encoder=False)
        gpu_bytes = torch.cuda.memory_allocated() if gpu() else None
        whole, _ = load_t5(self.profile, self.device, self.dtype, encoder=True)
        g = torch.Generator().manual_seed(0)
        states = torch.randn(2, 16, whole.config.d_model, generator=g).to(self.device, self.dtype)
        labels = tokenizer(["a red car on a beach", "a photo of a cat"], return_tensors="pt",
                           padding=True).input_ids.to(self.device)
        with torch.no_grad():
            a = decoder_only(encoder_outputs=(states,), labels=labels).loss.float().item()
            b = whole(encoder_outputs=(states,), labels=labels).loss.float().item()
        self.models["t5_whole"], self.models["t5_tokenizer"] = whole, tokenizer
        if abs(a - b) > 1e-3 * max(1, abs(b)):
            raise AssertionError(f"decoder-only loss {a} differs from the whole model's {b}")
        figures = {"loss_decoder_only": round(a, 5), "loss_whole_model": round(b, 5)}
        if gpu_bytes is not None: figures["decoder_only_gpu_gib"] = round(gpu_bytes / 2 ** 30, 2)
        return figures

    def training(self):
        ("Five aligner steps on the extracted answers, and one batch's loss through the T5 decoder in float32 and "
         "bfloat16.")
        cache, tokenizer, td = self.models["cache"], self.models["t5_tokenizer"], self.models["td"]
        t5, _ = load_t5(self.profile, self.device, self.dtype, encoder=False)
        start = time.time()
        schedule = dataclasses.replace(ALIGNER_SCHEDULE, steps=5, lr=1e-4, warmup=2, ckpt_every=5, seed=42)
        config = AlignerTraining(batch_size=self.sizes["train_batch"], eval_batches=1, schedule=schedule)
        aligner, losses, _ = train_aligner(cache, cache, t5, tokenizer, td.processor.tokenizer, self.profile.t5,
                                           Path(tempfile.mkdtemp()), config)
        per_step = (time.time() - start) / 5
        batch = AlignerBatches(cache, "thinkdiff", td.processor.tokenizer, tokenizer, self.sizes["train_batch"],
                               share=(0, 1))(torch.Generator().manual_seed(0))
        with torch.no_grad():
            by_dtype = {}
            for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
                by_dtype[name] = round(aligner_loss(aligner, t5.to(dtype), batch, self.device).item(), 5)
        return {"seconds_per_step": round(per_step, 2), "losses": [round(l, 4) for l in losses],
                "loss_by_t5_dtype": by_dtype}

    def premise(self):
        ("Is what the aligner writes what FLUX reads? Its tokens against both T5s' states of the same answers, and "
         "FLUX's loss.")
        td, cache, source = self.models["td"], self.models["cache"], self.models["source"]
        aligner = td.aligners["thinkdiff"]
        flan = encoder_states(self.models["t5_whole"], self.models["t5_tokenizer"])
        figures = {f"vs_{name}": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                                  t5_space_agreement(aligner, states, td.processor.tokenizer, cache,
                                                     len(cache)).items()}
                   for name, states in (("flan_t5_encoder", flan), ("flux_t5_v1_1", decoder_states(td.decoder)))}
        images = ImageBatches(cache, source, self.sizes["size"], batch_size=2,
                              n_rows=self.sizes["answer_tokens"], share=(0, 1))
        empty = td.decoder.encode_prompt([""])[0]
        figures["flux_flow_loss"] = {
            "aligned": round(image_loss_metrics(aligner, td.decoder, images, n_batches=2, seed=1)["flow_loss"], 4),
            "empty_prompt": round(image_loss_metrics(lambda f: empty.expand(len(f), -1, -1), td.decoder, images,
                                                     n_batches=2,
                                                     seed=1)["flow_loss"], 4)}
        return figures

    def flux_offload(self):
        "One FLUX image again with diffusers' model CPU offload, for a single smaller GPU."
        if not gpu(): return {"skipped": "no GPU: model CPU offload moves models to a GPU and back"}
        decoder = load_image_decoder(self.profile, self.device, self.dtype, cpu_offload=True)
        aligner = load_aligner(self.args.aligner or self.profile.aligners["thinkdiff"]).to(self.device)
        with torch.no_grad():
            embeds = aligner(self.models["answers"][1][0]["generated_features"][None].to(self.device))
            draw(decoder, embeds, decoder.empty_pooled(1), steps=self.sizes["steps"], seed=42, size=self.sizes["size"])
        return {"size": self.sizes["size"], "steps": self.sizes["steps"]}

    def video(self):
        "A 9-frame CogVideoX clip from an image's ThinkDiff-CLIP tokens and a text, with model CPU offload on a GPU."
        vision = load_vision(self.args.vision or self.profile.vision, self.device, self.dtype)
        aligner = load_aligner(self.args.clip_aligner or self.profile.clip_aligner).to(self.device, self.dtype).eval()
        pipe = load_video_pipeline(self.profile, self.device, self.dtype, cpu_offload=gpu())
        with torch.no_grad():
            tokens = aligner(
                vision_tokens(vision, [render("color_object", "car", "red", 224)]).to(self.device, self.dtype))
        side = self.sizes["video_side"]
        path = image_text_video(pipe, tokens, "a car driving along a beach at sunset", self.out / "video.mp4",
                                frames=self.sizes["video_frames"], height=side, width=side,
                                steps=self.sizes["video_steps"],
                                seed=42)
        frames = read_video(path)
        return {"frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                "steps": self.sizes["video_steps"], "file": path.name}

    def run(self):
        cobsat_dir = Path(self.args.cobsat_dir) if self.args.cobsat_dir else None
        if cobsat_dir is None:  # MiniCoBSAT renders in the released layout, at the benchmark's sizes
            cobsat_dir = write_cobsat_folder(Path(tempfile.mkdtemp()) / "cobsat",
                                             sizes=(224,) if self.kind == "paper" else (32,))
        self.cobsat = CobsatImages(cobsat_dir)
        self.demonstrations = self.cobsat.demonstrations
        self.step("environment", self.environment)
        self.step("load_inference", self.load_inference)
        if "td" in self.models:
            self.step("vlm_generation", self.vlm_generation)
            self.step("row_semantics", self.row_semantics)
            self.step("flux_image", self.flux_image)
            self.step("tbdn_answers", self.tbdn_answers)
            self.step("extract_answers", self.extract)
        self.step("released_aligner", self.released_aligner)
        self.step("judges", self.judges)
        if "td" in self.models and "judge_clip" in self.models: self.step("cobsat_block", self.cobsat_block)
        release("judge_llava", "judge_clip", scope=self.models)
        self.step("t5_decoder", self.t5_decoder)
        if "cache" in self.models and "t5_tokenizer" in self.models:
            self.step("training_steps", self.training)
            if "t5_whole" in self.models: self.step("premise", self.premise)
        release("t5_whole", "td", "cache", "source", scope=self.models)
        if "answers" in self.models: self.step("flux_offload", self.flux_offload)
        release("answers", scope=self.models)
        self.step("video", self.video)
        report = {"profile": self.profile.name, "device": str(self.device), "dtype": str(self.dtype),
                  "steps": self.results,
                  "failed": [n for n, r in self.results.items() if not r["ok"]]}
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"{len(self.results) - len(report['failed'])} of {len(self.results)} steps ok; "
              f"{self.out / 'gpu_check.json'}", flush=True)
        return len(report["failed"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper" if gpu() else "tiny-paper", choices=("paper", "tiny-paper"))
    parser.add_argument("--aligner", default="", help="ThinkDiff-LVLM aligner: thinkdiff_lvlm.pth or a 03_train folder")
    parser.add_argument("--clip-aligner", default="",
                        help="ThinkDiff-CLIP aligner: thinkdiff_clip.pth or a 10_train_clip folder")
    for name in ("vlm", "t5", "flux", "llava", "clip", "vision", "video"):
        parser.add_argument(f"--{name}", default="", help=f"a local folder or hub id in place of the profile's {name}")
    parser.add_argument("--cobsat-dir", default="",
                        help="the folder holding CoBSAT's released datasets/ (else renders)")
    parser.add_argument("--device", default="auto"); parser.add_argument("--dtype", default="auto")
    parser.add_argument("--cpu-offload", action="store_true", help="FLUX with model CPU offload in the inference steps")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu-check"))
    parser.add_argument("--verbose", action="store_true", help="print each failed step's traceback")
    args = parser.parse_args()
    if args.profile == "paper" and not args.aligner:
        parser.error("--profile paper needs --aligner (the released thinkdiff_lvlm.pth) and --clip-aligner "
                     "(thinkdiff_clip.pth)")
    process_state()
    sys.exit(Check(args).run())


if __name__ == "__main__":
    main()
