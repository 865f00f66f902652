"""`imagenet21k`: ImageNet-21k (fall 2011 release, 21,843 classes in the paper) from your downloaded archive.

ImageNet cannot be downloaded automatically: get it from image-net.org and point `--manual_dir` at one of
  MANUAL/n00004475/*.JPEG ...          one folder per synset (WordNet id)
  MANUAL/n00004475.tar ...             one tar per synset (as image-net.org serves them)
  MANUAL/fall11_whole.tar              the whole release: a tar of per-synset tars (or of synset folders)
An optional MANUAL/synsets.txt (one WordNet id a line, each once, e.g. the 21,843 ids of the released ViT
checkpoints) fixes the class ids; otherwise they are the sorted synsets found. Each synset must be in one place: a
synset both as a folder and as a tar, or a whole-release tar left beside the n########.tar extracted from it, is
refused before preparing (its images would be read twice).

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

from vit_jax.data.builders.image_folder import read_names
from vit_jax.data.errors import DatasetError

_SYNSET = re.compile(r"n\d{8}")
VALIDATION_PERCENT = 1


def is_validation(file_name: str) -> bool:
    """The held-out ~1%: decided by a CRC of the image's base name, independent of archive layout."""
    return zlib.crc32(os.path.basename(file_name).encode()) % 100 < VALIDATION_PERCENT


def _synset_source(member_name: str) -> tuple[str, str] | None:
    """An archive member's synset and the synset folder or tar that holds it ('whole/n00000001.tar'), or None."""
    parts = re.split(r"[/\\]", member_name)
    for i in range(len(parts) - 1, -1, -1):
        match = _SYNSET.fullmatch(parts[i].split(".")[0])
        if match and (parts[i] == match.group(0) or parts[i].endswith(".tar")):
            return match.group(0), "/".join(parts[: i + 1])
    return None


def _synset_of(member_name: str) -> str | None:
    found = _synset_source(member_name)
    return found[0] if found else None


def _is_image(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg", ".png"))


def _outer_archives(manual_dir: str) -> list[str]:
    return sorted(os.path.join(manual_dir, n) for n in os.listdir(manual_dir)
                  if n.endswith((".tar", ".tar.gz", ".tgz")) and not _SYNSET.fullmatch(n.split(".")[0]))


def _top_level_sources(manual_dir: str) -> list[tuple[str, str]]:
    """(synset, path) of the synset folders MANUAL/n########/ and per-synset tars MANUAL/n########.tar, sorted."""
    found = []
    for entry in sorted(os.listdir(manual_dir)):
        path = os.path.join(manual_dir, entry)
        if os.path.isdir(path) and _SYNSET.fullmatch(entry):
            found.append((entry, path))
        elif entry.endswith(".tar") and _SYNSET.fullmatch(entry[:-4]) and os.path.isfile(path):
            found.append((entry[:-4], path))
    return found


def _entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries of `tar`, forgetting each once passed: tarfile keeps every entry it read in `tar.members` (~470 B
    each; ~6.6 GB per pass over a whole-release tar of synset folders, 14M files)."""
    for member in tar:
        tar.members = []  # tarfile's iterator reads on with next() once past the end of `members`
        yield member


def _iter_tar_images(tar: tarfile.TarFile, synset: str | None, want) -> Iterator[tuple[str, str, bytes]]:
    """(synset, file name, bytes) of the images of an open tar; nested per-synset tars are opened in turn."""
    for member in _entries(tar):
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
    for synset, path in _top_level_sources(manual_dir):
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if _is_image(name) and want(name):
                    with open(os.path.join(path, name), "rb") as f:
                        yield synset, name, f.read()
        else:
            with tarfile.open(path, mode="r|") as tar:
                yield from _iter_tar_images(tar, synset, want)
    for archive in _outer_archives(manual_dir):
        with tarfile.open(archive, mode="r|*") as tar:
            yield from _iter_tar_images(tar, None, want)


def _archive_sources(archive: str) -> dict[str, set[str]]:
    """Per synset, the folders and tars of it inside `archive`. Opened seekable, so an uncompressed archive is listed
    from its headers, skipping the file data (a stream would read all ~1.3 TB of the full release)."""
    found: dict[str, set[str]] = {}
    with tarfile.open(archive) as tar:
        for member in _entries(tar):
            source = _synset_source(member.name)
            if source:
                found.setdefault(source[0], set()).add(f"{archive} (member {source[1]})")
    return found


def find_sources(manual_dir: str, list_archives: bool = True) -> dict[str, list[str]]:
    """Per synset, where its images are: its folder, its tar, the folders and tars of it in whole-release archives
    (listed only when `list_archives`)."""
    sources: dict[str, list[str]] = {}
    for synset, path in _top_level_sources(manual_dir):
        sources.setdefault(synset, []).append(path)
    for archive in _outer_archives(manual_dir) if list_archives else []:
        for synset, paths in _archive_sources(archive).items():
            sources.setdefault(synset, []).extend(sorted(paths))
    return sources


def _check_one_source(sources: dict[str, list[str]], manual_dir: str) -> None:
    """Raise `DatasetError` for a synset found in two places: every image of it would be read twice, and TFDS
    would stop only after the whole split ("Two examples share the same hashed key")."""
    twice = sorted(synset for synset, paths in sources.items() if len(paths) > 1)
    if twice:
        first, second = sources[twice[0]][:2]
        others = f" (and {len(twice) - 1} more synsets in two places)" if len(twice) > 1 else ""
        raise DatasetError(f"synset {twice[0]} is in both {first} and {second}{others}: its images would be read "
                           f"twice. Keep one of them in {manual_dir} (delete or move the other out, e.g. a "
                           "whole-release archive once extracted)")


def find_synsets(manual_dir: str) -> list[str]:
    """The class list: MANUAL/synsets.txt if present, else every synset found (folders, tars, archive members).
    `DatasetError` for a synset listed twice in synsets.txt, or found in two places (see `_check_one_source`)."""
    listed = os.path.join(manual_dir, "synsets.txt")
    names = read_names(listed, "synset") if os.path.exists(listed) else None
    archives, top_level = _outer_archives(manual_dir), _top_level_sources(manual_dir)
    # A lone archive is taken to hold each synset once, and listing a compressed one is a pass over all of it: it is
    # listed when the classes come from it, or when another source may hold one of its synsets too.
    sources = find_sources(manual_dir, list_archives=names is None or len(archives) + len(top_level) > 1)
    _check_one_source(sources, manual_dir)
    return names if names is not None else sorted(sources)


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
