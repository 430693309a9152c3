"The mini VLM: chat formatting, processor round trip, a training step, generate with hidden states, bad input."
import random
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from thinkdiff_nb.world import TASKS, THEMES, display_word, render, task_prompts
from thinkdiff_nb.backbones import (description_messages, get_profile, icl_messages, ImageOnlyQwen2VLProcessor,
                                    load_vlm, mini_vlm_config, mini_vlm_processor, vlm_answers, vlm_batch)
from thinkdiff_nb.world import is_heldout_pair
from thinkdiff_nb.loop import Schedule, fit
from thinkdiff_nb.pretrain import LookaheadVLM, VLMData, vlm_loss_fn


@pytest.fixture(scope="module")
def processor():
    return mini_vlm_processor()


@pytest.fixture(scope="module")
def tiny_vlm():
    return load_vlm(get_profile("tiny-random"))


def test_interleaved_prompt_token_layout(processor):
    prompt = task_prompts(TASKS[4], 4, 1)[0]  # Style-I, 4 demonstrations
    batch = vlm_batch(processor, [icl_messages(prompt.texts)], [prompt.images()])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    text = " ".join(tokens)
    assert tokens.count("<|vision_start|>") == tokens.count("<|vision_end|>") == 4
    assert tokens.count("<|image_pad|>") == 4 * 16  # (32 / 4 / 2)^2 merged tokens per picture
    for k in range(4):  # each picture: its "Picture k :" label, then exactly 16 pads between the vision markers
        start = [i for i, t in enumerate(tokens) if t == "<|vision_start|>"][k]
        assert tokens[start - 3:start] == ["picture", str(k + 1), ":"]
        assert tokens[start + 1:start + 17] == ["<|image_pad|>"] * 16 and tokens[start + 17] == "<|vision_end|>"
    assert f"word 5 : {display_word(prompt.xs[-1])} ," in text  # the query slot has no picture
    assert tokens[-2:] == ["<|im_start|>", "assistant"]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
    assert processor.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()


def test_labels_cover_only_the_answer(processor):
    batch = vlm_batch(processor, [description_messages("Describe the image briefly.")] * 2,
                      [[render("color_object", "car", "red")], [render("texture_object", "box", "lace")]],
                      answers=["a red car.", "a box made of lace."], padding_side="right")
    for row, answer in enumerate(["a red car. <|im_end|>", "a box made of lace. <|im_end|>"]):
        kept = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(kept) == answer


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ImageOnlyQwen2VLProcessor.from_pretrained(tmp_path)
    prompt = task_prompts(TASKS[7], 2, 1)[0]
    a = vlm_batch(processor, [icl_messages(prompt.texts)], [prompt.images()])
    b = vlm_batch(loaded, [icl_messages(prompt.texts)], [prompt.images()])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_training_step(processor, tmp_path):
    theme = THEMES["color_object"]
    rows = [{"theme": theme.name, "subject": s, "attribute": a, "caption": f"a {a} {s}"}
            for s in theme.subjects for a in theme.attributes]
    images = np.stack([render(theme, r["subject"], r["attribute"]) for r in rows])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(mini_vlm_config(processor.tokenizer, hidden=32, layers=1, vision_depth=1,
                                                            vision_dim=32))
    before = [p.detach().clone() for p in model.parameters()]
    losses = fit(LookaheadVLM(model, 0.5), vlm_loss_fn(processor, VLMData(images, rows), batch_size=4),
                 Schedule(steps=1, warmup=0), tmp_path / "vlm.pt").losses
    assert np.isfinite(losses[0]) and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_lookahead_loss_adds_to_the_next_token_loss(processor):
    "The lookahead head's KL is positive on a fresh model and adds, with its weight, to the VLM's own loss."
    batch = vlm_batch(processor, [description_messages("Describe the image briefly.")] * 2,
                      [[render("color_object", "car", "red")], [render("texture_object", "box", "lace")]],
                      answers=["a picture of a red car.", "a picture of a box made of lace."], padding_side="right")
    torch.manual_seed(0)
    vlm = Qwen2VLForConditionalGeneration(mini_vlm_config(processor.tokenizer, hidden=32, layers=1, vision_depth=1,
                                                          vision_dim=32))
    plain, weighted = LookaheadVLM(vlm, 0.0), LookaheadVLM(vlm, 0.5)
    weighted.head.load_state_dict(plain.head.state_dict())
    with torch.no_grad():
        lm, total = plain(**batch), weighted(**batch)
        double = LookaheadVLM(vlm, 1.0); double.head.load_state_dict(plain.head.state_dict()); total2 = double(**batch)
    assert total > lm and torch.isclose(total2 - lm, 2 * (total - lm))


def test_in_context_samples_never_answer_a_heldout_pair():
    rows, images = [], []
    for theme in THEMES.values():
        for s in theme.subjects:
            for a in theme.attributes:
                rows.append({"theme": theme.name, "subject": s, "attribute": a, "caption": ""})
                images.append(np.zeros((32, 32, 3), np.uint8))
    data, rng = VLMData(np.stack(images), rows), random.Random(0)
    for _ in range(300):
        messages, imgs, answer = data.icl(rng)
        assert len(imgs) in (2, 4) and answer.startswith("Create an image of")
    # the hold-out is a fifth of every theme
    assert all(sum(is_heldout_pair(t, s, a) for s in t.subjects for a in t.attributes) == 20 for t in THEMES.values())


def test_generate_with_hidden_states_on_a_batch(tiny_vlm):
    model, processor = tiny_vlm
    prompts = task_prompts(TASKS[2], 2, 3)
    batch = vlm_batch(processor, [icl_messages(p.texts) for p in prompts], [p.images() for p in prompts])
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_hidden_states=True,
                         return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    assert out.sequences.shape == (3, batch["input_ids"].shape[1] + 6)
    assert len(out.hidden_states) == 6
    assert (out.hidden_states[0][-1].shape[:2] == batch["input_ids"].shape
            and out.hidden_states[1][-1].shape[:2] == (3, 1))
    texts = vlm_answers(model, processor, [icl_messages(p.texts) for p in prompts], [p.images() for p in prompts],
                        max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_bad_input(processor, tiny_vlm):
    model, _ = tiny_vlm
    prompt = task_prompts(TASKS[0], 8, 1)[0]
    with pytest.raises(ValueError, match="more than the configured limit of 4"):
        vlm_batch(processor, [icl_messages(prompt.texts)], [prompt.images()], max_images=4)
    with pytest.raises(ValueError, match="2 pictures but 1 images"):
        vlm_batch(processor, [icl_messages(task_prompts(TASKS[0], 2, 1)[0].texts)],
                  [[render("color_object", "car", "red")]])
    # a non-square image is no error: the mini VLM sees its central square
    wide = np.zeros((32, 48, 3), np.uint8); wide[:, 8:40] = render("color_object", "car", "red")
    crops = [vlm_batch(processor, [description_messages("What is in this image?")], [[im]])
             for im in (wide, wide[:, 8:40])]
    assert torch.equal(crops[0]["pixel_values"], crops[1]["pixel_values"])
    # other modes and sizes are converted: a grey 64x64 image gives the same 16 tokens as an RGB 32x32 one
    grey = Image.fromarray(render("color_object", "car", "red", size=64)).convert("L")
    batch = vlm_batch(processor, [description_messages("What is in this image?")], [[grey]])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]
