"""The ``functions`` source: "x -> y" tasks of the in-context-learning mechanism literature, built
offline from data files that four pinned wheels ship (read as archives, never imported).

Each task maps a short input (a word, a country name) to one short answer. Zero-shot, a prompt
such as ``apple ->`` is ambiguous; a few demonstrations define the function. These are the tasks
of Hendel, Geva & Globerson (2023), "In-Context Learning Creates Task Vectors" (Findings of
EMNLP), and Todd et al. (2024), "Function Vectors in Large Language Models" (ICLR).

==================  ====================================================  ======================
task                example                                               data
==================  ====================================================  ======================
uppercase           apple -> APPLE                                        words
capitalize          apple -> Apple                                        words
first_letter        apple -> a                                            words
last_letter         apple -> e                                            words
word_length         apple -> 5                                            words
past_tense          take -> took                                          lemminflect + words
plural              child -> children                                     lemminflect + words
country_capital     France -> Paris                                       countryinfo + csc
country_currency    Japan -> Japanese yen                                 countryinfo + csc
country_continent   Peru -> South America                                 countryinfo + csc
country_french      Germany -> Allemagne                                  countryinfo + csc
country_german      France -> Frankreich                                  countryinfo + csc
country_spanish     Germany -> Alemania                                   countryinfo + csc
==================  ====================================================  ======================

- words: ``spellchecker/resources/en.json.gz`` of pyspellchecker (word -> count in the
  OpenSubtitles2018 corpus, Lison & Tiedemann 2016); the common words are the most frequent
  lower-case alphabetic words of 3-10 letters that the SPECIALIST Lexicon (below) lists as a base
  form (names, contractions and inflected forms are left out);
- lemminflect: ``lemminflect/resources/infl_lu.csv.gz`` (lemma, part of speech, inflected forms,
  from the NLM SPECIALIST Lexicon); the inflection tasks take the lower-case verbs and nouns of
  2-12 letters whose inflected form is most frequent in the word counts (take -> took before
  neck -> necked);
- countryinfo: ``countryinfo/data/*.json`` (one file per country, keyed by ISO 3166-1 alpha-2);
- csc: ``countrystatecity_countries/data/countries.json`` of countrystatecity-countries (the
  countries-states-cities database).

Every task has exactly one answer per input: an input listed with two answers (``dream`` ->
dreamed/dreamt, ``be`` -> was/were) is dropped; a country fact is kept only where the two country
sources agree (the capital up to accents and case, the currency's ISO 4217 code, the continent, the
translated name exactly), which drops stale entries (Nur-Sultan against Astana) and typos. The
identity is never an item of ``plural`` (mostly mass nouns: news -> news) or of the translations
(Canada -> Canada): there copying the input would score; ``past_tense`` keeps cut -> cut. Each task
is split once with seed 0: ``validation.jsonl`` holds min(200, half) of the items, ``train.jsonl``
the rest (the demonstration pool), and no input is on both sides.
"""

from __future__ import annotations

import gzip
import json
import re
import unicodedata
from collections import defaultdict
from typing import Callable

import numpy as np

from lit_icl.sources.cache import Archive, Writer

__all__ = ["FILES", "MAX_ITEMS", "MAX_VALIDATION", "SPLIT_SEED", "TASKS", "extract_functions", "split_items"]

SPLIT_SEED = 0
MAX_VALIDATION = 200  # held-out queries per task (at most half of the items)
MAX_ITEMS = 1000  # per word or inflection task: the most frequent qualifying inputs
WORD = re.compile(r"[a-z]{3,10}")  # the word tasks' inputs
LEMMA = re.compile(r"[a-z]{2,12}")  # the inflection tasks' inputs (go -> went, do -> did)

FILES = {  # the archive member each data file is read from, with its package and licence
    "words": ("spellchecker/resources/en.json.gz", "pyspellchecker==0.9.1",
              "MIT (the package); counts from the OpenSubtitles2018 corpus of OPUS (Lison & Tiedemann, 2016)"),
    "inflections": ("lemminflect/resources/infl_lu.csv.gz", "lemminflect==0.2.3",
                    "MIT (the package); derived from the NLM SPECIALIST Lexicon (free, NLM terms of use)"),
    "countryinfo": ("countryinfo/data/*.json", "countryinfo==1.0.1", "MIT (data mostly from Wikipedia)"),
    "csc": ("countrystatecity_countries/data/countries.json", "countrystatecity-countries==2.0.1",
            "ODbL-1.0 (countries-states-cities database, dr5hn): attribute it; adapted data stays ODbL"),
}
FUND_CODES = {"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "USS", "UYI", "UYW"}  # ISO 4217 funds, not money
LANGUAGES = {"country_french": "fr", "country_german": "de", "country_spanish": "es"}


def split_items(items: dict[str, str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """``(train, validation)`` inputs: the inputs in sorted order, permuted with ``seed``; the
    first min(MAX_VALIDATION, half) are held out."""
    inputs = sorted(items)
    order = [inputs[i] for i in np.random.default_rng(seed).permutation(len(inputs))]
    held = min(MAX_VALIDATION, len(inputs) // 2)
    return order[held:], order[:held]


def _one_answer(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], int]:
    """``{input: output}`` of the inputs with exactly one distinct, non-empty, single-line answer
    (in first-seen order), and how many inputs were dropped for having several."""
    answers = defaultdict(list)
    for x, y in pairs:
        if y not in answers[x]:
            answers[x].append(y)
    kept = {x: ys[0] for x, ys in answers.items() if len(ys) == 1 and ys[0].strip() and "\n" not in ys[0]}
    return kept, len(answers) - len(kept)


def _fold(text: str) -> str:
    """``text`` without accents, lower-cased: ``Bogotá`` and ``Bogota`` compare equal."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold().strip()


def _inflections(data: bytes) -> tuple[dict[tuple[str, str], list[str]], set[str]]:
    """``{(lemma, "VBD" | "NNS"): [forms]}`` of the lower-case verbs and nouns of ``infl_lu.csv``
    (``lemma,verb,past/past2,participle,ing,third`` and ``lemma,noun,plural/plural2``), and every
    lower-case lemma it lists (adjectives and adverbs too)."""
    out, lemmas = defaultdict(list), set()
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        lemma, pos, *forms = line.split(",")
        if not re.fullmatch(r"[a-z]+", lemma):
            continue
        lemmas.add(lemma)
        tag = {"verb": "VBD", "noun": "NNS"}.get(pos)
        for form in forms[0].split("/") if tag and forms and forms[0] else ():
            if form not in out[lemma, tag]:
                out[lemma, tag].append(form)
    return out, lemmas


def _word_tasks(counts: dict[str, int], lemmas: set[str]) -> dict[str, tuple[str, dict, int]]:
    words = sorted((w for w in counts if WORD.fullmatch(w) and w in lemmas), key=lambda w: (-counts[w], w))
    words = words[:MAX_ITEMS]
    rules: dict[str, tuple[str, Callable[[str], str]]] = {
        "uppercase": ("a common English word -> the word in upper case", str.upper),
        "capitalize": ("a common English word -> the word with its first letter capitalized", str.capitalize),
        "first_letter": ("a common English word -> its first letter", lambda w: w[0]),
        "last_letter": ("a common English word -> its last letter", lambda w: w[-1]),
        "word_length": ("a common English word -> its number of letters, in digits", lambda w: str(len(w))),
    }
    return {task: (text, *_one_answer([(w, rule(w)) for w in words])) for task, (text, rule) in rules.items()}


def _inflection_tasks(forms: dict[tuple[str, str], list[str]], counts: dict[str, int]) -> dict:
    out = {}
    for task, tag, text in (("past_tense", "VBD", "a common English verb (base form) -> its simple past"),
                            ("plural", "NNS", "a common English noun (singular) -> its plural")):
        pairs = [(lemma, f) for (lemma, t), fs in forms.items() if t == tag and LEMMA.fullmatch(lemma)
                 and lemma in counts for f in fs]
        common = {}  # lemma -> the count of its least frequent form: neck -> necked is rare, take -> took not
        for x, y in pairs:
            common[x] = min(common.get(x, counts[x]), counts.get(y, 0))
        if task == "plural":
            identical = {x for x, y in pairs if x == y}  # mass nouns (news, data): the identity would score
            pairs = [(x, y) for x, y in pairs if x not in identical]
        items, dropped = _one_answer(pairs)
        ranked = sorted((x for x in items if common[x] > 0), key=lambda x: (-common[x], x))
        out[task] = (text, {x: items[x] for x in ranked[:MAX_ITEMS]}, dropped)
    return out


def _continent(region: str, subregion: str, intermediate: str = "") -> str:
    """The continent of a UN M49 region (the Americas split into North and South America)."""
    if region in ("Africa", "Asia", "Europe", "Oceania"):
        return region
    if region == "Americas":
        if "South America" in (subregion, intermediate):
            return "South America"
        if subregion in ("Northern America", "Central America", "Caribbean") or \
                intermediate in ("Central America", "Caribbean"):
            return "North America"
    return ""


def _country_tasks(countryinfo: dict[str, bytes], csc: bytes) -> dict:
    """The country facts on which countryinfo (one file per ISO alpha-2 code; a code with two
    files is left out) and the countries-states-cities database agree, keyed by countryinfo's
    English name."""
    files = defaultdict(list)
    for data in countryinfo.values():
        info = json.loads(data)
        if isinstance(info.get("ISO"), dict) and info["ISO"].get("alpha2"):
            files[info["ISO"]["alpha2"]].append(info)
    other = {c["iso2"]: c for c in json.loads(csc)}
    pairs = defaultdict(list)
    for code, found in sorted(files.items()):
        if len(found) != 1 or code not in other:
            continue
        a, b = found[0], other[code]
        name = a.get("name")
        if not isinstance(name, str) or not name or any(c in name for c in ",()"):
            continue
        capital = a.get("capital")
        if isinstance(capital, str) and isinstance(b.get("capital"), str) and not any(c in capital for c in "/,") \
                and capital.strip() and _fold(capital) == _fold(b["capital"]):
            pairs["country_capital"].append((name, capital))
        currencies = [c for c in a.get("currencies") or [] if c not in FUND_CODES]
        if currencies == [b.get("currency")] and b.get("currency_name"):
            pairs["country_currency"].append((name, b["currency_name"]))
        continent = _continent(a.get("region") or "", a.get("subregion") or "", a.get("intermediateregion") or "")
        if continent and continent == _continent(b.get("region") or "", b.get("subregion") or ""):
            pairs["country_continent"].append((name, continent))
        for task, lang in LANGUAGES.items():
            word = (a.get("translations") or {}).get(lang)
            if word and word == (b.get("translations") or {}).get(lang) and word != name:
                pairs[task].append((name, word))
    texts = {"country_capital": "a country or territory (English name) -> its capital city",
             "country_currency": "a country or territory -> the name of its currency (one ISO 4217 code)",
             "country_continent": "a country or territory -> its continent (UN M49 regions; the Americas "
                                  "split into North and South America)",
             "country_french": "a country's English name -> its French name",
             "country_german": "a country's English name -> its German name",
             "country_spanish": "a country's English name -> its Spanish name"}
    return {task: (text, *_one_answer(pairs[task])) for task, text in texts.items()}


TASKS = ("uppercase", "capitalize", "first_letter", "last_letter", "word_length", "past_tense", "plural",
         "country_capital", "country_currency", "country_continent", "country_french", "country_german",
         "country_spanish")
SOURCES_OF = {**dict.fromkeys(TASKS[:5], ("words", "inflections")), "past_tense": ("inflections", "words"),
              "plural": ("inflections", "words"), **dict.fromkeys(TASKS[7:], ("countryinfo", "csc"))}


def _read_one(archive: Archive, member: str) -> bytes:
    (data,) = archive.read(member).values()
    return data


def extract_functions(archives: list[Archive], out: Writer) -> dict:
    """The extractor of the ``functions`` source: ``archives`` are the wheels of pyspellchecker,
    lemminflect, countryinfo and countrystatecity-countries, in that order. Writes
    ``<task>/train.jsonl`` and ``<task>/validation.jsonl`` (``{"input", "output"}`` per line)
    for every task of :data:`TASKS`; returns the manifest facts of each."""
    keys = list(FILES)
    if len(archives) != len(keys):
        raise ValueError(f"the functions source reads {len(keys)} packages ({[FILES[k][1] for k in keys]}), "
                         f"got {len(archives)}")
    by_key = dict(zip(keys, archives))
    for key, archive in by_key.items():
        wanted = FILES[key][1].split("==")[0].replace("-", "_")
        if not archive.path.name.lower().startswith(wanted):
            raise ValueError(f"package {archive.path.name} is in the place of {FILES[key][1]}")
    counts = json.loads(gzip.decompress(_read_one(by_key["words"], FILES["words"][0])))
    forms, lemmas = _inflections(_read_one(by_key["inflections"], FILES["inflections"][0]))
    tasks = {**_word_tasks(counts, lemmas), **_inflection_tasks(forms, counts),
             **_country_tasks(by_key["countryinfo"].read(FILES["countryinfo"][0]),
                              _read_one(by_key["csc"], FILES["csc"][0]))}
    facts = {}
    for task in TASKS:
        description, items, dropped = tasks[task]
        train, val = split_items(items)
        for split, inputs in (("train", train), ("validation", val)):
            out.write(f"{task}/{split}.jsonl", "".join(json.dumps({"input": x, "output": items[x]}, ensure_ascii=False)
                                                       + "\n" for x in inputs).encode())
        used = SOURCES_OF[task]
        facts[task] = {"description": description, "train": len(train), "validation": len(val),
                       "dropped_ambiguous": dropped,
                       "package": [FILES[k][1] for k in used], "file": [FILES[k][0] for k in used],
                       "licence": "; ".join(f"{FILES[k][1]}: {FILES[k][2]}" for k in used)}
    return {"tasks": facts, "split_seed": SPLIT_SEED, "max_validation": MAX_VALIDATION}
