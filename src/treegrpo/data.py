"""Dataset loaders: every source becomes the same normalized rows.

A normalized row is ``{"question", "golden_answers", "data_source", "index", "group_id"}`` plus
``"prompt"`` (chat messages) when the source carries one, which the environment then uses as-is.
``group_id = f"{data_source}/{index}"`` is unique per (data_source, index) — the reference keys
groups by index alone, so two sources' rows collide; here a duplicate pair is an error.

Sources: Search-R1 / verl parquet (``data_source``, ``prompt``, ``reward_model.ground_truth.target``,
``extra_info.index``), jsonl ``{"question", "golden_answers"}``, and a Hugging Face ``datasets``
directory written by ``save_to_disk``. Any malformed row raises :class:`DataError` naming the file
and row; so does an empty dataset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from treegrpo.errors import UserError


class DataError(UserError, ValueError):
    """A dataset file is unreadable, empty, or has a malformed row (the message says where)."""


Row = dict[str, Any]


def _to_py(x: Any) -> Any:
    """numpy arrays / scalars (what pandas gives for parquet lists and ints) → plain Python."""
    if hasattr(x, "tolist") and not isinstance(x, str | bytes):
        return x.tolist()
    return x


def _get(raw: Mapping[str, Any], *keys: str) -> Any:
    cur: Any = raw
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur or cur[k] is None:
            return None
        cur = cur[k]
    return _to_py(cur)


def _question_from_prompt(prompt: list[dict[str, str]]) -> str | None:
    """verl rows sometimes lack a bare question: take the last user turn, after its 'Question:'."""
    for m in reversed(prompt):
        if m.get("role") == "user":
            content = m.get("content", "")
            marker = content.rfind("Question:")
            return (content[marker + len("Question:") :] if marker >= 0 else content).strip() or None
    return None


def normalize_row(raw: Any, where: str, position: int, default_source: str) -> Row:
    """One raw record (any supported schema) → a normalized row; ``where`` names it in errors."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: row is a {type(raw).__name__}, not an object")
    prompt: list[dict[str, str]] | None = None
    raw_prompt = _get(raw, "prompt")
    if raw_prompt is not None:
        if isinstance(raw_prompt, str):
            prompt = [{"role": "user", "content": raw_prompt}]
        elif isinstance(raw_prompt, list) and all(
            isinstance(m, Mapping) and "role" in m and "content" in m for m in raw_prompt
        ):
            prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in raw_prompt]
        else:
            raise DataError(f"{where}: 'prompt' must be a list of {{'role','content'}} messages")
    question = _get(raw, "question")
    if question is None and prompt is not None:
        question = _question_from_prompt(prompt)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing or empty 'question'")

    golds = _get(raw, "golden_answers")
    for path in (
        ("reward_model", "ground_truth", "target"),
        ("reward_model", "ground_truth"),
        ("answers",),
        ("answer",),
    ):
        if golds is not None:
            break
        golds = _get(raw, *path)
    if isinstance(golds, str | int | float) and not isinstance(golds, bool):
        golds = [str(golds)]
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str | int | float) for g in golds):
        raise DataError(
            f"{where}: 'golden_answers' (or reward_model.ground_truth.target) must be a non-empty list of strings"
        )
    golds = [str(g) for g in golds]

    source = _get(raw, "data_source")
    source = str(source) if source is not None and str(source) else default_source
    index = _get(raw, "extra_info", "index")
    if index is None:
        index = _get(raw, "index")
    if index is None:
        index = _get(raw, "id")
    if index is None:
        index = position
    if not isinstance(index, str | int) or isinstance(index, bool):
        raise DataError(f"{where}: index must be an int or a string, got {type(index).__name__}")
    row: Row = {
        "question": question.strip(),
        "golden_answers": golds,
        "data_source": source,
        "index": index,
        "group_id": f"{source}/{index}",
    }
    if prompt is not None:
        row["prompt"] = prompt
    return row


def _normalize_all(records: Iterable[Any], name: str, default_source: str) -> list[Row]:
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(records):
        row = normalize_row(raw, f"{name} row {i}", i, default_source)
        if row["group_id"] in seen:
            raise DataError(
                f"{name} row {i}: group id {row['group_id']!r} repeats row {seen[row['group_id']]} "
                "(data_source/index must be unique)"
            )
        seen[row["group_id"]] = i
        rows.append(row)
    if not rows:
        raise DataError(f"{name}: dataset is empty")
    return rows


def load_jsonl(path: str | Path, data_source: str | None = None) -> list[Row]:
    """Rows ``{"question", "golden_answers", ...}``, one JSON object a line (blank lines skipped)."""
    p = Path(path)
    source = data_source or p.stem

    def records() -> Iterable[Any]:
        try:
            with open(p, encoding="utf-8") as f:
                n = 0
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p} line {lineno} (row {n}): invalid JSON ({e.msg})") from e
                    n += 1
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason})") from e

    return _normalize_all(records(), str(p), source)


def load_parquet(path: str | Path, data_source: str | None = None) -> list[Row]:
    """Search-R1 / verl parquet (or any parquet with our jsonl columns)."""
    p = Path(path)
    try:
        import pandas as pd

        df = pd.read_parquet(p)
    except Exception as e:  # missing file, not parquet, unreadable
        raise DataError(f"cannot read parquet {p}: {type(e).__name__}: {e}") from e
    return _normalize_all(df.to_dict(orient="records"), str(p), data_source or p.stem)


def load_hf_dataset(path: str | Path, split: str | None = None, data_source: str | None = None) -> list[Row]:
    """A directory written by ``datasets`` ``save_to_disk`` (a Dataset or a DatasetDict + ``split``)."""
    p = Path(path)
    try:
        import datasets

        ds: Any = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"cannot load Hugging Face dataset from {p}: {type(e).__name__}: {e}") from e
    name = str(p)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None)
        if split is None or split not in ds:
            raise DataError(f"{p}: choose a split from {sorted(ds)} (got {split!r})")
        ds = ds[split]
        name = f"{p}[{split}]"
    return _normalize_all(iter(ds), name, data_source or p.name)


def load_rows(
    path: str | Path, split: str | None = None, data_source: str | None = None, limit: int | None = None
) -> list[Row]:
    """Load any supported dataset by its path: ``.parquet``, ``.jsonl``/``.json`` lines, or a
    ``save_to_disk`` directory. ``limit`` keeps the first rows."""
    p = Path(path)
    if p.is_dir():
        rows = load_hf_dataset(p, split=split, data_source=data_source)
    elif p.suffix == ".parquet":
        rows = load_parquet(p, data_source=data_source)
    elif p.suffix in (".jsonl", ".json"):
        rows = load_jsonl(p, data_source=data_source)
    elif not p.exists():
        raise DataError(f"dataset {p} does not exist")
    else:
        raise DataError(f"dataset {p}: unknown format (use .parquet, .jsonl, or a save_to_disk directory)")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    return rows


__all__ = [
    "DataError",
    "Row",
    "load_hf_dataset",
    "load_jsonl",
    "load_parquet",
    "load_rows",
    "normalize_row",
]


# -- the training stream -------------------------------------------------------------------------
# Prompts are drawn epoch by epoch, each epoch a seeded permutation of the rows. A batch that straddles two
# epochs takes the tail of one and the head of the next; so that it never holds a row twice, the next
# epoch's permutation moves the rows of that tail out of its head (it stays a permutation: every row
# exactly once per epoch). The stream is a pure function of (rows, seed, batch size, position), so a
# resumed run draws exactly the batches of the uninterrupted one. (Resuming with another prompts_per_step
# re-plans the boundaries: the epoch in progress may then repeat or skip a few rows, never within a batch.)


def data_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The raw seeded permutation of epoch `epoch` (before the boundary fix-up of `epoch_order`)."""
    return np.random.default_rng([seed, epoch, 424242]).permutation(n)


_ORDERS: dict[tuple[int, int, int, int], dict[int, np.ndarray]] = {}


def _next_order(prev: np.ndarray, n: int, seed: int, epoch: int, batch: int, phase: int) -> np.ndarray:
    raw = data_order(n, seed, epoch)
    boundary = epoch * n
    tail = (boundary - phase) % batch  # rows of the previous epoch in the batch that crosses the boundary
    if tail == 0:
        return raw
    head = raw[~np.isin(raw, prev[n - tail :])][: batch - tail]
    return np.concatenate([head, raw[~np.isin(raw, head)]])


def epoch_order(n: int, seed: int, epoch: int, batch: int, phase: int = 0) -> np.ndarray:
    """Row order of `epoch` for batches of `batch` rows starting at positions ≡ `phase` (mod batch)."""
    cache = _ORDERS.setdefault((n, seed, batch, phase), {})
    if epoch not in cache:
        known = [e for e in cache if e < epoch]
        e = max(known) if known else 0
        order = cache[e] if known else data_order(n, seed, 0)
        while e < epoch:
            e += 1
            order = _next_order(order, n, seed, e, batch, phase)
        for old in sorted(cache)[:-3]:  # batches only ever look at the current and the next epoch
            del cache[old]
        cache[epoch] = order
    return cache[epoch]


def batch_rows(rows: Sequence[dict[str, Any]], position: int, size: int, seed: int) -> list[dict[str, Any]]:
    """Rows [position, position + size) of the seeded epoch-by-epoch stream; never a row twice.

    A batch larger than the dataset would need a row twice (and a prompt's group id must be unique in a
    step), so that is an error.
    """
    n = len(rows)
    if size > n:
        raise UserError(
            f"data: a step of {size} prompts needs {size} distinct training rows but the training set has "
            f"{n} (lower trainer.prompts_per_step or add rows)"
        )
    phase = position % size
    out = []
    for p in range(position, position + size):
        epoch, i = divmod(p, n)
        out.append(rows[int(epoch_order(n, seed, epoch, size, phase)[i])])
    return out


def group_ids_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [
        str(r.get("group_id") or f"{r.get('data_source', 'data')}/{r.get('index', i)}")
        for i, r in enumerate(rows)
    ]
