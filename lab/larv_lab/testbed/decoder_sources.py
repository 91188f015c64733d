"""Generation tasks from packaged data, for the decoder testbed (:mod:`.decoder_build`).

Each source reads its package's files into :class:`.sources.GenerationSourceData`: prompts (one
user turn each, the task's template filled in) and their accepted answers (the first is the
training target; a prediction scores when it equals any of them after :func:`normalise`).
Prompts are unique (exact duplicates kept once, their answers merged), so no prompt is both
trained and tested on.

=====================  ===========================  ===========================================
source                 skill                        where, licence
=====================  ===========================  ===========================================
``translate_fra``      English word -> French       Debian ``dict-freedict-eng-fra`` (FreeDict
                                                    0.1.6, GPL-2+), single-word entries
``translate_spa``      English word -> Spanish      Debian ``dict-freedict-eng-spa`` (GPL-2+)
``translate_ita``      English word -> Italian      Debian ``dict-freedict-eng-ita`` (GPL-2+)
``define_noun``        definition -> noun           Debian ``wordnet-base`` ``data.noun``:
                                                    a synset's gloss (examples cut) -> its
                                                    single-word lemmas (WordNet 3.0 licence)
``arithmetic``         word problem -> number       generated (seeded, fixed): +, -, x on
                                                    small numbers in seven templates
``review_sentiment``   review -> positive/negative  the text testbed's ``movie_polarity``
``question_type``      question -> answer type      the text testbed's ``trec_questions``,
                                                    its six coarse types as words
``quote_topic``        quotation -> topic           the text testbed's ``fortune_topic``
                                                    (``songs-poems`` written ``poems``)
=====================  ===========================  ===========================================

A translation accepts every single-word translation the dictionary lists for the headword (all
its entries); the target trained on is the first one of the first entry. ``define_noun``
accepts every single-word lemma of the synset. None of the sources ships a split: the build
keeps a seeded ``test_fraction``.

Users add their own generation tasks with :func:`.sources.register_source` (``train_prompts``,
``train_answers``) or, for a source with a template, :func:`register_generation_task`.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .sources import (
    ANSWER_SEP,
    SOURCES,
    GenerationSourceData,
    SourceSpec,
    load_source,
    register_source,
    source_fingerprint,
    specs_by_name,
)
from .text_sources import WORDNET_NOUNS, _locate_debian

__all__ = [
    "DECODER_TASKS",
    "GENERATION_SOURCES",
    "TEMPLATES",
    "arithmetic_problems",
    "generation_data",
    "normalise",
    "parse_dictd",
    "register_generation_task",
]

#: the decoder testbed's default tasks: six distinct skills (translate_spa / translate_ita are
#: registered too, for recipes that want more than one language)
DECODER_TASKS = (
    "translate_fra",
    "define_noun",
    "arithmetic",
    "review_sentiment",
    "question_type",
    "quote_topic",
)

#: each task's user turn; ``{x}`` is the item
TEMPLATES = {
    "translate_fra": "Translate the English word into French. Answer with one word.\n{x}",
    "translate_spa": "Translate the English word into Spanish. Answer with one word.\n{x}",
    "translate_ita": "Translate the English word into Italian. Answer with one word.\n{x}",
    "define_noun": "Which English noun has this meaning? Answer with one word.\n{x}",
    "arithmetic": "Solve the problem. Answer with the number only.\n{x}",
    "review_sentiment": ("Is this movie review positive or negative? Answer with one word.\n{x}"),
    "question_type": (
        "What kind of answer does this question ask for: abbreviation, description, entity, "
        "person, location or number? Answer with one word.\n{x}"
    ),
    "quote_topic": (
        "Which topic is this quotation about: computers, education, law, people, politics, "
        "science, poems or work? Answer with one word.\n{x}"
    ),
}
#: trec_questions' coarse types, written out (HUM: a person or a group; NUM: any quantity)
QUESTION_TYPES = {
    "ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "person",
    "LOC": "location", "NUM": "number",
}  # fmt: skip
FREEDICT = {"fra": "dict-freedict-eng-fra", "spa": "dict-freedict-eng-spa",
            "ita": "dict-freedict-eng-ita"}  # fmt: skip
#: the arithmetic source's fixed seed and size (its items never change)
ARITHMETIC_SEED, ARITHMETIC_ITEMS = 20260, 3000

_WORD = re.compile(r"^[^\W\d_]+(?:['-][^\W\d_]+)*$")  # letters, inner ' or - (any script)


def normalise(text: str) -> str:
    """The form answers are compared in: the first line, whitespace collapsed, stripped,
    lower-cased, without trailing ``.``, ``!`` or quotes around it ("Chat." == "chat")."""
    line = str(text).strip().split("\n", 1)[0]
    line = " ".join(line.split()).lower()
    return line.rstrip(".!").strip().strip("\"'").strip()


def generation_data(
    name: str, items: Iterable[tuple[str, Sequence[str]]], files: tuple[Path, ...]
) -> GenerationSourceData:
    """A source from ``(prompt, answers)`` pairs: prompts stripped and kept once (the answers of
    a repeated prompt merged, first answer first), answers normalised-distinct."""
    merged: dict[str, list[str]] = {}
    for prompt, answers in items:
        prompt = prompt.strip()
        seen = merged.setdefault(prompt, [])
        for a in answers:
            a = " ".join(str(a).split())
            if a and normalise(a) not in {normalise(s) for s in seen}:
                seen.append(a)
    pairs = [(p, a) for p, a in merged.items() if p and a]
    prompts = np.empty(len(pairs), dtype=object)
    prompts[:] = [p for p, _ in pairs]
    labels = np.empty(len(pairs), dtype=object)
    labels[:] = [ANSWER_SEP.join(a) for _, a in pairs]
    return GenerationSourceData(name, prompts, labels, None, None, (), files)


# --------------------------------------------------------------------------- FreeDict


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _DICTD_B64.index(c)
    return n


def parse_dictd(index_text: str, dict_bytes: bytes) -> dict[str, list[str]]:
    """English headword -> its single-word translations, from a FreeDict dictd database (the
    ``.index``: ``headword<TAB>offset<TAB>length``, numbers in dictd's base 64; the ``.dict``,
    decompressed). An entry's first line is ``headword /IPA/``; the next holds the translations
    (``1. a, b`` numbered senses on their own lines), with ``<pos>`` / ``[domain]`` notes that
    are dropped. Kept: lower-case single-word headwords whose entry is that very word, and the
    translations that are single words (letters, inner ``'`` or ``-``)."""
    out: dict[str, list[str]] = {}
    for ln in index_text.splitlines():
        parts = ln.split("\t")
        if len(parts) != 3 or not _WORD.match(parts[0]) or parts[0] != parts[0].lower():
            continue
        head, off, size = parts[0], _dictd_number(parts[1]), _dictd_number(parts[2])
        body = dict_bytes[off : off + size].decode("utf-8", errors="replace").split("\n")
        if not body or body[0].split(" /", 1)[0].strip() != head:
            continue
        for line in body[1:]:
            if not line.strip() or line.startswith(" "):
                if line.strip():  # an indented example or note ends the translations
                    break
                continue
            line = re.sub(r"<[^>]*>|\[[^\]]*\]", "", re.sub(r"^\s*\d+\.\s*", "", line))
            for word in (w.strip() for w in line.split(",")):
                if _WORD.match(word) and word not in out.setdefault(head, []):
                    out[head].append(word)
    return {h: ws for h, ws in out.items() if ws}


def _read_freedict(lang: str) -> Callable[[tuple[Path, ...]], GenerationSourceData]:
    name = f"translate_{lang}"

    def read(files: tuple[Path, ...]) -> GenerationSourceData:
        index = files[0].read_bytes().decode("utf-8", errors="replace")
        words = parse_dictd(index, gzip.decompress(files[1].read_bytes()))
        template = TEMPLATES[name]
        return generation_data(name, ((template.format(x=h), ws) for h, ws in words.items()), files)

    return read


# --------------------------------------------------------------------------- WordNet


def _read_define(files: tuple[Path, ...]) -> GenerationSourceData:
    # data.noun: offset lex_filenum ss_type w_cnt(hex) word lex_id ... | gloss; "examples"
    items = []
    for ln in files[0].read_bytes().decode("utf-8", errors="replace").splitlines():
        if ln.startswith(" ") or "|" not in ln:  # the licence header lines start with spaces
            continue
        fields, gloss = ln.split("|", 1)
        f = fields.split()
        words = [f[4 + 2 * i] for i in range(int(f[3], 16))]
        lemmas = [w.lower() for w in words if _WORD.match(w) and w == w.lower()]
        definition = re.split(r';\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
        # a definition that names its own answer would test reading, not recall
        if (
            lemmas
            and definition
            and not any(
                re.search(rf"\b{re.escape(w)}\b", definition, re.IGNORECASE) for w in lemmas
            )
        ):
            items.append((TEMPLATES["define_noun"].format(x=definition), lemmas))
    return generation_data("define_noun", items, files)


# --------------------------------------------------------------------------- arithmetic

_PEOPLE = ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
_THINGS = ("apples", "marbles", "books", "stamps", "coins", "pencils", "cards", "shells")
_ARITH = (
    ("+", "{p} has {a} {t}. {q} gives {p} {b} more {t}. How many {t} does {p} have now?"),
    ("+", "A box holds {a} {t} and a bag holds {b} {t}. How many {t} are there in all?"),
    ("-", "{p} has {a} {t} and gives {b} of them to {q}. How many {t} does {p} have left?"),
    ("-", "There are {a} {t} on a table. {p} takes away {b}. How many {t} are on the table?"),
    ("*", "{p} buys {a} packs of {t}. Each pack holds {b} {t}. How many {t} does {p} buy?"),
    ("*", "There are {a} rows of {t} with {b} {t} in each row. How many {t} are there?"),
    ("+", "{p} read {a} pages on Monday and {b} pages on Tuesday. How many pages in total?"),
)


def arithmetic_problems(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct word problems and their answers, drawn with ``seed``: a template of
    :data:`_ARITH` (+: a, b in 2..60; -: a in 10..99, b in 1..a-1; x: a, b in 2..12), two
    different names, a thing."""
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    while len(out) < n:
        op, text = _ARITH[rng.integers(len(_ARITH))]
        if op == "+":
            a, b = (int(v) for v in rng.integers(2, 61, 2))
        elif op == "-":
            a = int(rng.integers(10, 100))
            b = int(rng.integers(1, a))
        else:
            a, b = (int(v) for v in rng.integers(2, 13, 2))
        p, q = (str(v) for v in rng.choice(_PEOPLE, 2, replace=False))
        t = str(_THINGS[rng.integers(len(_THINGS))])
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        out.setdefault(text.format(p=p, q=q, a=a, b=b, t=t), answer)
    return list(out.items())


def _read_arithmetic(files: tuple[Path, ...]) -> GenerationSourceData:
    problems = arithmetic_problems(ARITHMETIC_ITEMS, ARITHMETIC_SEED)
    items = ((TEMPLATES["arithmetic"].format(x=q), [str(a)]) for q, a in problems)
    return generation_data("arithmetic", items, files)


def _arithmetic_fingerprint() -> list[str]:
    from .sources import _texts_sha256

    d = load_source("arithmetic")
    return ["generated:" + _texts_sha256(d.train_inputs, d.train_labels)]


# --------------------------------------------------------------------------- text sources


def _from_text(name: str, base: str, answer: Callable[[str], str]):
    """A generation source over a text classification source: its texts in the template, its
    class names (through ``answer``) as the answers."""

    def read(_files: tuple[Path, ...]) -> GenerationSourceData:
        d = load_source(base)
        texts = list(d.train_inputs) + list(d.test_inputs if d.test_inputs is not None else [])
        labels = list(d.train_labels) + list(d.test_labels if d.test_labels is not None else [])
        items = (
            (TEMPLATES[name].format(x=t), [answer(d.class_names[y])])
            for t, y in zip(texts, labels, strict=True)
        )
        return generation_data(name, items, d.files)

    spec = SOURCES[base]
    return spec, read, lambda: source_fingerprint(base)


# --------------------------------------------------------------------------- registry


def _gen_spec(name, description, package, hint, licence, locate, read, fingerprint=None):
    return SourceSpec(
        name, description, package, hint, licence, locate, read, fingerprint, "generation"
    )


_DEB_HINT = (
    "WITH_DECODER=1 bash lab/scripts/install_testbed_sources.sh   # extracts {files} from the .deb of "
    "Debian's {package} into $FUSION_BENCH_LARV_SOURCES/{package}/"
)


def _freedict_spec(lang: str) -> SourceSpec:
    package = FREEDICT[lang]
    rels = (f"usr/share/dictd/freedict-eng-{lang}.index",
            f"usr/share/dictd/freedict-eng-{lang}.dict.dz")  # fmt: skip
    language = {"fra": "French", "spa": "Spanish", "ita": "Italian"}[lang]
    return _gen_spec(
        f"translate_{lang}",
        f"English word -> {language} word (FreeDict, single-word entries)",
        f"apt: {package} (extracted)",
        _DEB_HINT.format(files="the dictd index and dictionary", package=package),
        "GPL-2+ (FreeDict; Debian copyright file)",
        _locate_debian(package, rels, f"translate_{lang}"),
        _read_freedict(lang),
    )


_movie, _read_movie_gen, _movie_fp = _from_text("review_sentiment", "movie_polarity", str)
_trec, _read_trec_gen, _trec_fp = _from_text("question_type", "trec_questions", QUESTION_TYPES.get)
_fortune, _read_fortune_gen, _fortune_fp = _from_text(
    "quote_topic", "fortune_topic", lambda c: {"songs-poems": "poems"}.get(c, c)
)

GENERATION_SOURCES: dict[str, SourceSpec] = specs_by_name(
    *(_freedict_spec(lang) for lang in FREEDICT),
    _gen_spec(
        "define_noun",
        "WordNet noun gloss -> a single-word lemma of the synset",
        "apt: wordnet-base (extracted)",
        _DEB_HINT.format(files="data.noun", package="wordnet-base"),
        "WordNet 3.0 licence (Princeton; permissive)",
        _locate_debian("wordnet-base", (WORDNET_NOUNS,), "define_noun"),
        _read_define,
    ),
    _gen_spec(
        "arithmetic",
        f"{ARITHMETIC_ITEMS} generated word problems (+, -, x), fixed seed {ARITHMETIC_SEED}",
        "generated (no package)",
        "(nothing to install)",
        "generated by this project (MIT)",
        lambda: (),
        _read_arithmetic,
        _arithmetic_fingerprint,
    ),
    _gen_spec(
        "review_sentiment",
        "movie-review snippet -> positive / negative (movie_polarity)",
        _movie.package,
        _movie.install_hint,
        _movie.licence,
        _movie.locate,
        _read_movie_gen,
        _movie_fp,
    ),
    _gen_spec(
        "question_type",
        "TREC question -> its coarse answer type as a word (trec_questions)",
        _trec.package,
        _trec.install_hint,
        _trec.licence,
        _trec.locate,
        _read_trec_gen,
        _trec_fp,
    ),
    _gen_spec(
        "quote_topic",
        "fortune(6) quotation -> its category as a word (fortune_topic)",
        _fortune.package,
        _fortune.install_hint,
        _fortune.licence,
        _fortune.locate,
        _read_fortune_gen,
        _fortune_fp,
    ),
)
SOURCES.update(GENERATION_SOURCES)


def register_generation_task(
    name: str,
    template: str,
    items: Callable[[], Iterable[tuple[str, str | Sequence[str]]]],
    **kw,
) -> SourceSpec:
    """Register a user's generation task: ``items()`` yields ``(x, answers)`` pairs (answers: a
    ``str`` or accepted answers, the first trained on), each ``x`` put into ``template``
    (``{x}``). A thin layer over :func:`.sources.register_source` (``kw``: its options)."""
    if "{x}" not in template:
        raise ValueError("the template must hold {x}")

    def loader():
        pairs = [(template.format(x=x), [a] if isinstance(a, str) else list(a)) for x, a in items()]
        return generation_data(name, pairs, ())

    return register_source(name, loader, **kw)
