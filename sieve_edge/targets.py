"""Target profiles: the kind of machine a bundle is made for, and the budgets it must meet.

A profile is a TOML file (schema in ``docs/TARGETS.md``, ``schema_version`` 1 to 4). Loading is
strict: an unknown key, a value of the wrong type or out of range is a ``ProfileError`` that
names the file, the key and what is allowed. Imports only the standard library (the edge
runner and ``sieve-edge --help`` stay light).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .errors import ProfileError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SCHEMA_VERSION = 4  # the newest; every version up to it is read (2 added dynamic_quantization,
#                      3 runtime_cache_capacity, 4 [workload])
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

RUNTIMES = ("onnxruntime", "openvino")
DEVICES = ("cpu", "gpu", "npu")
WEIGHTS = ("fp32", "int8", "int4")
PRECISIONS = ("f32", "bf16", "f16")
ARCHES = ("any", "x86_64", "aarch64")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits a validation run must stay within; ``None`` means no gate for that quantity.

    Latency budgets apply to the p90 of the measured samples (a budget is a maximum, and a
    median hides the slow tail a user feels). ``max_metric_drop`` is in the metric's own
    units (accuracy as a fraction: 0.02 is two points; perplexity: an increase).
    """

    max_metric_drop: float | None = None
    max_first_token_ms: float | None = None
    max_token_ms: float | None = None
    max_example_ms: float | None = None
    max_peak_memory_mb: float | None = None
    max_size_mb: float | None = None


# A classification prompt of the shipped sample tasks is 20-60 tokens (SmolLM2 tokenizer).
DEFAULT_PROMPT_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one example costs the box: a prompt pass over ``prompt_tokens`` tokens, then a
    greedy decode step for every new token after the first (the prompt pass yields the first).

    ``new_tokens`` is for generation tasks (``None``: the task's ``max_new_tokens``). A
    classification or perplexity task reads its answer from the prompt pass: 1 new token,
    whatever the profile says.
    """

    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    new_tokens: int | None = None

    def new_tokens_for(self, kind: str, max_new_tokens: int = 16) -> int:
        if kind != "generation":
            return 1
        return self.new_tokens if self.new_tokens is not None else int(max_new_tokens)

    def for_task(self, task) -> tuple[int, int]:
        """(prompt tokens, new tokens) of one example of ``task`` (a ``TaskSpec``)."""
        return self.prompt_tokens, self.new_tokens_for(task.kind, getattr(task, "max_new_tokens", 16))


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    name: str
    runtime: str                      # onnxruntime | openvino
    device: str = "cpu"               # cpu | gpu | npu
    weights: str = "int8"             # weight precision of the exported model
    inference_precision: str = "f32"  # OpenVINO INFERENCE_PRECISION_HINT (CPU default is bf16 on avx512_bf16)
    dynamic_quantization: bool = False  # OpenVINO CPU: int8 activations for int8/int4-weight MatMuls
    runtime_cache_capacity: int | None = None  # OpenVINO CPU: per-shape kernels kept (None = plugin default)
    threads: int = 1
    description: str = ""
    arch: str = "any"                 # CPU architecture the budgets were set for
    cpu_affinity: tuple[int, ...] | None = None
    budget: Budget = dataclasses.field(default_factory=Budget)
    workload: Workload = dataclasses.field(default_factory=Workload)
    schema_version: int = SCHEMA_VERSION
    path: str | None = None           # the file it was loaded from

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cpu_affinity"] = list(self.cpu_affinity) if self.cpu_affinity is not None else None
        return d


# key -> (types, check(value) -> bool, allowed-values text)
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TOP = {
    "schema_version": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= SCHEMA_VERSION,
                       f"an integer from 1 to {SCHEMA_VERSION}"),
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "description": (lambda v: isinstance(v, str), "a string"),
    "runtime": (lambda v: v in RUNTIMES, " | ".join(RUNTIMES)),
    "device": (lambda v: v in DEVICES, " | ".join(DEVICES)),
    "weights": (lambda v: v in WEIGHTS, " | ".join(WEIGHTS)),
    "inference_precision": (lambda v: v in PRECISIONS, " | ".join(PRECISIONS)),
    "dynamic_quantization": (lambda v: isinstance(v, bool), "true | false"),
    "runtime_cache_capacity": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                               "an integer >= 0 (0 = keep no per-shape kernels)"),
    "arch": (lambda v: v in ARCHES, " | ".join(ARCHES)),
    "threads": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024,
                "an integer from 1 to 1024"),
    "cpu_affinity": (lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v)
                     and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v),
                     "a non-empty list of distinct CPU indices >= 0, e.g. [0, 1]"),
    "budget": (lambda v: isinstance(v, dict), "a table [budget]"),
    "workload": (lambda v: isinstance(v, dict), "a table [workload]"),
}
_REQUIRED = ("schema_version", "name", "runtime", "threads")
_SINCE = {"dynamic_quantization": 2, "runtime_cache_capacity": 3, "workload": 4}  # key -> schema_version that added it
_BUDGET = {
    "max_metric_drop": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (metric units)"),
    **{k: (lambda v: _is_number(v) and v > 0, "a number > 0")
       for k in ("max_first_token_ms", "max_token_ms", "max_example_ms", "max_peak_memory_mb", "max_size_mb")},
}


_COUNT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1_000_000,
          "an integer from 1 to 1000000")
_WORKLOAD = {
    "prompt_tokens": _COUNT,   # typical prompt length of one example, in tokens
    "new_tokens": _COUNT,      # tokens generated per example (generation tasks; classification: 1)
}


def _resolve(path_or_name) -> Path:
    p = Path(path_or_name)
    if p.suffix == ".toml" or p.exists() or len(p.parts) > 1:
        if not p.is_file():
            raise ProfileError(f"target profile '{p}' does not exist")
        return p
    p = TARGETS_DIR / f"{path_or_name}.toml"
    if not p.is_file():
        raise ProfileError(f"no target profile named '{path_or_name}': shipped profiles are "
                           f"{', '.join(shipped_profiles()) or '(none)'} (or pass a path to a .toml file)")
    return p


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _check_table(path: Path, table: dict, schema: dict, prefix: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise ProfileError(f"{path}: unknown key '{prefix}{key}'; allowed keys: "
                               f"{', '.join(prefix + k for k in schema)}")
        check, allowed = schema[key]
        if not check(value):
            raise ProfileError(f"{path}: '{prefix}{key}' = {value!r} is not valid; allowed: {allowed}")


def parse_profile(data: dict, path: str | Path = "<profile>") -> TargetProfile:
    """Check a profile already read from TOML (or JSON) and build the ``TargetProfile``."""
    path = Path(path)
    _check_table(path, data, _TOP, "")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ProfileError(f"{path}: missing required key(s) {', '.join(missing)} "
                           f"(schema_version = {SCHEMA_VERSION}; see docs/TARGETS.md)")
    budget = data.get("budget", {})
    _check_table(path, budget, _BUDGET, "budget.")
    workload = data.get("workload", {})
    _check_table(path, workload, _WORKLOAD, "workload.")
    runtime = data["runtime"]
    precision = data.get("inference_precision", "f32")
    if runtime == "onnxruntime" and precision != "f32":
        raise ProfileError(f"{path}: 'inference_precision' = {precision!r} is not valid with runtime "
                           f"'onnxruntime' (its CPU provider has no precision hint); allowed: f32")
    for key, version in _SINCE.items():
        if key in data and data["schema_version"] < version:
            raise ProfileError(f"{path}: '{key}' needs schema_version = {version} (this file says "
                               f"{data['schema_version']}); allowed: set schema_version = {version}, or drop the key")
    if "runtime_cache_capacity" in data and (runtime != "openvino" or data.get("device", "cpu") != "cpu"):
        raise ProfileError(f"{path}: 'runtime_cache_capacity' is a setting of OpenVINO's CPU plugin, not valid with "
                           f"runtime '{runtime}' on device '{data.get('device', 'cpu')}'; allowed: drop the key, "
                           "or runtime = \"openvino\" with device = \"cpu\"")
    if runtime == "onnxruntime" and data.get("dynamic_quantization"):
        raise ProfileError(f"{path}: 'dynamic_quantization' = true is an OpenVINO setting, not valid with runtime "
                           "'onnxruntime' (its int8 export chooses its own quantization); allowed: false")
    affinity = data.get("cpu_affinity")
    if affinity is not None and data["threads"] > len(affinity):
        raise ProfileError(f"{path}: 'threads' = {data['threads']} exceeds the {len(affinity)} CPU(s) "
                           f"of 'cpu_affinity' {affinity}; allowed: threads <= len(cpu_affinity)")
    return TargetProfile(
        name=data["name"], runtime=runtime, device=data.get("device", "cpu"),
        weights=data.get("weights", "int8"), inference_precision=precision,
        dynamic_quantization=bool(data.get("dynamic_quantization", False)),
        runtime_cache_capacity=data.get("runtime_cache_capacity"),
        threads=data["threads"], description=data.get("description", ""),
        arch=data.get("arch", "any"),
        cpu_affinity=tuple(affinity) if affinity is not None else None,
        budget=Budget(**{k: float(v) for k, v in budget.items()}),
        workload=Workload(**workload),
        schema_version=data["schema_version"], path=str(path),
    )


def load_profile(path_or_name) -> TargetProfile:
    """Load a profile from a ``.toml`` path, or a bare name from the repository's ``targets/``."""
    if isinstance(path_or_name, TargetProfile):
        return path_or_name
    path = _resolve(path_or_name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: not UTF-8 text (byte {e.start}); save the profile as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_profile(data, path)


def check_host_arch(profile: TargetProfile, host: str, emulate: bool = False) -> None:
    """Raise ``InputError`` unless ``profile`` can be validated on a ``host`` CPU this way.

    Natively: a profile for ``any`` CPU or for the host's architecture. A profile for another
    architecture needs emulation (``validate --emulate``: accuracy only), which exists for
    aarch64 profiles on x86_64 hosts; measuring an ARM64 bundle's accuracy with the x86 build
    of the runtime would check other kernels than the device runs.
    """
    from .errors import InputError

    where = f"target '{profile.name}'" + (f" ({profile.path})" if profile.path else "")
    emulated = profile.arch == "aarch64" and host == "x86_64"
    if not emulate:
        if profile.arch in ("any", host):
            return
        if emulated:
            raise InputError(f"{where} is for aarch64 CPUs and this host is x86_64: its runtime's ARM64 kernels "
                             "cannot run here natively. Check its accuracy under emulation with --emulate "
                             "(set up once with `sieve-edge emulator setup`; latency and memory are not measured "
                             "then), or run `python runner.py` in the bundle on the device")
        raise InputError(f"{where} is for {profile.arch} CPUs and this host is {host}: validate it on a {profile.arch} "
                         f"host, or run `python runner.py` in the bundle on the device (emulation covers aarch64 "
                         "targets on x86_64 hosts only)")
    if profile.arch == "any":
        raise InputError(f"{where} has arch = \"any\": --emulate has no architecture to emulate; set "
                         "arch = \"aarch64\" in a copy of the profile to check it on ARM64 kernels, or validate "
                         "without --emulate")
    if profile.arch == host:
        raise InputError(f"{where} is for {host} CPUs, which this host is: validate without --emulate")
    if not emulated:
        raise InputError(f"no emulator for {profile.arch} targets on a {host} host (emulation covers aarch64 "
                         "targets on x86_64 hosts)")
    if profile.device != "cpu":
        raise InputError(f"{where} uses device '{profile.device}': --emulate runs the CPU only (QEMU's user-mode "
                         "emulation has no GPU or NPU)")
