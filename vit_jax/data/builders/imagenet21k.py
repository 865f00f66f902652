"""`imagenet21k`: ImageNet-21k (fall 2011 release, 21,843 classes in the paper) from your downloaded archive.

ImageNet cannot be downloaded automatically: get it from image-net.org and point `--manual_dir` at one of
  MANUAL/n00004475/*.JPEG ...          one folder per synset (WordNet id)
  MANUAL/n00004475.tar ...             one tar per synset (as image-net.org serves them)
  MANUAL/fall11_whole.tar              the whole release: a tar of per-synset tars (or of synset folders)
An optional MANUAL/synsets.txt (one WordNet id a line, e.g. the 21,843 ids of the released ViT checkpoints)
fixes the class ids; otherwise they are the sorted synsets found.

ImageNet-21k has no official validation split: about 1% of each class, chosen by a hash of the file name
(so the same under every layout), is `validation`; the rest is `train`. Image bytes are stored unchanged.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

from vit_jax.data.errors import DatasetError

_SYNSET = re.compile(r"n\d{8}")
VALIDATION_PERCENT = 1


def is_validation(file_name: str) -> bool:
    """The held-out ~1%: decided by a CRC of the image's base name, independent of archive layout."""
    return zlib.crc32(os.path.basename(file_name).encode()) % 100 < VALIDATION_PERCENT


def _synset_of(member_name: str) -> str | None:
    for part in reversed(re.split(r"[/\\]", member_name)):
        match = _SYNSET.fullmatch(part.split(".")[0])
        if match and (part == match.group(0) or part.endswith(".tar")):
            return match.group(0)
    return None


def _is_image(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg", ".png"))


def _outer_archives(manual_dir: str) -> list[str]:
    return sorted(os.path.join(manual_dir, n) for n in os.listdir(manual_dir)
                  if n.endswith((".tar", ".tar.gz", ".tgz")) and not _SYNSET.fullmatch(n.split(".")[0]))


def _iter_tar_images(tar: tarfile.TarFile, synset: str | None, want) -> Iterator[tuple[str, str, bytes]]:
    """(synset, file name, bytes) of the images of an open tar; nested per-synset tars are opened in turn."""
    for member in tar:
        if not member.isfile():
            continue
        if member.name.endswith(".tar"):
            inner_synset = _synset_of(member.name)
            with tarfile.open(fileobj=tar.extractfile(member), mode="r|") as inner:
                yield from _iter_tar_images(inner, inner_synset, want)
        elif _is_image(member.name):
            member_synset = synset or _synset_of(os.path.dirname(member.name))
            if member_synset and want(member.name):
                yield member_synset, os.path.basename(member.name), tar.extractfile(member).read()


def iter_images(manual_dir: str, want) -> Iterator[tuple[str, str, bytes]]:
    """(synset, file name, bytes) of every image under `manual_dir` whose name passes `want`, in any layout."""
    for entry in sorted(os.listdir(manual_dir)):
        path = os.path.join(manual_dir, entry)
        if os.path.isdir(path) and _SYNSET.fullmatch(entry):
            for name in sorted(os.listdir(path)):
                if _is_image(name) and want(name):
                    with open(os.path.join(path, name), "rb") as f:
                        yield entry, name, f.read()
        elif entry.endswith(".tar") and _SYNSET.fullmatch(entry[:-4]):
            with tarfile.open(path, mode="r|") as tar:
                yield from _iter_tar_images(tar, entry[:-4], want)
    for archive in _outer_archives(manual_dir):
        with tarfile.open(archive, mode="r|*") as tar:
            yield from _iter_tar_images(tar, None, want)


def find_synsets(manual_dir: str) -> list[str]:
    """The class list: MANUAL/synsets.txt if present, else every synset found (folders, tars, archive members)."""
    listed = os.path.join(manual_dir, "synsets.txt")
    if os.path.exists(listed):
        with open(listed, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    found = {entry.split(".")[0] for entry in os.listdir(manual_dir) if _SYNSET.fullmatch(entry.split(".")[0])
             and (os.path.isdir(os.path.join(manual_dir, entry)) or entry.endswith(".tar"))}
    for archive in _outer_archives(manual_dir):
        with tarfile.open(archive, mode="r|*") as tar:
            found.update(s for s in (_synset_of(m.name) for m in tar) if s)
    return sorted(found)


class Imagenet21k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ImageNet-21k from a manually downloaded archive; `train` and a hashed ~1% `validation`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, manual_dir: str, **kwargs):
        if not manual_dir or not os.path.isdir(manual_dir):
            raise DatasetError(f"imagenet21k needs --manual_dir (config.tfds_manual_dir) = the folder holding your "
                               f"downloaded ImageNet-21k archive; {manual_dir!r} is not a directory")
        self._manual_dir = manual_dir
        self._synsets = find_synsets(manual_dir)
        if not self._synsets:
            raise DatasetError(f"no ImageNet-21k synsets (n########/ folders, n########.tar or a whole-release .tar) "
                               f"found in {manual_dir}")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ImageNet-21k (fall 2011), prepared from a manually downloaded archive.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=self._synsets),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(validation=False),
                "validation": self._generate_examples(validation=True)}

    def _generate_examples(self, validation: bool):
        known = set(self._synsets)

        def want(name: str) -> bool:
            return is_validation(name) == validation

        for synset, name, image in iter_images(self._manual_dir, want):
            if synset not in known:
                raise DatasetError(f"synset {synset} of {name} is not in {self._manual_dir}/synsets.txt")
            yield f"{synset}/{name}", {"image": image, "label": synset, "file_name": name}
