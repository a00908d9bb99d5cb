"""LightningDataModules and task generators.

Synthetic ICL tasks (one :class:`Episodes` format for all): associative recall, induction head,
label mapping, and weighted mixtures of them. Real text: :class:`TextDataModule` (a corpus, a
trained BPE tokenizer, packed blocks) with template-based classification episodes
(:class:`TemplateTask`).
"""

from lit_icl.data.episodes import Episodes
from lit_icl.data.induction import InductionHeadDataModule
from lit_icl.data.label_mapping import LabelMappingDataModule
from lit_icl.data.mixture import MixtureDataModule
from lit_icl.data.recall import AssociativeRecallDataModule
from lit_icl.data.synthetic import SyntheticICLDataModule
from lit_icl.data.templates import TemplateTask
from lit_icl.data.text import TextDataModule

__all__ = [
    "AssociativeRecallDataModule",
    "Episodes",
    "InductionHeadDataModule",
    "LabelMappingDataModule",
    "MixtureDataModule",
    "SyntheticICLDataModule",
    "TemplateTask",
    "TextDataModule",
]
