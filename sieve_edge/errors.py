"""The error hierarchy. The library raises these; only the CLI turns them into exit codes.

Every message names the file, key or module at fault and what would be valid.
"""
from __future__ import annotations


class SieveEdgeError(Exception):
    """Base of every error sieve-edge raises on purpose."""

    exit_code = 1


class InputError(SieveEdgeError):
    """Bad user input: a missing file, a malformed file, an unknown key or value."""


class ModelLoadError(InputError):
    """A model path, hub id, GGUF file or alias that cannot be loaded."""


class UnsupportedArchitectureError(InputError):
    """A model whose architecture has no entry in the registry."""


class TaskSpecError(InputError):
    """A task TOML that is malformed or inconsistent with its data."""


class DataError(InputError):
    """A malformed JSON Lines file (the message names the file and the line)."""


class ProfileError(InputError):
    """A target profile with an unknown key or an out-of-range value."""


class BudgetError(InputError):
    """A budget or tolerance that cannot be met or makes no sense."""


class TrainingError(SieveEdgeError):
    """Training (tuning or healing) that diverged: the message names the step and the setting to lower."""


class ArtifactError(SieveEdgeError):
    """An output folder that holds something else, or an input artifact that is incomplete."""


class BackendMissingError(SieveEdgeError):
    """An optional backend (onnxruntime, openvino, ...) is not installed."""

    def __init__(self, module: str, install: str):
        super().__init__(f"the backend module '{module}' is not installed; install it with: {install}")
        self.module = module
        self.install = install


class EmulatorError(SieveEdgeError):
    """The CPU emulator behind ``validate --emulate``: not set up, incomplete, or failing to build."""


class FidelityError(SieveEdgeError):
    """An exported model whose outputs miss the reference beyond tolerance."""

    def __init__(self, what: str, misses: list[str]):
        lines = "\n  ".join(misses)
        super().__init__(f"{what}: {len(misses)} output(s) out of tolerance:\n  {lines}")
        self.misses = misses


class GateFailure(SieveEdgeError):
    """A validation gate that failed: exit code 3."""

    exit_code = 3


class AccuracyOnly(GateFailure):
    """A validation under emulation whose accuracy gates passed: latency and memory were not
    measured, so it is no pass either. Exit code 4."""

    exit_code = 4
