"""Where dataset files come from: the built-in registry, the user cache, downloads and the hub.

This module finds files and checks them; it does not parse them (that is `data.py`, which asks
here for paths). Where a built-in dataset's split files come from, in order:

1. the local mirror `$LORAFIT_DATA_DIR/<name>/`, when that folder exists: the user asked for it, so
   a file there that does not match the registry's sha256 (or is missing) is an error, never skipped;
2. the package itself (`lorafit/datasets/<name>/`), for datasets whose license allows shipping them
   (Banking77, CC-BY-4.0): the built-in name works offline with no set-up; a damaged file is an error;
3. the user cache (`$LORAFIT_CACHE_DIR`, default `~/.cache/lorafit`): a cached file that does not
   match is fetched again;
4. the canonical public source at a pinned commit or hub revision, checked before it enters the cache.

Every file is checked against the registry's sha256 every time it is read, wherever it comes from.
A hub dataset (`data.name=hf:<id>`) is materialised once as Parquet files in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import atomic
from .errors import UserError

__all__ = [
    "SPLITS",
    "RemoteFile",
    "BuiltinDataset",
    "BUILTINS",
    "PACKAGE_DATA",
    "BuiltinFile",
    "cache_dir",
    "sha256_of",
    "download",
    "fetch_builtin",
    "hub_folder",
]

log = logging.getLogger(__name__)

#: The splits a dataset can have; every source names its files by them.
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One split file of a built-in dataset, pinned by its sha256."""

    #: Its canonical public address (a pinned commit or revision); None: not downloadable, only
    #: read from a mirror or the package.
    url: str | None
    sha256: str
    #: Its name in a dataset folder (mirror, package, cache); None: "<split>.csv".
    name: str | None = None
    #: The file stores class i as the integer i: these are the class names (hub datasets do this).
    label_names: tuple[str, ...] = ()

    def file_name(self, split: str) -> str:
        return self.name or f"{split}.csv"


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    text_column: str
    label_column: str
    #: split -> its canonical file, with its checksum.
    files: dict[str, RemoteFile] = field(default_factory=dict)
    #: split -> another form of the same split accepted in a mirror, by its own checksum (emotion:
    #: the CSV export with class names, next to the hub's Parquet files with class numbers).
    mirror_files: dict[str, RemoteFile] = field(default_factory=dict)
    #: Shipped inside the package (lorafit/datasets/<name>/, with its license), so it works offline.
    packaged: bool = False
    description: str = ""


#: Data files shipped inside the package, one folder per built-in dataset (its license included).
PACKAGE_DATA = Path(__file__).parent / "datasets"

_POLYAI = "https://raw.githubusercontent.com/PolyAI-LDN/task-specific-datasets/57ec275d8078af65b7731c2a98be812d844a6d6b/banking_data"
# dair-ai/emotion's "split" configuration on the Hugging Face hub at a pinned revision (the Parquet
# files the hub serves; their checksums are those of that revision).
_EMOTION = "https://huggingface.co/datasets/dair-ai/emotion/resolve/cab853a1dbdf4c42c2b3ef2173804746df8825fe/split"
_EMOTION_CLASSES = ("sadness", "joy", "love", "anger", "fear", "surprise")


def _parquet(url: str, split: str, sha256: str, label_names: tuple[str, ...]) -> RemoteFile:
    return RemoteFile(f"{url}/{split}-00000-of-00001.parquet", sha256, f"{split}.parquet", label_names)


BUILTINS: dict[str, BuiltinDataset] = {
    "banking77": BuiltinDataset(
        name="banking77",
        text_column="text",
        label_column="category",
        files={
            "train": RemoteFile(f"{_POLYAI}/train.csv", "b06e26ac675513959a63135f11b94ea7786ed02da65db93a5650d8838cbc664b"),
            "test": RemoteFile(f"{_POLYAI}/test.csv", "d12d6e3bc4c3103966ae786dc435913c0c563dfa328f5a3646d0e62cfeeb474d"),
        },
        packaged=True,
        description="77 online-banking intents (Casanueva et al., 2020); 10,003 train / 3,080 test; CC-BY-4.0",
    ),
    "emotion": BuiltinDataset(
        name="emotion",
        text_column="text",
        label_column="label",
        files={
            "train": _parquet(_EMOTION, "train", "10817f0f2ea42358bc62f69a09dfb8bd71701727df6d5a387bea742f3ea06417", _EMOTION_CLASSES),
            "validation": _parquet(_EMOTION, "validation", "c70f0e660b5ebd1ea9a37d2a851f516f08a6d6477cdfc11be204e22a2f1102fd", _EMOTION_CLASSES),
            "test": _parquet(_EMOTION, "test", "6f8407fa1ca9c310f55781f082ed73812f6551e8dda2c61973123a121869245b", _EMOTION_CLASSES),
        },
        mirror_files={
            "train": RemoteFile(None, "ad257c9a95262698b4e6ebcd5562d6837f46e98e9c55d1f54e8e986444108428"),
            "validation": RemoteFile(None, "d8996132954cc6051bd53c2975c4c665c3a4bf67e0b5736718a1dc032dffb7a2"),
            "test": RemoteFile(None, "c2deeffa20ac778f47522d645fcacbdffb689a560e71ec73600816b10703860c"),
        },
        description="6 emotions of English tweets (Saravia et al., 2018); 16,000 / 2,000 / 2,000; "
                    "license unclear (research and education), so never shipped",
    ),
    # Mirror-only (no canonical download of these CSVs): the checksums are those of the CSV
    # conversions of the published splits, documented in each mirror folder's README.
    "snips": BuiltinDataset(
        name="snips",
        text_column="text",
        label_column="label",
        files={
            "train": RemoteFile(None, "19cabe085b195f5868d83456d62ce873a416c5a82addc449307475a16e1aa610"),
            "validation": RemoteFile(None, "e315c53769d216dde6e75b7b15581ee6a776345aeb78a5761bc3fc87ed5f910f"),
            "test": RemoteFile(None, "bf22736254d8e630145a85f40e9316b532a6d124141de75f9d6194bda7354e7b"),
        },
        description="7 voice-assistant intents (Coucke et al., 2018; split of Goo et al., 2018); 13,084 / 700 / 700; CC0-1.0",
    ),
    "trec6": BuiltinDataset(
        name="trec6",
        text_column="text",
        label_column="label",
        files={
            "train": RemoteFile(None, "d4067e99836e44937ae18cddc1a40fe7f9a1819132273a5515fe6984fe564522"),
            "test": RemoteFile(None, "a4b5bfb49557601109fb0f96d36e0aad3cb886990257d3b8683bc2d8a2697d4f"),
        },
        description="6 coarse question types (Li & Roth, 2002); 5,452 train / 500 test; research use",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE_DIR", Path.home() / ".cache" / "lorafit"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(remote: RemoteFile, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch `remote` to `dest` atomically; a checksum mismatch leaves nothing behind."""
    try:
        with atomic.file(dest) as tmp:
            with open(tmp, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            actual = sha256_of(tmp)
            if actual != remote.sha256:  # raised inside: atomic.file removes the temporary file
                raise UserError(f"download of {remote.url} is corrupt: sha256 {actual}, expected {remote.sha256}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UserError(
            f"cannot download {remote.url} ({getattr(e, 'reason', e)}); offline? put the files in "
            f"$LORAFIT_DATA_DIR/<dataset>/ (train.csv, test.csv) and set LORAFIT_DATA_DIR"
        ) from None
    return dest


@dataclass(frozen=True)
class BuiltinFile:
    """A split file of a built-in dataset, found and checked: where it is and what the registry says of it."""

    path: Path
    spec: RemoteFile


def fetch_builtin(spec: BuiltinDataset) -> dict[str, BuiltinFile]:
    """split -> its file, checked against the registry's sha256: mirror, else package, else cache,
    else download (see the module docstring)."""
    mirror = os.environ.get("LORAFIT_DATA_DIR")
    if mirror and (Path(mirror) / spec.name).is_dir():
        return _from_mirror(spec, Path(mirror) / spec.name)
    if spec.packaged:
        return {split: _checked(PACKAGE_DATA / spec.name / remote.file_name(split), remote,
                                "the copy shipped with lorafit is damaged; reinstall lorafit")
                for split, remote in spec.files.items()}
    if any(remote.url is None for remote in spec.files.values()):
        names = ", ".join(remote.file_name(split) for split, remote in spec.files.items())
        raise UserError(
            f"the built-in dataset {spec.name!r} has no public download; put its files ({names}) in "
            f"$LORAFIT_DATA_DIR/{spec.name}/ and set LORAFIT_DATA_DIR"
        )
    folder = cache_dir() / "datasets" / spec.name
    found: dict[str, BuiltinFile] = {}
    for split, remote in spec.files.items():
        target = folder / remote.file_name(split)
        damaged = ""
        if target.is_file():
            actual = sha256_of(target)
            if actual == remote.sha256:
                found[split] = BuiltinFile(target, remote)
                continue
            damaged = f"{target} does not match the sha256 in lorafit's registry ({actual}, expected {remote.sha256}); "
            log.warning("%sdownloading it again", damaged)
        log.info("downloading %s %s from %s", spec.name, split, remote.url)
        try:
            found[split] = BuiltinFile(download(remote, target), remote)
        except UserError as e:
            raise UserError(f"{damaged}{e}") from None
    return found


def _from_mirror(spec: BuiltinDataset, folder: Path) -> dict[str, BuiltinFile]:
    """Every split file of `spec` in the mirror folder, in its canonical or its accepted mirror form."""
    found: dict[str, BuiltinFile] = {}
    for split, remote in spec.files.items():
        forms = [remote] + ([spec.mirror_files[split]] if split in spec.mirror_files else [])
        present = [form for form in forms if (folder / form.file_name(split)).is_file()]
        if not present:
            names = " or ".join(form.file_name(split) for form in forms)
            raise UserError(
                f"$LORAFIT_DATA_DIR/{spec.name} ({folder}) has no {split} file ({names}) for the built-in "
                f"dataset {spec.name!r}; add it, or unset LORAFIT_DATA_DIR"
            )
        form = present[0]
        found[split] = _checked(folder / form.file_name(split), form,
                                "restore the original file, or unset LORAFIT_DATA_DIR to use another source")
    return found


def _checked(path: Path, remote: RemoteFile, fix: str) -> BuiltinFile:
    """`path` if its sha256 is the registry's, else one line saying what differs and `fix`."""
    try:
        actual = sha256_of(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}; {fix}") from None
    if actual != remote.sha256:
        raise UserError(f"{path} does not match the sha256 in lorafit's registry ({actual}, expected {remote.sha256}); {fix}")
    return BuiltinFile(path, remote)


def hub_folder(hub_id: str, label_column: str) -> Path:
    """The cache folder holding a hub dataset's splits as `<split>.parquet`, written on first use.

    Integer labels with class names in the hub's features are stored as the names. Each file is
    written atomically and train.parquet last, so its presence (what marks the folder as done) means
    the other splits are complete too; every training process may load at once, each file is whole.
    """
    folder = cache_dir() / "hub" / hub_id.replace("/", "__")
    if (folder / "train.parquet").is_file():
        return folder
    try:
        import datasets

        ds = datasets.load_dataset(hub_id)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load hub dataset {hub_id!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    aliases = {"valid": "validation", "val": "validation", "dev": "validation"}
    splits = [(aliases.get(name, name), split) for name, split in ds.items()]
    for name, split in sorted(splits, key=lambda item: item[0] == "train"):  # stable: train last
        if name not in SPLITS:
            continue
        frame = split.to_pandas()
        feature = split.features.get(label_column)
        if feature is not None and hasattr(feature, "names"):
            frame[label_column] = [feature.names[i] for i in frame[label_column]]
        with atomic.file(folder / f"{name}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
    return folder
