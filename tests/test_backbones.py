"Backbones: the three profiles, save/load round trips, the tokenizer, one training step of each model, bad input."
import collections, json, random
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration
from diffusers import FluxTransformer2DModel
from thinkdiff_nb.world import AXES, THEMES, display_word, render
from thinkdiff_nb.runtime import MINI_DIR
from thinkdiff_nb.image_decoders import sample_images
from thinkdiff_nb.backbones import (empty_pooled, encode_text, get_profile, Judge, judge_pairs, load_decoder,
                                    load_judge, load_t5, load_t5_tokenizer, mini_decoder_config, mini_t5_config,
                                    Profile, t5_tokenizer)
from thinkdiff_nb.loop import Schedule, fit
from thinkdiff_nb.pretrain import (t5_loss_fn, judge_loss_fn, decoder_loss_fn, caption_table, span_corrupt,
                                   span_length_probs)


@pytest.fixture(scope="module")
def tiny():
    return get_profile("tiny-random")


def test_tiny_random_profile_end_to_end(tiny):
    t5, tok = load_t5(tiny)
    decoder, judge = load_decoder(tiny), load_judge(tiny)
    emb = encode_text(t5, tok, ["a red car", "a dog in space"])
    images = sample_images(decoder, emb, empty_pooled(t5, tok, 2), encode_text(t5, tok, [""]), steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert len(judge_pairs(judge, np.stack([render("color_object", "car", "red")]), "color_object")) == 1


@pytest.mark.skipif(not (MINI_DIR / "decoder" / "config.json").exists(), reason="mini weights not shipped yet")
def test_mini_profile_loads_shipped_weights():
    t5, tok = load_t5("mini")
    decoder, judge = load_decoder("mini"), load_judge("mini")
    assert decoder.config.joint_attention_dim == t5.config.d_model == 128
    for part in ("t5", "judge", "decoder"):
        assert "params" in json.loads((MINI_DIR / part / "metrics.json").read_text())
    # the shipped judge reads canonical renders of every theme right
    for theme in THEMES.values():
        pairs = [(s, a) for s in theme.subjects[:3] for a in theme.attributes]
        got = judge_pairs(judge, np.stack([render(theme, s, a, seed=99_999) for s, a in pairs]), theme)
        assert np.mean([g == p for g, p in zip(got, pairs)]) >= 0.95


def test_paper_profile_asks_for_the_real_checkpoints(monkeypatch):
    "No hub here: every paper loader is stopped at its from_pretrained call, which must name the paper's checkpoint."
    paper = get_profile("paper")
    assert (paper.t5, paper.decoder, paper.vlm, paper.text_width, paper.kind) == (
        "google/flan-t5-xxl", "black-forest-labs/FLUX.1-dev", "Qwen/Qwen2-VL-7B-Instruct", 4096, "paper")
    asked = []
    def offline(cls, name, *args, **kwargs):
        asked.append((cls.__name__, name))
        raise OSError(f"offline: {name}")
    import thinkdiff_nb.backbones as backbones, thinkdiff_nb.image_decoders as image_decoders
    for cls in (backbones.T5ForConditionalGeneration, backbones.ImageOnlyQwen2VLProcessor, image_decoders.FluxPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(offline))
    for loader in (load_t5, backbones.load_vlm, image_decoders.load_image_decoder):
        with pytest.raises(OSError, match="offline"):
            loader("paper")
    assert asked == [("T5ForConditionalGeneration", "google/flan-t5-xxl"),
                     ("ImageOnlyQwen2VLProcessor", "Qwen/Qwen2-VL-7B-Instruct"),
                     ("FluxPipeline", "black-forest-labs/FLUX.1-dev")]
    with pytest.raises(ValueError, match="no judge"):
        load_judge("paper")
    with pytest.raises(ValueError, match="FluxPipeline"):
        load_decoder("paper")


def test_save_load_round_trips_are_bit_equal(tmp_path):
    tok = t5_tokenizer()
    torch.manual_seed(0)
    models = {"t5": (T5ForConditionalGeneration(mini_t5_config(len(tok), 32, 1)), T5ForConditionalGeneration),
              "decoder": (FluxTransformer2DModel(**mini_decoder_config(32, blocks=1, heads=2, head_dim=16)),
                          FluxTransformer2DModel),
              "judge": (Judge(width=8), Judge)}
    for name, (model, cls) in models.items():
        model.save_pretrained(tmp_path / name)
        loaded = cls.from_pretrained(tmp_path / name)
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    tok.save_pretrained(tmp_path / "t5")
    assert load_t5_tokenizer(tmp_path / "t5").get_vocab() == tok.get_vocab()


def test_tokenizer_round_trips_every_world_word():
    tok = t5_tokenizer()
    words = sorted({w for vs in AXES.values() for v in vs for w in (v + " " + display_word(v)).split()})
    text = " ".join(words)
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<extra_id_0>") != tok.unk_token_id
    src, tgt = span_corrupt(text.split(), random.Random(0))
    assert tok.unk_token_id not in tok(src).input_ids + tok(tgt).input_ids


def _one_step(model, loss_fn, path):
    before = [p.detach().clone() for p in model.parameters()]
    losses = fit(model, loss_fn, Schedule(steps=1, lr=1e-3, warmup=0), path).losses
    assert np.isfinite(losses[0])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_one_training_step_of_each_model(tmp_path):
    tok = t5_tokenizer()
    t5 = T5ForConditionalGeneration(mini_t5_config(len(tok), 32, 1))
    _one_step(t5, t5_loss_fn(tok, 4), tmp_path / "t5.pt")
    theme = THEMES["action_animal"]
    rows = [{"theme": theme.name, "subject": s, "attribute": "run", "caption": f"a {s} running"}
            for s in theme.subjects[:4]]
    images = np.stack([render(theme, r["subject"], "run", seed=i) for i, r in enumerate(rows)])
    judge = Judge(width=8)
    _one_step(judge, judge_loss_fn(images, rows, 4), tmp_path / "judge.pt")
    t5.eval()
    ids, table, lengths = caption_table(t5, tok, [r["caption"] for r in rows])
    decoder = FluxTransformer2DModel(**mini_decoder_config(32, blocks=1, heads=2, head_dim=16))
    _one_step(decoder, decoder_loss_fn(images, ids, table, lengths, empty_pooled(t5, tok), 4), tmp_path / "decoder.pt")


def test_bad_input_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'large'"):
        get_profile("large")
    missing = Profile("mini", str(tmp_path / "t5"), str(tmp_path / "decoder"), str(tmp_path / "judge"))
    for loader in (load_t5, load_decoder, load_judge):
        with pytest.raises(FileNotFoundError, match="missing"):
            loader(missing)
    with pytest.raises(ValueError, match="width"):
        load_decoder(Profile("x", tiny.t5, tiny.decoder, tiny.judge, text_width=64))
    with pytest.raises(ValueError, match="width"):
        load_t5(Profile("x", tiny.t5, tiny.decoder, tiny.judge, text_width=64))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_t5_tokenizer(tmp_path)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    calls = iter(range(100))
    def loss(model, g):
        step = next(calls)
        return model(torch.ones(1, 2)).sum() * (float("nan") if step == 3 else 1.0)
    with pytest.raises(FloatingPointError, match="step 3"):
        fit(model, loss, Schedule(steps=10, ckpt_every=2, warmup=0), tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=False)["step"] == 2


def test_span_ceiling_enumerates_what_span_corrupt_does():
    "The ceiling's exact corruption probabilities match span_corrupt's frequencies on a 10-word caption."
    words = "a photo of a dog with amusement park behind it".split()
    rng, n = random.Random(0), 40000
    seen = collections.Counter(span_corrupt(words, rng) for _ in range(n))
    for start in range(len(words)):
        for length, p in enumerate(span_length_probs(len(words) - start), 1):
            pair = (" ".join(words[:start] + ["<extra_id_0>"] + words[start + length:]),
                    " ".join(["<extra_id_0>"] + words[start:start + length]))
            assert abs(seen[pair] / n - p / len(words)) < 4 * (p / len(words) / n) ** 0.5 + 1e-4, (start, length)
