from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REVIEWS_PER_FOLDER
from training.data import load_imdb, stratified_split
from training.errors import DataError

REAL_TARBALL = Path(__file__).resolve().parents[2] / "../shared/data/aclImdb_v1.tar.gz"


def test_tarball_and_folder_give_the_same_reviews(
    imdb_dir: Path, imdb_tarball: Path, tmp_path: Path
):
    from_tar = load_imdb(str(imdb_tarball), tmp_path)
    from_dir = load_imdb(str(imdb_dir), tmp_path)
    from_inner_dir = load_imdb(str(imdb_dir / "aclImdb"), tmp_path)
    for split in ("train", "test"):
        assert from_tar[split].texts == from_dir[split].texts == from_inner_dir[split].texts
        np.testing.assert_array_equal(from_tar[split].labels, from_dir[split].labels)
    # 40 per folder plus one empty review; unsup/ and the .feat files are not reviews.
    assert len(from_tar["train"]) == 4 * REVIEWS_PER_FOLDER // 2 + 1
    assert from_tar["train"].labels.sum() == REVIEWS_PER_FOLDER + 1
    assert "" in from_tar["train"].texts
    assert not any("unlabelled" in t for t in from_tar["train"].texts)
    assert any("naïve" in t or "Amélie" in t for t in from_tar["train"].texts)


def test_missing_path_names_the_path_and_the_accepted_sources(tmp_path: Path):
    with pytest.raises(DataError, match=r"not found at .*nowhere.*tar\.gz.*aclImdb/ folder"):
        load_imdb(str(tmp_path / "nowhere"), tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tarball_is_refused(imdb_tarball: Path, tmp_path: Path, damage: str):
    bad = tmp_path / "aclImdb_v1.tar.gz"
    data = imdb_tarball.read_bytes()
    bad.write_bytes(
        b"not a tarball at all" * 100 if damage == "garbage" else data[: len(data) // 2]
    )
    with pytest.raises(DataError, match="not a readable aclImdb tar archive"):
        load_imdb(str(bad), tmp_path)


def test_wrong_checksum_is_refused(imdb_tarball: Path, tmp_path: Path):
    with pytest.raises(DataError, match="checksum mismatch"):
        load_imdb(str(imdb_tarball), tmp_path, sha256="0" * 64)
    right = hashlib.sha256(imdb_tarball.read_bytes()).hexdigest()
    assert len(load_imdb(str(imdb_tarball), tmp_path, sha256=right)["test"]) > 0


def test_folder_without_the_official_layout_is_refused(tmp_path: Path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="official layout"):
        load_imdb(str(tmp_path), tmp_path)


@pytest.fixture
def http_folder(imdb_tarball: Path) -> Iterator[str]:
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(imdb_tarball.parent)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_download_is_verified_and_cached(http_folder: str, imdb_tarball: Path, tmp_path: Path):
    url = f"{http_folder}/{imdb_tarball.name}"
    sha = hashlib.sha256(imdb_tarball.read_bytes()).hexdigest()
    reviews = load_imdb(url, tmp_path, sha256=sha)
    assert len(reviews["test"]) == 2 * REVIEWS_PER_FOLDER + 1
    assert (tmp_path / "downloads" / imdb_tarball.name).is_file()


def test_download_with_wrong_checksum_leaves_nothing(http_folder: str, tmp_path: Path):
    with pytest.raises(DataError, match="checksum mismatch"):
        load_imdb(f"{http_folder}/aclImdb_v1.tar.gz", tmp_path, sha256="f" * 64)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_download_failure_is_a_data_error(http_folder: str, tmp_path: Path):
    with pytest.raises(DataError, match="could not download"):
        load_imdb(f"{http_folder}/missing.tar.gz", tmp_path)


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.array([0] * 300 + [1] * 100)
    train, val = stratified_split(labels, 0.1, seed=7)
    again_train, again_val = stratified_split(labels, 0.1, seed=7)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert set(train).isdisjoint(val)
    assert len(train) + len(val) == len(labels)
    assert (labels[val] == 0).sum() == 30
    assert (labels[val] == 1).sum() == 10
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=8)[1])


@pytest.mark.slow
@pytest.mark.skipif(not REAL_TARBALL.exists(), reason="shared IMDb tarball not present")
def test_real_tarball_has_the_official_splits(tmp_path: Path):
    reviews = load_imdb(str(REAL_TARBALL), tmp_path)
    for split in ("train", "test"):
        assert len(reviews[split]) == 25_000
        assert reviews[split].labels.sum() == 12_500
    assert any("<br />" in t for t in reviews["train"].texts[:200])
