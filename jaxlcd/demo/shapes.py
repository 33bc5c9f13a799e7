"""The procedural "shapes" demo world: scenes, anti-aliased renders, captions, held-out prompts, tfds builder.

A scene is a background colour plus one object at a position (left, right, top, bottom, centre) or two
objects in a relation ("left of", "right of", "above", "below": ``objects[0]`` REL ``objects[1]``, with
the bounding boxes separated along that axis). Everything is a function of (seed, index).

What a caption states, and hence what `parse_caption` recovers and `Scene` equality compares: the
background, each object's shape / colour / size, the single object's position or the relation, and the
object order. ``Scene.layout_seed`` (the small jitter of sizes and positions in the picture) is not in
the caption and not compared. ``Scene(bg, (a, b), "left of")`` and ``Scene(bg, (b, a), "right of")``
describe the same picture but different captions; `Scene.normalized` maps both to one form.

Held-out rule: a (shape, colour) pair is held out iff ``(SHAPES.index(shape) + COLOURS.index(colour))
% 6 == 0`` (8 of 48 pairs, 1/6; every shape and every colour occurs in both sets). `sample_scene`
(the training stream) never draws a held-out pair; every scene of `eval_scenes` has one.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from jaxlcd.data.folder import image_caption_features, version_dir
from jaxlcd.errors import InputError

log = logging.getLogger(__name__)

BUILDER_NAME = "shapes"
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT_PAIRS = frozenset((s, c) for i, s in enumerate(SHAPES) for j, c in enumerate(COLOURS) if (i + j) % 6 == 0)
TRAIN_PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT_PAIRS)

_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                     "centre": "in the centre"}
_OBJECT_STYLES = ("{a_size} {size} {colour} {shape}", "{a_size} {size} {shape} in {colour}",
                  "{a_colour} {colour} {shape} of {size} size")
_FRAMES = (  # (one object, two objects)
    ("{obj} {pos}, {bg} background", "{obj} {rel} {obj2}, {bg} background"),
    ("on {a_bg} background, {obj} {pos}", "on {a_bg} background, {obj} {rel} {obj2}"),
    ("{obj} on {a_bg} background, {pos}", "{obj} on {a_bg} background, {rel} {obj2}"),
    ("{pos}, {obj} against {a_bg} background", "{obj} {rel} {obj2} against {a_bg} background"),
    ("{bg} background with {obj} {pos}", "{bg} background with {obj} {rel} {obj2}"),
    ("a picture of {obj} {pos} on {a_bg} background", "a picture of {obj} {rel} {obj2} on {a_bg} background"),
)
NUM_TEMPLATES = len(_FRAMES) * len(_OBJECT_STYLES)  # template t = frame t // 3 with object style t % 3; 0 canonical

_DIAMETER = {"small": 0.22, "large": 0.40}  # fraction of the image side, before the x[0.9, 1.05] jitter
_SINGLE_ANCHOR = {"left": (0.26, 0.5), "right": (0.74, 0.5), "top": (0.5, 0.26), "bottom": (0.5, 0.74),
                  "centre": (0.5, 0.5)}
_PAIR_ANCHORS = {"left of": ((0.26, 0.5), (0.74, 0.5)), "right of": ((0.74, 0.5), (0.26, 0.5)),
                 "above": ((0.5, 0.26), (0.5, 0.74)), "below": ((0.5, 0.74), (0.5, 0.26))}


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``colour`` in COLOURS, ``size`` in SIZES, ``position`` in POSITIONS
    for a single-object scene and None in a two-object scene (where the scene's relation places it)."""
    shape: str
    colour: str
    size: str
    position: str | None = None


@dataclasses.dataclass(frozen=True)
class Scene:
    """``background`` colour name, ``objects`` (1 or 2 `Obj`), ``relation`` (None, or in RELATIONS for two
    objects: objects[0] REL objects[1]). ``layout_seed`` (None: no jitter) varies the exact sizes and
    positions and is excluded from equality. Invalid combinations raise ValueError."""
    background: str
    objects: tuple[Obj, ...]
    relation: str | None = None
    layout_seed: int | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        objs, colours = self.objects, [o.colour for o in self.objects]
        problems = [f"unknown {kind} {v!r}" for o in objs
                    for kind, v, vocab in (("shape", o.shape, SHAPES), ("colour", o.colour, COLOURS),
                                           ("size", o.size, SIZES)) if v not in vocab]
        if self.background not in COLOURS:
            problems.append(f"unknown background {self.background!r}")
        if len(objs) not in (1, 2):
            problems.append(f"{len(objs)} objects (1 or 2 allowed)")
        elif len(objs) == 1 and (objs[0].position not in POSITIONS or self.relation is not None):
            problems.append("a single object needs a position in POSITIONS and no relation")
        elif len(objs) == 2 and (self.relation not in RELATIONS or any(o.position is not None for o in objs)):
            problems.append("two objects need a relation in RELATIONS and position None")
        if self.background in colours or len(set(colours)) != len(colours):
            problems.append("object colours must differ from each other and from the background")
        if problems:
            raise InputError(f"invalid scene {self}: " + "; ".join(problems))

    def held_out_pairs(self) -> list[tuple[str, str]]:
        """The (shape, colour) pairs of this scene that are in HELD_OUT_PAIRS."""
        return [(o.shape, o.colour) for o in self.objects if (o.shape, o.colour) in HELD_OUT_PAIRS]

    def normalized(self) -> Scene:
        """The same picture with "right of" / "below" rewritten as "left of" / "above" (objects swapped)."""
        flip = {"right of": "left of", "below": "above"}
        if self.relation not in flip:
            return self
        return dataclasses.replace(self, objects=self.objects[::-1], relation=flip[self.relation])


def _draw_scene(rng: np.random.Generator, first_pairs, other_pairs, held_out_slot: bool) -> Scene:
    pairs = [first_pairs[int(rng.integers(len(first_pairs)))]]
    n = 1 + int(rng.integers(2))
    if n == 2:
        rest = [p for p in other_pairs if p[1] != pairs[0][1]]
        pairs.append(rest[int(rng.integers(len(rest)))])
        if held_out_slot and rng.integers(2):
            pairs.reverse()
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in pairs]
    backgrounds = [c for c in COLOURS if c not in {p[1] for p in pairs}]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    if n == 1:
        objects, relation = (Obj(*pairs[0], sizes[0], POSITIONS[int(rng.integers(len(POSITIONS)))]),), None
    else:
        objects = tuple(Obj(s, c, z) for (s, c), z in zip(pairs, sizes))
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return Scene(background, objects, relation, layout_seed=int(rng.integers(2**31)))


def sample_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` (>= 0) of the endless training stream for ``seed`` (>= 0); no held-out pair ever."""
    return _draw_scene(np.random.default_rng([seed, index]), TRAIN_PAIRS, TRAIN_PAIRS, False)


def eval_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` distinct scenes (by equality), each with at least one held-out (shape, colour) pair; a
    deterministic function of ``seed``, and ``eval_scenes(n)`` is a prefix of ``eval_scenes(n + k)``."""
    held, everything = sorted(HELD_OUT_PAIRS), TRAIN_PAIRS + tuple(sorted(HELD_OUT_PAIRS))
    scenes, seen, i = [], set(), 0
    while len(scenes) < n:
        scene = _draw_scene(np.random.default_rng([seed, i, 1]), held, everything, True)
        i += 1
        if scene not in seen:
            seen.add(scene)
            scenes.append(scene)
        if i > 100 * n + 1000:
            raise InputError(f"cannot draw {n} distinct held-out scenes")
    return scenes


def eval_prompts(n: int, seed: int = 0) -> list[str]:
    """The canonical captions (template 0) of `eval_scenes(n, seed)`."""
    return [caption(s, template=0) for s in eval_scenes(n, seed)]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, seed: int = 0, index: int = 0, *, template: int | None = None) -> str:
    """The caption of ``scene``: template ``template`` (0 <= t < NUM_TEMPLATES; 0 is canonical, e.g. "a
    small red circle on the left, blue background"), or one picked deterministically from (seed, index)."""
    if template is None:
        template = int(np.random.default_rng([seed, index, 2]).integers(NUM_TEMPLATES))
    frame, style = _FRAMES[template // len(_OBJECT_STYLES)], _OBJECT_STYLES[template % len(_OBJECT_STYLES)]
    phrases = [style.format(a_size=_a(o.size), a_colour=_a(o.colour), size=o.size, colour=o.colour, shape=o.shape)
               for o in scene.objects]
    fields = dict(obj=phrases[0], bg=scene.background, a_bg=f"{_a(scene.background)} {scene.background}")
    if scene.relation is None:
        return frame[0].format(pos=_POSITION_PHRASES[scene.objects[0].position], **fields)
    return frame[1].format(rel=scene.relation, obj2=phrases[1], **fields)


def _parse_object(words: list[str], text: str) -> tuple[str, str, str]:
    found = []
    for vocab in (SHAPES, COLOURS, SIZES):
        hits = [w for w in words if w in vocab]
        if len(hits) != 1:
            raise InputError(f"cannot parse {text!r}: an object needs exactly one of {list(vocab)}, found {hits}")
        found.append(hits[0])
    return found[0], found[1], found[2]


def parse_caption(text: str) -> Scene:
    """The `Scene` a caption describes (layout_seed None); inverse of `caption` for every template.

    Word-based: the colour right before "background" is the background; "left of" / "right of" / "above" /
    "below" splits two objects; otherwise one of left/right/top/bottom/centre is the position. Other words
    are ignored. Raises ValueError when an attribute is missing or ambiguous.
    """
    words = re.findall(r"[a-z]+", text.lower())
    bg = [i for i in range(1, len(words)) if words[i] == "background" and words[i - 1] in COLOURS]
    if len(bg) != 1:
        raise InputError(f"cannot parse {text!r}: it needs exactly one '<colour> background'")
    background, words = words[bg[0] - 1], words[:bg[0] - 1] + words[bg[0] + 1:]
    rels = [(i, 2) for i in range(len(words) - 1) if words[i] in ("left", "right") and words[i + 1] == "of"]
    rels += [(i, 1) for i, w in enumerate(words) if w in ("above", "below")]
    positions = [w for w in words if w in POSITIONS]
    if len(rels) > 1 or (rels and len(positions) > sum(n == 2 for _, n in rels)):
        raise InputError(f"cannot parse {text!r}: ambiguous relation / position words")
    if rels:
        (i, n), = rels
        objects = tuple(Obj(*_parse_object(part, text)) for part in (words[:i], words[i + n:]))
        return Scene(background, objects, " ".join(words[i:i + n]))
    if len(positions) != 1:
        raise InputError(f"cannot parse {text!r}: one object needs exactly one of {list(POSITIONS)}")
    return Scene(background, (Obj(*_parse_object(words, text), positions[0]),))


HARD_NEGATIVE_KINDS = ("shape", "place", "size")


def parse_hard_negative_kinds(spec: str) -> tuple[str, ...]:
    """"shape,place,place" -> ("shape", "place", "place"); ValueError when empty or a kind is not in
    HARD_NEGATIVE_KINDS (a kind listed twice is drawn twice as often by `hard_negative`)."""
    return _checked_kinds(tuple(k.strip() for k in spec.split(",") if k.strip()))


def _checked_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    if not kinds or set(kinds) - set(HARD_NEGATIVE_KINDS):
        raise InputError(f"hard negative kinds {kinds} must be among {HARD_NEGATIVE_KINDS}")
    return kinds


def hard_negative(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] = HARD_NEGATIVE_KINDS) -> Scene:
    """``scene`` with exactly one of its shapes, positions / relation ("place") or sizes changed (the kind picked by
    ``rng`` among ``kinds``): a caption a contrastive model can only tell apart by reading that word (colours and
    background, which random in-batch negatives already separate, stay). Never one with a held-out (shape, colour)
    pair."""
    _checked_kinds(kinds)
    for _ in range(100):
        negative = _one_attribute_changed(scene, rng, str(rng.choice(kinds)))
        if not negative.held_out_pairs():
            return negative
    raise InputError(f"no hard negative of {scene} without a held-out pair")


def _one_attribute_changed(scene: Scene, rng: np.random.Generator, kind: str) -> Scene:
    """``scene`` with one object's shape or size, or the position / relation, changed (``kind`` in
    HARD_NEGATIVE_KINDS)."""
    objs = list(scene.objects)
    other = lambda vocab, v: vocab[(vocab.index(v) + 1 + int(rng.integers(len(vocab) - 1))) % len(vocab)]
    k = int(rng.integers(len(objs)))
    if kind == "shape":
        objs[k] = dataclasses.replace(objs[k], shape=other(SHAPES, objs[k].shape))
    elif kind == "size":
        objs[k] = dataclasses.replace(objs[k], size=other(SIZES, objs[k].size))
    elif scene.relation is not None:
        return dataclasses.replace(scene, relation=other(RELATIONS, scene.relation), layout_seed=None)
    else:
        objs[0] = dataclasses.replace(objs[0], position=other(POSITIONS, objs[0].position))
    return dataclasses.replace(scene, objects=tuple(objs), layout_seed=None)


def layout(scene: Scene, resolution: int = 64) -> list[tuple[float, float, float]]:
    """Per object ``(cx, cy, r)`` in pixels of a ``resolution`` image (x right, y down): the object lies in
    the box ``[cx - r, cx + r] x [cy - r, cy + r]`` and covers ``(cx, cy)``. Large objects: r ~ 0.2 R."""
    rng = None if scene.layout_seed is None else np.random.default_rng(scene.layout_seed)
    jitter = (lambda a: 0.0) if rng is None else (lambda a: float(rng.uniform(-a, a)))
    if scene.relation is None:
        position = scene.objects[0].position
        along, across = {"left": (0.02, 0.10), "right": (0.02, 0.10), "top": (0.10, 0.02),
                         "bottom": (0.10, 0.02), "centre": (0.04, 0.04)}[position]
        anchors, spreads = [_SINGLE_ANCHOR[position]], [(along, across)]
    else:
        anchors = _PAIR_ANCHORS[scene.relation]
        spreads = [(0.02, 0.12) if scene.relation in ("left of", "right of") else (0.12, 0.02)] * 2
    boxes = []
    for obj, (x, y), (sx, sy) in zip(scene.objects, anchors, spreads):
        r = _DIAMETER[obj.size] / 2 * (0.975 if rng is None else float(rng.uniform(0.9, 1.05)))
        boxes.append(((x + jitter(sx)) * resolution, (y + jitter(sy)) * resolution, r * resolution))
    return boxes


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "cross":
        t = 0.32 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        if shape == "triangle":
            points = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        elif shape == "diamond":
            points = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        else:
            angles = -np.pi / 2 + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
            points = list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
        draw.polygon([(float(px), float(py)) for px, py in points], fill=fill)


def render(scene: Scene, resolution: int = 64, supersample: int = 4) -> np.ndarray:
    """The scene as a [resolution, resolution, 3] uint8 RGB array: drawn with PIL at ``supersample`` x the
    resolution, then box-filtered down (anti-aliased edges; object interiors keep their exact colour)."""
    size = resolution * supersample
    img = Image.new("RGB", (size, size), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy, r) in zip(scene.objects, layout(scene, resolution)):
        _draw_object(draw, obj.shape, cx * supersample, cy * supersample, r * supersample, COLOURS[obj.colour])
    if supersample > 1:
        img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
    """tfds builder of the first ``num_examples`` scenes of the training stream; use `prepare_shapes_dataset`.

    Example record: {"image": b"\\x89PNG...", "caption": "a small red circle on the left, blue background",
    "file": "shapes_0000000"}, the same features as `jaxlcd.data.folder.FolderCaptions`.
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PNG renders of sample_scene(seed, i) + caption(scene, seed, i) + file name."}
    code_path = None  # see FolderCaptions

    def __init__(self, *, num_examples: int, resolution: int, seed: int, **kwargs):
        self._num_examples, self._resolution, self._seed = num_examples, resolution, seed
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural shapes scenes (jaxlcd demo world), held-out (shape, colour) pairs excluded.",
            features=image_caption_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(self._num_examples):
            scene = sample_scene(self._seed, i)
            yield i, {"image": _png(render(scene, self._resolution)), "caption": caption(scene, self._seed, i),
                      "file": f"shapes_{i:07d}"}
        self.info.metadata.update({"count": self._num_examples, "resolution": self._resolution,
                                   "seed": self._seed, "builder": BUILDER_NAME})


def prepare_shapes_dataset(out_dir: str, *, num_examples: int, resolution: int = 64, seed: int = 0,
                           overwrite: bool = False) -> dict:
    """Write scenes 0 .. num_examples - 1 of `sample_scene(seed, .)` as an array_record tfds dataset in
    ``out_dir/shapes/1.0.0`` (PNG ``image``, ``caption`` of a (seed, index)-chosen template, ``file``
    ``shapes_0000042``); read it with ``make_train_iterator(version_dir(out_dir, "shapes"), ...)``.

    Returns ``{"count", "resolution", "seed", "builder"}`` (also saved as ``metadata.json``). An existing
    dataset with the same parameters is reused unless ``overwrite``; one with other parameters raises
    ValueError unless ``overwrite``.
    """
    if num_examples <= 0 or resolution <= 0:
        raise InputError(f"num_examples ({num_examples}) and resolution ({resolution}) must be > 0")
    target = os.path.join(out_dir, BUILDER_NAME, str(Shapes.VERSION))
    wanted = {"count": num_examples, "resolution": resolution, "seed": seed, "builder": BUILDER_NAME}
    if os.path.isfile(os.path.join(target, "metadata.json")) and not overwrite:
        with open(os.path.join(target, "metadata.json"), encoding="utf-8") as f:
            stats = json.load(f)
        if stats != wanted:
            raise InputError(f"{target} holds a shapes dataset with {stats}, not {wanted}; pass overwrite=True")
        log.info("reusing the prepared shapes dataset in %s", target)
        return stats
    if os.path.isdir(target):
        shutil.rmtree(target)
    builder = Shapes(num_examples=num_examples, resolution=resolution, seed=seed, data_dir=out_dir,
                     file_format="array_record")
    builder.download_and_prepare()
    for empty in ("downloads/extracted", "downloads"):
        try:
            os.rmdir(os.path.join(out_dir, empty))
        except OSError:
            pass
    log.info("prepared %d shapes scenes at %d px in %s", num_examples, resolution, version_dir(out_dir, BUILDER_NAME))
    return dict(builder.info.metadata)


def make_shapes_iterator(data_root: str, *, num_examples: int, resolution: int, seed: int, tokenizer,
                         batch_size_per_host: int):
    """Prepare (or reuse) the shapes dataset in ``data_root`` and return the grain `TrainIterator` over it
    (batches as `jaxlcd.data.make_train_iterator`: "pixels" [B,R,R,3] float32 in [-1,1], "input_ids", "caption")."""
    from jaxlcd.data.pipeline import make_train_iterator

    prepare_shapes_dataset(data_root, num_examples=num_examples, resolution=resolution, seed=seed)
    return make_train_iterator(version_dir(data_root, BUILDER_NAME), tokenizer=tokenizer, resolution=resolution,
                               batch_size_per_host=batch_size_per_host, seed=seed)
