"CoBSAT's judges: its question text and reply parsing, and the mini, LLaVA and CLIP judges on real renders."
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor
from thinkdiff_nb.backbones import get_profile, judge_pairs, load_judge
from thinkdiff_nb.judges import (JUDGES, ClipJudge, LlavaJudge, MiniJudge, expand_to_square, judge_questions,
                                 load_cobsat_judge, parse_option)
from thinkdiff_nb.world import THEMES, render

# CoBSAT's configs.py: item_dict (the axes used by its five themes) and item2word, restated as a fixture
CONFIGS = json.loads((Path(__file__).parents[1] / "data" / "fixtures" / "cobsat_configs.json").read_text())
ITEM_DICT, ITEM2WORD = CONFIGS["item_dict"], CONFIGS["item2word"]


def cobsat_eval_prompts(task_type: str) -> dict:
    "evaluation_icl.py's get_eval_prompt in image mode, restated."
    detail, obj = task_type.split("_")
    item_list = {"detail": ITEM_DICT[detail], "obj": ITEM_DICT[obj]}
    prompts = {"detail": f"What is the {detail} (of the main object) in this image? Answer from the following "
                         "options: ",
               "obj": "What is the main object in this image? Answer from the following options: "}
    for mode in prompts:
        for i, item in enumerate(item_list[mode]):
            prompts[mode] += f" ({i+1}){ITEM2WORD.get(item, item)}"
        prompts[mode] += ". Answer the number only and do not include any other texts (e.g., 1)."
    return prompts


def cobsat_parse(response: str, n_options: int = 10) -> int:
    "evaluation_icl.py's eval_model reading of a reply, restated; where CoBSAT's int() would raise, -1."
    response_number = "".join(filter(str.isdigit, response))
    if not response_number:
        return -1
    try:
        value = int(response_number)
    except ValueError:
        return -1
    return value if value in list(range(1, n_options + 1)) else -1


REPLIES = {  # reply -> CoBSAT's option
    "1": 1, "10": 10, "(3)": 3, "3": 3, "9.": 9, "01": 1, "The answer is 7.": 7, "Answer: (4)cup": 4, "(2)white": 2,
    "1 or 2": -1, "(1)yellow (2)white": -1, "0": -1, "11": -1, "100": -1, "": -1, "none": -1, "-3": 3,
    # superscript two: isdigit but not int(); Arabic-Indic three: both
    "²": -1, "3²": -1, "The answer is ²": -1, "٣": 3,
}


@pytest.fixture(scope="module")
def paper():
    return get_profile("tiny-paper")


@pytest.fixture(scope="module")
def renders():
    theme = THEMES["color_object"]
    pairs = [("leaf", "yellow"), ("car", "red"), ("cup", "blue"), ("hat", "green")]
    return theme, pairs, np.stack([render(theme, s, a, 32) for s, a in pairs])


def test_parse_option_is_cobsats():
    assert {r: parse_option(r) for r in REPLIES} == REPLIES
    assert {r: parse_option(r) for r in REPLIES} == {r: cobsat_parse(r) for r in REPLIES}
    assert [parse_option("4", n_options=n) for n in (3, 4)] == [-1, 4]


def test_questions_are_cobsats():
    for name, theme in THEMES.items():
        expected = cobsat_eval_prompts(name)
        assert judge_questions(theme) == {"attribute": expected["detail"], "subject": expected["obj"]}
        assert judge_questions(name) == judge_questions(theme)
    style = judge_questions("style_object")["attribute"]
    assert style == ("What is the style (of the main object) in this image? Answer from the following options:  "
                     "(1)watercolor "
                     "(2)sketch (3)pixel (4)origami (5)lego (6)icon (7)graffiti (8)futuristic (9)wireframe (10)old. "
                     "Answer "
                     "the number only and do not include any other texts (e.g., 1).")
    background = judge_questions("background_animal")
    assert " (5)amusement park (6)gym " in background["attribute"] and "(1)zebra" in background["subject"]


def test_mini_judge_is_judge_pairs():
    judge = load_cobsat_judge("mini", "mini", max_new_tokens=512)  # options of other judges are ignored
    assert isinstance(judge, MiniJudge) and judge.name == "mini"
    right = 0
    for k, theme in enumerate(THEMES.values()):
        pairs = [(theme.subjects[(k + 3 * i) % 10], theme.attributes[(7 * i + k) % 10]) for i in range(6)]
        images = np.stack([render(theme, s, a, 32, seed=100 * k + i) for i, (s, a) in enumerate(pairs)])
        answers = judge.answer(images, theme.name)
        assert list(answers.columns) == ["subject_answer", "attribute_answer"]
        given = list(zip(answers.subject_answer, answers.attribute_answer))
        assert given == judge_pairs(judge.judge, images, theme)
        right += sum(g == p for g, p in zip(given, pairs))
    assert right >= 24  # of 30: the trained CNN reads renders
    random = MiniJudge(load_judge("tiny-random"))
    images = np.stack([render("texture_object", "box", "lace", 32, seed=1),
                       render("texture_object", "cup", "wood", 32, seed=2)])
    answers = random.answer(images, "texture_object")
    assert (list(zip(answers.subject_answer, answers.attribute_answer))
            == judge_pairs(random.judge, images, "texture_object"))


def test_llava_judge_on_tiny_paper(paper, renders):
    theme, _, images = renders
    judge = load_cobsat_judge(paper, "llava", max_new_tokens=32)
    assert isinstance(judge, LlavaJudge) and judge.batch_size == 8
    assert LlavaJudge.__init__.__defaults__[0] == 512  # CoBSAT's budget by default
    prompts = judge.prompts(theme)
    for key, question in judge_questions(theme).items():
        assert prompts[key].endswith(f"USER: <image>\n{question} ASSISTANT:")
        assert prompts[key].startswith("A chat between a curious human and an artificial intelligence assistant.")
    answers = judge.answer(images[:3], theme)
    assert list(answers.columns) == ["subject_answer", "attribute_answer", "reply_subject", "reply_attribute"]
    assert len(answers) == 3  # two questions per image, each reply in its question's column:
    for key in ("subject", "attribute"):
        assert judge.replies(list(images[:3]), [prompts[key]] * 3) == list(answers[f"reply_{key}"])
    for axis, values in (("subject", theme.subjects), ("attribute", theme.attributes)):
        for answer, reply in zip(answers[f"{axis}_answer"], answers[f"reply_{axis}"]):
            assert answer is None or answer in values
            option = parse_option(reply)
            assert answer == (values[option - 1] if option > 0 else None)
    assert judge.answer(images[:3], theme).equals(answers)  # greedy
    judge.batch_size = 1  # as CoBSAT, one prompt at a time: left padding changes nothing
    assert judge.answer(images[:3], theme).equals(answers)


def test_llava_pads_non_square_images_like_llava(paper, renders):
    theme, _, images = renders
    judge = LlavaJudge.from_profile(paper, max_new_tokens=8, batch_size=2)
    wide = np.concatenate([images[0], images[1][:, :16]], axis=1)  # (32, 48, 3)
    square = expand_to_square(wide, (122, 116, 104))  # LLaVA-1.5's expand2square with the CLIP mean colour
    assert square.shape == (48, 48, 3) and (square[8:40] == wide).all() and (square[:8] == (122, 116, 104)).all()
    prompt = judge.prompts(theme)["subject"]
    batch = judge.inputs([wide, images[2]], [prompt, prompt])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    padded = judge.processor(images=[square, images[2]], return_tensors="pt")["pixel_values"]
    cropped = judge.processor(images=[wide], return_tensors="pt")["pixel_values"]  # llava-hf's processor alone
    assert torch.equal(batch["pixel_values"], padded) and not torch.allclose(batch["pixel_values"][:1], cropped)
    assert (batch["input_ids"] == judge.processor.image_token_id).sum(1).tolist() == [4, 4]  # 2x2 patches each
    assert judge.answer(wide[None], theme).equals(judge.answer(square[None], theme))


def test_clip_judge_is_cobsats_metric(paper, renders):
    theme, pairs, images = renders
    judge = load_cobsat_judge(paper, "clip", max_new_tokens=512, batch_size=3)
    assert isinstance(judge, ClipJudge) and judge.batch_size == 3
    targets = [pairs[0], pairs[1], ("car", "green"), ("leaf", "blue")]
    answers = judge.answer(images, theme, targets)
    assert list(answers.columns) == ["subject_answer", "attribute_answer", "clip_similarity"]
    model, processor = CLIPModel.from_pretrained(paper.clip).eval(), CLIPProcessor.from_pretrained(paper.clip)
    negative = 0
    for i, (subject, attribute) in enumerate(targets):  # CoBSAT's eval_clip on each image
        texts = [attribute, subject, f"{attribute} {subject}"] + ITEM_DICT["object"] + ITEM_DICT["color"]
        inputs = processor(text=texts, images=images[i], return_tensors="pt", padding=True, truncation=True,
                           max_length=77)
        with torch.no_grad():
            out = model(**inputs)
            raw = (torch.matmul(out.text_embeds, out.image_embeds.t()) * model.logit_scale.exp()).t()[0].numpy()
        negative += int((raw < 0).sum())
        similarity = np.maximum(raw, 0)
        assert answers.subject_answer[i] == ITEM_DICT["object"][np.argmax(similarity[3:13])]
        assert answers.attribute_answer[i] == ITEM_DICT["color"][np.argmax(similarity[13:23])]
        assert answers.clip_similarity[i] == pytest.approx(similarity[2], abs=1e-4)
    assert negative > 0 and (answers.clip_similarity >= 0).all()  # the floor was needed
    assert list(judge.answer(images, theme).columns) == ["subject_answer", "attribute_answer"]
    with pytest.raises(ValueError, match="2 targets for 4 images"):
        judge.answer(images, theme, targets[:2])
    with pytest.raises(ValueError, match="unknown object value 'zebra'"):
        judge.answer(images[:1], theme, [("zebra", "red")])


def test_clear_errors(paper):
    with pytest.raises(ValueError, match=r"unknown judge 'gemini'; judges are \('mini', 'llava', 'clip'\)"):
        load_cobsat_judge(paper, "gemini")
    for name in ("llava", "clip"):
        with pytest.raises(ValueError, match=f"profile 'mini' has no {name} judge"):
            load_cobsat_judge("mini", name)
    with pytest.raises(ValueError, match="profile 'paper' has no judge here"):
        load_cobsat_judge("paper", "mini")
    with pytest.raises(TypeError, match=r"unknown judge options \['max_tokens'\]"):
        load_cobsat_judge(paper, "clip", max_tokens=4)
    with pytest.raises(ValueError, match=r"uint8 \(B, H, W, 3\)"):
        MiniJudge(load_judge("mini")).answer(np.zeros((1, 32, 32, 3), np.float32), "color_object")
    assert JUDGES == ("mini", "llava", "clip")
