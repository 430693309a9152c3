"Tiny paper profile: every folder loads with the real classes' from_pretrained, in the hub layouts, deterministically."
import json, random
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoTokenizer, AutoProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, LlamaTokenizer,
                          LlavaForConditionalGeneration, LlavaProcessor, Qwen2Tokenizer,
                          Qwen2VLForConditionalGeneration,
                          T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from diffusers import FluxPipeline
import thinkdiff_nb.tiny_paper as tiny_paper
from thinkdiff_nb.tiny_paper import save_tiny_paper
from thinkdiff_nb.backbones import ImageOnlyQwen2VLProcessor, Judge
from thinkdiff_nb.world import THEMES, caption, render

FOLDERS = ("vlm", "t5", "flux", "judge", "llava", "clip", "blip2", "cogvideox", "aligners")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_tiny_paper(tmp_path_factory.mktemp("tiny") / "paper")


def safetensors_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_layout(root):
    assert sorted(p.name for p in root.iterdir()) == sorted(FOLDERS + ("tiny_paper.json",))
    vlm = {p.name for p in (root / "vlm").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt", "chat_template.json", "preprocessor_config.json"} <= vlm
    flux = json.loads((root / "flux" / "model_index.json").read_text())
    assert flux["_class_name"] == "FluxPipeline"
    assert {k: v[1] for k, v in flux.items() if isinstance(v, list) and v[0]} == {
        "scheduler": "FlowMatchEulerDiscreteScheduler", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5Tokenizer",
        "transformer": "FluxTransformer2DModel"}
    assert sorted(p.name for p in (root / "flux" / "tokenizer").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]
    assert not list(root.parent.glob(".*building"))


def test_t5_sharded_untied(root):
    index = json.loads((root / "t5" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in (root / "t5").glob("*.safetensors")) == shards
    assert {"lm_head.weight", "shared.weight"} <= set(index["weight_map"])
    config = json.loads((root / "t5" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["feed_forward_proj"] == "gated-gelu"
    assert (config["d_model"], config["d_kv"], config["d_ff"], config["num_heads"]) == (32, 8, 64, 4)
    assert (config["num_layers"], config["num_decoder_layers"], config["relative_attention_num_buckets"]) == (2, 2, 32)
    t5 = T5ForConditionalGeneration.from_pretrained(root / "t5")
    assert t5.config.scale_decoder_outputs is False
    assert t5.lm_head.weight is not t5.shared.weight
    assert not torch.equal(t5.lm_head.weight, t5.shared.weight)
    norm = t5.encoder.final_layer_norm.weight.detach()
    assert 0.5 <= float(norm.min()) < float(norm.max()) <= 1.5 and norm.std() > 0.1
    tok = AutoTokenizer.from_pretrained(root / "t5")
    assert isinstance(tok, T5Tokenizer)
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == len(tok) - 100
    assert len(tok) <= t5.config.vocab_size
    text = caption("color_object", "leaf", "yellow", random.Random(0))
    ids = tok(text).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    out = t5(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[0]])).logits
    assert out.shape == (1, 1, t5.config.vocab_size) and torch.isfinite(out).all()


def test_vlm_tokenizer_and_chat_template(root):
    tok = AutoTokenizer.from_pretrained(root / "vlm")
    assert isinstance(tok, Qwen2Tokenizer)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    theme = THEMES["color_object"]
    for subject in theme.subjects[:3]:
        text = caption(theme, subject, theme.attributes[0], random.Random(1))
        assert tok.decode(tok(text).input_ids) == text
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": "Describe the image briefly."}]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True, tokenize=False)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Describe the image briefly.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    template = json.loads((root / "vlm" / "chat_template.json").read_text())["chat_template"]
    assert template == json.loads((root / "vlm" / "tokenizer_config.json").read_text())["chat_template"]
    assert "Video {{ video_count.value }}: " in template and "<|video_pad|>" in template
    config = json.loads((root / "vlm" / "config.json").read_text())
    ids = {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    assert ids == {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = config["text_config"]
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (
        tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id, tok.pad_token_id)
    assert text["hidden_size"] == 48 != json.loads((root / "t5" / "config.json").read_text())["d_model"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = config["vision_config"]
    assert vision["hidden_size"] == text["hidden_size"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)


def test_vlm_processor_without_torchvision(root):
    pre = json.loads((root / "vlm" / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"], pre["merge_size"]) == (3136, 12845056, 14, 2)
    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(root / "vlm")  # the stock processor builds a video processor
    explicit = ImageOnlyQwen2VLProcessor.from_pretrained(
        root / "vlm", image_processor=Qwen2VLImageProcessorPil.from_pretrained(root / "vlm"))
    processor = ImageOnlyQwen2VLProcessor.from_pretrained(root / "vlm")
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)
    assert processor.image_processor.to_dict() == explicit.image_processor.to_dict()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Word 1: red,"}, {"type": "image"},
                                             {"type": "text", "text": " Word 2: blue,"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, add_vision_id=True, tokenize=False)
    assert "Picture 1: <|vision_start|>" in prompt and "Picture 2: <|vision_start|>" in prompt
    images = [Image.fromarray(render("color_object", s, "red")) for s in ("leaf", "hat")]
    batch = processor(text=[prompt], images=images, return_tensors="pt")
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4]]  # 32x32 -> 56x56 (min_pixels) -> 4x4 patches of 14
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == int(grid.prod(-1).sum()) // 4
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    model = Qwen2VLForConditionalGeneration.from_pretrained(root / "vlm").eval()
    assert model.config.text_config.hidden_size == 48
    out = [model.generate(**batch, max_new_tokens=3, do_sample=False) for _ in range(2)]
    assert out[0].shape[1] == batch["input_ids"].shape[1] + 3 and torch.equal(out[0], out[1])


def test_flux_pipeline_draws_from_prompt_embeds(root):
    pipe = FluxPipeline.from_pretrained(root / "flux")
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_2, T5Tokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting, s.base_shift, s.max_shift, s.base_image_seq_len, s.max_image_seq_len,
            s.num_train_timesteps) == (3.0, True, 0.5, 1.15, 256, 4096, 1000)
    v = pipe.vae.config
    assert (v.latent_channels, pipe.vae_scale_factor, v.scaling_factor, v.shift_factor, v.use_quant_conv,
            v.use_post_quant_conv) == (16, 2, 0.3611, 0.1159, False, False)
    t = pipe.transformer.config
    assert t.guidance_embeds and t.in_channels == 64 and sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model == 32
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size == 24
    assert pipe.text_encoder_2.config.d_model == json.loads((root / "t5" / "config.json").read_text())["d_model"]
    assert pipe.tokenizer("A Red Car").input_ids == pipe.tokenizer("a red car").input_ids  # lower-casing
    assert all(t.endswith("</w>")
               for t in pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red car").input_ids)[1:-1])

    def draw(**kwargs):
        return pipe(height=32, width=32, num_inference_steps=2, guidance_scale=3.5, output_type="np",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    from_text = draw(prompt="a red car in a park")
    assert from_text.shape == (1, 32, 32, 3) and np.isfinite(from_text).all()
    _, pooled, _ = pipe.encode_prompt("", prompt_2=None)
    assert pooled.shape == (1, 24)
    embeds = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    first, second = (draw(prompt_embeds=embeds, pooled_prompt_embeds=pooled),
                     draw(prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    assert first.shape == (1, 32, 32, 3) and np.isfinite(first).all()
    assert np.array_equal(first, second) and not np.array_equal(first, from_text)


def test_llava_in_llava_hf_layout(root):
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "processor_config.json"} <= {p.name for p in (root / "llava").iterdir()}
    # transformers 5 reads a llava checkpoint's tokenizer.json as it is
    tok = AutoTokenizer.from_pretrained(root / "llava")
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    backend = json.loads((root / "llava" / "tokenizer.json").read_text())
    assert (backend["model"]["type"], backend["model"]["byte_fallback"], backend["pre_tokenizer"]["type"]) == (
        "BPE", True, "Metaspace")
    text = "USER: <image>\nWhat is it? (1)yellow (10)black ASSISTANT: 10"
    assert tok(text).input_ids == LlamaTokenizer.from_pretrained(root / "llava")(text).input_ids
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<image>", "<pad>"]) == [
        0, 1, 2, 3, len(tok) - 2, len(tok) - 1]
    config = json.loads((root / "llava" / "config.json").read_text())
    assert (config["image_token_index"], config["pad_token_id"]) == (len(tok) - 2, tok.pad_token_id)
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"],
            config["projector_hidden_act"]) == (-2, "default", "gelu")
    assert config["text_config"]["model_type"] == "llama" and config["vision_config"]["patch_size"] == 14
    assert json.loads((root / "llava"
                       / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    processor = LlavaProcessor.from_pretrained(root / "llava")
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    assert (processor.patch_size, processor.num_additional_image_tokens,
            processor.vision_feature_select_strategy) == (14, 1, "default")
    batch = processor(text=["USER: <image>\nWhich? ASSISTANT:"], images=[render("color_object", "leaf", "red")],
                      return_tensors="pt")
    assert (int((batch["input_ids"] == config["image_token_index"]).sum()) == 4
            and batch["input_ids"][0, 0] == tok.bos_token_id)
    model = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    assert (model.generation_config.eos_token_id == tok.eos_token_id
            and model.generation_config.pad_token_id == tok.pad_token_id)
    out = [model.generate(**batch, max_new_tokens=3, do_sample=False) for _ in range(2)]
    assert out[0].shape[1] == batch["input_ids"].shape[1] + 3 and torch.equal(out[0], out[1])


def test_clip_in_openai_layout(root):
    assert sorted(p.name for p in (root / "clip").iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json"]
    pre = json.loads((root / "clip" / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "CLIPFeatureExtractor" and "image_processor_type" not in pre
    processor = CLIPProcessor.from_pretrained(root / "clip")
    assert (isinstance(processor.image_processor, CLIPImageProcessorPil)
            and isinstance(processor.tokenizer, CLIPTokenizer))
    assert processor.tokenizer.pad_token == processor.tokenizer.eos_token == "<|endoftext|>"
    model = CLIPModel.from_pretrained(root / "clip").eval()
    assert model.config.text_config.eos_token_id == 2 and model.config.projection_dim == 16
    inputs = processor(text=["red", "a red leaf"], images=[render("color_object", "leaf", "red", 48)], padding=True,
                       return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad(): out = model(**inputs)
    assert torch.allclose(out.logits_per_image, model.logit_scale.exp() * out.image_embeds @ out.text_embeds.T,
                          atol=1e-5)


def test_judge(root):
    judge = Judge.from_pretrained(root / "judge").eval()
    assert judge.config.width == 8
    logits = judge(torch.zeros(2, 3, 32, 32))
    assert all(v.shape == (2, 10) for v in logits.values())


def test_deterministic_and_leaves_rng_alone(root, tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = save_tiny_paper(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), state)
    first, second = safetensors_bytes(root), safetensors_bytes(again)
    assert len(first) >= 8 and first == second
    for name in ("vlm/tokenizer.json", "t5/tokenizer.json", "flux/tokenizer/vocab.json", "flux/tokenizer/merges.txt",
                 "llava/tokenizer.json", "clip/tokenizer.json"):
        assert (root / name).read_bytes() == (again / name).read_bytes()
    other = safetensors_bytes(save_tiny_paper(tmp_path / "other", seed=1))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first)


def test_complete_root_is_left_alone(root, tmp_path):
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert save_tiny_paper(root) == root and save_tiny_paper(str(root)) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    with pytest.raises(ValueError, match="seed 0"):
        save_tiny_paper(root, seed=5)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a profile")
    with pytest.raises(FileExistsError):
        save_tiny_paper(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (save_tiny_paper(empty) / "tiny_paper.json").is_file()


def test_crash_leaves_no_partial_profile(tmp_path, monkeypatch):
    def boom(*args, **kwargs): raise RuntimeError("disk on fire")
    monkeypatch.setattr(tiny_paper, "_save_flux", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_tiny_paper(tmp_path / "crashed")
    assert list(tmp_path.iterdir()) == []
