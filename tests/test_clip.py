("ThinkDiff-CLIP: vision-token pooling, the caption split, the loss on renders, resuming, the released layout and the "
 "10_train_clip pipeline.")
import json, random, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from transformers import (Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel, T5Config,
                          T5ForConditionalGeneration)
from thinkdiff_nb.world import THEMES, write_image_caption_set
from thinkdiff_nb.backbones import get_profile, load_t5
from thinkdiff_nb.aligner import Aligner
from thinkdiff_nb.data import open_image_captions, write_webdataset
from thinkdiff_nb.loop import Schedule, fit
from thinkdiff_nb.aligner import load_aligner
from thinkdiff_nb.clip import (CLIP_ALIGNER_BAR, IMAGE_MODES, ClipBatches, ImageTokens, blip_caption,
                               clip_aligner_gain, clip_loss,
                               clip_loss_fn, clip_metrics, load_vision, pool_vision_tokens, random_split_string,
                               vision_states,
                               vision_tokens)

sys.path.insert(0, str(Path(__file__).parent))
from official_layout import projector, write_official  # noqa: E402

NBS = Path(__file__).parents[1] / "nbs"


def _clip(width=16):
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=1, num_attention_heads=2)).eval()


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    return write_image_caption_set(tmp_path_factory.mktemp("clip") / "data", n_per_pair=1,
                                   themes=[THEMES["color_object"]])


@pytest.fixture(scope="module")
def tiny_t5():
    profile = get_profile("tiny-random")
    return profile, *load_t5(profile)


def test_pooling_is_the_mean_of_each_2x2_block():
    states = torch.randn(3, 1 + 16 * 16, 7)
    pooled = pool_vision_tokens(states, 2)
    assert pooled.shape == (3, 65, 7)  # the paper's 257 -> 65
    assert torch.equal(pooled[:, 0], states[:, 0])
    grid = states[:, 1:].reshape(3, 16, 16, 7)
    for r, c in [(0, 0), (3, 5), (7, 7)]:  # output cell (r, c) = mean of input rows 2r..2r+1, columns 2c..2c+1
        torch.testing.assert_close(pooled[:, 1 + 8 * r + c], grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2)))
    assert torch.equal(pool_vision_tokens(states, 1), states)
    with pytest.raises(ValueError, match="does not pool by 3"):
        pool_vision_tokens(states, 3)


def test_states_after_the_post_layernorm_for_both_classes():
    images = [np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)]
    clip = _clip()
    from thinkdiff_nb.clip import vision_pixels
    pixels = vision_pixels(images, 32)
    with torch.no_grad():
        out = clip(pixel_values=pixels)
        torch.testing.assert_close(vision_states(clip, pixels), clip.post_layernorm(out.last_hidden_state))
    torch.manual_seed(0)
    blip = Blip2VisionModel(Blip2VisionConfig(image_size=224, patch_size=14, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2)).eval()
    assert vision_tokens(blip, images).shape == (3, 65, 16) and vision_tokens(clip, images).shape == (3, 17, 16)


def test_split_rules():
    assert random_split_string("dog", random.Random(0)) == ("", "dog")
    assert random_split_string("", random.Random(0)) == ("", "")
    for n in range(2, 9):
        words = " ".join(f"w{i}" for i in range(n))
        cuts = [len(random_split_string(words, random.Random(k))[0].split()) for k in range(400)]
        assert set(cuts) == set(range(1, n))  # uniform in [1, n - 1]: every index drawn, none outside
        assert max(np.bincount(cuts)[1:]) / min(np.bincount(cuts)[1:]) < 2.5
    assert blip_caption('Create an image: a RED car.  "Wow"!\n') == "create an image a red car wow"
    assert blip_caption(" ".join(map(str, range(80)))).split() == [str(i) for i in range(50)]


def test_loss_falls_on_renders_and_the_image_is_read(renders, tiny_t5):
    profile, t5, tok = tiny_t5
    images = ImageTokens(_clip(), open_image_captions(renders, "train"))
    batches = ClipBatches(images, tok, batch_size=8)
    torch.manual_seed(0)
    aligner = Aligner(16, t5.config.d_model)
    before = clip_metrics(aligner, t5, batches, n_batches=2)["loss"]
    run = fit(aligner, clip_loss_fn(t5, batches), Schedule(steps=30, lr=3e-3, warmup=1),
              Path(str(renders) + "-ckpt") / "ckpt.pt")
    assert np.mean(run.losses[-5:]) < np.mean(run.losses[:5])
    assert clip_metrics(aligner, t5, batches, n_batches=2)["loss"] < before
    batch = batches(torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the image tokens enter the decoder
        assert clip_loss(aligner, t5, batch, "none") != clip_loss(aligner, t5, batch)


def test_shares_make_the_global_batch(renders, tiny_t5):
    "Two processes' shares of a global batch are the one-process batch split in two, each encoding only its own images."
    _, t5, tok = tiny_t5
    images = ImageTokens(_clip(), open_image_captions(renders, "train"), keep=False)
    whole = ClipBatches(images, tok, batch_size=8, share=(0, 1))(torch.Generator().manual_seed(3))
    halves = [ClipBatches(images, tok, batch_size=8, share=(rank, 2))(torch.Generator().manual_seed(3))
              for rank in (0, 1)]
    assert [len(h[0]) for h in halves] == [4, 4]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole[0])
    assert sum(int((h[3] != -100).sum()) for h in halves) == int((whole[3] != -100).sum())
    assert whole[4] == 1 and sum(h[4] for h in halves) == pytest.approx(2)  # DDP averages the two shares' gradients


def test_webdataset_layout(tmp_path, tiny_t5):
    _, t5, tok = tiny_t5
    source = open_image_captions(write_webdataset(tmp_path / "wds", 12, 4, per_tar=5), "train")
    tokens, captions = ImageTokens(_clip(), source, batch_size=5)([0, 11, 0])
    assert tokens.shape == (3, 17, 16) and captions[0] == captions[2] == source.row(0)["caption"]


def test_resume_gives_the_same_weights(renders, tiny_t5, tmp_path):
    _, t5, tok = tiny_t5
    images = ImageTokens(_clip(), open_image_captions(renders, "train")).fill()
    def train(ckpt, crash_at=None):
        torch.manual_seed(0)
        aligner, loss, calls = (Aligner(16, t5.config.d_model),
                                clip_loss_fn(t5, ClipBatches(images, tok, batch_size=4)), iter(range(99)))
        def dying(model, g):
            if next(calls) == crash_at: raise KeyboardInterrupt("killed")
            return loss(model, g)
        fit(aligner, dying, Schedule(steps=8, lr=1e-2, warmup=1, ckpt_every=3), ckpt, log_csv=ckpt.with_suffix(".csv"))
        return aligner
    whole = train(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed.pt", crash_at=4)
    resumed = train(tmp_path / "resumed.pt")
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "whole.csv").read_text()


def test_released_clip_layout_at_paper_widths_trains(tmp_path):
    path = write_official(tmp_path / "thinkdiff_clip.pth", {
        **projector(1408, 4096, seed=1),
        "language_model.encoder.embed_tokens.weight": torch.randn(8, 4096).bfloat16()})
    aligner = Aligner.from_official(path, d_vlm=1408, d_t5=4096).train()
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=40, d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval().requires_grad_(False)
    batch = (torch.randn(2, 65, 1408), torch.tensor([[5, 6, 1], [1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]),
             torch.tensor([[7, 8, 1], [9, 1, -100]]), 1.0)  # 65 BLIP-2 tokens; prefixes "x y" and ""
    loss = clip_loss(aligner, t5, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in aligner.parameters())


def test_paper_path_reads_the_blip2_vision_tower(renders, tmp_path):
    from transformers import Blip2ForConditionalGeneration
    # Profile.vision: a whole BLIP-2 checkpoint in shards, as Salesforce/blip2-flan-t5-xxl
    profile = get_profile("tiny-paper")
    tower = load_vision(profile.vision)
    whole = Blip2ForConditionalGeneration.from_pretrained(profile.vision).vision_model.state_dict()
    assert type(tower) is Blip2VisionModel and all(torch.equal(v, whole[k]) for k, v in tower.state_dict().items())
    t5, tok = load_t5(profile)  # Flan-T5-shaped, with its SentencePiece tokenizer
    batches = ClipBatches(ImageTokens(tower, open_image_captions(renders, "train"), max_images=16), tok, batch_size=4)
    # 257 -> 65 as in the paper
    assert batches(torch.Generator().manual_seed(0))[0].shape == (4, 65, tower.config.hidden_size)
    run = fit(Aligner(tower.config.hidden_size, t5.config.d_model), clip_loss_fn(t5, batches),
              Schedule(steps=3, warmup=1), tmp_path / "ckpt.pt")
    assert np.isfinite(run.losses).all()


def test_shipped_mini_clip_aligner_reads_the_image(tmp_path):
    ("On renders it never saw (another seed), the T5 decoder continues captions better from the image's own aligned "
     "tokens.")
    mini = get_profile("mini")
    t5, tok = load_t5(mini)
    unseen = write_image_caption_set(tmp_path / "unseen", n_per_pair=1, seed=7)
    batches = ClipBatches(ImageTokens(load_vision(mini.vision), open_image_captions(unseen, "train")), tok,
                          batch_size=64)
    scores = {m: clip_metrics(load_aligner(mini.clip_aligner), t5, batches, n_batches=4, image=m) for m in IMAGE_MODES}
    assert clip_aligner_gain(scores) >= CLIP_ALIGNER_BAR, scores


def _run(tmp_path, **params):
    import papermill as pm
    base = dict(profile="tiny-random", vision_steps=3, vision_batch_size=8, steps=3, batch_size=4, eval_batches=1,
                ckpt_every=2, warmup=1, max_images=40, output_dir=str(tmp_path / "run"))
    return pm.execute_notebook(str(NBS / "10_train_clip.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={**base, **params},
                               progress_bar=False, kernel_name="python3")


def test_pipeline_notebook(renders, tmp_path):
    _run(tmp_path, data_dir=str(renders))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["metrics"]["heldout"]) == {"own", "none", "shuffled"}
    assert (metrics["metrics"]["vision"]["source"] == "trained"
            and metrics["metrics"]["vision"]["tokens_per_image"] == 17)
    assert metrics["params"]["steps"] == 3 and metrics["seed"] == 0 and "torch" in metrics["versions"]
    for f in ("loss.png", "aligner/config.json", "vision/config.json", "vision/model.safetensors",
              "vision/metrics.json"):
        assert (run / f).exists(), f
    assert len((run / "loss.csv").read_text().splitlines()) == 4
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match=r"other settings \(then -> now\): lr 0.001 -> 0.05; remove"):
        _run(tmp_path, data_dir=str(renders), lr=0.05)  # its checkpoint and vision encoder were made with lr 0.001


def test_pipeline_names_bad_parameters(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError,
                       match=r"parameter norm='layer' is not one of \['t5', 'default', 'none'\]; "
                                                          r"parameter steps must be positive, got 0"):
        _run(tmp_path, steps=0, norm="layer")
