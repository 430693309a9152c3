("Image-caption sources: the folder layout and cc_sbu webdataset tars read alike, mixed sizes, clear errors, 03_train "
 "from tars.")
import json
from pathlib import Path
import numpy as np
import pytest
import torch
import webdataset
from thinkdiff_nb.backbones import (DESCRIBE_INSTRUCTIONS, get_profile, load_vlm, OFFICIAL_DESCRIBE_INSTRUCTIONS,
                                    prepare_image)
from thinkdiff_nb.data import WIDS_INDEX, WebDatasetSource, open_image_captions, shard_list, write_webdataset
from thinkdiff_nb.features import FeatureCache, extract_features
from thinkdiff_nb.train import cache_pixels
from thinkdiff_nb.world import THEMES, ImageCaptionSet, write_image_caption_set

NBS = Path(__file__).parents[1] / "nbs"


@pytest.fixture(scope="module")
def tiny_vlm():
    return load_vlm(get_profile("tiny-random"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_webdataset(tmp_path_factory.mktemp("data") / "wds", 40, 8, per_tar=16, sides=(20, 90), seed=3)


def _as_tars(folder: Path, split: str, out: Path, per_tar: int = 16) -> Path:
    "A folder-layout split rewritten as cc_sbu-style tars: the same images (lossless PNG), the row as the json."
    ds = ImageCaptionSet(folder, split)
    (out / split).mkdir(parents=True)
    with webdataset.ShardWriter(str(out / split / "%05d.tar"), maxcount=per_tar, verbose=0) as tars:
        for i, row in enumerate(ds.rows):
            tars.write({"__key__": Path(row["image"]).stem, "png": ds.image(i), "json": row, "txt": row["caption"]})
    return out


def test_both_layouts_read_the_same_way(tmp_path, tiny_vlm):
    folder = write_image_caption_set(tmp_path / "folder", n_per_pair=1, themes=[THEMES["color_object"]])
    tars = _as_tars(folder, "train", tmp_path / "tars")
    a, b = open_image_captions(folder), open_image_captions(tars)
    assert isinstance(a, ImageCaptionSet) and isinstance(b, WebDatasetSource) and len(a) == len(b) > 80
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert np.array_equal(x.pop("pixels"), y.pop("pixels"))
        assert y.pop("image") == Path(x["image"]).stem and {**x, "image": None} == {**y, "image": None}
    vlm, processor = tiny_vlm
    caches = [extract_features(vlm, processor, s, tmp_path / name, DESCRIBE_INSTRUCTIONS, samples=10, shard_size=4,
                               batch_size=4,
                               max_new_tokens=4) for name, s in (("from_folder", a), ("from_tars", b))]
    for i in range(10):
        x, y = caches[0][i], caches[1][i]
        assert torch.equal(x["generated_features"], y["generated_features"]) and x["text"] == y["text"]
        assert x["instruction"] == y["instruction"] and x["caption"] == y["caption"]


def test_mixed_sizes_survive(shards, tmp_path, tiny_vlm):
    train = open_image_captions(shards, "train")
    rows = [train[i] for i in range(len(train))]
    assert [r["pixels"].shape for r in rows] == [(r["height"], r["width"], 3) for r in rows]  # each at its own size
    assert len({r["pixels"].shape for r in rows}) > 20 and sum(r["height"] != r["width"] for r in rows) > 30
    wide = rows[0]["pixels"]
    assert prepare_image(wide, 32).size == (32, 32) and prepare_image(wide, None).size == (wide.shape[1], wide.shape[0])
    vlm, processor = tiny_vlm  # a mini-kind VLM (32 px): each image's central square, resized
    cache = extract_features(vlm, processor, train, tmp_path / "f", DESCRIBE_INSTRUCTIONS, samples=12, shard_size=8,
                             batch_size=4,
                             max_new_tokens=4)
    assert len(cache) == 12 and len(cache.shards) == 2 and cache[11]["image"] == rows[11]["image"] == "000000011"
    assert cache[3]["url"] == rows[3]["url"] and cache[3]["theme"] == rows[3]["theme"]  # the cc_sbu json rides along
    pixels = cache_pixels(cache, train, [11, 2], 16)
    assert pixels.shape == (2, 3, 16, 16) and -1 <= pixels.min() and pixels.max() <= 1
    with pytest.raises(ValueError, match="pass the source the cache was extracted from"):
        cache_pixels(cache, open_image_captions(shards, "validation"), [0], 16)


def test_a_wids_index_reads_the_same_samples(shards, tmp_path):
    counted = WebDatasetSource(shards / "train")
    folder = tmp_path / "indexed"; folder.mkdir()
    for tar in (shards / "train").glob("*.tar"): (folder / tar.name).symlink_to(tar)
    # relative urls
    listed = [{"url": Path(s["url"]).name, "nsamples": s["nsamples"]} for s in shard_list(shards / "train")]
    (folder / WIDS_INDEX).write_text(json.dumps({"wids_version": 1, "shardlist": listed}))
    indexed = WebDatasetSource(folder)
    assert len(indexed) == len(counted) == 40
    assert indexed.row(33) == counted.row(33) and np.array_equal(indexed.image(33), counted.image(33))
    # nothing written by the data
    assert sorted(p.name for p in (shards / "train").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]


def test_missing_or_corrupt_tars_are_named(shards, tmp_path):
    import shutil
    broken = tmp_path / "broken"; shutil.copytree(shards, broken)
    tars = sorted((broken / "train").glob("*.tar"))
    good = tars[1].read_bytes()
    tars[1].write_bytes(b"\x00garbage" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=f"shard {tars[1]} is corrupt or not a tar"):
        open_image_captions(broken)
    tars[1].write_bytes(b"")
    with pytest.raises(ValueError, match=f"shard {tars[1]} is corrupt"):
        open_image_captions(broken)
    tars[1].write_bytes(good)
    source = open_image_captions(broken)
    tars[1].write_bytes(good[:len(good) // 3])  # truncated after it was counted
    with pytest.raises(ValueError, match=f"from webdataset shard {tars[1]}, missing or corrupt"):
        [source[i] for i in range(16, 32)]
    tars[2].unlink()
    with pytest.raises(ValueError, match=f"sample 39 from webdataset shard {tars[2]}, missing or corrupt"):
        source[39]
    listed = [{"url": t.name, "nsamples": 16} for t in tars]
    (broken / "train" / WIDS_INDEX).write_text(json.dumps({"shardlist": listed}))
    with pytest.raises(FileNotFoundError, match=f"shard {tars[2]} is missing \\(listed in"):
        open_image_captions(broken)


def test_a_wrong_data_dir_names_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="train.jsonl and the images it lists \\(the folder layout\\) or .tar shards"):
        open_image_captions(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no train split in {tmp_path}"):
        open_image_captions(tmp_path)


def _papermill(tmp_path, **params):
    import papermill as pm
    pm.execute_notebook(str(NBS / "03_train.ipynb"), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False,
                        kernel_name="python3")
    return json.loads((Path(params["output_dir"]) / "metrics.json").read_text())


@pytest.mark.slow  # the train notebook on tiny-paper
def test_train_notebook_on_tiny_paper_from_webdataset_tars_of_mixed_sizes(shards, tmp_path):
    before = sorted(p.relative_to(shards) for p in shards.rglob("*"))
    metrics = _papermill(tmp_path, profile="tiny-paper", data_dir=str(shards), method="image-loss", shard_size=8,
                         max_images=20,
                         steps=3, batch_size=4, eval_batches=1, ckpt_every=2, warmup=1, max_new_tokens=4,
                         extract_batch_size=4,
                         output_dir=str(tmp_path / "run"))
    assert metrics["metrics"]["train_samples"] == 20 and metrics["metrics"]["validation_samples"] == 4
    assert np.isfinite([metrics["metrics"]["heldout"]["loss"],
                        *metrics["metrics"]["image_decoder_flow_loss"].values()]).all()
    assert metrics["metrics"]["content_probe"] is not None  # the cc_sbu json carries the rendered pair
    assert metrics["run"]["loaded"]["image_decoder"] == "FluxPipeline" and metrics["run"]["peak_host_memory_mib"] > 100
    cache = FeatureCache(tmp_path / "run" / "features" / "train")
    assert len(cache.shards) == 3 and cache[19]["image"] == "000000019"  # 20 samples in shards of 8
    assert {cache[i]["instruction"] for i in range(20)} <= set(OFFICIAL_DESCRIBE_INSTRUCTIONS)
    assert sorted(p.relative_to(shards) for p in shards.rglob("*")) == before  # the data folder is only read


def test_train_notebook_names_a_wrong_data_dir(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="no train split in"):
        _papermill(tmp_path, profile="tiny-random", data_dir=str(tmp_path), steps=1, output_dir=str(tmp_path / "run"))
