from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.bundle import Truncation
from training.batches import length_bucketed_batches, pad_batch
from training.config import ModelConfig, TrainConfig
from training.errors import ConfigError
from training.model import SentimentRNN
from training.train import adversarial_loss, average_states

EMBEDDINGS = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)


def _reviews() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(2, 50, size=n).astype(np.int32) for n in (9, 4, 1, 0, 7)]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("pooling", ["last", "concat"])
def test_scripted_batched_and_single_answers_agree(
    cell: str, bidirectional: bool, pooling: str, tmp_path: Path
):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, layers=2, hidden=5, bidirectional=bidirectional, pooling=pooling)  # type: ignore[arg-type]
    model = SentimentRNN(cfg, EMBEDDINGS).eval()
    torch.jit.script(model).save(str(tmp_path / "model.pt"))
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    reviews = _reviews()
    ids, lengths = pad_batch(reviews, Truncation.keep(8, 3))
    wider = torch.cat([ids, torch.zeros(len(reviews), 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        batched = model(ids, lengths)
        one_by_one = torch.cat([model(*pad_batch([r], Truncation.keep(8, 3))) for r in reviews])
        torch.testing.assert_close(scripted(ids, lengths), batched, rtol=0, atol=0)
        torch.testing.assert_close(one_by_one, batched, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(wider, lengths), batched, rtol=0, atol=1e-6)
        # The two halves the bundle exports compose to forward, scripted as well as eager.
        halves = scripted.forward_embedded(scripted.embed(ids), lengths)
        torch.testing.assert_close(halves, batched, rtol=0, atol=0)
        # Each layer's two directions on two threads: the same arithmetic, the same logits (a
        # fork that read the wrong input or rejoined the halves out of order would differ).
        torch.testing.assert_close(scripted.forward_forked(ids, lengths), batched, rtol=0, atol=0)
    assert torch.isfinite(batched).all()


def test_embeddings_start_from_the_given_matrix():
    model = SentimentRNN(ModelConfig(), EMBEDDINGS)
    np.testing.assert_array_equal(model.embedding.weight.detach().numpy(), EMBEDDINGS)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ModelConfig(cell="transformer"), "unknown cell type 'transformer'"),  # type: ignore[arg-type]
        (lambda: ModelConfig(dropout=1.5), "dropout must be in"),
        (lambda: ModelConfig(layers=0), "must be positive"),
        (lambda: TrainConfig(name="../escape"), "invalid bundle name"),
        (lambda: TrainConfig(freeze_embeddings_epochs=-2), "-1 or more"),
        (lambda: TrainConfig(max_len=10, head_len=11), "head_len must be in"),
        (lambda: TrainConfig(average_top=0), "at least 1"),
    ],
)
def test_bad_hyper_parameters_are_refused(factory, message: str):
    with pytest.raises(ConfigError, match=message):
        factory()


def test_pad_batch_applies_the_truncation_rule_and_pads_right():
    seqs = [np.array([5, 6, 7, 8]), np.array([9]), np.array([], np.int32)]
    ids, lengths = pad_batch(seqs, Truncation.keep(3, 3))
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]]
    assert pad_batch(seqs, Truncation.keep(3, 1))[0].tolist() == [[5, 7, 8], [9, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]


def test_length_bucketed_batches_cover_everything_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    batches = length_bucketed_batches(lengths, 10, np.random.default_rng(1), bucket_batches=100)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 20  # random batches of 10 would spread over ~400
    again = length_bucketed_batches(lengths, 10, np.random.default_rng(1), bucket_batches=100)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_average_states_means_float_weights_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5)}
    averaged = average_states([a, b])
    assert averaged["w"].tolist() == [2.0, 4.0]
    assert averaged["steps"].item() == 3


def test_adversarial_loss_adds_the_loss_one_step_up_the_gradient_of_each_text():
    """If this fails, `train --adv-epsilon` and `finetune` fit their batches at the wrong
    offset (not along the gradient, or not scale per text), or cannot back-propagate to the
    word vectors through the offset."""
    torch.manual_seed(0)
    weights = torch.randn(4)
    embedded = torch.randn(3, 5, 4, requires_grad=True)
    seen: list[torch.Tensor] = []

    def fit(vectors: torch.Tensor) -> torch.Tensor:
        seen.append(vectors.detach().clone())
        return (vectors * weights).sum(dim=(1, 2)).sigmoid().sum()

    loss = adversarial_loss(fit, embedded, scale=0.5)
    clean, moved = seen
    offset = moved - clean
    assert torch.allclose(offset.flatten(1).norm(dim=1), torch.full((3,), 0.5))
    # The loss grows with every vector's dot product with `weights`: the offset points that way.
    assert (offset * weights).sum(dim=2).gt(0).all()
    assert loss.item() > fit(embedded).item()
    loss.backward()
    assert embedded.grad is not None
    assert embedded.grad.abs().sum() > 0
