"""``python -m statemachine inspect RUN``: the checkpoints of a run folder, each verified.

``RUN`` is a run folder: a local path or any fsspec URL (``file://``, ``memory://``,
``s3://bucket/runs/exp1``). For every ``checkpoint_NNNNNN`` folder, and every folder the run
state names, it shows the index, rank 0's metrics, size and number of files, and whether the
files match the commit marker's manifest (sizes; with ``--deep`` also CRC-32Cs, which reads
every byte). Folders without a marker are shown as partial: an upload that never committed, or
a deletion that stopped half way. The run's kept set is read from ``run_state.json``.

Exit status: 0 when every committed checkpoint verifies, 1 when one does not (or the run state
names a folder that is gone), 2 when ``RUN`` does not exist. Partial folders do not change the
status: they are never read as checkpoints, and the next ``fit()`` of the run removes those it
would write over.
"""

from __future__ import annotations

import argparse
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
from rich.console import Console
from rich.table import Table

from .storage import RUN_STATE_NAME, RunStorage
from .verify import Verification, verify_checkpoint

__all__ = ["RunInspection", "add_parser", "inspect_run", "run"]


@dataclass(slots=True)
class CheckpointEntry:
    """One checkpoint folder of the run."""

    path: str
    #: None for a partial folder (no marker).
    index: int | None
    committed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)
    kept: bool = False
    verification: Verification | None = None
    #: False for a folder that the run state names but that is not in storage.
    exists: bool = True

    @property
    def status(self) -> str:
        if not self.exists:
            return "missing"
        if not self.committed:
            return "partial"
        assert self.verification is not None
        return "ok" if self.verification.ok else "corrupt"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "index": self.index,
            "status": self.status,
            "committed": self.committed,
            "kept": self.kept,
            "metrics": self.metrics,
            "ranks": self.ranks,
        }
        if self.verification is not None:
            data["files"] = self.verification.files
            data["bytes"] = self.verification.bytes
            data["problems"] = self.verification.problems
            data["extra_files"] = self.verification.extra
        return data


@dataclass(slots=True)
class RunInspection:
    """What :func:`inspect_run` found in a run folder."""

    url: str
    run_state: dict[str, Any] | None
    checkpoints: list[CheckpointEntry]
    deep: bool

    @property
    def ok(self) -> bool:
        return all(c.status in ("ok", "partial") for c in self.checkpoints)

    def to_json(self) -> dict[str, Any]:
        state = self.run_state or {}
        return {
            "run": self.url,
            "deep": self.deep,
            "ok": self.ok,
            "latest": state.get("latest"),
            "next_index": state.get("next_index"),
            "kept": [entry["path"] for entry in state.get("checkpoints", ())],
            "checkpoints": [c.to_json() for c in self.checkpoints],
        }


def open_run(url: str) -> RunStorage:
    """The :class:`RunStorage` of a run folder given as a path or URL."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    parent, name = posixpath.split(path)
    if not name:
        raise ValueError(f"{url!r} does not name a run folder")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return RunStorage(f"{protocol}://{parent}" if parent else f"{protocol}://", name)


def inspect_run(storage: RunStorage, deep: bool = False) -> RunInspection:
    """Read every checkpoint folder of the run and verify the committed ones (blocking I/O)."""
    state = storage.read_run_state()
    kept = {str(entry["path"]) for entry in (state or {}).get("checkpoints", ())}
    paths = {relative for _, relative in storage.checkpoint_folders()} | kept
    entries: list[CheckpointEntry] = []
    for relative in paths:
        marker = storage.read_marker(relative)
        if marker is None:
            exists = storage.fs.exists(storage.path(relative))
            entries.append(
                CheckpointEntry(relative, _index_of(relative), committed=False, kept=relative in kept, exists=exists)
            )
            continue
        entries.append(
            CheckpointEntry(
                relative,
                marker.index,
                committed=True,
                metrics=marker.metrics,
                ranks=[p.rank for p in marker.parts],
                kept=relative in kept,
                verification=verify_checkpoint(storage, marker, deep=deep),
            )
        )
    entries.sort(key=lambda e: (e.index if e.index is not None else -1, e.path))
    return RunInspection(storage.url(), state, entries, deep)


def _index_of(relative: str) -> int | None:
    name = posixpath.basename(relative)
    if name.startswith("checkpoint_") and name[len("checkpoint_") :].isdigit():
        return int(name[len("checkpoint_") :])
    return None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="list and verify the checkpoints of a run folder", description=__doc__
    )
    parser.add_argument("run", help="run folder: a local path or an fsspec URL")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--deep", action="store_true", help="also compare checksums, CRC-32C (reads every file)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        storage = open_run(args.run)
    except (ValueError, ImportError) as error:
        console.print(f"[red]cannot open {args.run}:[/red] {error}")
        return 2
    if not storage.fs.exists(storage.root):
        console.print(f"[red]{storage.url()} does not exist[/red]")
        return 2
    inspection = inspect_run(storage, deep=args.deep)
    if args.json:
        print(json.dumps(inspection.to_json(), indent=1, sort_keys=True))
    else:
        print_inspection(console, inspection)
    return 0 if inspection.ok else 1


def print_inspection(console: Console, inspection: RunInspection) -> None:
    state = inspection.run_state
    depth = "sizes and checksums" if inspection.deep else "sizes"
    table = Table(title=f"Checkpoints of {inspection.url} (verified: {depth})")
    for column in ("index", "folder", "status", "kept", "ranks", "files", "MiB"):
        table.add_column(column, no_wrap=True)
    table.add_column("metrics (rank 0)")
    for entry in inspection.checkpoints:
        check = entry.verification
        style = {"ok": "green", "corrupt": "red", "missing": "red", "partial": "yellow"}[entry.status]
        table.add_row(
            "" if entry.index is None else str(entry.index),
            entry.path,
            f"[{style}]{entry.status}[/{style}]",
            "yes" if entry.kept else "",
            ",".join(map(str, entry.ranks)),
            str(check.files) if check else "",
            f"{check.bytes / 2**20:.2f}" if check else "",
            " ".join(f"{key}={value}" for key, value in sorted(entry.metrics.items())),
        )
    console.print(table)
    for entry in inspection.checkpoints:
        if entry.verification is not None and entry.verification.problems:
            console.print(f"[red]{entry.path}[/red]: " + "; ".join(entry.verification.problems))
        elif entry.status == "missing":
            console.print(f"[red]{entry.path}[/red]: named by the run state but not in storage")
        elif entry.status == "partial":
            console.print(f"[yellow]{entry.path}[/yellow]: no commit marker (never committed, or half deleted)")
    if state is None:
        console.print(f"no {RUN_STATE_NAME}: the run has committed no checkpoint yet, or this is not a run folder")
    else:
        kept = [str(e["path"]) for e in state.get("checkpoints", ())]
        console.print(f"run state: latest {state.get('latest')}, next index {state.get('next_index')}, kept {kept}")
