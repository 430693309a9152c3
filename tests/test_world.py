"The MiniCoBSAT world: CoBSAT's prompt recipe, the renderer's determinism and separability, captions, data on disk."
import collections, json, random
from pathlib import Path
import numpy as np
import pytest
from thinkdiff_nb.world import (TASKS, THEMES, SHOTS, ImageCaptionSet, caption, caption_variants, cobsat_prompt_list,
                                describe,
                                min_pair_distance, parse_pair, render, task_prompts, write_image_caption_set)

FIXTURE = Path(__file__).parents[1] / "data/fixtures/cobsat_prompt_list_default.json"
SHARED_FIXTURE = Path(__file__).parents[2] / "shared/fixtures/cobsat_prompt_list_default.json"


def test_prompt_list_matches_cobsat_fixture():
    expected = json.loads(FIXTURE.read_text())
    if SHARED_FIXTURE.exists():  # the copy under data/ is the shared fixture, byte for byte
        assert SHARED_FIXTURE.read_bytes() == FIXTURE.read_bytes()
    assert cobsat_prompt_list() == expected


@pytest.mark.parametrize("shot", SHOTS)
def test_prompt_invariants(shot):
    for task in TASKS:
        for p in task_prompts(task, shot, 10):
            assert len(set(p.xs)) == shot + 1 and len(p.demo_pairs) == shot
            assert p.xs[-1] not in p.xs[:-1]
            theta_slot = 0 if task.infers_subject else 1
            assert {pair[theta_slot] for pair in p.demo_pairs} == {p.theta}
            assert len(p.images()) == shot


def test_render_deterministic_and_nuisance_varies():
    a = render("action_animal", "cat", "sing", seed=11)
    assert np.array_equal(a, render("action_animal", "cat", "sing", seed=11))
    others = [render("action_animal", "cat", "sing", seed=s) for s in range(12, 16)]
    assert all(np.abs(a.astype(int) - o).mean() > 1.0 for o in others)
    assert render("color_object", "cup", "red", size=48).shape == (48, 48, 3)


def test_every_pair_of_targets_differs_clearly():
    # measured minimum 5.25 (texture_object: chair wicker vs chair sequined) in mean |difference| per channel, 0..255
    distances = {name: min_pair_distance(name)[0] for name in THEMES}
    assert min(distances.values()) > 4.0, distances


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown animal value 'unicorn'"):
        render("action_animal", "unicorn", "run")
    with pytest.raises(ValueError, match="unknown style value"):
        render("style_object", "car", "cubist")
    with pytest.raises(ValueError, match="minimum"):
        render("color_object", "car", "red", size=12)
    with pytest.raises(ValueError, match="unknown theme 'weather_object'"):
        render("weather_object", "car", "red")
    with pytest.raises(ValueError, match="shot must be one of"):
        task_prompts(TASKS[0], 3, 1)


def test_captions_deterministic_and_parseable():
    theme = THEMES["background_animal"]
    first = [caption(theme, "dog", "park", random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    assert len({caption(theme, "dog", "park", random.Random(s)) for s in range(30)}) > 3
    assert describe(theme, "dog", "park") == "a dog in an amusement park"
    for s in theme.subjects:
        for a in theme.attributes:
            assert parse_pair(f"Create an image of {describe(theme, s, a)}", theme) == (s, a)


def test_captions_are_drawn_uniformly_from_their_variants():
    theme = THEMES["color_object"]  # 3 phrases x 5 frames
    variants = caption_variants(theme, "cup", "red")
    assert len(variants) == 15 == len(set(variants))
    rng = random.Random(0)
    counts = collections.Counter(caption(theme, "cup", "red", rng) for _ in range(15000))
    assert set(counts) == set(variants) and all(850 < c < 1150 for c in counts.values())


def test_image_caption_set_round_trip(tmp_path):
    root = write_image_caption_set(tmp_path / "set", n_per_pair=1, seed=3, themes=[THEMES["texture_object"]])
    train, val = ImageCaptionSet(root), ImageCaptionSet(root, "validation")
    assert len(train) + len(val) == 100 and len(val) > 0
    row = train[0]
    assert np.array_equal(row["pixels"], render(row["theme"], row["subject"], row["attribute"], 32, row["seed"]))
    assert parse_pair(row["caption"], row["theme"]) == (row["subject"], row["attribute"])
    with pytest.raises(FileExistsError):
        write_image_caption_set(root, n_per_pair=1)
    (root / train.rows[0]["image"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        train.image(0)
    assert not list(tmp_path.glob(".set.*")), "no temporary folder is left behind"
