"ThinkDiff-LVLM: feature rows, shards, the split, the aligner's norm, resumable training and the 03_train pipeline."
import json, random
from pathlib import Path
import numpy as np
import pytest
import torch
from thinkdiff_nb.world import THEMES, render, write_image_caption_set
from thinkdiff_nb.backbones import (DESCRIBE_INSTRUCTIONS, description_messages, get_profile, load_t5, load_vlm,
                                    to_pixels, vlm_batch)
from thinkdiff_nb.aligner import Aligner, init_norm_from_t5, t5_final_norm_weight
from thinkdiff_nb.data import MemorySource, open_image_captions
from thinkdiff_nb.features import FeatureCache, extract_features, generate_with_features
import thinkdiff_nb.features as features_module
from thinkdiff_nb.methods import ALIGNER_METHODS
from thinkdiff_nb.train import AlignerBatches, aligner_loss_fn, cache_pixels, make_example, split_point
from thinkdiff_nb.loop import Schedule, fit

NBS = Path(__file__).parents[1] / "nbs"


@pytest.fixture(scope="module")
def tiny():
    profile = get_profile("tiny-random")
    return profile, load_vlm(profile), load_t5(profile)


def _data(n=12):
    theme = THEMES["style_object"]
    rows = [{"theme": theme.name, "subject": theme.subjects[i % 10], "attribute": theme.attributes[i // 2 % 10],
             "caption": "x"} for i in range(n)]
    return MemorySource([render(theme, r["subject"], r["attribute"], seed=i) for i, r in enumerate(rows)], rows)


def test_official_row_semantics(tiny):
    _, (vlm, processor), _ = tiny
    images = _data(3).images
    msgs = [description_messages(DESCRIBE_INSTRUCTIONS[i]) for i in range(3)]
    samples = generate_with_features(vlm, processor, msgs, [[im] for im in images], max_new_tokens=7, sample=False)
    for b, s in enumerate(samples):
        full = vlm(**vlm_batch(processor, msgs[b:b + 1], [[images[b]]]), output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(s["generated_features"][0], full[-1], atol=1e-4)      # row 0 = last prompt state
        assert torch.allclose(s["prompt_features"], full, atol=1e-4)                 # padding removed
        # row k predicts token k
        assert torch.equal(vlm.lm_head(s["generated_features"]).argmax(-1), s["generated_ids"])
        assert len(s["generated_features"]) == len(s["generated_ids"])


def test_split_never_empty_and_one_token_answers():
    for length in range(2, 40):
        points = {split_point(length, 128, random.Random(k)) for k in range(300)}
        assert min(points) == 1 and max(points) == length - 1
    assert {split_point(200, 128, random.Random(k)) for k in range(2000)} <= set(range(1, 129))
    class Tok:
        def decode(self, ids, skip_special_tokens=True): return " ".join(map(str, ids.tolist()))
    one = {"generated_ids": torch.tensor([5]), "generated_features": torch.ones(1, 4),
           "prompt_features": torch.ones(3, 4)}
    feats, target = make_example(one, "thinkdiff", random.Random(0), Tok())
    assert feats.shape == (1, 4) and target == "5"
    two = {"generated_ids": torch.tensor([5, 6]), "generated_features": torch.ones(2, 4),
           "prompt_features": torch.ones(3, 4)}
    feats, target = make_example(two, "thinkdiff", random.Random(0), Tok())
    assert feats.shape == (1, 4) and target == "6"


def test_interrupted_extraction_resumes_to_identical_shards(tiny, tmp_path, monkeypatch):
    _, (vlm, processor), _ = tiny
    source = _data(12)
    whole = extract_features(vlm, processor, source, tmp_path / "whole", DESCRIBE_INSTRUCTIONS, shard_size=4,
                             batch_size=4, max_new_tokens=5)
    real_write, calls = features_module.write_shard, []
    def dying_write(path, samples, shard_rows, **kw):
        calls.append(path)
        if len(calls) == 2: raise KeyboardInterrupt("killed while writing shard 1")
        real_write(path, samples, shard_rows, **kw)
    monkeypatch.setattr(features_module, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        extract_features(vlm, processor, source, tmp_path / "resumed", DESCRIBE_INSTRUCTIONS, shard_size=4,
                         batch_size=4, max_new_tokens=5)
    assert len(json.loads((tmp_path / "resumed" / "manifest.json").read_text())["shards"]) == 1
    monkeypatch.setattr(features_module, "write_shard", real_write)
    resumed = extract_features(vlm, processor, source, tmp_path / "resumed", DESCRIBE_INSTRUCTIONS, shard_size=4,
                               batch_size=4,
                               max_new_tokens=5)
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in whole.shards]
    assert len(resumed) == 12 and resumed[11]["text"] == whole[11]["text"]


def test_cache_errors(tiny, tmp_path):
    _, (vlm, processor), _ = tiny
    source = _data(8)
    cache = extract_features(vlm, processor, source, tmp_path / "f", DESCRIBE_INSTRUCTIONS, shard_size=4, batch_size=4,
                             max_new_tokens=4)
    with pytest.raises(ValueError, match="expected 3584"):
        FeatureCache(tmp_path / "f", expected_width=3584)
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        FeatureCache(tmp_path / "missing")
    with pytest.raises(ValueError, match="use another folder"):
        extract_features(vlm, processor, source, tmp_path / "f", DESCRIBE_INSTRUCTIONS, shard_size=4, batch_size=4,
                         max_new_tokens=9)
    shard = tmp_path / "f" / cache.shards[1]["file"]
    data = bytearray(shard.read_bytes()); data[-10] ^= 0xFF; shard.write_bytes(bytes(data))
    fresh = FeatureCache(tmp_path / "f")
    assert fresh[0]["text"] == cache[0]["text"]  # shard 0 is fine
    with pytest.raises(ValueError, match="corrupt"):
        fresh[5]
    with pytest.raises(ValueError, match="features are 7 wide"):
        Aligner(d_vlm=32, d_t5=32)(torch.zeros(1, 2, 7))


def test_cache_pixels_are_the_described_images(tiny, tmp_path):
    _, (vlm, processor), _ = tiny
    root = write_image_caption_set(tmp_path / "data", 1, themes=[THEMES["color_object"]])
    source = open_image_captions(root, "train")
    cache = extract_features(vlm, processor, source, tmp_path / "f", DESCRIBE_INSTRUCTIONS, samples=6, shard_size=6,
                             batch_size=6,
                             max_new_tokens=4)
    assert torch.equal(cache_pixels(cache, source, [5, 0, 5], 32),
                       to_pixels(np.stack([source.image(i) for i in (5, 0, 5)])))
    with pytest.raises(ValueError, match="pass the source the cache was extracted from"):
        cache_pixels(cache, open_image_captions(root, "validation"), [0], 32)


def test_t5_init_copies_the_final_norm(tiny):
    profile, _, (t5, _) = tiny
    aligner = init_norm_from_t5(Aligner(32, 32), t5_final_norm_weight(profile.t5))
    assert torch.equal(aligner.rms_norm.weight, t5.encoder.final_layer_norm.weight)
    assert torch.equal(Aligner(32, 32, norm="default").rms_norm.weight, torch.ones(32))
    with pytest.raises(ValueError, match="no norm"):
        init_norm_from_t5(Aligner(32, 32, norm="none"), t5.encoder.final_layer_norm.weight)


def test_killed_training_resumes_bit_equal(tiny, tmp_path):
    _, (vlm, processor), (t5, t5_tok) = tiny
    cache = extract_features(vlm, processor, _data(12), tmp_path / "f", DESCRIBE_INSTRUCTIONS, shard_size=6,
                             batch_size=6, max_new_tokens=6)
    batches = AlignerBatches(cache, "thinkdiff", processor.tokenizer, t5_tok, batch_size=4)
    def train(path, crash_at=None):
        torch.manual_seed(0)
        aligner = Aligner(cache.width, t5.config.d_model)
        loss = aligner_loss_fn(t5, batches)
        calls = iter(range(100))
        def dying(model, g):
            if next(calls) == crash_at: raise KeyboardInterrupt("killed")
            return loss(model, g)
        fit(aligner, dying, Schedule(steps=8, ckpt_every=3, warmup=2), path, log_csv=path.with_suffix(".csv"))
        return aligner
    whole = train(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed.pt", crash_at=5)
    resumed = train(tmp_path / "resumed.pt")
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed.csv").read_text() == (tmp_path / "whole.csv").read_text()


def _run_train(tmp_path, **params):
    import papermill as pm
    base = dict(profile="tiny-random", steps=3, batch_size=4, max_images=12, eval_batches=1, ckpt_every=2, warmup=1,
                max_new_tokens=5, extract_batch_size=12, output_dir=str(tmp_path / "run"))
    return pm.execute_notebook(str(NBS / "03_train.ipynb"), str(tmp_path / "out.ipynb"), parameters={**base, **params},
                               progress_bar=False, kernel_name="python3")


@pytest.mark.parametrize("method", list(ALIGNER_METHODS))
def test_train_notebook_runs_every_aligner_method(tmp_path, method):
    _run_train(tmp_path, method=method)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["params"]["method"] == method and np.isfinite(metrics["metrics"]["heldout"]["loss"])
    image_read = metrics["metrics"]["image_decoder_flow_loss"]  # only generated rows are read by the image decoder
    assert (image_read is None if method == "input-tokens"
            else np.isfinite([image_read["aligned"], image_read["empty_prompt"]]).all())
    assert (tmp_path / "run" / "aligner" / "config.json").exists() and (tmp_path / "run" / "loss.png").exists()
    assert len((tmp_path / "run" / "loss.csv").read_text().splitlines()) == 4
    if method == "thinkdiff":  # the finished folder is not relabelled by a rerun with other settings
        import papermill as pm
        with pytest.raises(pm.PapermillExecutionError,
                           match=r"\(then -> now\): method 'thinkdiff' -> 'no-masking', lr 0.001 -> 0.05; remove"):
            _run_train(tmp_path, method="no-masking", lr=0.05)


def test_train_notebook_rejects_a_bad_parameter(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="parameter method='masked' is not one of"):
        _run_train(tmp_path, method="masked")
