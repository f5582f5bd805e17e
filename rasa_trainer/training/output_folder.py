"""One run per output folder, and nothing written through a link: the run lock (``.rasa-run.lock``, process 0; it
lives in ``rasa_trainer/run_lock.py``, below the rooms, since detection holds it too), the refusal of another run's
checkpoints in a new run's folder, and the refusal of symbolic links where a save writes."""

from __future__ import annotations

import logging
import os

from ..run_lock import LOCK_FILE, OutputFolderError, RunLock, hold_run_lock, run_lock_holder  # noqa: F401 (re-exported)
from .checkpoints import _CHECKPOINT, ADAPTER_DIR, _delete_checkpoint

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The output folder: no links written through, no other run's checkpoints touched, one run at a time
# --------------------------------------------------------------------------------------------------------------------


def links_in(folder: str) -> list[str]:
    """Symbolic links a save into ``folder`` would write through, as paths relative to it (never followed): the
    links among its files, a link named ``adapter`` and any link inside ``adapter/`` (the subfolder RASATrainer
    writes), and ``"."`` when ``folder`` itself is a link. Links to other folders are left alone: nothing writes into
    them."""
    if os.path.islink(folder):
        return ["."]
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.scandir(folder):
        if entry.is_symlink():
            if entry.name == ADAPTER_DIR or not os.path.isdir(entry.path):
                found.append(entry.name)
        elif entry.name == ADAPTER_DIR and entry.is_dir(follow_symlinks=False):
            for root, dirs, files in os.walk(entry.path):  # os.walk does not descend into linked folders
                found += [os.path.relpath(os.path.join(root, name), folder) for name in dirs + files
                          if os.path.islink(os.path.join(root, name))]
    return sorted(found)


def refuse_links(folder: str, *, allow_self: bool = True) -> None:
    """Raise :class:`OutputFolderError` when ``folder`` holds symbolic links (or is one, unless ``allow_self``):
    transformers' writers open files by name, so a planted ``config.json -> ~/.ssh/id_rsa`` would be overwritten."""
    links = [rel for rel in links_in(folder) if not (allow_self and rel == ".")]
    if not links:
        return
    shown = ", ".join(f"{rel} -> {os.readlink(folder if rel == '.' else os.path.join(folder, rel))}"
                      for rel in links[:5])
    what = "is a symbolic link" if links == ["."] else "holds symbolic links"
    raise OutputFolderError(
        f"{folder} {what} ({shown}{', ...' if len(links) > 5 else ''}); RASATrainer never writes through a link in a "
        f"folder it saves into (the write would land in, or open up, the file it points to). Remove the links, or "
        f"save to another folder"
    )


def earlier_checkpoints(output_dir: str, overwrite: bool) -> list[str]:
    """Before a new (not resumed) run: the ``checkpoint-*`` entries ``output_dir`` already holds. They belong to
    another run, which this one would rotate or overwrite and whose checkpoints a later resume would pick, so they
    are refused with :class:`OutputFolderError` unless ``overwrite`` (``overwrite_output_dir``); then they are
    returned, for :func:`remove_earlier_checkpoints`."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name)))
    if not found or overwrite:
        return [os.path.join(output_dir, name) for _, name in found]
    names = [name for _, name in found]
    raise OutputFolderError(
        f"output_dir {output_dir} already holds checkpoints of another run ({', '.join(names[:4])}"
        f"{', ...' if len(names) > 4 else ''}); a new run there would rotate or overwrite them, and a later resume "
        f"would pick theirs. Pass overwrite_output_dir=True (--overwrite_output_dir on the command line) to replace "
        f"them, use a new output_dir, or resume that run (resume_from_checkpoint=True, --resume_from_checkpoint true)"
    )


def remove_earlier_checkpoints(output_dir: str, folders: list[str]) -> None:
    if not folders:
        return
    logger.warning("RASA: overwrite_output_dir=True: removing %d checkpoint folders of an earlier run in %s: %s",
                   len(folders), output_dir, ", ".join(os.path.basename(f) for f in folders))
    for folder in folders:
        if os.path.isdir(folder) or os.path.islink(folder):
            _delete_checkpoint(folder)
        else:
            os.remove(folder)
