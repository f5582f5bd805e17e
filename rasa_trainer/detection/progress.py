"""Resumable detection: the statistics of every shard of pairs, written as detection goes, so that an interrupted run
resumes where it stopped and ends with the same statistics, bit for bit, as an uninterrupted one.

A detection run with an output folder keeps ``<output_dir>/detection_progress/``:

- ``fingerprint.json``: what makes it the same run (the model's identity from ``rasa_trainer/model_identity.py``, the
  pairs' content hash, the judge, the generation and statistics settings, the world size, the package version),
  written once before the first shard;
- ``shard-rank<r>-<s>.safetensors``: the :class:`~rasa_trainer.detection.statistics.ExpertStatistics` of shard ``s``
  of rank ``r`` (exact int64 / float64 tensors), with the shard's rows, pair counts and the fingerprint's hash in its
  metadata (JSON). Each file is written atomically (temporary file, fsync, rename): it is complete or absent.

Every run, interrupted or not, sums the shards' statistics in shard order, so resuming changes nothing in the result.
A folder that holds another run's progress is refused, naming what differs. The folder is removed once the run's
artifacts are written. Rank 0 holds the output folder's run lock (``rasa_trainer/run_lock.py``) meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

from ..model_identity import model_differences, model_identity, rows_sha256
from ..run_lock import OutputFolderError
from ..utils import atomic_save_safetensors, atomic_write_json
from .statistics import ExpertStatistics

logger = logging.getLogger(__name__)

PROGRESS_DIR = "detection_progress"
FINGERPRINT_FILE = "fingerprint.json"
FORMAT = 1
_SHARD = re.compile(r"shard-rank(\d+)-(\d+)\.safetensors$")
_SAVED = "partial detection"  # how messages name the progress on disk


class DetectionProgressError(OutputFolderError):
    """The output folder holds a partial detection that cannot be resumed by this run (another run's, or damaged);
    the message says what differs and how to go on."""


def progress_folder(output_dir: str | os.PathLike) -> str:
    """Where a detection run with ``output_dir`` keeps its progress."""
    return os.path.join(os.fspath(output_dir), PROGRESS_DIR)


# --------------------------------------------------------------------------------------------------------------------
# The fingerprint
# --------------------------------------------------------------------------------------------------------------------


def judge_identity(judge) -> dict[str, Any]:
    """A judge's name, class and plain options (e.g. its keywords or refusal label ids; not its model)."""
    try:
        attributes = vars(judge)
    except TypeError:  # a judge with __slots__
        attributes = {}
    options = {key: value for key, value in sorted(attributes.items())
               if not key.startswith("_") and key != "name" and _is_plain(value)}
    kind = type(judge)
    return {"name": str(getattr(judge, "name", kind.__name__)), "class": f"{kind.__module__}.{kind.__qualname__}",
            "options": options}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def detection_fingerprint(model, tokenizer, dataset, *, judge, settings: Mapping[str, Any],
                          weights_folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a resumed detection must share with the run that wrote the progress. ``settings``: the generation
    settings (every field of ``GenerationSettings``, so a new one is included without a change here), the anchor
    column, the shard size, the world size and the statistics' vote settings. ``weights_folder``: the folder a backend
    generates from (vLLM reads the weights there, not from ``model``, which may be an empty skeleton), identified by
    :func:`folder_identity`."""
    from .. import __version__

    fingerprint = {
        "format": FORMAT,
        "model": model_identity(model, tokenizer),
        "model_files": folder_identity(weights_folder) if weights_folder is not None else None,
        "pairs": {"sha256": rows_sha256(dataset), "num_pairs": len(dataset)},
        "judge": judge_identity(judge),
        "settings": dict(settings),
        "rasa_trainer_version": __version__,
    }
    # plain JSON, as read back from disk (a judge's tuple of phrases is then the list fingerprint.json holds)
    return json.loads(json.dumps(fingerprint, default=str))


_WINDOW = 1 << 16  # bytes read at the start, the middle and the end of every weights file


def folder_identity(folder: str | os.PathLike) -> dict[str, Any]:
    """The weights files of a model folder, cheaply: every ``*.safetensors`` / ``*.bin`` file's name and size and a
    hash of three 64 KiB windows of it (its header, middle and end), plus ``config.json``'s hash. Another checkpoint
    of the same architecture differs in those bytes; a Hub id (no local folder) is recorded by name only."""
    root = os.fspath(folder)
    if not os.path.isdir(root):
        return {"path": root, "files": None}
    files = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not (name.endswith((".safetensors", ".bin")) or name == "config.json") or not os.path.isfile(path):
            continue
        size, digest = os.path.getsize(path), hashlib.sha256()
        with open(path, "rb") as f:
            for start in sorted({0, max(0, size // 2 - _WINDOW // 2), max(0, size - _WINDOW)}):
                f.seek(start)
                digest.update(f.read(_WINDOW))
        files[name] = {"size": size, "sha256": digest.hexdigest()}
    return {"path": root, "files": files}


def progress_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between the fingerprint of a partial detection and the current run's."""
    if saved.get("format") != current["format"]:
        return [f"progress format: {_SAVED} {saved.get('format')!r}, now {current['format']}"]
    diffs = model_differences(saved.get("model"), current["model"], saved_label=_SAVED)
    old_files, new_files = saved.get("model_files"), current.get("model_files")
    if (old_files or {}).get("files") != (new_files or {}).get("files"):
        def described(record):
            if not record:
                return "the model in memory"
            return f"{record['path']} ({len(record['files'] or {})} weights and config files)"
        diffs.append(f"model files the backend generates from: {_SAVED} {described(old_files)}, now "
                     f"{described(new_files)}, different content")
    old, new = saved.get("pairs", {}), current["pairs"]
    if old.get("sha256") != new["sha256"]:
        diffs.append(f"pairs: {_SAVED} {old.get('num_pairs')} pairs, now {new['num_pairs']} pairs, different content")
    diffs += _judge_differences(saved.get("judge") or {}, current["judge"])
    old, new = saved.get("settings", {}), current["settings"]
    diffs += [f"{key}: {_SAVED} {old.get(key)!r}, now {new.get(key)!r}"
              for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if saved.get("rasa_trainer_version") != current["rasa_trainer_version"]:
        diffs.append(f"rasa_trainer_version: {_SAVED} {saved.get('rasa_trainer_version')}, now "
                     f"{current['rasa_trainer_version']}")
    return diffs


def _judge_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    if (old.get("name"), old.get("class")) != (new["name"], new["class"]):
        return [f"judge: {_SAVED} {old.get('name')!r} ({old.get('class')}), now {new['name']!r} ({new['class']})"]
    options, now = old.get("options", {}), new["options"]
    changed = sorted(key for key in set(options) | set(now) if options.get(key) != now.get(key))
    return [f"judge {new['name']!r} option {key}: {_SAVED} {_short(options.get(key))}, now {_short(now.get(key))}"
            for key in changed]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The shards
# --------------------------------------------------------------------------------------------------------------------


class ShardStore:
    """The shards of one rank in a progress folder: which are done, their statistics and pair counts, new ones.

    Open it with :func:`open_progress`, which checks the folder's fingerprint first."""

    def __init__(self, folder: str, fingerprint: Mapping[str, Any], rank: int, world_size: int):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.digest = _digest(fingerprint)

    def path(self, shard: int) -> str:
        return os.path.join(self.folder, f"shard-rank{self.rank:03d}-{shard:06d}.safetensors")

    def _metadata(self, shard: int, rows: Sequence[int]) -> dict[str, str]:
        return {"format": str(FORMAT), "fingerprint_sha256": self.digest, "rank": str(self.rank),
                "world_size": str(self.world_size), "shard": str(shard), "rows_sha256": _rows_key(rows)}

    def done(self, shard: int) -> bool:
        """Whether shard ``shard`` was written (a readable file; its content is checked by :meth:`load`). A file that
        cannot be read is regenerated, with a warning."""
        path = self.path(shard)
        if os.path.islink(path):
            raise DetectionProgressError(f"{path} is a symbolic link; detection never reads or writes through a link "
                                         f"it did not create. Remove it")
        if not os.path.isfile(path):
            return False
        try:
            _read_metadata(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is regenerated, and said so
            logger.warning("RASA: detection shard %s cannot be read (%s); generating it again", path, err)
            return False
        return True

    def load(self, shard: int, rows: Sequence[int], settings: dict[str, Any]
             ) -> tuple[ExpertStatistics, dict[str, Any]]:
        """The statistics and pair counts (``PairCounts.to_dict()``) of a done shard, checked to be this run's."""
        from safetensors.torch import load_file

        path = self.path(shard)
        metadata = _read_metadata(path)
        expected = self._metadata(shard, rows)
        wrong = sorted(key for key, value in expected.items() if metadata.get(key) != value)
        if wrong:
            raise DetectionProgressError(
                f"{path} does not belong to this detection run (its {', '.join(wrong)} differ, although "
                f"{FINGERPRINT_FILE} matches): the folder was changed by hand. Delete {self.folder} to start over")
        try:
            stats = ExpertStatistics.from_state_tensors(load_file(path), settings)
        except ValueError as err:
            raise DetectionProgressError(f"{path}: {err}. Delete {self.folder} to start over") from None
        return stats, json.loads(metadata["pairs"])

    def save(self, shard: int, rows: Sequence[int], stats: ExpertStatistics, pairs: dict[str, Any]) -> None:
        """Write a finished shard atomically."""
        metadata = {**self._metadata(shard, rows), "num_rows": str(len(rows)), "pairs": json.dumps(pairs)}
        atomic_save_safetensors(stats.state_tensors(), self.path(shard), metadata=metadata)


def _rows_key(rows: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(r) for r in rows]).encode()).hexdigest()


def _read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:  # reads the header only
        return f.metadata() or {}


def open_progress(folder: str, fingerprint: Mapping[str, Any], *, rank: int = 0, world_size: int = 1) -> ShardStore:
    """The shard store of ``folder`` for this rank: resumed when ``folder`` holds this run's fingerprint, started when
    it holds nothing; another run's progress is refused (:class:`DetectionProgressError`, naming what differs).

    No collective call: every rank reads the same ``fingerprint.json``, which rank 0 writes only where none exists,
    so all ranks refuse alike, and a rank that finds none yet reads its own shards' fingerprint hashes."""
    if os.path.islink(folder):
        raise DetectionProgressError(f"{folder} is a symbolic link; detection keeps its progress in a folder it "
                                     f"creates and never writes through a link. Remove the link")
    path = os.path.join(folder, FINGERPRINT_FILE)
    if os.path.islink(path):
        raise DetectionProgressError(f"{path} is a symbolic link; remove it (or delete {folder} to start over)")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        diffs = progress_differences(saved, fingerprint)
        if diffs:
            raise DetectionProgressError(
                f"{os.path.dirname(folder) or '.'} holds the partial detection of another run ({folder}), which this "
                f"run cannot resume: {'; '.join(diffs)}. To resume it, run again with the model, pairs, judge and "
                f"settings it was started with (the values named '{_SAVED}' above); to start over, delete {folder} "
                f"or choose another output_dir")
        store = ShardStore(folder, fingerprint, rank, world_size)
        _remove_temporary_files(folder, rank)
        return store
    # this rank's own shards only: another rank may already be writing its first one into a folder started now
    mine = sorted(name for name in os.listdir(folder) if (m := _SHARD.match(name)) and int(m.group(1)) == rank
                  ) if os.path.isdir(folder) else []
    if mine:
        raise DetectionProgressError(
            f"{folder} holds detection shards ({', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''}) but no "
            f"{FINGERPRINT_FILE}, so it cannot be told which run wrote them. Delete {folder} to start over")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(dict(fingerprint), path)
    store = ShardStore(folder, fingerprint, rank, world_size)
    if os.path.isdir(folder):
        _remove_temporary_files(folder, rank)
    return store


def _remove_temporary_files(folder: str, rank: int) -> None:
    """The temporary files of this rank's shard writes that a killed run left behind (a write is complete or absent:
    these were never renamed into place)."""
    prefix = f".shard-rank{rank:03d}-"
    for entry in os.scandir(folder):
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)


def remove_progress(folder: str) -> None:
    """Delete a finished run's progress folder (the files this module wrote; no link is followed)."""
    import shutil

    if os.path.isdir(folder) and not os.path.islink(folder):
        shutil.rmtree(folder)
