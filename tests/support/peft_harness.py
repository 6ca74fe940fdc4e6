"""PEFT's own test harness, for the PEFT version installed here, fetched at test time.

Nothing of PEFT's test code lives in this repository. `peft_harness_tests_dir()` downloads the source
distribution of the installed PEFT (`pip download --no-binary :all: --no-deps peft==<version>`) once into a
cache directory and extracts its `tests/` folder; `import_peft_harness()` imports `testing_common` and
`test_decoder_models` from there as the modules of a package of their own. A download that fails raises
`PeftHarnessUnavailable`, which the tests turn into a failure, never a skip.

Cache: `$XDG_CACHE_HOME/longlora-hf/peft-<version>/tests` (`~/.cache/...` without XDG_CACHE_HOME). It is filled
atomically: the sdist is downloaded and extracted into a temporary directory beside it and moved in place
with one rename, so parallel workers (pytest-xdist) either find the whole folder or make their own and let the
first rename win.

Two adaptations make the harness run offline on local tiny models, both without changing its code:
- `testing_common` imports `diffusers.StableDiffusionPipeline` for its Stable Diffusion branches only
  (`isinstance` checks). Without diffusers installed, a stand-in class that no object is an instance of is
  importable while the harness is imported, and removed right after.
- The harness wraps model loading in `hub_online_once(model_id)`, which turns the hub ONLINE for the first
  use of an id (to fill its cache). `mark_models_cached` enters the local model directories in the harness's
  own access table, so every use stays offline.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest


DOWNLOAD_TIMEOUT_S = 600
HARNESS_MODULES = ("testing_utils", "testing_common", "test_decoder_models")
"""The modules of PEFT's tests/ used here, in import order."""


class PeftHarnessUnavailable(RuntimeError):
    """PEFT's test harness for the installed version could not be fetched or imported."""


@dataclass(frozen=True)
class PeftHarness:
    """PEFT's test modules, imported from its sdist: `common` is `testing_common` (PeftCommonTester),
    `utils` is `testing_utils`, `decoder` is `test_decoder_models` (TestDecoderModels, its driver for causal LMs)."""

    version: str
    tests_dir: Path
    common: types.ModuleType
    utils: types.ModuleType
    decoder: types.ModuleType

    def mark_models_cached(self, *model_ids: str) -> None:
        """Keep the harness offline for these (local) model ids: its `hub_online_once` goes online only for
        an id it has not seen, and it records seen ids in `_HUB_MODEL_ACCESSES`."""
        for model_id in model_ids:
            self.utils._HUB_MODEL_ACCESSES.setdefault(model_id, 1)


def cache_root() -> Path:
    """Where fetched PEFT test suites are kept: `$XDG_CACHE_HOME/longlora-hf`, else `~/.cache/longlora-hf`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "longlora-hf"


def peft_harness_tests_dir(version: str = peft.__version__, root: Path | None = None) -> Path:
    """PEFT's `tests/` folder for `version`, from the cache, else downloaded (the sdist) and extracted into it."""
    target = (root or cache_root()) / f"peft-{version}" / "tests"
    if (target / "testing_common.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        sdist = _download_sdist(version, Path(scratch) / "download")
        extracted = _extract_tests(sdist, version, Path(scratch) / "extract")
        try:
            os.replace(extracted, target)
        except OSError:
            if not (target / "testing_common.py").is_file():  # not another worker's copy: a real failure
                raise
    return target


def _download_sdist(version: str, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "--disable-pip-version-check",
        f"peft=={version}",
        "-d",
        str(into),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PeftHarnessUnavailable(
            f"could not download the peft=={version} sdist ({' '.join(command)}): {error}"
        ) from error
    sdists = sorted(into.glob("peft-*.tar.gz"))
    if result.returncode != 0 or not sdists:
        output = (result.stderr or result.stdout).strip().splitlines()[-15:]
        raise PeftHarnessUnavailable(
            f"could not download the peft=={version} sdist, exit status {result.returncode}, with "
            f"`{' '.join(command)}`:\n" + "\n".join(output)
        )
    return sdists[0]


def _extract_tests(sdist: Path, version: str, into: Path) -> Path:
    """Extract the sdist's `tests/` folder (only it) into `into`; returns the extracted folder."""
    prefix = f"peft-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers() if member.name.startswith(prefix)]
        archive.extractall(into, members=members, filter="data")
    tests = into / prefix
    if not (tests / "testing_common.py").is_file():
        raise PeftHarnessUnavailable(f"{sdist.name} has no {prefix}testing_common.py: PEFT's test layout changed")
    return tests


@contextlib.contextmanager
def _diffusers_stand_in():
    """Let `from diffusers import StableDiffusionPipeline` succeed while the harness is imported, if diffusers
    is not installed: the harness uses the class only to recognise Stable Diffusion pipelines."""
    if importlib.util.find_spec("diffusers") is not None:
        yield
        return
    stand_in = types.ModuleType("diffusers", "Stand-in for diffusers while PEFT's test harness is imported.")
    stand_in.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {"__doc__": "No model here is one."})
    sys.modules["diffusers"] = stand_in
    try:
        yield
    finally:
        if sys.modules.get("diffusers") is stand_in:
            del sys.modules["diffusers"]


def import_peft_harness(version: str = peft.__version__) -> PeftHarness:
    """Fetch (or reuse) PEFT's tests for `version` and import its harness modules, as the package
    `_peft_<version>_tests` (they import each other relatively). Assertions in them are rewritten by pytest, so
    a failing harness check reports its values. Raises PeftHarnessUnavailable."""
    package = f"_peft_{version.replace('.', '_').replace('+', '_')}_tests"
    if package not in sys.modules:
        tests_dir = peft_harness_tests_dir(version)
        pytest.register_assert_rewrite(*(f"{package}.{name}" for name in HARNESS_MODULES))
        module = types.ModuleType(package, f"PEFT {version}'s tests/, from its sdist ({tests_dir}).")
        module.__path__ = [str(tests_dir)]
        module.__file__ = None
        sys.modules[package] = module
        try:
            with _diffusers_stand_in():
                for name in HARNESS_MODULES:
                    importlib.import_module(f"{package}.{name}")
        except Exception as error:
            for name in [key for key in sys.modules if key == package or key.startswith(package + ".")]:
                del sys.modules[name]
            raise PeftHarnessUnavailable(
                f"PEFT {version}'s test harness in {tests_dir} could not be imported: {type(error).__name__}: {error}"
            ) from error
    package_module = sys.modules[package]
    return PeftHarness(
        version=version,
        tests_dir=Path(package_module.__path__[0]),
        common=sys.modules[f"{package}.testing_common"],
        utils=sys.modules[f"{package}.testing_utils"],
        decoder=sys.modules[f"{package}.test_decoder_models"],
    )
