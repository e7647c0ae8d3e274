"""The IMDb Large Movie Review dataset (Maas et al., 2011) in its official layout.

Three sources are accepted: the official tarball (or a copy of it), an extracted ``aclImdb/``
folder, or the official URL, downloaded once into the cache and verified before use. Reviews are
sorted by (label, review id) so that every source yields the same order, whatever order the
archive or the file system lists them in.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service import bundle
from training.config import OFFICIAL_URL
from training.errors import DataError

OFFICIAL_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
LABELS = ("neg", "pos")  # index = label: 0 negative, 1 positive
SPLITS = ("train", "test")

# aclImdb/<split>/<neg|pos>/<id>_<rating>.txt; train/unsup/ and the bag-of-words files are skipped.
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(neg|pos)/(\d+)_(\d+)\.txt$")


@dataclass
class ReviewSet:
    """Reviews of one official split, in a stable order."""

    texts: list[str]
    labels: np.ndarray  # int64, 1 = positive

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> ReviewSet:
        return ReviewSet([self.texts[i] for i in index], self.labels[index])


def load_imdb(source: str, cache_dir: Path, sha256: str | None = None) -> dict[str, ReviewSet]:
    """Read the labelled train and test splits from a tarball, a folder or a URL."""
    if source.startswith(("http://", "https://")):
        path = download(source, cache_dir / "downloads", sha256 or _expected_sha(source))
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(
                f"IMDb data not found at {path}: pass --data with aclImdb_v1.tar.gz, an "
                f"extracted aclImdb/ folder, or the official URL {OFFICIAL_URL}"
            )
        if sha256 and path.is_file():
            verify_sha256(path, sha256)
    records = _read_folder(path) if path.is_dir() else _read_tarball(path)
    return _to_splits(records, path)


def _expected_sha(url: str) -> str | None:
    return OFFICIAL_SHA256 if url == OFFICIAL_URL else None


def verify_sha256(path: Path, expected: str) -> None:
    actual = bundle.sha256(path)
    if actual != expected.lower():
        raise DataError(f"checksum mismatch for {path}: SHA-256 is {actual}, expected {expected}")


def download(url: str, folder: Path, sha256: str | None) -> Path:
    """Download once into ``folder``; a partial or tampered file never takes the final name."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / url.rstrip("/").rsplit("/", 1)[-1]
    if target.exists() and (sha256 is None or bundle.sha256(target) == sha256):
        return target
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {target.name}"
            ) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}") from exc
    if sha256:
        try:
            verify_sha256(partial, sha256)
        except DataError:
            partial.unlink(missing_ok=True)
            raise
    shutil.move(partial, target)
    return target


Record = tuple[str, int, int, str]  # split, label, review id, text


def _read_tarball(path: Path) -> Iterator[Record]:
    try:
        with tarfile.open(path, "r:*") as archive:
            members = (m for m in archive if m.isfile() and _MEMBER.search(m.name))
            for member in tqdm(members, desc=f"read {path.name}", unit=" reviews"):
                match = _MEMBER.search(member.name)
                stream = archive.extractfile(member)
                if match is None or stream is None:
                    continue
                yield _record(match, stream.read())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{path} is not a readable aclImdb tar archive: {exc}") from exc


def _read_folder(path: Path) -> Iterator[Record]:
    root = path / "aclImdb" if (path / "aclImdb").is_dir() else path
    files = sorted(root.glob("*/*/*.txt"))
    for file in tqdm(files, desc=f"read {root}", unit=" reviews"):
        match = _MEMBER.search("aclImdb/" + file.relative_to(root).as_posix())
        if match:
            yield _record(match, file.read_bytes())


def _record(match: re.Match[str], raw: bytes) -> Record:
    split, label, review_id, _rating = match.groups()
    return split, LABELS.index(label), int(review_id), raw.decode("utf-8", errors="replace")


def _to_splits(records: Iterator[Record], path: Path) -> dict[str, ReviewSet]:
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for record in records:
        by_split[record[0]].append(record)
    result = {}
    for split, rows in by_split.items():
        rows.sort(key=lambda r: (r[1], r[2]))
        labels = np.array([r[1] for r in rows], dtype=np.int64)
        if len(rows) == 0 or labels.min() == labels.max():
            raise DataError(
                f"{path} holds no complete aclImdb/{split}/{{neg,pos}} reviews "
                "(expected the official layout)"
            )
        result[split] = ReviewSet([r[3] for r in rows], labels)
    return result


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, validation), each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = max(1, round(len(members) * val_fraction))
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def load_sentences(path: Path) -> ReviewSet:
    """A labelled sentence file: one ``text<TAB>label`` per line, label 0 (negative) or 1
    (positive), UTF-8 (the layout of UCI's Sentiment Labelled Sentences, e.g.
    imdb_labelled.txt). Blank lines are skipped; any other malformed line is refused by number."""
    try:
        # Split on newlines only: str.splitlines also breaks at U+0085 and U+2028, which occur
        # inside sentences (imdb_labelled.txt line 179: "The script is\x85was there a script?").
        lines = path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read sentence file {path}: {exc}") from exc
    texts, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text, _, label = line.rpartition("\t")
        if not text.strip() or label.strip() not in ("0", "1"):
            raise DataError(f"{path}:{number}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        texts.append(text.strip())
        labels.append(int(label))
    if len(set(labels)) < 2:
        raise DataError(f"{path} needs sentences of both labels, found {len(texts)} lines")
    return ReviewSet(texts, np.array(labels, dtype=np.int64))
