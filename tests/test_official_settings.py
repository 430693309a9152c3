"""The paper path does what the official run does: each finding of a reading against the official ThinkDiff and CoBSAT
code, checked on tiny models of the paper's classes (decoding, the aligner's input, training, loading, costs)."""
import copy, json, re, shutil
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import T5ForConditionalGeneration
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
import thinkdiff_nb.features as features_module
import thinkdiff_nb.train as train_module
import thinkdiff_nb.clip as clip_module
from thinkdiff_nb.aligner import t5_aligner
from thinkdiff_nb.backbones import (description_messages, get_profile, icl_messages, load_t5, load_vlm, mini_t5_config,
                                    t5_decoder_only, vlm_batch)
from thinkdiff_nb.clip import ClipBatches, ClipTraining, ImageTokens, train_clip_aligner, vision_pixels
from thinkdiff_nb.cobsat import evaluate, rejudge
from thinkdiff_nb.data import MemorySource
from thinkdiff_nb.features import FeatureCache, end_token_ids, extract_features, generate_with_features
from thinkdiff_nb.inference import ThinkDiff, conditioning, draw, respond
from thinkdiff_nb.judges import judge_dtype, load_cobsat_judge
from thinkdiff_nb.train import AlignerBatches, AlignerTraining, aligner_loss, train_aligner
from thinkdiff_nb.world import TASKS, THEMES, render, task_prompts

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def paper():
    return get_profile("tiny-paper")


@pytest.fixture(scope="module")
def vlm(paper):
    return load_vlm(paper)


def _images(n: int, theme="color_object") -> MemorySource:
    "n MiniCoBSAT renders of different sizes with their rows."
    theme = THEMES[theme]
    rows = [{"image": f"{i}", "theme": theme.name, "subject": theme.subjects[i % 10],
             "attribute": theme.attributes[i // 3 % 10],
             "caption": f"a {theme.attributes[i // 3 % 10]} {theme.subjects[i % 10]} in a photo"} for i in range(n)]
    return MemorySource([render(theme, r["subject"], r["attribute"], size=32 + 8 * (i % 3), seed=i) for i,
                         r in enumerate(rows)], rows)


def _eos_prone(model, processor, conversation, images):
    ("A copy of the VLM whose greedy answer would end at its fourth token: that token's lm_head row is given to "
     "<|im_end|>.")
    plain = generate_with_features(model, processor, [conversation], [images], 4, sample=False, capture=None,
                                   image_size=None)[0]
    prone = copy.deepcopy(model)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad(): prone.lm_head.weight[end] = prone.lm_head.weight[int(plain["generated_ids"][3])] * 1.5
    return prone


def _greedy_by_hand(model, processor, conversation, images, n: int) -> list[int]:
    ("n tokens by full forward passes, each the arg-max of the next-token logits with the end tokens masked (vLLM's "
     "min_tokens).")
    batch = vlm_batch(processor, [conversation], [images], image_size=None)
    ends, ids = end_token_ids(model, processor.tokenizer), batch["input_ids"]
    for _ in range(n):
        text = torch.zeros(1, ids.shape[1] - batch["input_ids"].shape[1], dtype=torch.long)  # generated tokens are text
        with torch.no_grad():
            logits = model(**{**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                              "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], text], 1)}).logits[0, -1]
        logits[ends] = -float("inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
    return ids[0, batch["input_ids"].shape[1]:].tolist()


# --- 1 and 2: decoding


def test_the_hub_generation_config_neither_penalises_nor_ends_a_fixed_length_answer(paper, vlm):
    ("Qwen2-VL's hub file (repetition penalty 1.05, top-k 1) reaches no call; 'N tokens, EOS ignored' has no end token "
     "inside.")
    model, processor = vlm
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.top_k == 1  # as on the hub
    conversation = icl_messages(task_prompts(TASKS[0], 2, 1)[0].texts)
    images = [render("color_object", "car", "red", 40), render("color_object", "car", "blue", 56)]
    prone = _eos_prone(model, processor, conversation, images)
    natural = generate_with_features(prone, processor, [conversation], [images], 40, sample=False, image_size=None)[0]
    assert len(natural["generated_ids"]) < 40  # left to itself, this model ends its answer early
    out = generate_with_features(prone, processor, [conversation], [images], 40, sample=False, ignore_eos=True,
                                 image_size=None)[0]
    ids = out["generated_ids"].tolist()
    assert len(ids) == 40 and len(out["generated_features"]) == 40
    assert not set(ids) & set(end_token_ids(prone, processor.tokenizer))  # no end token inside the requested length
    assert ids == _greedy_by_hand(prone, processor, conversation, images, 40)  # unpenalised arg-max, ends masked
    # row semantics: each row's lm_head arg-max, end tokens masked, is the token it predicts
    logits = prone.lm_head(out["generated_features"])
    logits[:, end_token_ids(prone, processor.tokenizer)] = -float("inf")
    assert logits.argmax(-1).tolist() == ids


def test_an_answer_that_may_stop_stops_at_either_end_token(paper, vlm):
    "Extraction stops at <|im_end|> or <|endoftext|> (the hub's eos list), after at least one token (min_tokens 1)."
    model, processor = vlm
    conversation = description_messages("Describe the image concisely.")
    images = [render("color_object", "cup", "green", 48)]
    prone = _eos_prone(model, processor, conversation, images)
    out = generate_with_features(prone, processor, [conversation], [images], 24, sample=False, image_size=None)[0]
    assert out["generated_ids"].tolist()[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # EOS kept
    assert 1 <= len(out["generated_ids"]) < 24 and len(out["generated_features"]) == len(out["generated_ids"])


# --- 3: the aligner's input


def test_a_prompts_aligned_tokens_and_image_do_not_depend_on_its_block(paper):
    ("Prompt states of different lengths are projected alone and drawn without padding rows (the official code has "
     "none).")
    td = ThinkDiff.load(paper, {"input-tokens": paper.aligners["input-tokens"]})
    prompts = task_prompts(TASKS[2], 2, 3)
    responses = respond(td, prompts, n_tokens=4)
    tokens, pooled = conditioning(td, "input-tokens", prompts, responses)
    lengths = [len(r["prompt_features"]) for r in responses]
    assert len(set(lengths)) > 1 and [len(t) for t in tokens] == lengths  # each prompt's own rows, no padding rows
    block = draw(td.decoder, tokens, pooled, steps=2, seed=3, size=32)
    for i in range(len(prompts)):
        alone, alone_pooled = conditioning(td, "input-tokens", prompts[i:i + 1], responses[i:i + 1])
        assert torch.allclose(alone[0], tokens[i], atol=1e-6)
        assert np.array_equal(draw(td.decoder, alone, alone_pooled, steps=2, seed=3 + i, size=32)[0], block[i])


# --- 4: training and prompts


@pytest.fixture(scope="module")
def paper_cache(paper, vlm, tmp_path_factory):
    model, processor = vlm
    return extract_features(model, processor, _images(8), tmp_path_factory.mktemp("features"),
                            paper.describe_instructions,
                            shard_size=8, batch_size=8, max_new_tokens=8, image_size=None,
                            vision_id=paper.describe_vision_id)


def test_extraction_prompts_carry_no_picture_label_and_record_the_applied_sampling(paper, vlm, paper_cache):
    model, processor = vlm
    params = paper_cache.manifest["params"]
    assert params["vision_id"] is False and params["generation"]["repetition_penalty"] == 1.0
    assert (params["generation"]["temperature"], params["generation"]["top_p"],
            params["generation"]["top_k"]) == (0.6, 0.9, 0)
    item = paper_cache[0]
    unlabelled = vlm_batch(processor, [description_messages(item["instruction"])], [[_images(8)[0]["pixels"]]],
                           image_size=None, vision_id=False)
    assert "Picture" not in processor.tokenizer.decode(unlabelled["input_ids"][0])
    assert len(item["prompt_features"]) == unlabelled["input_ids"].shape[1]  # the prompt it was extracted from


def test_the_in_context_instruction_is_the_official_scripts(vlm):
    ("The instruction ends in a blank line; 'Word 1' follows it directly, later words after a blank line, pictures "
     "labelled.")
    _, processor = vlm
    prompt = task_prompts(TASKS[0], 2, 1)[0]  # blue, brown -> orange
    text = processor.apply_chat_template(icl_messages(prompt.texts), add_generation_prompt=True, add_vision_id=True,
                                         tokenize=False)
    picture = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
    assert ("start the answer with 'Create an image'.\n\nWord 1: blue, " + picture.format(1) + "\n\nWord 2: brown, "
            + picture.format(2) + "\n\nWord 3: orange, <|im_end|>") in text


def test_the_captioning_loss_is_float32_cross_entropy_of_the_bf16_decoder(paper, paper_cache, vlm):
    t5, t5_tokenizer = load_t5(paper, encoder=False, dtype=torch.bfloat16)
    batch = AlignerBatches(paper_cache, "thinkdiff", vlm[1].tokenizer, t5_tokenizer,
                           batch_size=4)(torch.Generator().manual_seed(0))
    aligner = t5_aligner(paper_cache.width, t5, paper.t5, "t5", seed=0)
    with torch.no_grad():
        loss = aligner_loss(aligner, t5, batch)
        states = aligner(batch[0]).to(torch.bfloat16)
        out = t5(encoder_outputs=(states,), attention_mask=batch[1], labels=batch[2])
        float32 = F.cross_entropy(out.logits.float().flatten(0, 1), batch[2].flatten(), ignore_index=-100)
    assert loss.dtype == torch.float32 and torch.equal(loss, float32)
    assert out.loss.dtype == torch.bfloat16 and out.loss.float() != float32  # transformers' own loss stays in bf16


def test_training_leaves_gradients_unclipped_and_the_frozen_t5_in_train_mode(
        paper, paper_cache, vlm, tmp_path, monkeypatch):
    ("The official runner: no clipping; model.train() on the whole model, so Flan-T5's dropout (0.1) is on; metrics in "
     "eval mode.")
    t5, t5_tokenizer = load_t5(paper, encoder=False)
    assert t5.config.dropout_rate == 0.1
    clips, fit = [], train_module.fit
    monkeypatch.setattr(train_module, "fit", lambda model, loss_fn, schedule, *a, **k: clips.append(schedule.grad_clip)
                        or fit(model, loss_fn, schedule, *a, **k))
    config = lambda dropout: AlignerTraining(batch_size=4, eval_batches=1, t5_dropout=dropout,
                                             schedule=replace(AlignerTraining().schedule, steps=1, warmup=1))
    run = lambda dropout, out: train_aligner(paper_cache, paper_cache, t5, t5_tokenizer, vlm[1].tokenizer, paper.t5,
                                             out,
                                             config(dropout))
    first_batch = AlignerBatches(paper_cache, "thinkdiff", vlm[1].tokenizer, t5_tokenizer, batch_size=4)(
        torch.Generator().manual_seed(0))  # fit draws its first batch from a generator seeded with the run's seed
    with torch.no_grad():
        eval_loss = aligner_loss(t5_aligner(paper_cache.width, t5, paper.t5, "t5", 0), t5.eval(), first_batch)
    _, no_dropout, _ = run(False, tmp_path / "eval")
    _, dropout, _ = run(True, tmp_path / "train")
    assert clips == [0.0, 0.0]  # the default: off
    assert (no_dropout[0] == pytest.approx(eval_loss.item(), rel=1e-6)
            and dropout[0] != pytest.approx(eval_loss.item(), rel=1e-3))
    assert not t5.training  # back in eval mode for the held-out metrics


def test_clip_training_defaults_are_the_official_runners(monkeypatch, tmp_path):
    "ThinkDiff-CLIP trains unclipped with the frozen T5 (prefix encoder and decoder) in train mode."
    profile = get_profile("tiny-random")
    t5, t5_tokenizer = load_t5(profile)
    vision = clip_module.CLIPVisionModel(clip_module.mini_vision_config(hidden=16, layers=1)).eval()
    tokens = ImageTokens(vision, _images(4))
    calls = []
    fit = clip_module.fit
    def spy(model, loss_fn, schedule, *a, **k):
        calls.append((schedule.grad_clip, t5.training))
        return fit(model, loss_fn, schedule, *a, **k)
    monkeypatch.setattr(clip_module, "fit", spy)
    config = ClipTraining(batch_size=2, eval_batches=1, schedule=replace(ClipTraining().schedule, steps=1, warmup=1))
    train_clip_aligner(tokens, tokens, t5, t5_tokenizer, profile.t5, tmp_path, config)
    assert calls == [(0.0, True)] and not t5.training  # the default: unclipped


def test_clip_images_are_squashed_as_blips_processor_does():
    # 48 x 96
    wide = np.concatenate([render("color_object", "car", "red", 48), render("color_object", "hat", "blue", 48)], 1)
    processor = BlipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=OPENAI_CLIP_MEAN,
                                      image_std=OPENAI_CLIP_STD)
    assert torch.allclose(vision_pixels([wide], 32), processor(wide, return_tensors="pt").pixel_values, atol=1e-5)


def test_judges_run_in_cobsats_dtypes_not_the_runs():
    "CoBSAT: LLaVA-1.5 in float16, CLIP in float32, on a GPU, even when FLUX and the VLM run in bfloat16."
    assert (judge_dtype("llava", "cuda:0"), judge_dtype("clip", "cuda:0"), judge_dtype("mini", "cuda:0")) == (
        torch.float16, torch.float32, torch.float32)
    assert judge_dtype("llava", "cpu") == torch.float32
    for notebook in ("05_cobsat", "06_generate", "11_composition"):  # no pipeline passes its own dtype to a judge
        cells = json.loads((ROOT / "nbs" / f"{notebook}.ipynb").read_text())["cells"]
        calls = re.findall(r"load_cobsat_judge\([^)]*\)", "".join("".join(c["source"]) for c in cells))
        assert calls and not any("dtype=" in call for call in calls), (notebook, calls)


# --- 5: loading


def test_an_older_flan_t5_conversion_with_only_the_decoders_embedding_loads(tmp_path):
    "A checkpoint storing the tied table only as decoder.embed_tokens.weight reads as from_pretrained reads it."
    torch.manual_seed(0)
    full = T5ForConditionalGeneration(mini_t5_config(64, d_model=32, layers=2)).eval()
    full.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32))
    full.config.save_pretrained(tmp_path)
    tied = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    save_file({k: v.contiguous() for k, v in full.state_dict().items() if k not in tied}
              | {"decoder.embed_tokens.weight": full.shared.weight.detach().contiguous()},
              str(tmp_path / "model.safetensors"))
    states, labels = torch.randn(2, 5, 32), torch.randint(3, 64, (2, 4))
    reference = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = full(encoder_outputs=(states,), labels=labels).loss
        # transformers resolves it
        assert torch.allclose(reference(encoder_outputs=(states,), labels=labels).loss, expected)
        assert torch.allclose(t5_decoder_only(str(tmp_path))(encoder_outputs=(states,), labels=labels).loss, expected)


# --- 6: costs


def test_a_kept_cobsat_run_is_judged_again_by_another_judge_from_its_files(paper, tmp_path):
    ("Judging kept images with CLIP gives the records of a run that drew them with CLIP as its judge; nothing is drawn "
     "again.")
    td = ThinkDiff.load(paper, {"thinkdiff": paper.aligners["thinkdiff"]})
    kw = dict(shots=(2,), n_prompts=3, methods=("thinkdiff", "text-bridge"), tasks=TASKS[:2], batch_size=2, n_tokens=4,
              steps=2, size=32)
    evaluate(td, {"mini": load_cobsat_judge(paper, "mini")}, tmp_path / "kept", keep_images=True, **kw)
    clip = {"clip": load_cobsat_judge(paper, "clip")}
    direct = evaluate(td, clip, tmp_path / "direct", **kw)
    td.decoder.pipe = td.vlm = None  # nothing can draw or answer any more
    pd.testing.assert_frame_equal(rejudge(tmp_path / "kept", clip, tmp_path / "again", batch_size=2), direct)
    answers = (tmp_path / "kept" / "answers" / "shot2_task01.block0000.jsonl").read_text().splitlines()
    assert [json.loads(a)["prompt"] for a in answers] == [0, 1] and len(json.loads(answers[0])["generated_ids"]) == 4


def test_each_process_decodes_only_its_share_of_a_clip_batch():
    "The captions of the whole global batch weigh the shares; only this process's images are decoded and encoded."
    class Counting(MemorySource):
        decoded = 0
        def __getitem__(self, i):
            Counting.decoded += 1
            return super().__getitem__(i)
    source = _images(16)
    counting = Counting(source.images, source.rows)
    profile = get_profile("tiny-random")
    vision = clip_module.CLIPVisionModel(clip_module.mini_vision_config(hidden=16, layers=1)).eval()
    batches = ClipBatches(ImageTokens(vision, counting, keep=False), load_t5(profile)[1], batch_size=8, share=(0, 2))
    batches(torch.Generator().manual_seed(0))
    # the global batch ClipBatches drew
    drawn = torch.randint(16, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    assert Counting.decoded == len(set(drawn[:4]))  # this process's half, each image once


def test_a_shard_is_hashed_once_for_every_reader(paper_cache, monkeypatch, tmp_path):
    "The first reader checks a shard's SHA-256 and stamps it; other processes and later runs read the stamp."
    hashed, root = [], tmp_path / "features"
    shutil.copytree(paper_cache.root, root, ignore=shutil.ignore_patterns(".*"))  # no stamp yet
    sha256 = features_module.sha256
    monkeypatch.setattr(features_module, "sha256", lambda path: hashed.append(path.name) or sha256(path))
    for _ in range(3): FeatureCache(root)[0]
    assert hashed == ["shard-00000.safetensors"]
    shard = root / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes()); data[-1] ^= 1; shard.write_bytes(bytes(data))  # changed since: hashed again
    with pytest.raises(ValueError, match="is corrupt"): FeatureCache(root)[0]


def test_libraries_whose_private_apis_we_read_are_pinned():
    pinned = dict(re.findall(r'"(transformers|diffusers|accelerate)==([^"]+)"', (ROOT / "pyproject.toml").read_text()))
    assert pinned == {name: version(name) for name in ("transformers", "diffusers", "accelerate")}
    from diffusers import FluxPipeline
    from transformers import GenerationMixin
    assert all(hasattr(FluxPipeline, a) for a in ("_pack_latents", "_prepare_latent_image_ids", "_execution_device"))
    assert hasattr(GenerationMixin, "_prepare_generation_config")
