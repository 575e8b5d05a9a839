"""``python -m statemachine simulate``: failure-injection runs, then a check of every invariant.

Each simulated job trains a few ranks for a few steps and reports a real checkpoint every step
(SYNC, ASYNC, NO_UPLOAD, or a mix that adds metrics-only reports and a custom upload
function), into storage reached through :class:`~statemachine.faults.FaultyFileSystem`: upload
I/O fails, fills the disk, writes short, hangs, or crashes, at the given rates and from the
given seed; training functions crash too (``--crash-rate``). Runs restart from the latest
committed checkpoint (``FailureConfig(max_failures=...)``), as a real job would.

After each run every hang is released, the threads abandoned by timed-out attempts are given
time to finish, and then the run folder and the run's record are checked:

* hang: the run did not end within ``--deadline`` seconds (the library promises it always ends);
* partial commit: a committed checkpoint whose files do not match its manifest byte for byte
  (size, CRC-32C, and the bytes the rank meant to write), that lacks a rank, or that holds files its
  manifest does not list;
* lost report: a ``report()`` call that returned but whose report is not in the result in a
  terminal state;
* order: a rank's reports reached the controller out of order or with a gap, or checkpoints
  were committed out of order; or a restarted rank resumed from a checkpoint that is not the
  latest committed one.

The table counts them per mode; the command exits with status 1 if any is found. Faults hit the
upload path (staging folders and rank parts); the commit marker is written by the store's
atomic put and is left alone, so a run fails only when its uploads do.

With ``--backend ray`` the ranks run in Ray actors on this machine: they log what their
``report()`` calls returned to files the checker reads, a crash ends the actor's process, and
the "faults" column counts only faults injected in this process (the actors' uploads are seen
through their retries and failures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import crc32c
import fsspec
import trio
from rich.console import Console
from rich.table import Table

import statemachine as sm

from .faults import CrashInjector, FaultPlan, FaultyFileSystem, plan_options
from .storage import MARKER_NAME, STAGING_NAME, CommittedCheckpoint
from .upload import wait_for_attempt_threads

__all__ = ["RunOutcome", "SimulationConfig", "add_parser", "run", "simulate"]

MODES = ("sync", "async", "no-upload", "mixed")
#: Only the upload path can fail: staging folders and rank parts (see the module docstring).
UPLOAD_PATHS = r"/\.staging/|/rank_\d+(/|$)"
UPLOAD_OPERATIONS = ("write", "read", "mv", "makedirs", "find", "info")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """The knobs of one batch of simulated runs."""

    ranks: int = 3
    reports: int = 6
    modes: tuple[str, ...] = MODES
    error_rate: float = 0.05
    enospc_rate: float = 0.01
    partial_write_rate: float = 0.02
    hang_rate: float = 0.01
    hang_s: float = 1.0
    crash_rate: float = 0.02
    seed: int = 0
    seeds: int = 3
    backend: str = "local"
    on_failure: str = "raise"
    max_failures: int = 20
    attempt_timeout_s: float | None = 0.25
    deadline_s: float = 120.0
    size_kib: int = 64
    storage: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
        if self.ranks < 1 or self.reports < 1 or self.seeds < 1:
            raise ValueError("--ranks, --reports and --seeds must be at least 1")


@dataclass(slots=True)
class RunOutcome:
    """What one simulated run did, and every invariant it broke."""

    mode: str
    seed: int
    finished: bool = False
    failed: bool = False
    hang: bool = False
    restarts: int = 0
    reports: int = 0
    committed: int = 0
    retries: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    partial_commits: list[str] = field(default_factory=list)
    lost_reports: list[str] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def violations(self) -> int:
        return int(self.hang) + len(self.partial_commits) + len(self.lost_reports) + len(self.order_violations)


def payload(seed: int, rank: int, step: int, size: int) -> bytes:
    """The bytes rank ``rank`` writes at ``step``: known in advance, so the check can compare."""
    return random.Random(f"{seed}|{rank}|{step}").randbytes(size)


def _mode_of(mode: str, rank: int, step: int) -> tuple[str, sm.CheckpointUploadMode]:
    """The kind of report ``rank`` makes at ``step``: a checkpoint mode, metrics only, or a custom upload."""
    if mode == "sync":
        return "checkpoint", sm.CheckpointUploadMode.SYNC
    if mode == "async":
        return "checkpoint", sm.CheckpointUploadMode.ASYNC
    if mode == "no-upload":
        return "checkpoint", sm.CheckpointUploadMode.NO_UPLOAD
    kinds = (
        ("checkpoint", sm.CheckpointUploadMode.SYNC),
        ("checkpoint", sm.CheckpointUploadMode.ASYNC),
        ("checkpoint", sm.CheckpointUploadMode.NO_UPLOAD),
        ("metrics", sm.CheckpointUploadMode.ASYNC),
        ("custom", sm.CheckpointUploadMode.ASYNC),
    )
    return kinds[(step + rank) % len(kinds)]


class _Recorder:
    """Run callback and training-function log: the order things happened in.

    The callback side (hand-offs, commits) lives in this process. The training functions write
    their side (reports that returned, problems seen) to one file per rank in ``log_dir``, so
    that ranks in Ray actors, which get a pickled copy of this object, are heard too.
    """

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.handed_off: dict[int, list[int]] = {}
        self.commits: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["log_dir"])  # type: ignore[misc]

    def on_report(self, message: Any) -> None:
        self.handed_off.setdefault(message.rank, []).append(message.index)

    def on_commit(self, committed: CommittedCheckpoint) -> None:
        self.commits.append(committed.index)

    def _log(self, rank: int, entry: dict[str, Any]) -> None:
        with open(os.path.join(self.log_dir, f"rank_{rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def report_returned(self, rank: int, step: int) -> None:
        self._log(rank, {"returned": [rank, step]})

    def problem(self, rank: int, text: str) -> None:
        self._log(rank, {"problem": text})

    def _entries(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        for name in sorted(n for n in os.listdir(self.log_dir) if n.endswith(".jsonl")):
            with open(os.path.join(self.log_dir, name)) as handle:
                entries.extend(json.loads(line) for line in handle if line.strip())
        return entries

    @property
    def returned(self) -> set[tuple[int, int]]:
        """``(rank, step)`` of every ``report()`` call that returned."""
        return {(int(e["returned"][0]), int(e["returned"][1])) for e in self._entries() if "returned" in e}

    @property
    def problems(self) -> list[str]:
        return [str(e["problem"]) for e in self._entries() if "problem" in e]


def _train(config: dict[str, Any]) -> None:
    ctx = sm.get_context()
    rank = ctx.world_rank
    seed: int = config["seed"]
    size: int = config["size"]
    recorder: _Recorder = config["recorder"]
    injector: CrashInjector = config["injector"]
    first = 0
    start = sm.get_checkpoint()
    if start is not None:
        # Report index == step here, so the folder name says where to go on.
        first = int(posixpath.basename(start.path).rsplit("_", 1)[1]) + 1
        with start.as_directory() as folder:
            part = os.path.join(folder, f"rank_{rank}", "weights.bin")
            if os.path.exists(part):
                with open(part, "rb") as handle:
                    if handle.read() != payload(seed, rank, first - 1, size):
                        recorder.problem(rank, f"rank {rank} resumed from a checkpoint with the wrong bytes ({start})")
            elif _mode_of(config["mode"], rank, first - 1)[0] != "metrics":
                recorder.problem(rank, f"rank {rank} resumed from {start}, which lacks its part")
    for step in range(first, config["reports"]):
        target = ctx.next_checkpoint_path()
        if not target.rstrip("/").endswith(f"checkpoint_{step:06d}/rank_{rank}"):
            recorder.problem(rank, f"rank {rank} step {step}: next checkpoint is {target}")
        injector.maybe_crash(rank, step)
        kind, mode = _mode_of(config["mode"], rank, step)
        metrics = {"step": step, "rank": rank, "loss": 1.0 / (step + 1)}
        data = payload(seed, rank, step, size)
        state = json.dumps({"step": step}).encode()
        if kind == "metrics":
            sm.report(metrics, checkpoint_upload_mode=mode)
        elif kind == "custom":
            with tempfile.TemporaryDirectory() as local:
                _write_local(local, data, state)
                sm.report(
                    metrics,
                    checkpoint=sm.Checkpoint.from_directory(local),
                    checkpoint_upload_mode=mode,
                    checkpoint_upload_fn=_CustomUpload(ctx.storage_path, rank, config["storage_options"]),
                )
        elif mode is sm.CheckpointUploadMode.NO_UPLOAD:
            # The rank writes straight into the run folder (outside the faults: the user's own write).
            fs, path = fsspec.core.url_to_fs(target)
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(posixpath.join(path, "weights.bin"), data)
            fs.pipe_file(posixpath.join(path, "state.json"), state)
            sm.report(metrics, checkpoint=sm.Checkpoint(target), checkpoint_upload_mode=mode)
        else:
            with tempfile.TemporaryDirectory() as local:
                _write_local(local, data, state)
                sm.report(metrics, checkpoint=sm.Checkpoint.from_directory(local), checkpoint_upload_mode=mode)
        recorder.report_returned(rank, step)


def _write_local(folder: str, data: bytes, state: bytes) -> None:
    with open(os.path.join(folder, "weights.bin"), "wb") as handle:
        handle.write(data)
    with open(os.path.join(folder, "state.json"), "wb") as handle:
        handle.write(state)


class _CustomUpload:
    """A user's upload function: writes the part itself through the (faulty) storage.

    It runs in a thread that a timeout abandons but cannot stop, so, like any custom upload
    function should, it writes each file under a temporary name outside the part folder (in
    the checkpoint's ``.staging``, which the library clears), checks what the store kept, and
    renames it into place: a late or failed call never leaves a short file in the part.
    """

    def __init__(self, run_url: str, rank: int, storage_options: dict[str, Any]) -> None:
        self.run_url = run_url
        self.rank = rank
        self.storage_options = storage_options

    def __call__(self, checkpoint: sm.Checkpoint, checkpoint_dir_name: str) -> sm.Checkpoint:
        fs = FaultyFileSystem(**self.storage_options)
        folder = posixpath.join(fs._strip_protocol(self.run_url), checkpoint_dir_name)
        target = posixpath.join(folder, f"rank_{self.rank}")
        fs.makedirs(target, exist_ok=True)
        fs.makedirs(posixpath.join(folder, STAGING_NAME), exist_ok=True)
        for name in ("weights.bin", "state.json"):
            with open(os.path.join(checkpoint.path, name), "rb") as handle:
                data = handle.read()
            temporary = posixpath.join(folder, STAGING_NAME, f"custom-{self.rank}-{uuid.uuid4().hex}")
            try:
                with fs.open(temporary, "wb") as out:
                    out.write(data)
                if fs.size(temporary) != len(data):
                    raise OSError(f"short write of {name}")
                fs.mv(temporary, posixpath.join(target, name))
            finally:
                if fs.target.exists(temporary):
                    fs.target.rm(temporary)
        return sm.Checkpoint(target, fs)


def _check_storage(outcome: RunOutcome, config: SimulationConfig, run_root: str) -> None:
    """Every committed checkpoint is complete and exactly what the ranks wrote."""
    local = fsspec.filesystem("file")
    for folder in sorted(os.listdir(run_root)) if os.path.isdir(run_root) else []:
        marker_path = os.path.join(run_root, folder, MARKER_NAME)
        if not os.path.isfile(marker_path):
            continue
        with open(marker_path) as handle:
            committed = CommittedCheckpoint.from_json(json.load(handle))
        listed: set[str] = {MARKER_NAME}
        ranks = sorted(p.rank for p in committed.parts)
        expected_ranks = [r for r in range(config.ranks) if _mode_of(outcome.mode, r, committed.index)[0] != "metrics"]
        if ranks != expected_ranks:
            outcome.partial_commits.append(f"{folder}: holds ranks {ranks}, expected {expected_ranks}")
        for part in committed.parts:
            for entry in part.files:
                relative = posixpath.relpath(posixpath.join(part.path, entry.path), folder)
                listed.add(relative)
                path = os.path.join(run_root, part.path, entry.path)
                try:
                    data = local.cat_file(path)
                except FileNotFoundError:
                    outcome.partial_commits.append(f"{folder}: {relative} is missing")
                    continue
                expected = (
                    payload(outcome.seed, part.rank, committed.index, config.size_kib * 1024)
                    if entry.path == "weights.bin"
                    else json.dumps({"step": committed.index}).encode()
                )
                if len(data) != entry.size or f"{crc32c.crc32c(data):08x}" != entry.checksum:
                    outcome.partial_commits.append(f"{folder}: {relative} does not match its manifest")
                elif data != expected:
                    outcome.partial_commits.append(f"{folder}: {relative} is not what rank {part.rank} wrote")
        for root, _dirs, files in os.walk(os.path.join(run_root, folder)):
            for name in files:
                relative = os.path.relpath(os.path.join(root, name), os.path.join(run_root, folder))
                if relative.split(os.sep)[0] != STAGING_NAME and relative.replace(os.sep, "/") not in listed:
                    outcome.partial_commits.append(f"{folder}: unlisted file {relative}")


def _check_record(outcome: RunOutcome, recorder: _Recorder, results: list[sm.Result]) -> None:
    terminal: set[tuple[int, int]] = set()
    for result in results:
        for report in result.reports:
            if report.state.terminal:
                terminal.add((report.rank, report.index))
            else:
                outcome.lost_reports.append(f"rank {report.rank} report {report.index} ended {report.state.name}")
        outcome.reports += len(result.reports)
        outcome.retries += int(result.stats.get("retries", 0))
        outcome.committed += len(result.committed_indices)
    for rank, step in sorted(recorder.returned - terminal):
        outcome.lost_reports.append(f"rank {rank} report {step} returned from report() but is not in the result")
    for rank, indices in sorted(recorder.handed_off.items()):
        segments = 1 + sum(1 for a, b in itertools.pairwise(indices) if b != a + 1)
        if segments > outcome.restarts + 1:
            outcome.order_violations.append(f"rank {rank} handed off {indices} (attempts: {outcome.restarts + 1})")
    if any(b <= a for a, b in itertools.pairwise(recorder.commits)):
        outcome.order_violations.append(f"commits out of order: {recorder.commits}")
    outcome.order_violations.extend(recorder.problems)
    final = results[-1] if results else None
    if final is not None and final.checkpoint is not None and recorder.commits:
        if not final.checkpoint.path.endswith(f"checkpoint_{recorder.commits[-1]:06d}"):
            outcome.order_violations.append(f"result.checkpoint {final.checkpoint} is not the latest commit")


async def _run_one(config: SimulationConfig, mode: str, seed: int, root: str) -> RunOutcome:
    outcome = RunOutcome(mode, seed)
    name = f"sim-{mode}-{seed}"
    run_root = os.path.join(root, name)
    shutil.rmtree(run_root, ignore_errors=True)
    plan = FaultPlan(
        seed=seed,
        error_rate=config.error_rate,
        enospc_rate=config.enospc_rate,
        hang_rate=config.hang_rate,
        hang_s=config.hang_s,
        partial_write_rate=config.partial_write_rate,
        crash_rate=config.crash_rate / 4,
        crash_mode="exit" if config.backend == "ray" else "raise",
        operations=UPLOAD_OPERATIONS,
        path_pattern=UPLOAD_PATHS,
    )
    fault_name = f"{name}-{time.monotonic_ns()}"
    options = plan_options(plan, "file", fault_name)
    recorder = _Recorder(tempfile.mkdtemp(prefix="simulate-log-"))
    trainer = sm.Trainer(
        _train,
        train_loop_config={
            "seed": seed,
            "mode": mode,
            "reports": config.reports,
            "size": config.size_kib * 1024,
            "recorder": recorder,
            "injector": CrashInjector(
                seed,
                config.crash_rate,
                "exit" if config.backend == "ray" else "raise",
                os.path.join(recorder.log_dir, "crashes.txt"),
            ),
            "storage_options": options,
        },
        scaling_config=sm.ScalingConfig(num_workers=config.ranks),
        run_config=sm.RunConfig(
            storage_path=f"faulty://{root}",
            storage_options=options,
            name=name,
            failure_config=sm.FailureConfig(max_failures=config.max_failures),
            upload_config=sm.UploadConfig(
                max_concurrent_uploads=2,
                max_pending_reports=3,
                on_failure="continue" if config.on_failure == "continue" else "raise",
                drain_timeout_s=5.0,
                retry=sm.RetryPolicy(
                    max_attempts=5,
                    initial_backoff_s=0.005,
                    max_backoff_s=0.05,
                    jitter=0.005,
                    attempt_timeout_s=config.attempt_timeout_s,
                ),
            ),
            callbacks=(recorder,),
        ),
        backend=config.backend,
    )
    results: list[sm.Result] = []
    started = time.perf_counter()
    try:
        with trio.fail_after(config.deadline_s):
            result = await trainer.fit_async()
        outcome.finished = True
        results = [*_failed_results(result.failures), result]
    except trio.TooSlowError:
        outcome.hang = True
    except sm.TrainingFailedError as error:
        outcome.failed = True
        outcome.error = str(error)
        if error.result is not None:
            results = [*_failed_results(error.result.failures[:-1]), error.result]
    outcome.seconds = time.perf_counter() - started
    outcome.restarts = max(len(results) - 1, 0)
    fs = FaultyFileSystem(**options)
    fs.release_hangs()
    # Threads of timed-out attempts run out on their own once released; check what they leave.
    await trio.to_thread.run_sync(wait_for_attempt_threads, config.hang_s + 10.0)
    outcome.injected = fs.injected
    _check_record(outcome, recorder, results)
    _check_storage(outcome, config, run_root)
    shutil.rmtree(recorder.log_dir, ignore_errors=True)
    return outcome


def _failed_results(failures: Sequence[BaseException]) -> list[sm.Result]:
    return [f.result for f in failures if isinstance(f, sm.TrainingFailedError) and f.result is not None]


def simulate(config: SimulationConfig) -> list[RunOutcome]:
    """Run every (seed, mode) job of ``config``; return their outcomes."""
    root = os.path.abspath(config.storage or os.path.join(tempfile.gettempdir(), "statemachine-simulate"))
    os.makedirs(root, exist_ok=True)
    outcomes = []
    for seed in range(config.seed, config.seed + config.seeds):
        for mode in config.modes:
            outcomes.append(trio.run(_run_one, config, mode, seed, root))
    return outcomes


def summarise(outcomes: Sequence[RunOutcome]) -> list[dict[str, Any]]:
    """One row per mode and a total: the figures the table prints."""
    rows = []
    for mode in [*dict.fromkeys(o.mode for o in outcomes), "total"]:
        group = [o for o in outcomes if mode in ("total", o.mode)]
        injected: dict[str, int] = {}
        for o in group:
            for kind, n in o.injected.items():
                injected[kind] = injected.get(kind, 0) + n
        rows.append(
            {
                "mode": mode,
                "runs": len(group),
                "ok": sum(o.finished for o in group),
                "failed": sum(o.failed for o in group),
                "hangs": sum(o.hang for o in group),
                "partial commits": sum(len(o.partial_commits) for o in group),
                "lost reports": sum(len(o.lost_reports) for o in group),
                "order errors": sum(len(o.order_violations) for o in group),
                "reports": sum(o.reports for o in group),
                "committed": sum(o.committed for o in group),
                "retries": sum(o.retries for o in group),
                "failures": sum(o.restarts for o in group),
                "faults": sum(injected.values()),
            }
        )
    return rows


def _timeout(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds or 'none', got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate", help="failure-injection runs with an invariant check", description=__doc__
    )
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--reports", type=int, default=6, help="reports per rank and run")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (default: all)"
    )
    parser.add_argument("--error-rate", type=float, default=0.05, help="I/O errors per upload operation")
    parser.add_argument("--enospc-rate", type=float, default=0.01, help="full-disk errors per upload operation")
    parser.add_argument("--partial-write-rate", type=float, default=0.02, help="silent short writes per write")
    parser.add_argument("--hang-rate", type=float, default=0.01, help="hangs per upload operation")
    parser.add_argument("--hang-s", type=float, default=1.0, help="how long a hang lasts at most")
    parser.add_argument("--crash-rate", type=float, default=0.02, help="rank crashes per report (and mid-upload)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (runs per mode)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--on-failure", choices=("raise", "continue"), default="raise")
    parser.add_argument("--max-failures", type=int, default=20, help="restarts allowed per run")
    parser.add_argument(
        "--attempt-timeout",
        type=_timeout,
        default=0.25,
        help="per-attempt upload timeout, s, or 'none' (then a SYNC report's first attempt runs in the "
        "training thread, and hangs are waited out)",
    )
    parser.add_argument("--deadline", type=float, default=120.0, help="a run taking longer counts as a hang, s")
    parser.add_argument("--size-kib", type=int, default=64, help="checkpoint size per rank and step")
    parser.add_argument("--storage", default="", help="local folder for the run folders (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print the outcome of every run as JSON too")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        # Injected faults make the library log a lot; the table says what matters.
        logging.getLogger("statemachine").setLevel(logging.CRITICAL)
    config = SimulationConfig(
        ranks=args.ranks,
        reports=args.reports,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        error_rate=args.error_rate,
        enospc_rate=args.enospc_rate,
        partial_write_rate=args.partial_write_rate,
        hang_rate=args.hang_rate,
        hang_s=args.hang_s,
        crash_rate=args.crash_rate,
        seed=args.seed,
        seeds=args.seeds,
        backend=args.backend,
        on_failure=args.on_failure,
        max_failures=args.max_failures,
        attempt_timeout_s=args.attempt_timeout,
        deadline_s=args.deadline,
        size_kib=args.size_kib,
        storage=args.storage,
    )
    outcomes = simulate(config)
    console = Console(width=max(Console().width, 180))
    rows = summarise(outcomes)
    last = config.seed + config.seeds - 1
    table = Table(
        title=f"simulate: {config.ranks} ranks x {config.reports} reports, seeds {config.seed}..{last}, "
        f"backend {config.backend}, on_failure={config.on_failure}"
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "mode" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    bad = [o for o in outcomes if o.violations]
    for outcome in bad:
        console.print(f"[red]{outcome.mode} seed {outcome.seed}[/red]: hang={outcome.hang}")
        for text in outcome.partial_commits + outcome.lost_reports + outcome.order_violations:
            console.print(f"  {text}")
    if args.json:
        console.print_json(json.dumps([{**asdict(o), "violations": o.violations} for o in outcomes]))
    return 1 if bad else 0
