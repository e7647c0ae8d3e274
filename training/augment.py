"""Short training texts that teach reading, made from the training reviews' own sentences.

Whole reviews teach a model which words are polar, rarely how a sentence turns them: "not bad"
occurs mostly in lukewarm reviews, and a review's verdict seldom hangs on one "although". These
generators take sentences of the training split whose own words lean their review's way
(judged by the training reviews' bag-of-words log-count ratios, as `training.short` does) and
rewrite them with a label the rewrite determines:

- **negation inserted** (Wang & Culotta, AAAI 2021: counterfactuals by rule): "the plot was
  dull" -> "the plot was not dull", label flipped; also inside a frame ("I don't think the plot
  was dull");
- **negation removed**: a sentence whose words lean against its review ("it was not bad at
  all" in a positive review) is a real negation; it is kept with its review's label, and with
  the negation taken out it gets the other label;
- **concession and change of mind**: two sentences of opposite polarity from different
  reviews joined by but / although / even though / despite the fact that / at first ... now,
  labelled by the clause that carries the verdict;
- **crops**: one to three consecutive sentences of a review with its label.

Nothing here reads the behaviour suite's templates or word lists (`training.behaviour`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
from tokenizers import Tokenizer

Sample = tuple[str, int]

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z']+")
# A sentence with one of these is already negated: inserting another would not flip it.
_NEGATION = re.compile(
    r"\b(not|no|never|nothing|none|nobody|neither|nor|hardly|without|cannot)\b|n't\b",
    re.IGNORECASE,
)
_COPULA = re.compile(r"\b(is|was|are|were)\b(?! not\b)", re.IGNORECASE)
_CONTRACTED = {"is": "isn't", "was": "wasn't", "are": "aren't", "were": "weren't"}
# Negations a sentence can lose and stay grammatical, with what is left.
_REMOVABLE = [
    (re.compile(r"\b(is|was|are|were) not\b", re.IGNORECASE), r"\1"),
    (re.compile(r"\b(is|was|are|were)n't\b", re.IGNORECASE), r"\1"),
    (re.compile(r"\b(did|does|do) not\b", re.IGNORECASE), r"\1"),
    (re.compile(r"\b(did|does|do)n't\b", re.IGNORECASE), r"\1"),
    (re.compile(r"\b(is|was|are|were) never\b", re.IGNORECASE), r"\1"),
]
NEGATION_FRAMES = (
    "I don't think {s}",
    "I wouldn't say {s}",
    "It is not true that {s}",
    "I would not say that {s}",
)
_ASIDE = re.compile(r", ([a-z][a-z' ]{2,40}), ")
ASIDE_SHARE = 0.6  # negations that get an aside between the negation and what it negates
CONCESSION_FRAMES = (
    "{a}, but {b}",
    "Although {a}, {b}",
    "Even though {a}, {b}",
    "Despite the fact that {a}, {b}",
    "{B}, although {a}",
    "{B}, even though {a}",
    "{A}. However, {b}",
    "At first I thought {a}, but now I think {b}",
    "I used to believe {a}; now {b}",
)
MIN_WORDS, MAX_WORDS = 4, 30


def clean(text: str) -> str:
    return " ".join(_BREAK.sub(" ", text).split())


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(clean(text)) if s]


def _clause(sentence: str) -> str:
    """A sentence as a clause inside another: no end punctuation, lower-case first letter
    (the tokenizer lower-cases anyway; this keeps the generated text readable)."""
    body = sentence.rstrip(".!? ")
    return body[:1].lower() + body[1:]


def _sentence(clause: str) -> str:
    return clause[:1].upper() + clause[1:] + "."


@dataclass
class Pools:
    """Sentences of the training reviews, sorted by what a generator can do with them."""

    reviews: list[list[str]]  # each review's sentences
    labels: np.ndarray  # each review's label
    polar: list[Sample]  # sentences whose words lean their review's way clearly
    # Polar sentences whose polarity sits right after their first "is / was / are / were",
    # so a negation inserted there is in scope of what makes them polar.
    negatable: list[Sample] = field(default_factory=list)
    # Sentences of at most FRAME_WORDS words: "I don't think <sentence>" still reads plainly.
    framable: list[Sample] = field(default_factory=list)
    # Negated sentences whose words after the negation lean against their review: real
    # negations ("it was not bad at all" in a positive review).
    negated: list[Sample] = field(default_factory=list)
    # Short neutral asides found between commas in the training sentences ("to be honest"),
    # to put words between a negation and what it negates.
    asides: list[str] = field(default_factory=list)


COPULAS = frozenset({"is", "was", "are", "were"})
NEGATION_TOKENS = frozenset({"not", "never", "t"})  # "t" of "isn ' t", as the tokenizer splits
SCOPE = 3  # tokens after the copula or negation that count as its scope
SCOPE_EVIDENCE = 1.5  # the scope's own summed log-count ratio, at least
REST_EVIDENCE = 1.0  # the rest of the sentence's, at most (either way)
SCOPED_WORDS = 20  # longer sentences hold too many clauses to say what a negation reaches
FRAME_WORDS = 15


def _scoped(
    tokens: list[str], ids: np.ndarray, ratios: np.ndarray, heads: frozenset[str]
) -> tuple[float, float] | None:
    """(evidence of the ``SCOPE`` tokens after the first of ``heads``, evidence of the rest),
    or None when no token of ``heads`` occurs."""
    at = next((i for i, t in enumerate(tokens) if t in heads), None)
    if at is None:
        return None
    inside = set(ids[at + 1 : at + 1 + SCOPE].tolist())
    outside = set(ids.tolist()) - inside
    return float(ratios[list(inside)].sum()), float(ratios[list(outside)].sum())


def build_pools(
    texts: Sequence[str],
    labels: np.ndarray,
    tokenizer: Tokenizer,
    ratios: np.ndarray,
    min_evidence: float = 2.5,
) -> Pools:
    """Split the reviews into sentences and sort them by the log-count ratios (``ratios``,
    from the training reviews) of their words: summed over a sentence's distinct words, and
    within the scope of a copula or a negation."""
    reviews = [split_sentences(t) for t in texts]
    flat = [(s, int(labels[r])) for r, sents in enumerate(reviews) for s in sents]
    pools = Pools(reviews, np.asarray(labels), [])
    pools.asides = _asides([s for s, _ in flat], tokenizer, ratios)
    encodings = tokenizer.encode_batch([s for s, _ in flat])
    for (sentence, label), encoding in zip(flat, encodings, strict=True):
        words = len(sentence.split())
        if not MIN_WORDS <= words <= MAX_WORDS:
            continue
        sign = 1.0 if label == 1 else -1.0
        ids = np.asarray(encoding.ids, dtype=np.int64)
        evidence = sign * float(ratios[np.unique(ids)].sum())
        if _NEGATION.search(sentence) is None:
            if evidence < min_evidence:
                continue
            pools.polar.append((sentence, label))
            if words <= FRAME_WORDS:
                pools.framable.append((sentence, label))
            scope = _scoped(encoding.tokens, ids, ratios, COPULAS)
            if words <= SCOPED_WORDS and scope and _in_scope(sign * scope[0], scope[1]):
                pools.negatable.append((sentence, label))
        elif words <= SCOPED_WORDS:
            scope = _scoped(encoding.tokens, ids, ratios, NEGATION_TOKENS)
            if scope and _in_scope(-sign * scope[0], scope[1]):
                pools.negated.append((sentence, label))
    return pools


def _asides(
    sentences: list[str], tokenizer: Tokenizer, ratios: np.ndarray, keep: int = 300
) -> list[str]:
    """The ``keep`` most frequent asides of one to five words between commas whose words
    carry no polarity (summed log-count ratio within +-0.5)."""
    found = Counter(
        m.group(1) for s in sentences for m in _ASIDE.finditer(s) if len(m.group(1).split()) <= 5
    )
    common = [aside for aside, _ in found.most_common(3 * keep)]
    neutral = [
        aside
        for aside, encoding in zip(common, tokenizer.encode_batch(common), strict=True)
        if abs(float(ratios[np.unique(encoding.ids)].sum())) <= 0.5
    ]
    return neutral[:keep]


def _in_scope(scope_evidence: float, rest_evidence: float) -> bool:
    return scope_evidence >= SCOPE_EVIDENCE and abs(rest_evidence) <= REST_EVIDENCE


def insert_negation(
    sentence: str, rng: np.random.Generator, aside: str | None = None
) -> str | None:
    """ "X was dull" -> "X was not dull" (or "wasn't", or "was never"; with an ``aside``,
    "X was not, to be honest, dull"); None without a copula."""
    match = _COPULA.search(sentence)
    if match is None:
        return None
    verb = match.group(1)
    draw = rng.random()
    if draw < 0.3 and verb.lower() in _CONTRACTED:
        negated = _CONTRACTED[verb.lower()]
        negated = negated[:1].upper() + negated[1:] if verb[:1].isupper() else negated
    elif draw < 0.4:
        negated = f"{verb} never"
    else:
        negated = f"{verb} not"
    if aside is not None:
        negated += f", {aside},"
    return sentence[: match.start()] + negated + sentence[match.end() :]


def remove_negation(sentence: str) -> str | None:
    for pattern, replacement in _REMOVABLE:
        changed, count = pattern.subn(replacement, sentence, count=1)
        if count and _NEGATION.search(changed) is None:
            return changed
    return None


def negations(pools: Pools, count: int, rng: np.random.Generator) -> list[Sample]:
    """Counterfactual pairs: a sentence negated where its polarity sits (after its copula, or
    by a frame around a short one) with the other label, beside the sentence itself; a real
    negated sentence with its label and, without its negation, with the other.

    Each kind draws its source sentences half positive, half negative. Negative sentences
    have their polarity after a copula three times as often ("was awful"), and negated they
    all read positive: drawn as found, "not" would become a word for POSITIVE."""
    kinds = [
        # Real negations are few (about one in 200 sentences qualifies): a small share, so
        # that the same sentences do not come back thousands of times.
        (0.1, _by_label(pools.negated), _without_negation),
        (0.3, _by_label(pools.framable), _framed),
        (0.6, _by_label(pools.negatable), _negated),
    ]
    kinds = [kind for kind in kinds if all(kind[1])]
    out: list[Sample] = []
    if not kinds:
        return out
    shares = np.array([share for share, _, _ in kinds])
    while len(out) < count:
        _, by_label, rewrite = kinds[rng.choice(len(kinds), p=shares / shares.sum())]
        label = int(rng.integers(2))
        sentence = by_label[label][rng.integers(len(by_label[label]))]
        out.extend(rewrite(sentence, label, rng, pools.asides))
    return out[:count]


def _by_label(samples: list[Sample]) -> tuple[list[str], list[str]]:
    return [s for s, y in samples if y == 0], [s for s, y in samples if y == 1]


def _without_negation(
    sentence: str, label: int, rng: np.random.Generator, asides: Sequence[str] = ()
) -> list[Sample]:
    plain = remove_negation(sentence)
    return [(sentence, label)] + ([] if plain is None else [(plain, 1 - label)])


def _framed(
    sentence: str, label: int, rng: np.random.Generator, asides: Sequence[str] = ()
) -> list[Sample]:
    frame = NEGATION_FRAMES[rng.integers(len(NEGATION_FRAMES))]
    if asides and rng.random() < ASIDE_SHARE:  # "I would not say, to be fair, that ..."
        frame = frame.replace(" {s}", f", {asides[int(rng.integers(len(asides)))]}, {{s}}", 1)
    return [(sentence, label), (frame.format(s=_clause(sentence)) + ".", 1 - label)]


def _negated(
    sentence: str, label: int, rng: np.random.Generator, asides: Sequence[str] = ()
) -> list[Sample]:
    aside = (
        asides[int(rng.integers(len(asides)))] if asides and rng.random() < ASIDE_SHARE else None
    )
    negated = insert_negation(sentence, rng, aside)
    return [(sentence, label)] + ([] if negated is None else [(negated, 1 - label)])


def concessions(pools: Pools, count: int, rng: np.random.Generator) -> list[Sample]:
    """Two short polar sentences of opposite labels joined so that one, ``b``, carries the
    verdict: its label is the sample's."""
    by_label = [[s for s, y in pools.framable if y == label] for label in (0, 1)]
    out: list[Sample] = []
    if not all(by_label):
        return out
    for _ in range(count):
        label = int(rng.integers(2))
        a = by_label[1 - label][rng.integers(len(by_label[1 - label]))]
        b = by_label[label][rng.integers(len(by_label[label]))]
        frame = CONCESSION_FRAMES[rng.integers(len(CONCESSION_FRAMES))]
        text = frame.format(
            a=_clause(a), b=_clause(b), A=_sentence(_clause(a))[:-1], B=_sentence(_clause(b))[:-1]
        )
        out.append((text + ".", label))
    return out


def crops(pools: Pools, count: int, rng: np.random.Generator) -> list[Sample]:
    """One to three consecutive sentences of a random review, with its label."""
    out: list[Sample] = []
    if not any(pools.reviews):
        return out
    while len(out) < count:
        review = int(rng.integers(len(pools.reviews)))
        sents = pools.reviews[review]
        if not sents:
            continue
        span = int(rng.integers(1, min(3, len(sents)) + 1))
        start = int(rng.integers(len(sents) - span + 1))
        out.append((" ".join(sents[start : start + span]), int(pools.labels[review])))
    return out


GENERATORS: dict[str, Callable[[Pools, int, np.random.Generator], list[Sample]]] = {
    "crops": crops,
    "negations": negations,
    "concessions": concessions,
}


# -- words read as one ----------------------------------------------------------------------
# Adjectives of nationality: closed-class words a review's verdict should not hang on.
NATIONALITIES = [
    "afghan",
    "albanian",
    "algerian",
    "american",
    "argentine",
    "argentinian",
    "armenian",
    "australian",
    "austrian",
    "bangladeshi",
    "belgian",
    "bolivian",
    "bosnian",
    "brazilian",
    "british",
    "bulgarian",
    "cambodian",
    "cameroonian",
    "canadian",
    "chilean",
    "chinese",
    "colombian",
    "congolese",
    "croatian",
    "cuban",
    "czech",
    "danish",
    "dominican",
    "dutch",
    "ecuadorian",
    "egyptian",
    "english",
    "estonian",
    "ethiopian",
    "filipino",
    "finnish",
    "french",
    "georgian",
    "german",
    "ghanaian",
    "greek",
    "guatemalan",
    "haitian",
    "honduran",
    "hungarian",
    "icelandic",
    "indian",
    "indonesian",
    "iranian",
    "iraqi",
    "irish",
    "israeli",
    "italian",
    "jamaican",
    "japanese",
    "jordanian",
    "kazakh",
    "kenyan",
    "korean",
    "kurdish",
    "lebanese",
    "libyan",
    "lithuanian",
    "malaysian",
    "mexican",
    "mongolian",
    "moroccan",
    "nepalese",
    "nigerian",
    "norwegian",
    "pakistani",
    "palestinian",
    "peruvian",
    "polish",
    "portuguese",
    "romanian",
    "russian",
    "rwandan",
    "saudi",
    "scottish",
    "senegalese",
    "serbian",
    "somali",
    "spanish",
    "sudanese",
    "swedish",
    "swiss",
    "syrian",
    "taiwanese",
    "thai",
    "tibetan",
    "tunisian",
    "turkish",
    "ugandan",
    "ukrainian",
    "uruguayan",
    "venezuelan",
    "vietnamese",
    "welsh",
    "yemeni",
    "zimbabwean",
]
# Personal pronouns of the third person; each group is read as one word, so that who holds an
# opinion (he, she, they) cannot change it.
PRONOUN_GROUPS = (
    ("he", "she", "they"),
    ("him", "his", "her", "them", "their"),
    ("himself", "herself", "themselves"),
)


def first_names() -> set[str]:
    """First names of many countries (lower case), from gender-guesser's dictionary (Jörg
    Michael's nam_dict, about 40,000 names): a word list, no sentiment in it."""
    data = resources.files("gender_guesser") / "data" / "nam_dict.txt"
    names = set()
    for line in data.read_text(encoding="iso-8859-1").splitlines():
        if line.startswith("#") or len(line) < 30:
            continue
        name = line[3:29].strip()
        if name.isascii() and name.isalpha():
            names.add(name.lower())
    return names


def capitalised_share(texts: Sequence[str]) -> dict[str, float]:
    """Per lower-cased word, the share of its occurrences written with a capital inside a
    sentence (after its first word), in ``texts``."""
    capital: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for text in texts:
        for sentence in split_sentences(text):
            for word in _WORD.findall(sentence)[1:]:
                low = word.lower()
                total[low] += 1
                if word[:1].isupper():
                    capital[low] += 1
    return {w: capital[w] / n for w, n in total.items()}


def tied_groups(
    vocab: list[str], texts: Sequence[str], min_capitalised: float = 0.8
) -> dict[str, list[int]]:
    """Ids of the vocabulary words read as one: person names (a first name of the list that
    the training reviews write capitalised at least ``min_capitalised`` of the time, so "will"
    or "grace" stay words), nationalities, and each pronoun group."""
    index = {word: i for i, word in enumerate(vocab)}
    share = capitalised_share(texts)
    names = sorted(
        index[w] for w in first_names() if w in index and share.get(w, 0.0) >= min_capitalised
    )
    groups = {
        "names": names,
        "nationalities": sorted(index[w] for w in NATIONALITIES if w in index),
    }
    for group in PRONOUN_GROUPS:
        groups["/".join(group)] = [index[w] for w in group if w in index]
    return groups
