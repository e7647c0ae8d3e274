"""Cut a text into sentences, and sentences into clauses where the writer turns ("... but ...").

Reviews often praise one thing and pan another in the same sentence ("The acting was wonderful
but the plot was dull."), so sentence boundaries alone would hide most mixed verdicts. The
segments are character spans of the original text (Python string indices, i.e. code points),
white space trimmed; each holds at least one word character.

Rules, in order:

- a sentence ends after ``.``, ``!``, ``?`` or ``…`` (with any closing quotes or brackets) that
  white space follows, but not after a title such as ``Mr.``, and at a line break and the site's
  HTML line break ``<br />``;
- inside a sentence, a clause ends at ``;`` and before a contrasting conjunction (``but``,
  ``however``, ``although``, ``though``, ``whereas``, ``nevertheless``, ``nonetheless``,
  ``except``; ``yet`` after a comma);
- a clause of fewer than ``MIN_CLAUSE_WORDS`` words joins its neighbour ("..., though." is not a
  verdict of its own).
"""

from __future__ import annotations

import re

MIN_CLAUSE_WORDS = 3
# A text is "mixed" when one of its segments is POSITIVE and another NEGATIVE, each with a
# calibrated probability of at least this: both verdicts are clear, not one of them a shrug.
MIXED_CONFIDENCE = 0.75

_SENTENCE_BREAK = re.compile(
    # after the mark, or after the mark and one closing quote or bracket (kept in the sentence)
    r"(?<=[.!?\u2026])\s+|(?<=[.!?\u2026][\"'\u201d\u2019)\]])\s+|\s*<br\s*/?>\s*|\s*\n\s*",
    flags=re.IGNORECASE,
)
_CLAUSE_BREAK = re.compile(
    r";\s*|\s+(?=(?:but|however|although|though|whereas|nevertheless|nonetheless|except)\b)"
    r"|(?<=,)\s+(?=yet\b)",
    flags=re.IGNORECASE,
)
_TITLE = re.compile(r"\b(?:mr|mrs|ms|dr|st|jr|sr|vs|prof|e\.g|i\.e)\.$", flags=re.IGNORECASE)
_WORD = re.compile(r"\w+")

Span = tuple[int, int]


def split(text: str) -> list[Span]:
    """The sentence-or-clause spans of ``text``, in order; ``text[start:end]`` is each one."""
    sentences: list[Span] = []
    for span in _cut(text, _SENTENCE_BREAK, 0, len(text)):
        if sentences and _TITLE.search(text, sentences[-1][0], sentences[-1][1]):
            sentences[-1] = (sentences[-1][0], span[1])
        else:
            sentences.append(span)
    return [clause for start, end in sentences for clause in _clauses(text, start, end)]


def _cut(text: str, pattern: re.Pattern[str], start: int, end: int) -> list[Span]:
    """The spans of ``text[start:end]`` between matches of ``pattern``, trimmed, with words."""
    spans = []
    at = start
    for match in pattern.finditer(text, start, end):
        spans.append((at, match.start()))
        at = match.end()
    spans.append((at, end))
    return [s for s in (_trim(text, a, b) for a, b in spans) if _WORD.search(text, s[0], s[1])]


def _clauses(text: str, start: int, end: int) -> list[Span]:
    merged: list[Span] = []
    for span in _cut(text, _CLAUSE_BREAK, start, end):
        short = min(_words(text, span), _words(text, merged[-1])) if merged else MIN_CLAUSE_WORDS
        if short < MIN_CLAUSE_WORDS:
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return merged


def _words(text: str, span: Span) -> int:
    return sum(1 for _ in _WORD.finditer(text, span[0], span[1]))


def _trim(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
