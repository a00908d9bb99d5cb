"""Template-based episodes: classification tasks (the momentum-attention paper's evaluation style)
and open-vocabulary function tasks ("france -> Paris"; Hendel et al. 2023, Todd et al. 2024).

A :class:`TemplateTask` names a classification dataset with a text and a label field, a
verbalizer (label -> word) and a template such as ``"Review: {text}\\nSentiment: {label}\\n"``.
With a tokenizer, :class:`TemplateEpisodes` turns it into :class:`~lit_icl.data.episodes.Episodes`
that the ICL callback evaluates like the synthetic tasks':

- a demonstration is the template filled with a train-split example and its label word;
- the query is a validation-split example's template up to ``{label}``, without the whitespace
  just before ``{label}``: that whitespace starts the label instead (``" positive"``), as the
  byte-level BPE attaches a space to the word after it;
- the candidates are the first tokens of the verbalizer words (with that whitespace), which must
  be distinct, and the answer is the query's;
- a task without a verbalizer is open-vocabulary: the label field holds the answer itself (a
  word of one or more tokens, e.g. a function task of the ``functions`` source), the episode
  carries the answer's tokens (with that whitespace) and is scored by exact match;
- queries: a seeded permutation of the validation split (cycled when more episodes are asked
  for); demonstrations: ``k`` train examples drawn per episode with its own seed, either
  uniformly without replacement or ``balanced`` (classes as equal as possible: a round-robin over
  a random class order of per-class random draws), shown in a random order. The same episode
  index draws the same examples for every ``k``: the demonstrations of ``k`` shots are a subset
  of those of ``k + 1``.

Demonstrations and queries differ in length, so the episodes are left-padded (``shot_index``
``-1`` and ``query_mask`` 0 at padding). A DataModule keeps its tasks in a
:class:`TemplateTaskSet`, which builds each task's episodes once and serves them again, and gets
its ``heldout_tasks`` / ``heldout_episodes`` from :class:`TemplateHeldout` (TextDataModule and
TemplateDataModule alike).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tokenizers import Tokenizer

from lit_icl.data.episodes import Episodes
from lit_icl.data.load import load_source
from lit_icl.data.synthetic import stream_generator
from lit_icl.data.tokenizer import EOS

__all__ = ["TemplateEpisodes", "TemplateHeldout", "TemplateTask", "TemplateTaskSet"]

QUERIES, DEMOS = 0, 1  # streams of a task's seed


@dataclass
class TemplateTask:
    """One classification task as template-based ICL episodes.

    Args:
        name: the task's name in ``heldout_tasks()`` and the logs.
        source: a local JSON(L)/CSV/parquet file or directory, a named source (``mr``, ``bbc``)
            or a hub dataset name (see :mod:`lit_icl.data.load`); it must provide ``train_split`` and ``eval_split``
            (a directory holding ``train.jsonl`` and ``validation.jsonl`` does).
        config_name: the hub dataset's configuration (e.g. ``sst2`` of ``nyu-mll/glue``).
        text_field: the column holding the input text.
        label_field: the column holding the label (int or str).
        verbalizer: label -> word; the keys are compared with ``str(label)``, so ``{0: negative}``
            and ``{"0": negative}`` are the same. Examples with other labels are an error. Empty:
            an open-vocabulary task, whose label field is the answer word itself.
        template: the text of one example, with ``{text}`` before a single ``{label}``.
        train_split: the split the demonstrations are drawn from.
        eval_split: the split the queries are drawn from.
        balanced: draw the demonstrations of an episode with as equal class counts as possible
            (a label task; an open-vocabulary task draws uniformly).
        seed: seed of the query order and the demonstration draws.
    """

    name: str
    source: str
    config_name: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    verbalizer: dict[str, str] = field(default_factory=dict)
    template: str = "{text}\n{label}\n"
    train_split: str = "train"
    eval_split: str = "validation"
    balanced: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.verbalizer = {str(k): str(v) for k, v in self.verbalizer.items()}
        before, _, after = self.template.partition("{label}")
        if "{text}" not in before or "{label}" in after or "{text}" in after:
            raise ValueError(
                f"TemplateTask {self.name!r}: template={self.template!r} needs {{text}} before a single {{label}}"
            )
        words = list(self.verbalizer.values())
        if words and len(words) < 2 or not all(w.strip() for w in words) or len(set(words)) != len(words):
            raise ValueError(
                f"TemplateTask {self.name!r}: verbalizer={self.verbalizer} must map at least two labels to "
                "distinct, non-empty words (or be empty: an open-vocabulary task)"
            )

    @property
    def open_vocabulary(self) -> bool:
        """No verbalizer: the label field holds the answer word itself."""
        return not self.verbalizer

    @property
    def parts(self) -> tuple[str, str, str]:
        """``(prefix, space, suffix)``: the template before ``{label}`` without its trailing
        whitespace, that whitespace, and the template after ``{label}``."""
        before, _, after = self.template.partition("{label}")
        prefix = before.rstrip()
        return prefix, before[len(prefix):], after


class TemplateEpisodes:
    """A :class:`TemplateTask`'s train and eval examples in memory, and its episodes.

    Args:
        task: the task.
        cache_dir: the ``datasets`` cache (its default when ``None``).
    """

    def __init__(self, task: TemplateTask, cache_dir: str | None = None) -> None:
        self.task = task
        splits = load_source(task.source, task.config_name, cache_dir=cache_dir)
        self.train_texts, self.train_labels = self._examples(splits, task.train_split)
        self.eval_texts, self.eval_labels = self._examples(splits, task.eval_split)
        self.by_class: dict[str, list[int]] = {label: [] for label in task.verbalizer}
        for row, label in enumerate(self.train_labels if not task.open_vocabulary else []):
            self.by_class[label].append(row)

    def _examples(self, splits, split: str) -> tuple[list[str], list[str]]:
        task = self.task
        if split not in splits:
            raise ValueError(f"TemplateTask {task.name!r}: no split {split!r} in {task.source!r}; it has {list(splits)}")
        data = splits[split]
        missing = {task.text_field, task.label_field} - set(data.column_names)
        if missing:
            raise ValueError(
                f"TemplateTask {task.name!r}: split {split!r} lacks the fields {sorted(missing)}; it has "
                f"{data.column_names}"
            )
        labels = [str(label) for label in data[task.label_field]]
        unknown = [] if task.open_vocabulary else sorted(set(labels) - set(task.verbalizer))
        if task.open_vocabulary and any(not label.strip() for label in labels):
            raise ValueError(f"TemplateTask {task.name!r}: split {split!r} has empty answers in {task.label_field!r}")
        if unknown or not labels:
            raise ValueError(
                f"TemplateTask {task.name!r}: split {split!r} has {len(labels)} examples and labels {unknown[:10]} "
                f"outside the verbalizer {sorted(task.verbalizer)}"
            )
        return [str(t) for t in data[task.text_field]], labels

    def format(self, text: str, label: str | None = None) -> str:
        """The template filled with ``text`` and ``label``'s word (a demonstration), or, without a
        label, up to the label without the whitespace before it (a query)."""
        prefix, space, suffix = self.task.parts
        query = prefix.replace("{text}", text)
        return query if label is None else query + space + self.task.verbalizer.get(label, label) + suffix

    def candidates(self, tokenizer: Tokenizer) -> dict[str, int]:
        """label -> the first token of its word as it follows the query (the candidates)."""
        _, space, _ = self.task.parts
        first = {label: tokenizer.encode(space + word, add_special_tokens=False).ids[0]
                 for label, word in self.task.verbalizer.items()}
        if len(set(first.values())) != len(first):
            tokens = {w: tokenizer.id_to_token(first[label]) for label, w in self.task.verbalizer.items()}
            raise ValueError(
                f"TemplateTask {self.task.name!r}: the verbalizer words must start with distinct tokens, got {tokens}"
            )
        return first

    def demonstration_rows(self, n_shots: int, episode: int) -> list[int]:
        """The train rows of episode ``episode``'s ``n_shots`` demonstrations, in shown order."""
        gen = stream_generator(self.task.seed, DEMOS, episode)
        n = len(self.train_labels)
        if not self.task.balanced or self.task.open_vocabulary:
            if n_shots > n:
                raise ValueError(f"TemplateTask {self.task.name!r}: {n_shots} shots but {n} train examples")
            return torch.randperm(n, generator=gen)[:n_shots].tolist()
        by_class = self.by_class
        classes = [c for c in by_class if by_class[c]]
        per_class = math.ceil(n_shots / len(classes))
        if per_class > min(len(by_class[c]) for c in classes):
            raise ValueError(f"TemplateTask {self.task.name!r}: too few train examples per class for {n_shots} shots")
        order = [classes[i] for i in torch.randperm(len(classes), generator=gen).tolist()]
        draws = {c: [by_class[c][i] for i in torch.randperm(len(by_class[c]), generator=gen)[:per_class]]
                 for c in classes}
        rows = [draws[order[j % len(order)]][j // len(order)] for j in range(n_shots)]
        shown = torch.randperm(n_shots, generator=stream_generator(self.task.seed, DEMOS, episode, n_shots))
        return [rows[i] for i in shown.tolist()]

    def episodes(self, tokenizer: Tokenizer, n_shots: int, num_episodes: int, pad_id: int = 0) -> Episodes:
        """``num_episodes`` episodes of ``n_shots`` demonstrations, tokenized by ``tokenizer``."""
        if n_shots < 0 or num_episodes < 1:
            raise ValueError(f"heldout_episodes: need n_shots >= 0 and num_episodes >= 1, got {n_shots}, {num_episodes}")
        first = {} if self.task.open_vocabulary else self.candidates(tokenizer)
        order = torch.randperm(len(self.eval_labels), generator=stream_generator(self.task.seed, QUERIES)).tolist()
        queries = [order[i % len(order)] for i in range(num_episodes)]
        rows = [self.demonstration_rows(n_shots, i) for i in range(num_episodes)]
        demo_texts = [self.format(self.train_texts[r], self.train_labels[r]) for shots in rows for r in shots]
        # every piece without the tokenizer's special tokens; its BOS (Gemma's <bos>; none for a
        # byte-level BPE) once, at the start of the first demonstration: one per prompt, as the
        # model was trained, and the query continues the demonstrations (a state) without one
        bos = tokenizer.encode("").ids
        demo_ids = iter([e.ids for e in tokenizer.encode_batch(demo_texts, add_special_tokens=False)])
        query_texts = [self.format(self.eval_texts[q]) for q in queries]
        demos = [[next(demo_ids) for _ in shots] for shots in rows]
        answer_tokens = None
        if self.task.open_vocabulary:  # the answer word as it follows the query: " Paris"
            space = self.task.parts[1]
            answer_tokens = [e.ids for e in tokenizer.encode_batch([space + self.eval_labels[q] for q in queries],
                                                                    add_special_tokens=False)]
        return Episodes.from_lists(
            demos=[[bos + shots[0], *shots[1:]] if shots else [] for shots in demos],
            queries=[e.ids for e in tokenizer.encode_batch(query_texts, add_special_tokens=False)],
            answers=[first[self.eval_labels[q]] for q in queries] if first else [0] * len(queries),
            candidates=list(first.values()),
            pad_id=pad_id,
            answer_tokens=answer_tokens,
        )


class TemplateTaskSet:
    """A DataModule's template tasks by name: each task's examples are loaded on first use and its
    episodes built once per ``(task, n_shots, num_episodes)``, so every evaluation sees the same.

    Args:
        templates: :class:`TemplateTask` objects or their keyword dicts (as a config gives them).
        owner: the DataModule's name, for error messages.
        cache_dir: the ``datasets`` cache of the tasks' sources (its default when ``None``).
    """

    def __init__(self, templates: Sequence[TemplateTask | dict], owner: str, cache_dir: str | None = None) -> None:
        self.tasks = [t if isinstance(t, TemplateTask) else TemplateTask(**t) for t in templates]
        names = self.names()
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}: template task names {names} must be distinct")
        self.owner, self.cache_dir = owner, cache_dir
        self._examples: dict[str, TemplateEpisodes] = {}
        self._episodes: dict[tuple[str, int, int], Episodes] = {}

    def names(self) -> list[str]:
        """The task names, in order."""
        return [t.name for t in self.tasks]

    def as_dicts(self) -> list[dict]:
        """The tasks as plain dicts (for hyperparameters and checkpoints)."""
        return [asdict(t) for t in self.tasks]

    def examples(self, name: str) -> TemplateEpisodes:
        """Task ``name``'s train and eval examples (loaded on first use)."""
        if name not in self._examples:
            task = next(t for t in self.tasks if t.name == name)
            self._examples[name] = TemplateEpisodes(task, cache_dir=self.cache_dir)
        return self._examples[name]

    def episodes(self, tokenizer: Tokenizer, n_shots: int, num_episodes: int, task: str | None = None,
                 pad_id: int = 0) -> Episodes:
        """Task ``task``'s (the first task's when ``None``) episodes; the same on every call."""
        names = self.names()
        if not names:
            raise ValueError(f"{self.owner}: no held-out tasks; set data.init_args.templates to evaluate ICL")
        if task is not None and task not in names:
            raise ValueError(f"heldout_episodes: task={task!r}; allowed: {names}")
        key = (task or names[0], n_shots, num_episodes)
        if key not in self._episodes:
            self._episodes[key] = self.examples(key[0]).episodes(tokenizer, n_shots, num_episodes, pad_id=pad_id)
        return self._episodes[key]


class TemplateHeldout:
    """``heldout_tasks`` and ``heldout_episodes`` of a DataModule whose ICL tasks are template
    tasks: the DataModule calls :meth:`_set_tasks` in its ``__init__`` (after
    ``save_hyperparameters``) and has ``tokenizer`` and ``num_heldout`` attributes."""

    tasks: TemplateTaskSet
    tokenizer: Tokenizer
    num_heldout: int

    def _set_tasks(self, templates: Sequence[TemplateTask | dict], cache_dir: str) -> None:
        """Keep ``templates`` as ``self.tasks`` (datasets prepared under ``<cache_dir>/hf``), and
        as plain dicts in the hyperparameters (so in checkpoints)."""
        self.tasks = TemplateTaskSet(templates, type(self).__name__, cache_dir=os.path.join(cache_dir, "hf"))
        self.hparams["templates"] = self.tasks.as_dicts()

    @property
    def pad_id(self) -> int:
        """Padding of episodes and batches: ``<|endoftext|>`` when the tokenizer has it, else 0
        (padding is masked or unscored either way)."""
        eos = self.tokenizer.token_to_id(EOS)
        return 0 if eos is None else eos

    def load_tasks(self) -> None:
        """Load every task's examples (a hub dataset downloads here)."""
        for name in self.tasks.names():
            self.tasks.examples(name)

    def heldout_tasks(self) -> list[str]:
        """The names of the template tasks, in order."""
        return self.tasks.names()

    def heldout_episodes(self, n_shots: int, num_episodes: int | None = None, task: str | None = None) -> Episodes:
        """Template task ``task``'s episodes (the first task's when ``None``), tokenized by the
        DataModule's tokenizer; the same on every call.

        Args:
            n_shots: demonstrations per episode (train examples).
            num_episodes: number of episodes (validation examples); ``num_heldout`` when ``None``.
            task: one of :meth:`heldout_tasks`, or ``None``.
        """
        num_episodes = self.num_heldout if num_episodes is None else num_episodes
        return self.tasks.episodes(self.tokenizer, n_shots, num_episodes, task, pad_id=self.pad_id)
