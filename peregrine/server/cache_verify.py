"""The semantic cache's guard against false hits: after the vector search finds a cached
question close to the new one, these checks compare the two texts where embeddings are
blind (a sentence embedding barely moves when 5 becomes 6, "is" becomes "isn't" or two
countries swap places). Pure functions of the two texts (and, for the content check, word
vectors the caller computed): each check either passes or names why the pair differs.

The checks, in order (the first that fails is the reason):
  number    the numbers (digits and number words) differ, in value or in order;
  negation  the count of negations (not, no, never, n't, without, ...) differs, or a word
            on one side is a negated form (un-, in-, im-, dis-, ...) of one on the other;
  entity    a named entity (a capitalized word that is not merely the first of a sentence,
            or an acronym) appears on one side only;
  order     the entities both sides share appear in another order (who did what to whom);
  format    the requested formats differ (json, table, bullets, poem, a language, ...);
  qualifier a content word only one side has narrows the question: it follows a
            preposition ("by value", "for seniors", "in water") or is an -ly adverb
            ("permanently", "vertically");
  content   after dropping function words (a stopword list) and filler, a content word was
            replaced by one that is not a near-synonym (word vectors closer than a bound).
Other content words only added or removed pass: the sentence similarity judged them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

REASONS = ("number", "negation", "entity", "order", "format", "qualifier", "content")

# Function words: a change among them alone does not change what is asked.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers herself him himself his how i if in into is it its
itself just me more most my myself of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves
let lets may might must shall also ever yet whats hows whos wheres whens thats theres
one's someone something anything thing things much many via per
""".split())
# Words that ask rather than say what is asked: they may come and go between paraphrases.
FILLER = frozenset("""
please tell explain describe give show know want need like wondering wonder curious help
kindly briefly quick quickly simply simple short shortly exactly actually really basically
way ways best good find out mean meaning means define definition say said says get got
question answer use using used make does work works go going possible able
""".split())
# Openers of an imperative or a question: capitalized at a sentence's start, never a name.
_OPENERS = FILLER | frozenset("""
list write name compare summarize summarise calculate compute convert translate find
identify outline suggest recommend provide create generate draft is are was were do does
did can could would should will may might what which who whom whose when where why how
hey hi hello ok okay so well now
""".split())
NEGATIONS = frozenset("""
not no never none nobody nothing neither nor nowhere without cannot cant dont doesnt didnt
isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt neednt
""".split())
_NEGATING_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")
NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "million": 10**6, "billion": 10**9, "dozen": 12, "half": 0.5, "twice": 2, "double": 2,
    "triple": 3, "single": 1, "once": 1, "first": 1, "second": 2, "third": 3, "fourth": 4,
    "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
    "last": -1,
}
# What shape the answer should take: two requests that differ here want different answers.
FORMATS = frozenset("""
json yaml xml csv html markdown table tables bullet bullets bulleted list numbered paragraph
paragraphs sentence sentences word words essay poem poems haiku limerick sonnet story
summary tweet email letter code python javascript java rust sql bash regex diagram outline
steps step chart
""".split())
# Prepositions that attach a qualifier to what is asked ("sort by value", "diet for
# diabetics"); `of` and `to` are left out: they mostly build the question itself.
_QUALIFYING = frozenset("""
by for at from in on with under over per via as during before after using through into
against within without inside outside
""".split())
_DETERMINERS = frozenset("a an the my your our their its his her this that these those "
                         "some any each every".split())
_WORD = re.compile(r"\d+(?:[.,]\d+)*(?:st|nd|rd|th)?\b|[A-Za-z]+(?:'[A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s*$")


@dataclass(frozen=True)
class Parsed:
    """What the checks look at in one text."""

    words: tuple[str, ...]  # lowercased, apostrophes dropped ("doesn't" -> "doesnt")
    numbers: tuple[float, ...]
    negations: int
    entities: tuple[str, ...]  # lowercased, in order of first appearance
    formats: frozenset[str]
    content: dict[str, str]  # stem -> word, of content words (not numbers, entities, formats)
    qualifiers: frozenset[str]  # stems of content words that narrow the question


def stem(word: str) -> str:
    """A light strip of plural and verb endings, enough to match sort/sorts/sorting/sorted
    and cookie/cookies (a key for comparing, not a word to show)."""
    w = word
    if len(w) <= 3 or w.endswith("ss"):
        return w
    if w.endswith("ies") and len(w) > 4:
        w = w[:-3] + "y"
    elif w.endswith(("ches", "shes", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith(("us", "is")):
        w = w[:-1]
    for suffix in ("ing", "ed"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("eed"):
            w = w[:-len(suffix)]
            break
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w.endswith("y"):
        w = w[:-1] + "i"
    return w


def _number(token: str) -> float | None:
    if token[0].isdigit():
        try:
            return float(token.rstrip("stndrh").replace(",", ""))
        except ValueError:  # "1.2.3": a version, still a number-like token
            return float(abs(hash(token)) % 10**9)
    return NUMBER_WORDS.get(token)


def parse(text: str) -> Parsed:
    """Split `text` into what each check compares."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    words: list[str] = []
    numbers: list[float] = []
    entities: list[str] = []
    negations = 0
    for m in _WORD.finditer(text):
        raw = m.group()
        if raw.endswith("'s"):  # the possessive: France's is France
            raw = raw[:-2]
        word = raw.lower().replace("'", "")
        words.append(word)
        value = _number(word)
        if value is not None:
            numbers.append(value)
        if word in NEGATIONS or word.endswith("nt") and raw.lower().endswith("n't"):
            negations += 1
        starts_sentence = m.start() == 0 or bool(_SENTENCE_END.search(text[:m.start()]))
        capital = raw[0].isupper()
        acronym = len(raw) > 1 and raw.isupper()
        if acronym or capital and not (starts_sentence and (word in _OPENERS or word in
                                                             STOPWORDS or word == "i")):
            if (value is None and word != "i" and word not in FORMATS
                    and word not in entities):
                entities.append(word)
    content: dict[str, str] = {}
    qualifiers: set[str] = set()
    after_preposition = False
    for w in words:
        if (w not in STOPWORDS and w not in NEGATIONS and w not in FILLER and w not in FORMATS
                and _number(w) is None and w not in entities and len(w) > 1):
            content.setdefault(stem(w), w)
            if after_preposition or (w.endswith("ly") and len(w) > 5):
                qualifiers.add(stem(w))
        if w in _QUALIFYING:
            after_preposition = True
        elif w not in _DETERMINERS:
            after_preposition = False
    return Parsed(tuple(words), tuple(numbers), negations, tuple(entities),
                  frozenset(w for w in words if w in FORMATS), content, frozenset(qualifiers))


def replaced_words(cached: str, new: str) -> tuple[frozenset[str], frozenset[str]]:
    """The content words only `cached` has and only `new` has: what the content check
    compares (the caller embeds them to pass as `word_vectors`)."""
    a, b = parse(cached).content, parse(new).content
    return (frozenset(w for k, w in a.items() if k not in b),
            frozenset(w for k, w in b.items() if k not in a))


def _negated_pair(a: set[str], b: set[str]) -> bool:
    """A word only one side has is a prefix-negated form of a word of the other side
    (safe/unsafe, possible/impossible)."""
    for x, y in ((a - b, b), (b - a, a)):
        for w in x:
            if any(w.startswith(p) and w[len(p):] in y and len(w) - len(p) >= 4
                   and w[len(p):] not in STOPWORDS for p in _NEGATING_PREFIXES):
                return True
    return False


def _shared_order(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    shared = set(a) & set(b)
    return [e for e in a if e in shared] == [e for e in b if e in shared]


def _content_ok(only_a: frozenset[str], only_b: frozenset[str],
                word_vectors: Mapping[str, np.ndarray] | None, synonym: float) -> bool:
    """Replaced words (both sides non-empty) must each have a near-synonym on the other
    side; words only added or removed pass."""
    if not only_a or not only_b:
        return True
    if word_vectors is None:
        return False
    fewer, more = sorted((sorted(only_a), sorted(only_b)), key=len)
    if any(w not in word_vectors for w in fewer + more):
        return False
    other = np.stack([word_vectors[w] for w in more])
    return all(float(np.max(other @ word_vectors[w])) >= synonym for w in fewer)


def verify(cached: str, new: str, word_vectors: Mapping[str, np.ndarray] | None = None,
           synonym: float = 0.6) -> str | None:
    """None when `new` may be answered with `cached`'s answer; else the first check that
    failed (one of REASONS). `word_vectors`: unit vectors of the words replaced_words
    returns (without them any replaced content word fails); `synonym`: the least cosine
    of a word and its replacement."""
    a, b = parse(cached), parse(new)
    if a.numbers != b.numbers:
        return "number"
    words_a, words_b = set(a.words), set(b.words)
    if a.negations != b.negations or _negated_pair(words_a, words_b):
        return "negation"
    if any(e not in words_b for e in a.entities) or any(e not in words_a for e in b.entities):
        return "entity"
    if not _shared_order(a.entities, b.entities):
        return "order"
    if a.formats != b.formats:
        return "format"
    if (any(k in a.qualifiers for k in a.content.keys() - b.content.keys())
            or any(k in b.qualifiers for k in b.content.keys() - a.content.keys())):
        return "qualifier"
    # An entity written in lowercase on one side is a content word there only; not a change.
    only_a = frozenset(w for k, w in a.content.items()
                       if k not in b.content and w not in b.entities)
    only_b = frozenset(w for k, w in b.content.items()
                       if k not in a.content and w not in a.entities)
    if not _content_ok(only_a, only_b, word_vectors, synonym):
        return "content"
    return None
