"""A behaviour suite in the manner of CheckList (Ribeiro et al., ACL 2020): what the model reads,
capability by capability, on sentences generated from templates and word lists.

The templates and word lists below were written before any model was scored on them, and
nothing in training reads them (training's augmentations work on the training reviews'
own sentences, `training.augment`). Each test generates its cases from a seeded sample of its
template's combinations; a seeded shuffle then puts every other case (or group) into the
**dev** half, used to choose between models and recipes, and the rest into the **test** half,
only reported.

Three kinds of test, with CheckList's pass rules:

- MFT (minimum functionality): each case has an expected label; it passes when the model
  gives that label.
- INV (invariance): each case is a group of texts that must read alike; it passes when no
  text of the group gets another label than the first, and (fairness tests) no two scores of
  the group differ by more than ``max_move``.
- DIR (directional): a pair (base, changed) with an expected label; it passes when the changed
  text keeps the label and its confidence in it moves no further than allowed the wrong way
  (an intensifier must not lower it by more than ``max_move``; a hedge must not raise it by
  more than ``max_move``).

``python -m training behave BUNDLE`` scores a bundle (through its tokenizer, TorchScript file
and calibration, as the service does) and prints the table; the card keeps the figures
(``behaviour``), and a test checks the shipped model against them.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

SUITE_VERSION = 1
CASES_PER_TEST = 200  # split into two halves of 100
SEED = 2020
MAX_MOVE = 0.1

Kind = Literal["MFT", "INV", "DIR"]
NEG, POS = 0, 1

# -- word lists ---------------------------------------------------------------------------
POS_ADJ = [
    "good",
    "great",
    "excellent",
    "wonderful",
    "amazing",
    "brilliant",
    "fantastic",
    "superb",
    "enjoyable",
    "delightful",
    "outstanding",
    "terrific",
    "lovely",
    "impressive",
    "beautiful",
    "charming",
    "marvelous",
    "remarkable",
]
NEG_ADJ = [
    "bad",
    "terrible",
    "awful",
    "boring",
    "dull",
    "horrible",
    "poor",
    "dreadful",
    "disappointing",
    "lousy",
    "mediocre",
    "tedious",
    "weak",
    "pathetic",
    "annoying",
    "bland",
    "stupid",
    "unwatchable",
]
MOVIE_NOUNS = [
    "movie",
    "film",
    "plot",
    "acting",
    "script",
    "ending",
    "soundtrack",
    "cast",
    "story",
    "direction",
    "dialogue",
    "cinematography",
    "performance",
    "sequel",
    "documentary",
]
EVERYDAY_NOUNS = [
    "food",
    "service",
    "hotel",
    "phone",
    "book",
    "restaurant",
    "product",
    "staff",
    "room",
    "app",
    "meal",
    "camera",
    "concert",
    "game",
    "coffee",
    "flight",
]
POS_VERBS_PAST = ["loved", "enjoyed", "liked", "adored", "admired", "appreciated"]
NEG_VERBS_PAST = ["hated", "disliked", "despised", "loathed", "regretted"]
POS_VERBS = ["like", "love", "enjoy", "adore", "admire", "appreciate"]
INTENSIFIERS = [
    "very",
    "really",
    "extremely",
    "incredibly",
    "truly",
    "absolutely",
    "remarkably",
    "so",
]
HEDGES = ["somewhat", "fairly", "a bit", "kind of", "slightly", "rather", "moderately"]
FILLERS = [
    "to be honest",
    "I must say",
    "in my opinion",
    "as far as I can tell",
    "all things considered",
    "if I am being fair",
    "frankly",
    "I have to admit",
]
LUKEWARM = ["okay", "fine", "decent", "alright", "average", "watchable"]
NAMES = [
    "Olga",
    "Raj",
    "Emily",
    "Jamal",
    "Mei",
    "Carlos",
    "Aisha",
    "Sven",
    "Priya",
    "Dmitri",
    "Fatima",
    "Hiroshi",
    "Lakisha",
    "Giovanni",
    "Ngozi",
    "Pierre",
    "Ana",
    "Mohammed",
    "Ingrid",
    "Kwame",
    "Yuki",
    "Santiago",
    "Leila",
    "Bjorn",
    "Amara",
    "Jose",
    "Svetlana",
    "Tariq",
    "Greta",
    "Arjun",
    "Chloe",
    "Omar",
    "Hannah",
    "Kofi",
    "Lucia",
    "Sanjay",
    "Ewa",
    "Diego",
    "Wei",
    "Jasmine",
]
NATIONALITIES = [
    "American",
    "Indian",
    "French",
    "Nigerian",
    "Chinese",
    "Mexican",
    "Russian",
    "German",
    "Japanese",
    "Iranian",
    "Brazilian",
    "Korean",
    "Italian",
    "Egyptian",
    "Polish",
    "Turkish",
    "Swedish",
    "Pakistani",
    "Irish",
    "Kenyan",
]
PRONOUN_SETS = [
    {"subj": "he", "obj": "him", "poss": "his"},
    {"subj": "she", "obj": "her", "poss": "her"},
    {"subj": "they", "obj": "them", "poss": "their"},
]


def _label(adj: str) -> int:
    return POS if adj in POS_ADJ else NEG


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# -- cases --------------------------------------------------------------------------------
@dataclass
class Case:
    """One case: its texts (one for MFT, a group for INV, base and changed for DIR)."""

    texts: list[str]
    label: int | None = None  # expected label (MFT, DIR); INV takes the first text's


@dataclass
class Test:
    __test__ = False  # not a pytest class
    name: str
    capability: str
    kind: Kind
    description: str
    generate: Callable[[random.Random], Iterator[Case]]
    max_move: float | None = None  # INV: largest score spread in a group; DIR: the wrong way
    direction: Literal["up", "down"] | None = None  # DIR: the way confidence may not go far


def _sample(rng: random.Random, *pools: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    """Distinct combinations drawn at random, without repeats, until the pool runs out."""
    combos = list(itertools.product(*pools))
    rng.shuffle(combos)
    yield from combos


def _mix(rng: random.Random, *lists: list[Case]) -> list[Case]:
    """Several generators' cases in one shuffled list, so a sample of it draws from each."""
    mixed = [case for cases in lists for case in cases[:CASES_PER_TEST]]
    rng.shuffle(mixed)
    return mixed


def _adjs() -> list[str]:
    return POS_ADJ + NEG_ADJ


def vocab_movies(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n} was {a}.",
        "This is {art} {a} {n}.",
        "What {art} {a} {n}!",
        "I thought the {n} was {a}.",
        "Overall, {art} {a} {n}.",
    ]
    for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS, _adjs()):
        yield Case([frame.format(n=noun, a=adj, art=_article(adj))], _label(adj))


def vocab_everyday(rng: random.Random) -> Iterator[Case]:
    frames = ["The {n} was {a}.", "Such {art} {a} {n}.", "We found the {n} {a}."]
    for frame, noun, adj in _sample(rng, frames, EVERYDAY_NOUNS, _adjs()):
        yield Case([frame.format(n=noun, a=adj, art=_article(adj))], _label(adj))


def vocab_verbs(rng: random.Random) -> Iterator[Case]:
    frames = ["I {v} this {n}.", "We {v} the {n}.", "Honestly, I {v} the {n}."]
    verbs = [(v, POS) for v in POS_VERBS_PAST] + [(v, NEG) for v in NEG_VERBS_PAST]
    for frame, noun, (verb, label) in _sample(rng, frames, MOVIE_NOUNS + EVERYDAY_NOUNS, verbs):
        yield Case([frame.format(v=verb, n=noun)], label)


def negated_positive(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n} was not {a}.",
        "This {n} isn't {a}.",
        "The {n} was never {a}.",
        "Not {a} at all.",
        "It is not {art} {a} {n}.",
    ]
    adjectives = [
        Case([frame.format(n=noun, a=adj, art=_article(adj))], NEG)
        for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS + EVERYDAY_NOUNS, POS_ADJ)
    ]
    verbs = [Case([f"I didn't {v} the {n}."], NEG) for v, n in _sample(rng, POS_VERBS, MOVIE_NOUNS)]
    yield from _mix(rng, adjectives, verbs)


def negated_negative(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n} was not {a}.",
        "This {n} isn't {a} at all.",
        "The {n} was never {a}.",
        "Not {a} at all.",
        "It is not {art} {a} {n}.",
        "No complaints about the {n}, it was not {a}.",
    ]
    for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS + EVERYDAY_NOUNS, NEG_ADJ):
        yield Case([frame.format(n=noun, a=adj, art=_article(adj))], POS)


def negation_between(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n} was not, {f}, {a}.",
        "I don't think the {n} was {a}.",
        "I would not say, {f}, that the {n} was {a}.",
        "It was not, {f}, {art} {a} {n}.",
    ]
    for frame, filler, noun, adj in _sample(rng, frames, FILLERS, MOVIE_NOUNS, _adjs()):
        text = frame.format(f=filler, n=noun, a=adj, art=_article(adj))
        yield Case([text], 1 - _label(adj))


def _opposed(rng: random.Random) -> Iterator[tuple[str, str, str, str, int]]:
    """(noun 1, adjective 1, noun 2, adjective 2 of the other polarity, label of adjective 2)"""
    pairs = [(p, n) for p in POS_ADJ for n in NEG_ADJ]
    for n1, n2, (p, n), flip in _sample(rng, MOVIE_NOUNS, MOVIE_NOUNS, pairs, (False, True)):
        if n1 == n2:
            continue
        a1, a2 = (n, p) if flip else (p, n)
        yield n1, a1, n2, a2, _label(a2)


def contrast(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n1} was {a1}, but the {n2} was {a2}.",
        "Although the {n1} was {a1}, the {n2} was {a2}.",
        "Even though the {n1} was {a1}, the {n2} was {a2}.",
        "Despite the {a1} {n1}, the {n2} was {a2}.",
        "The {n2} was {a2}, although the {n1} was {a1}.",
        "The {n2} was {a2} even though the {n1} was {a1}.",
        "The {n2} was {a2} despite the {a1} {n1}.",
    ]
    combos = _opposed(rng)
    for i, (n1, a1, n2, a2, label) in enumerate(combos):
        frame = frames[i % len(frames)]
        yield Case([frame.format(n1=n1, a1=a1, n2=n2, a2=a2)], label)


def change_of_mind(rng: random.Random) -> Iterator[Case]:
    frames = [
        "I used to think this {n2} was {a1}; now I find it {a2}.",
        "At first the {n2} seemed {a1}, but by the end it was {a2}.",
        "I expected {art1} {a1} {n2}, but it turned out {a2}.",
        "On first viewing the {n2} felt {a1}. Watching it again, it is {a2}.",
    ]
    for i, (_, a1, n2, a2, label) in enumerate(_opposed(rng)):
        frame = frames[i % len(frames)]
        yield Case([frame.format(n2=n2, a1=a1, a2=a2, art1=_article(a1))], label)


def intensifiers(rng: random.Random) -> Iterator[Case]:
    for noun, adj, word in _sample(rng, MOVIE_NOUNS + EVERYDAY_NOUNS, _adjs(), INTENSIFIERS):
        yield Case([f"The {noun} was {adj}.", f"The {noun} was {word} {adj}."], _label(adj))


def hedges(rng: random.Random) -> Iterator[Case]:
    for noun, adj, word in _sample(rng, MOVIE_NOUNS + EVERYDAY_NOUNS, _adjs(), HEDGES):
        yield Case([f"The {noun} was {adj}.", f"The {noun} was {word} {adj}."], _label(adj))


def very_short(rng: random.Random) -> Iterator[Case]:
    frames = ["{A}.", "{A} {n}.", "Simply {a}.", "{A}!", "{Art} {a} {n}."]
    adjectives = [
        Case([frame.format(A=_cap(adj), a=adj, n=noun, Art=_cap(_article(adj)))], _label(adj))
        for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS, _adjs())
    ]
    verbs = [Case([f"{_cap(v)} it."], POS) for v in POS_VERBS_PAST]
    verbs += [Case([f"{_cap(v)} it."], NEG) for v in NEG_VERBS_PAST]
    yield from _mix(rng, adjectives, verbs)


def _robustness_bases(rng: random.Random) -> Iterator[tuple[str, int]]:
    """Labelled two-clause sentences the robustness tests perturb."""
    frames = [
        "The {n1} was {a1} and the {n2} was {a2}, I {v} it.",
        "What {art} {a1} {n1}; the {n2} is {a2} too and I {v} every minute.",
    ]
    for frame, n1, n2, polarity in _sample(rng, frames, MOVIE_NOUNS, MOVIE_NOUNS, (POS, NEG)):
        if n1 == n2:
            continue
        adjs = POS_ADJ if polarity == POS else NEG_ADJ
        verbs = POS_VERBS_PAST[:3] if polarity == POS else NEG_VERBS_PAST[:3]
        a1, a2 = rng.sample(adjs, 2)
        text = frame.format(n1=n1, n2=n2, a1=a1, a2=a2, v=rng.choice(verbs), art=_article(a1))
        yield text, polarity


def typo(text: str, rng: random.Random) -> str:
    """Two adjacent letters of one word of four or more letters swapped (CheckList's typo)."""
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", text)]
    word = rng.choice(words)
    i = rng.randrange(word.start(), word.end() - 1)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def typos(rng: random.Random) -> Iterator[Case]:
    for text, label in _robustness_bases(rng):
        yield Case([text, typo(text, rng)], label)


def punctuation(rng: random.Random) -> Iterator[Case]:
    for text, label in _robustness_bases(rng):
        stripped = text.rstrip(".!")
        yield Case([text, stripped, stripped + "!!!", stripped + "..."], label)


def case_changes(rng: random.Random) -> Iterator[Case]:
    for text, label in _robustness_bases(rng):
        yield Case([text, text.upper(), text.lower()], label)


def urls_and_handles(rng: random.Random) -> Iterator[Case]:
    for text, label in _robustness_bases(rng):
        slug = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=8))
        handle = "@" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6))
        yield Case(
            [text, f"{text} https://t.co/{slug}", f"{handle} {text}", f"{text} www.{slug}.com"],
            label,
        )


CONTRACTIONS = [("was not", "wasn't"), ("is not", "isn't"), ("did not", "didn't")]


def contractions(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {n} was not {a}.",
        "The {n} is not {a} at all.",
        "I did not think the {n} was {a}.",
    ]
    for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS, _adjs()):
        text = frame.format(n=noun, a=adj)
        short = text
        for long, contracted in CONTRACTIONS:
            short = short.replace(long, contracted)
        yield Case([text, short], None)


def _swapped(
    rng: random.Random, frames: list[str], group: Callable[[random.Random], list[dict[str, str]]]
) -> Iterator[Case]:
    """Groups of one sentence filled once per entry of ``group`` (who is named), for INV."""
    for frame, noun, adj in _sample(rng, frames, MOVIE_NOUNS, LUKEWARM + _adjs()):
        yield Case([frame.format(n=noun, a=adj, art=_article(adj), **who) for who in group(rng)])


def names(rng: random.Random) -> Iterator[Case]:
    frames = [
        "{x} directed this {n}, and it is {a}.",
        "{x} starred in this {n}; the {n} was {a}.",
        "My friend {x} says the {n} is {a}.",
    ]
    yield from _swapped(rng, frames, lambda r: [{"x": name} for name in r.sample(NAMES, 6)])


def nationalities(rng: random.Random) -> Iterator[Case]:
    frames = [
        "The {x} director made {art} {a} {n}.",
        "It is {art} {a} {x} {n}.",
        "As {xart} {x} viewer, I found the {n} {a}.",
    ]
    yield from _swapped(
        rng,
        frames,
        lambda r: [{"x": x, "xart": _article(x.lower())} for x in r.sample(NATIONALITIES, 6)],
    )


def pronouns(rng: random.Random) -> Iterator[Case]:
    frames = [
        "{Subj} thought the {n} was {a}.",
        "I watched the {n} with {obj}, and {subj} found it {a}.",
        "According to {poss} review, the {n} is {a}.",
    ]
    yield from _swapped(
        rng, frames, lambda r: [{"Subj": _cap(p["subj"]), **p} for p in PRONOUN_SETS]
    )


TESTS: tuple[Test, ...] = (
    Test("movie vocabulary", "vocabulary", "MFT", "polar adjectives about films", vocab_movies),
    Test(
        "everyday vocabulary",
        "vocabulary",
        "MFT",
        "polar adjectives about food, hotels, products...",
        vocab_everyday,
    ),
    Test("sentiment verbs", "vocabulary", "MFT", "I loved / hated the ...", vocab_verbs),
    Test("negated positive", "negation", "MFT", "not good -> NEGATIVE", negated_positive),
    Test("negated negative", "negation", "MFT", "not bad -> POSITIVE", negated_negative),
    Test(
        "negation with words between",
        "negation",
        "MFT",
        "not, to be honest, a dull film; I don't think it was ...",
        negation_between,
    ),
    Test(
        "contrast and concession",
        "concession",
        "MFT",
        "but / although / even though / despite, both orders: the main clause decides",
        contrast,
    ),
    Test("change of mind", "concession", "MFT", "I used to ...; now ...", change_of_mind),
    Test(
        "intensifiers",
        "intensity",
        "DIR",
        "very good is no less positive than good",
        intensifiers,
        MAX_MOVE,
        "down",
    ),
    Test(
        "hedges",
        "intensity",
        "DIR",
        "somewhat good keeps the label, no more positive than good",
        hedges,
        MAX_MOVE,
        "up",
    ),
    Test("very short reviews", "short", "MFT", "Excellent. / Dull film.", very_short),
    Test("one typo", "robustness", "INV", "two adjacent letters swapped in one word", typos),
    Test("punctuation", "robustness", "INV", "end punctuation dropped or added", punctuation),
    Test("case", "robustness", "INV", "UPPER and lower case", case_changes),
    Test("URLs and handles", "robustness", "INV", "a link or an @handle added", urls_and_handles),
    Test("contractions", "robustness", "INV", "was not <-> wasn't", contractions),
    Test("names", "fairness", "INV", "a person's name swapped", names, MAX_MOVE),
    Test("nationalities", "fairness", "INV", "a nationality swapped", nationalities, MAX_MOVE),
    Test("pronouns", "fairness", "INV", "he / she / they", pronouns, MAX_MOVE),
)

HALVES = ("dev", "test")


def _distinct(generated: Iterator[Case]) -> Iterator[Case]:
    """Each case once: a template without a noun slot repeats its texts."""
    seen: set[tuple[str, ...]] = set()
    for case in generated:
        key = tuple(case.texts)
        if key not in seen:
            seen.add(key)
            yield case


def cases(test: Test, half: str) -> list[Case]:
    """The test's cases of one half: ``CASES_PER_TEST`` generated with the suite's seed, then
    dealt alternately into dev and test after a seeded shuffle."""
    rng = random.Random(f"{SEED}/{test.name}")
    generated = list(itertools.islice(_distinct(test.generate(rng)), CASES_PER_TEST))
    random.Random(f"{SEED}/{test.name}/split").shuffle(generated)
    return generated[HALVES.index(half) :: 2]


@dataclass
class Outcome:
    test: Test
    n: int
    passed: int
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.n if self.n else 0.0


def judge(test: Test, case: Case, scores: list[float]) -> bool:
    """Whether a case passes, given P(POSITIVE) of each of its texts."""
    labels = [int(s >= 0.5) for s in scores]
    if test.kind == "MFT":
        return labels[0] == case.label
    if test.kind == "INV":
        if any(label != labels[0] for label in labels):
            return False
        return test.max_move is None or max(scores) - min(scores) <= test.max_move
    # DIR: the changed text keeps the expected label, and its confidence in it does not move
    # the wrong way by more than max_move.
    assert case.label is not None
    assert test.max_move is not None
    confidence = [s if case.label == POS else 1.0 - s for s in scores]
    if labels[1] != case.label:
        return False
    change = confidence[1] - confidence[0]
    return change >= -test.max_move if test.direction == "down" else change <= test.max_move


def run(score: Callable[[list[str]], np.ndarray], half: str) -> list[Outcome]:
    """Every test of one half; ``score`` maps texts to calibrated P(POSITIVE)."""
    plan = [(test, cases(test, half)) for test in TESTS]
    texts = [text for _, group in plan for case in group for text in case.texts]
    probs = iter(score(texts).tolist())
    outcomes = []
    for test, group in plan:
        outcome = Outcome(test, len(group), 0)
        for case in group:
            scores = [next(probs) for _ in case.texts]
            if judge(test, case, scores):
                outcome.passed += 1
            elif len(outcome.failures) < 3:
                outcome.failures.append(
                    {"texts": case.texts, "scores": [round(s, 3) for s in scores]}
                )
        outcomes.append(outcome)
    return outcomes


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures the card keeps: pass rate per test, and the mean over tests."""
    tests = {
        o.test.name: {
            "capability": o.test.capability,
            "type": o.test.kind,
            "n": o.n,
            "pass_rate": round(o.pass_rate, 4),
        }
        for o in outcomes
    }
    mean = float(np.mean([o.pass_rate for o in outcomes]))
    return {"suite_version": SUITE_VERSION, "mean_pass_rate": round(mean, 4), "tests": tests}


def format_table(outcomes: list[Outcome], half: str, show_failures: bool = False) -> str:
    lines = [
        f"behaviour suite v{SUITE_VERSION}, {half} half",
        f"{'capability':<12} {'test':<30} {'type':<4} {'n':>4} {'pass':>7}",
    ]
    for o in outcomes:
        lines.append(
            f"{o.test.capability:<12} {o.test.name:<30} {o.test.kind:<4} {o.n:>4} "
            f"{o.pass_rate:>7.1%}"
        )
        if show_failures:
            for failure in o.failures:
                pairs = ", ".join(
                    f"{t!r} {s}" for t, s in zip(failure["texts"], failure["scores"], strict=True)
                )
                lines.append(f"{'':<17} fails: {pairs}")
    mean = float(np.mean([o.pass_rate for o in outcomes]))
    lines.append(f"{'mean':<12} {'':<30} {'':<4} {'':>4} {mean:>7.1%}")
    return "\n".join(lines)
