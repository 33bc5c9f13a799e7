"""Prompt files for evaluation: plain text, the HPDv2 benchmark folder, PartiPrompts.tsv, COCO captions (seeded),
capping, and one sentence for a file that cannot be parsed."""
import json

import pytest

from jaxlcd.errors import InputError
from jaxlcd.metrics.prompts import HPD_STYLES, Prompt, load_prompts


def test_plain_text_one_prompt_per_line(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \nthird\n")
    assert load_prompts(str(tmp_path / "p.txt")) == [Prompt("a cat"), Prompt("a dog"), Prompt("third")]
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"), num=2)] == ["a cat", "a dog"]


def test_hpd_folder_every_style_kept_when_capped(tmp_path):
    for style in HPD_STYLES:
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(5)]))
    prompts = load_prompts(str(tmp_path))
    assert len(prompts) == 20 and {p.group for p in prompts} == set(HPD_STYLES)
    capped = load_prompts(str(tmp_path), num=8)
    assert [p.text for p in capped] == [f"{s} {i}" for s in HPD_STYLES for i in range(2)]


def test_partiprompts_tsv_grouped_by_category(tmp_path):
    (tmp_path / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n"
                                               "a red cube\tArtifacts\tColors\t\nbread\tFood & Beverage\tBasic\t\n")
    assert load_prompts(str(tmp_path / "PartiPrompts.tsv")) == [Prompt("a red cube", "Artifacts"),
                                                                Prompt("bread", "Food & Beverage")]


def test_coco_one_seeded_caption_per_image(tmp_path):
    annotations = [{"image_id": i, "id": 10 * i + k, "caption": f"image {i} caption {k}"}
                   for i in range(50) for k in range(5)]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": [], "annotations": annotations}))
    path = str(tmp_path / "captions_val2014.json")
    a, b, c = load_prompts(path, num=10, seed=0), load_prompts(path, num=10, seed=0), load_prompts(path, num=10, seed=1)
    assert a == b and a != c and len(a) == 10 and all(p.group == "coco" for p in a)
    images = [p.text.split()[1] for p in a]
    assert len(set(images)) == 10                    # one caption per image id
    assert len(load_prompts(path)) == 50


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.json", "{not json", "is not a COCO captions file"),
    ("other.json", json.dumps({"images": []}), "is not a COCO captions file"),
    ("bad.tsv", "a\tb\n1\t2\n", "is not PartiPrompts.tsv"),
    ("missing.txt", None, "does not exist"),
])
def test_unparseable_prompt_files_are_one_sentence(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=message):
        load_prompts(str(tmp_path / name))


def test_a_folder_that_is_not_hpd_is_one_sentence(tmp_path):
    (tmp_path / "anime.txt").write_text("x")
    with pytest.raises(InputError, match="not the HPDv2 benchmark folder"):
        load_prompts(str(tmp_path))
    (tmp_path / "photo.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(InputError, match="must be a JSON list of prompt strings"):
        load_prompts(str(tmp_path))
