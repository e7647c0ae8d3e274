"""The model runtime on the exported tiny bundle, and on bundles that must not load (each
refusal names its file: an operator fixes the bundle from that message alone)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers

from service import bundle
from service import runtime as runtime_module
from service.bundle import BundleError
from service.runtime import Execution, ModelRuntime
from tests.service.conftest import corrupt_model_file, oversize_tokenizer

TEXTS = ["A great, moving film.", "Dull and clumsy, a waste.", "naïve Amélie 😀 " * 30]


@pytest.fixture(scope="module")
def runtime(trained_bundle: Path) -> ModelRuntime:
    return ModelRuntime.load(trained_bundle, "cpu")


def test_preprocess_cuts_long_texts_by_the_card_and_reports_the_original_length(
    runtime: ModelRuntime,
):
    short, _, long = runtime.preprocess(TEXTS)
    assert short.ids.dtype == np.int64
    assert short.original_tokens == len(short.ids) == 6
    full = runtime.tokenizer.encode(TEXTS[2]).ids
    assert long.original_tokens == len(full) > runtime.truncation.max_length == 32
    # The tiny bundle keeps the first 12 and the last 20 tokens.
    assert long.ids.tolist() == full[:12] + full[-20:]


def test_batched_inference_equals_one_text_at_a_time(runtime: ModelRuntime):
    seqs = [e.ids for e in runtime.preprocess(TEXTS)]
    batched = runtime.infer(seqs)
    singles = np.concatenate([runtime.infer([s]) for s in seqs])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-6)
    # The same numbers the TorchScript file gives when called directly.
    model = torch.jit.load(str(runtime.bundle.folder / "model.pt"))
    with torch.no_grad():
        direct = model(torch.tensor(seqs[0])[None], torch.tensor([len(seqs[0])]))
    np.testing.assert_allclose(batched[0], direct.numpy()[0], rtol=0, atol=1e-6)


def test_a_batch_runs_on_the_threads_the_scheduler_gives_it(trained_bundle: Path):
    """If this fails, the scheduler's threads per batch no longer reach the thread the model
    runs in: workers side by side would each take every core."""
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    seqs = [e.ids for e in runtime.preprocess(TEXTS)]
    before = torch.get_num_threads()
    try:
        expected = runtime.infer(seqs)
        for threads in (1, 3):
            logits = runtime.infer(seqs, Execution(threads))
            assert torch.get_num_threads() == threads
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
    finally:
        torch.set_num_threads(before)


def _entry_points_run(runtime: ModelRuntime, seqs: list[np.ndarray], how: Execution) -> set[str]:
    """The model's logits under ``how``, and whether the profiler saw a forked function."""
    with torch.profiler.profile() as profile:
        runtime.infer(seqs, how)
    return {event.name for event in profile.events()} & {"<forked function>", "forward_forked"}


def test_a_batch_told_to_fork_runs_the_forked_entry_point_and_the_same_logits(
    trained_bundle: Path,
):
    """If this fails, a lone request no longer gets the idle core (the GRU's directions one
    after the other: the profiler sees no forked function), or the forked entry point answers
    differently from ``forward``."""
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    seqs = [e.ids for e in runtime.preprocess(TEXTS)]
    before = torch.get_num_threads()
    try:
        sequential = runtime.infer(seqs, Execution(1))
        assert _entry_points_run(runtime, seqs, Execution(1)) == set()
        assert _entry_points_run(runtime, seqs, Execution(1, forked=True)) == {
            "<forked function>",
            "forward_forked",
        }
        np.testing.assert_allclose(
            runtime.infer(seqs, Execution(1, forked=True)), sequential, rtol=0, atol=0
        )
    finally:
        torch.set_num_threads(before)


def test_the_warm_up_runs_on_the_threads_and_entry_point_batches_will_use(
    trained_bundle: Path,
):
    """If this fails, the warm-up starts torch's inter-op threads on other intra-op threads than
    the batches': in the server a lone review then ran at half its rate."""
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    before = torch.get_num_threads()
    try:
        with torch.profiler.profile() as profile:
            runtime.warmup([(1, Execution(1, forked=True))])
        assert torch.get_num_threads() == 1
        assert "<forked function>" in {event.name for event in profile.events()}
        torch.set_num_threads(2)
        with torch.profiler.profile() as profile:
            runtime.warmup([(1, Execution(1))])  # a policy without the fork warms no fork
        assert "<forked function>" not in {event.name for event in profile.events()}
    finally:
        torch.set_num_threads(before)


def test_postprocess_applies_the_temperature(runtime: ModelRuntime):
    runtime_t = runtime.calibration.temperature
    (top, p), (other, q) = runtime.postprocess(2.0, 300)
    assert (top, other) == ("POSITIVE", "NEGATIVE")
    assert p == pytest.approx(1 / (1 + np.exp(-2.0 / runtime_t)))
    assert p + q == pytest.approx(1.0)
    assert runtime.postprocess(2.0, 300, "softmax") == runtime.postprocess(2.0, 300, "sigmoid")
    assert runtime.postprocess(-1.0, 300, "none") == [
        ("NEGATIVE", pytest.approx(1.0 / runtime_t)),
        ("POSITIVE", pytest.approx(-1.0 / runtime_t)),
    ]
    assert runtime.postprocess(-800.0, 300)[0] == ("NEGATIVE", 1.0)  # no overflow


def test_postprocess_takes_the_short_band_temperature_by_length(trained_bundle: Path):
    """If this fails, a sentence is scored with the reviews' temperature (or a review with the
    sentences'): the card's length bands are not applied."""
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    banded = runtime.calibration.model_copy(
        update={"temperature": 2.0, "short_temperature": 0.5, "short_max_tokens": 40}
    )
    runtime.calibration = banded
    short = dict(runtime.postprocess(1.0, 40, "none"))["POSITIVE"]
    long = dict(runtime.postprocess(1.0, 41, "none"))["POSITIVE"]
    assert (short, long) == (pytest.approx(2.0), pytest.approx(0.5))


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(bundle, target)
    return target


def test_missing_bundle_and_missing_files(trained_bundle: Path, tmp_path: Path):
    with pytest.raises(BundleError, match="not found"):
        ModelRuntime.load(tmp_path / "absent", "cpu")
    broken = _copy(trained_bundle, tmp_path)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"lacks tokenizer\.json"):
        ModelRuntime.load(broken, "cpu")


def test_corrupt_model_file(trained_bundle: Path, tmp_path: Path):
    broken = _copy(trained_bundle, tmp_path)
    corrupt_model_file(broken)
    with pytest.raises(BundleError, match="not a loadable TorchScript file"):
        ModelRuntime.load(broken, "cpu")


def test_corrupt_card(trained_bundle: Path, tmp_path: Path):
    broken = _copy(trained_bundle, tmp_path)
    (broken / "card.json").write_text("{ not json")
    with pytest.raises(BundleError, match=r"card\.json is unreadable"):
        ModelRuntime.load(broken, "cpu")


def test_tokenizer_larger_than_the_embedding_table(trained_bundle: Path, tmp_path: Path):
    broken = _copy(trained_bundle, tmp_path)
    oversize_tokenizer(broken)
    with pytest.raises(BundleError, match="do not match"):
        ModelRuntime.load(broken, "cpu")


def test_a_tokenizer_that_truncates_by_itself_is_refused(trained_bundle: Path, tmp_path: Path):
    broken = _copy(trained_bundle, tmp_path)
    tokenizer = Tokenizer.from_file(str(broken / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=32)  # would silently drop the tail the card keeps
    tokenizer.save(str(broken / "tokenizer.json"))
    with pytest.raises(BundleError, match="truncates by itself"):
        ModelRuntime.load(broken, "cpu")


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_casts_the_weights_and_answers_close_to_float32(
    trained_bundle: Path, dtype: str, atol: float
):
    # If the cast missed a tensor, the model would raise on mixed dtypes; if it missed the
    # weights, the answers would be float32's exactly.
    full = ModelRuntime.load(trained_bundle, "cpu")
    half = ModelRuntime.load(trained_bundle, "cpu", dtype)  # type: ignore[arg-type]
    assert {p.dtype for p in half.model.parameters()} == {getattr(torch, dtype)}
    seqs = [e.ids for e in full.preprocess(TEXTS)]
    reference, answers = full.infer(seqs), half.infer(seqs)
    assert answers.dtype == np.float32  # logits leave the runtime as float32 whatever ran
    np.testing.assert_allclose(answers, reference, rtol=0, atol=atol)
    assert not np.array_equal(answers, reference)
    assert full.cuda_memory() is None
    assert half.cuda_memory() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_precision_answers_close_to_float32(trained_bundle: Path):
    cpu = ModelRuntime.load(trained_bundle, "cpu")
    gpu = ModelRuntime.load(trained_bundle, "cuda", "float16")
    seqs = [e.ids for e in cpu.preprocess(TEXTS)]
    np.testing.assert_allclose(gpu.infer(seqs), cpu.infer(seqs), rtol=0, atol=0.01)
    memory = gpu.cuda_memory()
    assert memory is not None
    assert 0 < memory["allocated"] <= memory["reserved"]
    assert memory["peak"] >= memory["allocated"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_answers_match_cpu(trained_bundle: Path):
    cpu = ModelRuntime.load(trained_bundle, "cpu")
    gpu = ModelRuntime.load(trained_bundle, "cuda")
    seqs = [e.ids for e in cpu.preprocess(TEXTS)]
    # cuDNN sums in another order than the CPU kernels, and the difference compounds over the
    # recurrent steps: up to 3.1e-4 on logits near 4 on an H100 (2026-11-24). A wrong weight or
    # a lost direction moves logits by whole units.
    np.testing.assert_allclose(gpu.infer(seqs), cpu.infer(seqs), rtol=0, atol=1e-3)


def test_flattening_recurrent_weights_leaves_a_cpu_model_alone(runtime: ModelRuntime):
    """cuDNN's layout is for CUDA only; on a CPU the loader must not touch the weights."""
    before = [p.clone() for p in runtime.model.parameters()]
    assert bundle.flatten_rnn_weights(runtime.model) == 0
    for old, new in zip(before, runtime.model.parameters(), strict=True):
        assert torch.equal(old, new)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recurrent_weights_are_flattened_for_cudnn(trained_bundle: Path):
    """pytorch/pytorch#19053: a scripted RNN loaded onto CUDA keeps each weight in its own
    tensor and cuDNN copies them together at every call. If this fails, every batch on a GPU
    pays that copy again (and the warning is back in the log), or flattening changed answers."""
    as_loaded = torch.jit.load(str(trained_bundle / "model.pt"), map_location="cuda").eval()
    gpu = ModelRuntime.load(trained_bundle, "cuda")
    ids, lengths = bundle.pad([e.ids for e in gpu.preprocess(TEXTS)])
    ids, lengths = ids.cuda(), lengths.cuda()
    was_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # the warning is issued once per process otherwise
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as before:
            warnings.simplefilter("always")
            expected = as_loaded(ids, lengths)
        with torch.no_grad(), warnings.catch_warnings(record=True) as after:
            warnings.simplefilter("always")
            served = gpu.model(ids, lengths)
    finally:
        torch.set_warn_always(was_always)
    # The check can fail: the model as loaded does warn.
    assert any("single contiguous chunk" in str(w.message) for w in before)
    assert not [w for w in after if "single contiguous chunk" in str(w.message)]
    rnns = [m for m in gpu.model.modules() if m.original_name in bundle.RNN_MODULES]
    assert len(rnns) >= 2
    assert bundle.flatten_rnn_weights(gpu.model) == len(rnns)  # again: nothing changes
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)


def explain(runtime: ModelRuntime, ids: np.ndarray, steps: int, chunk_tokens: int = 4096):
    job = runtime.explanation(ids, steps, chunk_tokens)
    chunks = 1
    while not job.advance(Execution()):
        chunks += 1
    return job.result(), chunks


def test_tokenize_gives_offsets_that_slice_the_token_as_written(runtime: ModelRuntime):
    """If this fails, /explain shades the wrong characters of the user's text."""
    text = "The ﬁlm<br />was GREAT, naïve 😀 and Cafe\u0301!"
    tokens = runtime.tokenize(text)
    written = [text[a:b] for a, b in tokens.offsets]
    assert written == ["The", "ﬁlm", "was", "GREAT", ",", "naïve", "😀", "and", "Cafe\u0301", "!"]
    assert tokens.tokens[1] == "film"  # NFKC unfolds the ligature; the offsets keep 'ﬁ'
    assert tokens.ids.tolist() == runtime.tokenizer.encode(text).ids


PIECES_WORDS = (
    "Good bad <br />great <BR> x<br\n/>y caf\u00e9 cafe\u0301 don't 10% r R ; movie\nfilm"
)


@pytest.mark.parametrize("words", [3, 40, 150, 2000])
def test_a_long_text_read_in_pieces_gives_the_whole_texts_tokens(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, words: int
):
    """If this fails, a text longer than PIECE_CHARS is read differently from the same text
    whole (a token or a "<br />" cut in two), or its offsets point at the wrong characters.
    Pieces of 64 characters here, so that texts of every length against the truncation
    (shorter, about as long, far longer) are cut many times."""
    monkeypatch.setattr(runtime, "_piece_chars", 64)
    rng = np.random.default_rng(words)
    vocabulary = PIECES_WORDS.split(" ")
    cut = runtime.truncation
    for _ in range(10):
        text = " ".join(rng.choice(vocabulary, size=words))
        whole = runtime.tokenizer.encode(text)
        n = len(whole.ids)
        read = range(n) if n <= cut.max_length else [*range(cut.head), *range(n - cut.tail, n)]
        tokens = runtime.tokenize(text)
        assert tokens.count == n
        assert tokens.ids.tolist() == [whole.ids[i] for i in read]
        assert [a for a, _ in tokens.offsets] == [whole.offsets[i][0] for i in read]
        (encoded,) = runtime.preprocess([text])
        assert encoded.original_tokens == n
        assert encoded.ids.tolist() == cut.apply(np.asarray(whole.ids)).tolist()


def test_a_tokenizer_that_joins_across_spaces_reads_a_long_text_whole(trained_bundle: Path):
    """If this fails, a bundle whose tokenizer reads across spaces (a normaliser that removes
    them, say) would read long texts with other tokens than short ones."""
    tokenizer = Tokenizer.from_file(str(trained_bundle / "tokenizer.json"))
    assert runtime_module._cuts_keep_tokens(tokenizer)
    tokenizer.normalizer = normalizers.Replace(" ", "")
    assert not runtime_module._cuts_keep_tokens(tokenizer)


def test_integrated_gradients_are_complete_and_the_same_in_any_chunking(runtime: ModelRuntime):
    """If this fails, the attributions do not add up to what the model says (a wrong baseline
    or weights), or an explanation depends on how the batcher cut it."""
    ids = runtime.preprocess(["A great, moving film. Dull plot, a waste of time."])[0].ids
    whole, chunks = explain(runtime, ids, steps=32)
    assert chunks == 1
    with torch.no_grad():
        logit = runtime.infer([ids])[0]
    assert whole.logit == pytest.approx(float(logit), abs=1e-5)
    assert len(whole.tokens) == len(ids)
    difference = whole.logit - whole.baseline_logit
    assert abs(whole.gap) <= 0.02 * abs(difference) + 1e-3
    coarse, _ = explain(runtime, ids, steps=2)
    assert abs(coarse.gap) > abs(whole.gap)  # the quadrature error shrinks with steps
    pieces, chunks = explain(runtime, ids, steps=32, chunk_tokens=len(ids) * 5)
    assert chunks == 7  # 5 + 5 + ... + 2 steps
    np.testing.assert_allclose(pieces.tokens, whole.tokens, rtol=0, atol=1e-5)


def test_an_explanation_reports_its_result_only_when_complete(runtime: ModelRuntime):
    job = runtime.explanation(runtime.preprocess(["great"])[0].ids, 4, chunk_tokens=1)
    job.advance(Execution())
    with pytest.raises(RuntimeError, match="has not run all its steps"):
        job.result()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_explanations_match_cpu(trained_bundle: Path):
    """cuDNN's RNN has no backward pass in evaluation mode; the runtime turns it off."""
    cpu = ModelRuntime.load(trained_bundle, "cpu")
    gpu = ModelRuntime.load(trained_bundle, "cuda")
    ids = cpu.preprocess([TEXTS[0]])[0].ids
    on_cpu, _ = explain(cpu, ids, 16)
    on_gpu, _ = explain(gpu, ids, 16)
    np.testing.assert_allclose(on_gpu.tokens, on_cpu.tokens, rtol=0, atol=1e-4)
