("ThinkDiff-CLIP's compositions on tiny-paper: FLUX image + text and several images, CogVideoX image + text to a video "
 "file.")
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoImageProcessor, Blip2VisionModel
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from diffusers import CogVideoXPipeline
from thinkdiff_nb.aligner import Aligner
from thinkdiff_nb.runtime import MINI_DIR, weight_files
from thinkdiff_nb.backbones import get_profile, Profile
from thinkdiff_nb.clip import load_vision, vision_tokens
from thinkdiff_nb.composition import (check_image_tokens, draw_video, flux_conditioning, image_text_conditioning,
                                      image_text_video, images_conditioning, load_video_pipeline, read_video,
                                      video_conditioning, write_video)
from thinkdiff_nb.image_decoders import load_image_decoder
from thinkdiff_nb.world import render

PROMPT = "a panda playing a guitar"


@pytest.fixture(scope="module")
def profile():
    return get_profile("tiny-paper")


@pytest.fixture(scope="module")
def tower(profile):
    return load_vision(profile.vision)


@pytest.fixture(scope="module")
def aligned(profile, tower):
    "Two images' aligned tokens (2, 65, 32): the tiny BLIP-2 tower's CLS + pooled grid through a random aligner."
    images = [render("color_object", "leaf", "yellow"), render("color_object", "car", "red")]
    aligner = Aligner(tower.config.hidden_size, profile.text_width)
    with torch.no_grad(): return aligner(vision_tokens(tower, images))


@pytest.fixture(scope="module")
def flux(profile):
    return load_image_decoder(profile)


@pytest.fixture(scope="module")
def video_pipe(profile):
    return load_video_pipeline(profile)


def stored_tensors(folder) -> dict:
    out = {}
    for file in set(weight_files(str(folder)).values()):
        with safe_open(str(file), framework="pt") as f: out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_profiles_name_the_vision_encoder_and_the_video_pipeline(profile):
    paper, mini = get_profile("paper"), get_profile("mini")
    assert (paper.vision, paper.video) == ("Salesforce/blip2-flan-t5-xxl", "THUDM/CogVideoX-5b")
    assert (mini.vision, mini.video) == (str(MINI_DIR / "vision"), None)
    assert (Path(profile.vision).name, Path(profile.video).name) == ("blip2", "cogvideox")
    assert Profile("x", "t5", "dec").vision is None and Profile("x", "t5", "dec").video is None


def test_blip2_vision_tower_loads_with_257_tokens(profile, tower):
    config = json.loads((Path(profile.vision) / "config.json").read_text())
    assert config["model_type"] == "blip-2" and config["num_query_tokens"] == 32
    assert (config["vision_config"]["image_size"], config["vision_config"]["patch_size"],
            config["vision_config"]["hidden_size"]) == (32, 2, 48)
    index = json.loads((Path(profile.vision) / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[0] for k in index} == {"vision_model", "qformer", "query_tokens", "language_model",
                                                "language_projection"}
    stored = stored_tensors(profile.vision)
    # finds the config, not the weights (stored under vision_model.)
    naive = Blip2VisionModel.from_pretrained(profile.vision)
    assert not torch.equal(naive.embeddings.patch_embedding.weight,
                           stored["vision_model.embeddings.patch_embedding.weight"])
    native = Blip2VisionModel.from_pretrained(profile.vision, key_mapping={r"^vision_model\.": ""})
    for model in (native, tower):
        state = model.state_dict()
        assert len(state) == sum(k.startswith("vision_model.") for k in stored)
        assert all(torch.equal(v, stored[f"vision_model.{k}"]) for k, v in state.items())
    processor = AutoImageProcessor.from_pretrained(profile.vision)
    assert isinstance(processor, BlipImageProcessorPil)
    pixels = processor(images=[render("color_object", "hat", "blue", 48)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad(): states = tower(pixel_values=pixels).last_hidden_state
    assert states.shape == (1, 257, 48) and torch.isfinite(states).all()


def test_cogvideox_folder_in_the_hub_layout(profile, video_pipe):
    index = json.loads((Path(profile.video) / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert {k: v[1] for k, v in index.items() if isinstance(v, list)} == {
        "scheduler": "CogVideoXDDIMScheduler", "text_encoder": "T5EncoderModel", "tokenizer": "T5Tokenizer",
        "transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX"}
    s = video_pipe.scheduler.config
    assert (s.prediction_type, s.timestep_spacing, s.rescale_betas_zero_snr, s.snr_shift_scale) == (
        "v_prediction", "trailing", True, 1.0)
    t = video_pipe.transformer.config
    assert (t.use_rotary_positional_embeddings, t.max_text_seq_length, t.patch_size, t.in_channels) == (
        True, 226, 2, 16)
    assert t.text_embed_dim == video_pipe.text_encoder.config.d_model == profile.text_width == 32
    assert (video_pipe.vae_scale_factor_spatial, video_pipe.vae_scale_factor_temporal,
            video_pipe.vae.config.scaling_factor) == (8, 4, 0.7)
    assert video_pipe.tokenizer.model_max_length == 226
    assert isinstance(CogVideoXPipeline.from_pretrained(profile.video), CogVideoXPipeline)


def test_image_and_text_for_flux(flux, aligned):
    embeds, pooled = image_text_conditioning(flux, aligned[:1], [PROMPT])
    text, text_pooled = flux.encode_prompt([PROMPT])
    assert embeds.shape == (1, 65 + 128, 32) and pooled.shape == (1, 24)
    # image first, then FLUX's T5 at 128
    assert torch.equal(embeds[:, :65], aligned[:1]) and torch.equal(embeds[:, 65:], text)
    assert torch.equal(pooled, text_pooled) and not torch.equal(pooled, flux.empty_pooled(1))  # CLIP pooled of the text
    batch, _ = image_text_conditioning(flux, aligned, [PROMPT, "a red car"])
    assert batch.shape == (2, 193, 32) and torch.equal(batch[1, :65], aligned[1])


def test_two_images_for_flux(flux, aligned):
    first, second = aligned[:1], aligned[1:]
    embeds, pooled = images_conditioning(flux, [first, second])
    assert embeds.shape == (1, 65 + 65 + 128, 32)
    assert torch.equal(embeds[:, :65], first) and torch.equal(embeds[:, 65:130], second)
    assert torch.equal(embeds[:, 130:], flux.encode_prompt([""])[0]) and torch.equal(pooled, flux.empty_pooled(1))
    swapped, _ = images_conditioning(flux, [second, first])
    assert torch.equal(swapped[:, :65], second)  # list order is token order
    three, _ = flux_conditioning(flux, [first, second, first])
    assert three.shape == (1, 3 * 65 + 128, 32)


def test_flux_draws_the_requested_size_from_each_composition(flux, aligned):
    one = image_text_conditioning(flux, aligned[:1], [PROMPT])
    two = images_conditioning(flux, [aligned[:1], aligned[1:]])
    for (embeds, pooled), size in [(one, 48), (two, 32)]:
        image = flux.draw(embeds, pooled, steps=2, size=size, seed=1)
        assert image.shape == (1, size, size, 3) and image.dtype == np.uint8
        assert np.array_equal(image, flux.draw(embeds, pooled, steps=2, size=size, seed=1))


def test_video_conditioning_fills_226_positions(video_pipe, aligned):
    embeds, negative = video_conditioning(video_pipe, aligned[:1], [PROMPT])
    assert embeds.shape == negative.shape == (1, 65 + 161, 32)
    assert torch.equal(embeds[:, :65], aligned[:1])
    own = video_pipe.encode_prompt([PROMPT], do_classifier_free_guidance=False, max_sequence_length=161)[0]
    assert torch.equal(embeds[:, 65:], own)  # CogVideoX's own T5 at 226 - 65
    empty = video_pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=226)[0]
    assert torch.equal(negative, empty)  # what the pipeline builds from "" for real CFG
    short, short_negative = video_conditioning(video_pipe, aligned[:1, :10], [PROMPT])
    assert short.shape == short_negative.shape == (1, 226, 32)  # any image length: the text fills the rest


def test_video_pipeline_decodes_in_tiles_one_video_at_a_time(video_pipe, aligned):
    "CogVideoX-5b's 49 frames of 480x720 decode in its own 240x360 tiles, a batch one video at a time, not all at once."
    vae = video_pipe.vae
    assert (vae.use_tiling, vae.use_slicing) == (True, True)
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width) == (240, 360)
    embeds, negative = video_conditioning(video_pipe, aligned[:1], [PROMPT])
    video = draw_video(video_pipe, embeds, negative, frames=9, height=256, width=32, steps=1)
    assert video.shape == (1, 9, 256, 32, 3)  # taller than a tile: decoded in two, stitched back to the size asked


def test_cogvideox_writes_a_video_of_the_requested_frames_and_size(video_pipe, aligned, tmp_path):
    path = image_text_video(video_pipe, aligned[:1], PROMPT, tmp_path / "out" / "panda.mp4", frames=9, height=32,
                            width=48, steps=2)
    assert path == tmp_path / "out" / "panda.mp4" and path.stat().st_size > 0
    video = read_video(path)
    assert video.shape == (9, 32, 48, 3) and video.dtype == np.uint8
    embeds, negative = video_conditioning(video_pipe, aligned[:1], [PROMPT])
    drawn = draw_video(video_pipe, embeds, negative, frames=9, height=32, width=48, steps=2)
    assert drawn.shape == (1, 9, 32, 48, 3) and 0 <= drawn.min() <= drawn.max() <= 1
    assert np.abs(video / 255 - drawn[0]).mean() < 0.1  # the same frames through H.264
    again = read_video(write_video(drawn[0], tmp_path / "again.mp4", fps=4))
    assert again.shape == video.shape


def test_bad_inputs_are_named(profile, flux, video_pipe, aligned):
    narrow = aligned[..., :31]
    with pytest.raises(ValueError, match="31 wide but the decoder reads 32-wide"):
        image_text_conditioning(flux, narrow[:1], [PROMPT])
    with pytest.raises(ValueError, match="31 wide but the decoder reads 32-wide"):
        images_conditioning(flux, [aligned[:1], narrow[:1]])
    with pytest.raises(ValueError, match="31 wide but the decoder reads 32-wide"):
        video_conditioning(video_pipe, narrow[:1], [PROMPT])
    with pytest.raises(ValueError, match=r"got shape \(65, 32\)"):
        check_image_tokens(aligned[0], 32)
    with pytest.raises(ValueError, match="2 texts for 1 rows"):
        image_text_conditioning(flux, aligned[:1], [PROMPT, PROMPT])
    with pytest.raises(ValueError, match="no room for text"):
        video_conditioning(video_pipe, torch.zeros(1, 226, 32), [PROMPT])
    embeds, negative = video_conditioning(video_pipe, aligned[:1], [PROMPT])
    with pytest.raises(ValueError, match=r"8k \+ 1 frames \(such as 49\), not 13"):
        draw_video(video_pipe, embeds, negative, frames=13)
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        draw_video(video_pipe, embeds, negative, width=40)
    with pytest.raises(ValueError, match="one video per call"):
        image_text_video(video_pipe, aligned, PROMPT, "unused.mp4")
    with pytest.raises(ValueError, match="names no video pipeline"):
        load_video_pipeline("mini")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_video_pipeline(Profile("x", "t5", "dec", video="/nonexistent/cogvideox", text_width=32))
