"""LightningDataModules and task generators."""

from lit_icl.data.episodes import Episodes
from lit_icl.data.recall import AssociativeRecallDataModule

__all__ = ["AssociativeRecallDataModule", "Episodes"]
