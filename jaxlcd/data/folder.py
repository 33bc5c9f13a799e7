"""A tfds builder (array_record, no TensorFlow needed) for a local folder of captioned images.

Input layout (``src_dir``, searched recursively; extensions .jpg .jpeg .png .webp, any case):
  * sidecar captions: ``cat.png`` + ``cat.txt`` (UTF-8, surrounding whitespace stripped); or
  * ``src_dir/captions.jsonl`` with lines ``{"file": "sub/cat.png", "caption": "a cat"}`` (``file``
    relative to ``src_dir``). When captions.jsonl exists it is the only caption source.

Output: ``out_dir/folder_captions/1.0.0/`` in the standard tfds layout (``dataset_info.json``,
``features.json``, ``metadata.json``, ``folder_captions-train.array_record-XXXXX-of-YYYYY``), one
split ``train`` with features ``image`` (the encoded file bytes exactly as stored; read with
``decoders={"image": tfds.decode.SkipDecoding()}``), ``caption`` (text) and ``file`` (relative path).
``metadata.json`` holds the preparation stats (see `prepare_folder_dataset`).

Bad data never raises: corrupt or unreadable images, images without a caption, empty captions,
jsonl lines naming missing files and malformed jsonl lines are skipped, counted by reason and
summarised with one ``logging.warning``. Only "nothing usable at all" raises a ValueError.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter

import tensorflow_datasets as tfds
from PIL import Image
from jaxlcd.errors import InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTIONS_JSONL = "captions.jsonl"
BUILDER_NAME = "folder_captions"
SKIP_REASONS = ("corrupt_image", "unreadable_image", "missing_caption", "empty_caption", "missing_image",
                "bad_jsonl_line")


def _check_image(data: bytes) -> str | None:
    """None when ``data`` decodes with PIL (header CRCs via verify(), then a full decode), else a reason."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return None
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, bomb errors, ...)
        return "corrupt_image"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _scan(src_dir: str, skipped: Counter) -> list[tuple[str, str]]:
    """[(relative image path, caption)] of every image with a non-empty caption, sorted by path."""
    images = []
    for root, dirs, files in os.walk(src_dir):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.relpath(os.path.join(root, name), src_dir))
    jsonl = os.path.join(src_dir, CAPTIONS_JSONL)
    pairs = []
    if os.path.isfile(jsonl):
        captions = {}
        with open(jsonl, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    rel, caption = os.path.normpath(entry["file"]), entry["caption"]
                    if not isinstance(caption, str):
                        raise TypeError("caption must be a string")
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped["bad_jsonl_line"] += 1
                    continue
                captions[rel] = caption
        present = set(images)
        skipped["missing_image"] += sum(1 for rel in captions if rel not in present)
        for rel in images:
            if rel not in captions:
                skipped["missing_caption"] += 1
            else:
                pairs.append((rel, captions[rel]))
    else:
        for rel in images:
            txt = os.path.splitext(os.path.join(src_dir, rel))[0] + ".txt"
            if not os.path.isfile(txt):
                skipped["missing_caption"] += 1
                continue
            try:
                with open(txt, encoding="utf-8") as f:
                    pairs.append((rel, f.read()))
            except (OSError, UnicodeDecodeError):
                skipped["missing_caption"] += 1
    kept = []
    for rel, caption in pairs:
        if not caption.strip():
            skipped["empty_caption"] += 1
        else:
            kept.append((rel, caption.strip()))
    return kept


def image_caption_features() -> tfds.features.FeaturesDict:
    """The features of every jaxlcd image-caption builder: encoded ``image`` bytes (passed through unchanged),
    ``caption`` and ``file`` text."""
    return tfds.features.FeaturesDict({"image": tfds.features.Image(), "caption": tfds.features.Text(),
                                       "file": tfds.features.Text()})


class FolderCaptions(tfds.core.GeneratorBasedBuilder):
    """tfds builder over a pre-scanned list of (image path, caption); use `prepare_folder_dataset`.

    Example record: {"image": b"\\x89PNG...", "caption": "a red circle", "file": "img_0001.png"}.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded image bytes as stored + caption + relative file path."}
    # tfds looks up the builder's source file (only to find download checksums, which a local folder has
    # none of); for a builder inside a package that lookup needs the importlib_resources package.
    code_path = None

    def __init__(self, *, src_dir: str, pairs: list[tuple[str, str]], skipped: Counter, **kwargs):
        self._src_dir, self._pairs, self._skipped = src_dir, pairs, skipped
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Captioned images from the local folder {self._src_dir}.",
            features=image_caption_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        count = 0
        for rel, caption in self._pairs:
            data = _read(os.path.join(self._src_dir, rel))
            if data is None:
                self._skipped["unreadable_image"] += 1
                continue
            count += 1
            yield rel, {"image": data, "caption": caption, "file": rel}
        if count == 0:
            raise InputError(_no_usable_message(self._src_dir, self._skipped))
        self.info.metadata.update(_stats(count, self._skipped, self._src_dir))


def _stats(count: int, skipped: Counter, src_dir: str) -> dict:
    return {"count": count, "skipped": {r: int(skipped.get(r, 0)) for r in SKIP_REASONS},
            "src_dir": os.path.abspath(src_dir)}


def _no_usable_message(src_dir: str, skipped: Counter) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items()) if n) or "no images found"
    return (f"no usable image-caption pair in {src_dir!r} ({reasons}): it needs .jpg/.jpeg/.png/.webp images "
            f"with a non-empty sidecar .txt caption each, or a {CAPTIONS_JSONL} of "
            '{"file": ..., "caption": ...} lines')


def version_dir(data_dir: str, builder_name: str = BUILDER_NAME) -> str:
    """The prepared dataset folder (the one holding dataset_info.json) for ``data_dir``, which may be
    the ``out_dir`` given to `prepare_folder_dataset` or that folder itself; ``builder_name`` picks
    another builder's dataset in ``out_dir`` (e.g. ``"shapes"``, see `jaxlcd.demo.shapes`). The newest
    version is taken. Raises ValueError if none."""
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    root = os.path.join(data_dir, builder_name)
    versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])  # not "incomplete.*" leftovers
                if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isfile(os.path.join(root, v, "dataset_info.json"))]
    if not versions:
        prepare = ("prepare_folder_dataset(src_dir, out_dir)" if builder_name == BUILDER_NAME
                   else f"prepare_{builder_name}_dataset(out_dir, ...)")
        raise InputError(f"no prepared dataset in {data_dir!r}: run jaxlcd.data.{prepare} and pass out_dir")
    return os.path.join(root, max(versions, key=tfds.core.Version))


def read_prepare_stats(data_dir: str) -> dict:
    """The stats dict `prepare_folder_dataset` returned, read back from ``metadata.json``."""
    with open(os.path.join(version_dir(data_dir), "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def prepare_folder_dataset(src_dir: str, out_dir: str, *, overwrite: bool = False,
                           verify_images: bool = True) -> dict:
    """Write the array_record tfds dataset for ``src_dir`` under ``out_dir`` and return its stats.

    Returns ``{"count": int, "skipped": {reason: int for reason in SKIP_REASONS}, "src_dir": str}``
    (also saved as ``metadata.json``). An existing prepared dataset in ``out_dir`` is reused
    (stats read back) unless ``overwrite``. ``verify_images=False`` skips the PIL decode check (faster;
    bad images are then skipped at read time by the pipeline instead).
    Raises ValueError when ``src_dir`` is not a folder or holds no usable image-caption pair.
    """
    if not os.path.isdir(src_dir):
        raise InputError(f"image folder {src_dir!r} does not exist; pass a folder of images with captions")
    target = os.path.join(out_dir, BUILDER_NAME, str(FolderCaptions.VERSION))
    if os.path.isfile(os.path.join(target, "metadata.json")) and not overwrite:
        log.info("reusing the prepared dataset in %s (pass overwrite=True to rebuild)", target)
        return read_prepare_stats(target)
    if os.path.isdir(target):
        shutil.rmtree(target)
    skipped: Counter = Counter()
    pairs = _scan(src_dir, skipped)
    if verify_images:  # check before tfds starts writing, so "nothing usable" fails cleanly
        good = []
        for rel, caption in pairs:
            data = _read(os.path.join(src_dir, rel))
            reason = "unreadable_image" if data is None else _check_image(data)
            if reason:
                skipped[reason] += 1
            else:
                good.append((rel, caption))
        pairs = good
    if not pairs:
        raise InputError(_no_usable_message(src_dir, skipped))
    builder = FolderCaptions(src_dir=src_dir, pairs=pairs, skipped=skipped, data_dir=out_dir,
                             file_format="array_record")
    builder.download_and_prepare()
    for empty in ("downloads/extracted", "downloads"):  # tfds creates these; a local folder downloads nothing
        try:
            os.rmdir(os.path.join(out_dir, empty))
        except OSError:
            pass
    stats = dict(builder.info.metadata)
    if any(stats["skipped"].values()):
        log.warning("prepared %d image-caption pairs from %s; skipped %s", stats["count"], src_dir,
                    ", ".join(f"{n} {r}" for r, n in stats["skipped"].items() if n))
    else:
        log.info("prepared %d image-caption pairs from %s", stats["count"], src_dir)
    return stats
