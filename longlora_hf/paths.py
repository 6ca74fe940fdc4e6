"""What the commands read and write, checked before any work: local models, adapters and data, and the
directories and files a command writes.

Every command that writes follows one rule. It never writes into its own inputs (an output that is,
holds or sits inside an input is refused, whatever the flags). It never replaces files it did not write
unless asked with `--overwrite`: a directory it wrote records what it wrote in `MANIFEST`, and anything
else found there is someone else's. It writes into a temporary sibling and renames that into place at
the end, so an interrupted run leaves the earlier result or none, never a mix. A run killed outright (no
cleanup runs) leaves that sibling; the next run for the same output removes it, once it has proved the
sibling is an earlier run's and that run is over (`remove_abandoned_partials`). A write that fills the disk
ends with one line naming the output and the free space (`OutOfSpaceError`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


MANIFEST = ".longlora-hf-output.json"  # in a directory a command wrote: the names it wrote there
PARTIAL = ".longlora-hf-partial"  # suffix of the temporary sibling a command writes into
OWNER = ".owner"  # PARTIAL + OWNER: the marker next to a partial, locked by the run writing it
PREVIOUS = ".longlora-hf-previous"  # suffix of the earlier output while it is being replaced

# What a local model or adapter directory must hold, by kind.
# "config": a model whose weights this command does not require (it reads only the config, or its loader
# also takes PyTorch .bin weights); any .safetensors file present is still checked.
DIRECTORY_CONFIG = {"model": "config.json", "adapter": "adapter_config.json", "config": "config.json"}
CONFIG_KEY = {"model": "model_type", "adapter": "peft_type", "config": "model_type"}


def _looks_like_a_path(value: str) -> bool:
    """True when `value` cannot be a Hub repo id ('name' or 'owner/name'): it is written as a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", "..") or "\\" in value:
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def check_local_or_hub(value: str | os.PathLike, flag: str) -> bool:
    """True when `value` exists here; False when it does not but can be a Hub repo id (left to the Hub); a
    missing local path (one that cannot be a repo id: '/data/model', './model', 'a/b/c') is refused."""
    text = os.fspath(value)
    if Path(text).expanduser().exists():
        return True
    if _looks_like_a_path(text):
        raise FileNotFoundError(
            f"{flag} {text}: no such directory (nor a Hub repo id, which is 'name' or 'owner/name')."
        )
    return False


def check_safetensors(path: Path, flag: str) -> None:
    """Refuse a .safetensors file whose header cannot be read or does not cover the file (truncated, or not
    safetensors at all). Reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{flag}: {path} is not a readable safetensors file ({error}); it may be truncated (an interrupted "
            "download or copy): fetch or save it again."
        ) from error


def _read_json_config(path: Path, flag: str, key: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag}: {path} is not valid JSON ({error}); restore it from the original.") from error
    if not isinstance(config, dict) or not isinstance(config.get(key), str):
        raise ValueError(
            f"{flag}: {path} has no {key!r} string; it is not a transformers/PEFT config. Restore it from the "
            "original."
        )
    return config


def check_model_source(value: str | os.PathLike, flag: str, kind: str = "model") -> None:
    """Check a `kind` ("model", "adapter", or "config": a model whose weights are not required) given as a local
    directory or a Hub repo id, before loading it.

    A local directory must hold its config (config.json or adapter_config.json) as valid JSON, and
    safetensors weights whose headers read (a model: at least one .safetensors file; an adapter:
    adapter_model.safetensors, or PEFT's adapter_model.bin). A value that does not exist here and cannot be a
    Hub repo id is a missing directory. A Hub id is left to the Hub."""
    text = os.fspath(value)
    path = Path(text).expanduser()
    needed = DIRECTORY_CONFIG[kind]
    if not check_local_or_hub(text, flag):
        return
    if not path.is_dir():
        raise ValueError(f"{flag} {text} is a file; give the {kind}'s directory (the one holding {needed}).")
    config = path / needed
    if not config.is_file():
        raise ValueError(f"{flag} {text} has no {needed}: it is not a {kind} directory (saved with save_pretrained).")
    _read_json_config(config, flag, CONFIG_KEY[kind])
    if kind == "model":
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise ValueError(
                f"{flag} {text} holds no .safetensors weights; longlora-hf loads safetensors only (save the model "
                "with save_pretrained(..., safe_serialization=True))."
            )
    elif kind == "adapter":
        weights = [path / "adapter_model.safetensors"] if (path / "adapter_model.safetensors").is_file() else []
        if not weights and not (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{flag} {text} has no adapter_model.safetensors (or adapter_model.bin): the adapter's weights are "
                "missing."
            )
    else:
        weights = sorted(path.glob("*.safetensors"))
    for file in weights:
        check_safetensors(file, flag)


def check_input_file(value: str | os.PathLike, flag: str) -> Path:
    """A file to read: it exists and is a file."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {value} is a directory; give a file.")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {value}: no such file.")
    return path


def check_writable_parent(path: Path, flag: str) -> None:
    """Refuse an output whose directory cannot be created or written (a file in the way, no permission)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so {path} cannot be created; choose another path.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{flag} {path}: cannot write in {parent} (permission denied); the output is written next to its final "
            "place and renamed into it, so that directory must be writable. Choose a writable place."
        )


def check_not_an_input(output: Path, inputs: Mapping[str, object], flag: str) -> None:
    """Refuse an output that is, holds, or lies inside one of the local `inputs` ({flag: path or paths})."""
    cwd = Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        raise ValueError(f"{flag} {output} is the current directory or holds it; choose a directory of its own.")
    for input_flag, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None:
                continue
            source = Path(os.fspath(value)).expanduser()
            if not source.exists():
                continue
            source = source.resolve()
            if output == source or output in source.parents or source in output.parents:
                relation = "is" if output == source else ("lies inside" if source in output.parents else "holds")
                raise ValueError(
                    f"{flag} {output} {relation} the {input_flag} {source}: a command never writes into its own "
                    f"inputs. Choose another {flag}."
                )


def _fingerprint(path: Path) -> list[int] | None:
    """(size, modification time) of a file, None for a directory: what tells a file edited since it was written."""
    if path.is_dir():
        return None
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _written_before(directory: Path) -> set[str]:
    """The names a command recorded writing in `directory` and that are still as it wrote them (a file edited
    since, such as a README someone rewrote, is someone else's now). Empty without a readable manifest."""
    try:
        written = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["written"]
        ours = {
            name
            for name, print_ in written.items()
            if (directory / name).exists() and _fingerprint(directory / name) == print_
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return ours | {MANIFEST}


def _foreign(directory: Path) -> list[str]:
    """The entries of an existing `directory` that no longlora-hf command recorded writing (leftover partial
    siblings are not in it: they sit next to it)."""
    if not directory.is_dir():
        return []
    ours = _written_before(directory)
    return sorted(name for name in os.listdir(directory) if name not in ours)


def check_output_place(value: str | os.PathLike, flag: str, inputs: Mapping[str, object] = {}) -> Path:
    """Where an output directory goes, whatever it holds: a directory (or nothing yet), not one of the `inputs`
    ({flag: local path or list of them}) nor inside or around one, and writable. Returns it resolved."""
    output = Path(value).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise ValueError(f"{flag} {value} is a file; give a directory (it is created if missing).")
    check_not_an_input(output, inputs, flag)
    check_writable_parent(output, flag)
    if output.exists() and not os.access(output, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {value}: cannot write in it (permission denied); choose a writable directory.")
    return output


def check_output_directory(
    value: str | os.PathLike, flag: str, inputs: Mapping[str, object] = {}, overwrite: bool = False
) -> Path:
    """Check a directory a command is about to write, before any work; return it resolved. See the module's
    rule. `inputs`: {flag: local path or list of them} the command reads."""
    output = check_output_place(value, flag, inputs)
    foreign = _foreign(output)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{flag} {value} holds files longlora-hf did not write ({shown}). Choose another {flag}, or pass "
            "--overwrite to replace what this command writes there (the other files are kept)."
        )
    return output


def _carry(source: Path, target: Path) -> None:
    """Put `source` (a file or a directory) at `target`, hard-linked where possible, else copied."""

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
    elif source.is_symlink():
        os.symlink(os.readlink(source), target)
    else:
        link_or_copy(source, target)


def _mode_for(output: Path, default: int) -> int:
    """The permission bits for what replaces `output`: its own when it exists, else `default` less the umask."""
    if output.exists():
        return output.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return default & ~umask


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), None where that cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class _Marker:
    """The proof that a partial sibling is a run's own, and whether that run is still going: a file next to the
    partial (its name + OWNER) recording the output, the partial and the process (host, boot, pid, start time),
    with an advisory lock (`flock`) held for the life of the partial. The system drops the lock when the process
    dies, however it dies; `remove_abandoned_partials` removes a partial only when it can take that lock. Where the
    file system has no locks there is no marker, and the partial of a killed run stays, as it always did."""

    def __init__(self, partial: Path, output: Path):
        import fcntl

        self.path, self.handle = partial.with_name(partial.name + OWNER), None
        self.record = {
            "longlora-hf": "partial",
            "output": str(output),
            "partial": partial.name,
            "host": os.uname().nodename,
            "boot": _boot_id(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
        }
        try:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # a cleaner that takes it first finds it empty, and leaves it
        except OSError:  # no locks here
            os.close(handle)
            self.path.unlink(missing_ok=True)
            return
        self.handle = handle
        self.update()

    def update(self, **changes) -> None:
        """Record `changes`. Never fails: a marker that could not be written (a full disk) is emptied, and an
        empty one proves nothing, so what it stands for is kept."""
        if self.handle is None:
            return
        self.record.update(changes)
        data = json.dumps(self.record).encode()
        try:
            os.pwrite(self.handle, data, 0)
            os.ftruncate(self.handle, len(data))
        except OSError:
            try:
                os.ftruncate(self.handle, 0)
            except OSError:
                pass

    def release(self) -> None:
        """The partial is gone (renamed into place or removed): remove the marker, then drop the lock."""
        if self.handle is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.handle)
        self.handle = None


def _remove_entry(path: Path) -> bool:
    """Remove a file or a directory (a link itself, not what it points to); True when it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return not os.path.lexists(path)


def _remove_if_abandoned(output: Path, marker: Path) -> bool:
    """Remove the partial `marker` stands for, and the marker, when the marker proves it: a run of this user
    wrote it for `output`, and that run is over (its lock can be taken, and its process is not running)."""
    import fcntl

    try:
        handle = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live run holds it
        status, now = os.fstat(handle), os.lstat(marker)
        if (status.st_dev, status.st_ino) != (now.st_dev, now.st_ino) or status.st_uid != os.getuid():
            return False  # removed and made again meanwhile, or another user's
        record = json.loads(os.pread(handle, 1 << 16, 0).decode("utf-8"))
        partial = marker.name[: -len(OWNER)]
        if not isinstance(record, dict) or (record.get("output"), record.get("partial")) != (str(output), partial):
            return False  # not written by `_Marker` for this output (an empty one: its run is just starting)
        here = (record.get("host"), record.get("boot")) == (os.uname().nodename, _boot_id())
        if here and isinstance(record.get("pid"), int):
            started = _start_time(record["pid"])
            if started is not None and started == record.get("start"):
                return False  # its process still runs (a lock that did not hold)
        previous = record.get("previous")
        named = isinstance(previous, str) and previous.startswith(f".{output.name}.") and previous.endswith(PREVIOUS)
        if named and "/" not in previous:
            previous = output.parent / previous
            if os.path.lexists(previous):
                if record.get("phase") == "swapping" and not os.path.lexists(output):
                    os.rename(previous, output)  # killed between the two renames: the earlier result goes back
                elif not _remove_entry(previous):
                    return False
        if not _remove_entry(output.parent / partial):
            return False
        marker.unlink()
        return True
    except (OSError, ValueError):  # BlockingIOError: in use; no locks here; not JSON; cannot remove
        return False
    finally:
        os.close(handle)


def remove_abandoned_partials(output: Path) -> list[str]:
    """Remove the partial siblings (and earlier outputs being replaced) that runs of a command left for `output`
    when they were killed outright, once each is proved abandoned (see `_Marker`); returns their names. A
    partial without a marker, one another run is still writing, another user's, or another output's is kept."""
    try:
        names = sorted(os.listdir(output.parent))
    except OSError:
        return []
    prefix, suffix = f".{output.name}.", PARTIAL + OWNER
    markers = [name for name in names if name.startswith(prefix) and name.endswith(suffix)]
    return [name[: -len(OWNER)] for name in markers if _remove_if_abandoned(output, output.parent / name)]


class OutOfSpaceError(OSError):
    """A write that filled its file system: one line naming the output, the space it needs where known, and the
    space free there (errno ENOSPC)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_out_of_space(error: BaseException) -> bool:
    """True when `error`, or an error it was raised from, is a full disk or a full quota (an OSError with
    ENOSPC/EDQUOT, or safetensors' SafetensorError saying "No space left on device")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded", "(os error 28)")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def out_of_space(output: Path, flag: str, needed: int | None = None, what: str = "it") -> OutOfSpaceError:
    """The error for a write of `output` that filled the disk, once its partial is removed; `needed`: an
    estimate of the bytes it takes, `what`: what was being written."""
    place = Path(output).parent
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = f"{_size(shutil.disk_usage(place).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"it needs about {_size(needed)}; " if needed else ""
    return OutOfSpaceError(
        f"{flag} {output}: no space left on the device while writing {what} ({need}{free}); nothing was kept (the "
        f"partial files were removed). Free some space there, or choose a {flag} on a disk with room."
    )


@contextmanager
def output_directory(
    value: str | os.PathLike, flag: str, inputs: Mapping[str, object] = {}, overwrite: bool = False
) -> Iterator[Path]:
    """Write a directory the safe way: check it (`check_output_directory`), yield an empty temporary sibling to
    write into, and on success record what was written (`MANIFEST`) and rename the sibling into place. On an
    error or an interruption the sibling is removed and `value` is left as it was. With `overwrite`, files of
    the earlier directory that this run did not write again are carried over; without it there are none
    (earlier files are this command's own, and are replaced as a whole)."""
    output = check_output_directory(value, flag, inputs, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(output)
    partial = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=PARTIAL, dir=output.parent))
    marker = _Marker(partial, output)
    previous = None
    try:
        partial.chmod(_mode_for(output, 0o777))  # mkdtemp makes it private
        yield partial
        written = sorted(os.listdir(partial))
        record = {"written": {name: _fingerprint(partial / name) for name in written}}
        (partial / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if output.exists():
            foreign = _foreign(output)
            if foreign and not overwrite:  # someone wrote there while this command ran
                raise FileExistsError(
                    f"{flag} {value}: files appeared there during the run ({', '.join(foreign[:5])}); nothing was "
                    "replaced. Choose another directory, or pass --overwrite."
                )
            for name in foreign:
                if name not in written:
                    _carry(output / name, partial / name)
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=PREVIOUS, dir=output.parent))
            previous.rmdir()
            marker.update(previous=previous.name, phase="swapping")  # killed now: the next run puts it back
            os.rename(output, previous)
            os.rename(partial, output)
            marker.update(phase="replaced")  # killed now: the next run removes what is left of it
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(partial, output)
    except BaseException as error:
        if previous is not None and previous.exists() and not output.exists():
            os.rename(previous, output)  # interrupted between the two renames: the earlier result goes back
        shutil.rmtree(partial, ignore_errors=True)
        if is_out_of_space(error) and not isinstance(error, OutOfSpaceError):
            raise out_of_space(output, flag) from error
        raise
    finally:
        marker.release()


def check_output_file(
    value: str | os.PathLike, flag: str, inputs: Mapping[str, object] = {}, overwrite: bool = False
) -> Path:
    """Check a file a command is about to write: not one of its inputs, not a directory, in a writable place, and
    not an existing file unless `overwrite`."""
    output = Path(value).expanduser().resolve()
    if output.is_dir():
        raise ValueError(f"{flag} {value} is a directory; give a file name.")
    check_not_an_input(output, inputs, flag)
    check_writable_parent(output, flag)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{flag} {value} exists. Choose another {flag}, or pass --overwrite to replace it.")
    return output


@contextmanager
def output_file(
    value: str | os.PathLike, flag: str, inputs: Mapping[str, object] = {}, overwrite: bool = False
) -> Iterator[Path]:
    """Write a file the safe way: check it (`check_output_file`), yield a temporary sibling path, and on success
    rename it into place; on an error or an interruption the sibling is removed and `value` is left as it was."""
    output = check_output_file(value, flag, inputs, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(output)
    handle, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=PARTIAL, dir=output.parent)
    os.close(handle)
    partial = Path(name)
    marker = _Marker(partial, output)
    try:
        partial.chmod(_mode_for(output, 0o666))
        yield partial
        if overwrite:
            os.replace(partial, output)
        else:
            try:
                os.link(partial, output)  # fails if a file appeared there meanwhile: never replaced unasked
            except FileExistsError:
                raise FileExistsError(
                    f"{flag} {value} appeared during the run; nothing was replaced. Pass --overwrite, or choose "
                    f"another {flag}."
                ) from None
            partial.unlink()
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if is_out_of_space(error) and not isinstance(error, OutOfSpaceError):
            raise out_of_space(output, flag) from error
        raise
    finally:
        marker.release()


@contextmanager
def claimed_directory(value: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold an exclusive claim on the output directory `value` while a run writes it.

    A second run that asks for it meanwhile is refused, naming the directory and the process that holds it. The
    claim is a `filelock` lock (the system's `flock`) on a hidden file next to the directory
    (`.<name>.longlora-hf.lock`: not inside, so nothing foreign lands in the output or goes to the Hub with it),
    removed at the end. The system drops the lock when the process dies, so a killed run never leaves a stale
    claim (only the file, which the next run reuses). On a file system without `flock` (Lustre mounted without
    it, NFS without a lock daemon) the claim is skipped with a warning: filelock's soft lock, a file whose
    existence is the lock, would outlive a killed run.

    Args:
        value: The output directory (made if missing, with its parents).
        flag: The flag that named it, for messages.

    Raises:
        FileExistsError: Another run holds the claim.
        OSError: The lock file cannot be made or opened (a directory that cannot be written).
    """
    from filelock import FileLock, Timeout

    directory = Path(value).expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.parent / f".{directory.name}.longlora-hf.lock"
    # a short wait, not 0: a run that opened the file as the holder removed it finds it unlinked once it gets the
    # lock, and filelock then tries again on a new file within the wait
    lock = FileLock(path, timeout=0.5, fallback_to_soft=False)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            holder = ""
        raise FileExistsError(
            f"{flag} {value}: another run is writing to it ({holder or 'unknown'}). Wait for it to end, or choose "
            f"another {flag}."
        ) from None
    except (NotImplementedError, OSError) as error:
        if isinstance(error, OSError) and error.errno not in NO_LOCKS:
            raise
        warnings.warn(
            f"{flag} {value}: cannot lock {path} ({error}); two runs into it at once would not be refused.",
            stacklevel=3,
        )
        yield
        return
    try:
        _write_holder(path, f"process {os.getpid()} on {os.uname().nodename}")
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still held, so no run holds a lock on a removed file unawares
        finally:
            lock.release()


# What `flock` fails with on a file system without locks.
NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


def _write_holder(path: Path, text: str) -> None:
    """Record who holds the claim in its lock file (the lock is on the file, not its content)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError:
        pass
