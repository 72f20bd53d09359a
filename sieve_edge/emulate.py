"""ARM64 accuracy without the device: a bundle's own runner under QEMU's user-mode emulator.

``sieve-edge emulator setup`` builds, once, all it takes to run the runner (this package's
``runtime.py``, the same code a bundle ships as ``runner.py``, never taken from the bundle
under test) as an ARM64 process on an x86-64 host, with no root, chroot or binfmt_misc (the folder is
``emulator_dir()``, one per emulated architecture):

- ``qemu/qemu-aarch64``: QEMU's user-mode emulator, a static x86-64 binary taken out of
  Debian's ``qemu-user`` package (amd64);
- ``root/``: Debian arm64 packages unpacked into a folder: ``python3.X`` and the shared
  libraries it and the wheels load (libc, libstdc++, libgomp, ...); no package script runs;
- ``site/``: the aarch64 wheels of numpy, tokenizers and the runtimes (``pip install --target
  --platform``) at the versions installed on this host, so that the x86 and the ARM64 run
  use the same runtime release and differ only in the kernels the CPU selects;
- ``emulator.json``: what was installed (versions, sources, sizes, timings). Written last:
  a folder without it is incomplete, and is not used.

A run is ``qemu-aarch64 -L root -cpu MODEL root/usr/bin/python3.X .../sieve_edge/runtime.py BUNDLE ...``. ``-L``
makes QEMU resolve paths in ``root`` first (the ELF interpreter, shared libraries), and the
CPU model decides what the runtimes detect (HWCAP and /proc/cpuinfo are emulated per model),
so which of their kernels run. The runner does not know it is emulated.

Network is used by ``setup`` only: a Debian mirror (its ``InRelease`` checked with ``gpgv``
against the Debian archive keyring when both are on this host; then the package index and
every package by SHA-256) and the Python package index (pip, with its usual configuration).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import EmulatorError, InputError

DEFAULT_SUITE = "trixie"   # Debian 13: Python 3.13, glibc 2.41, QEMU 10.0
DEFAULT_MIRROR = "https://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
RUNTIMES = ("onnxruntime", "openvino")
BASE_WHEELS = ("numpy", "tokenizers")  # what the runner imports besides a runtime
# CPU model QEMU emulates unless --emulate-cpu says otherwise. cortex-a72 is the oldest core
# of the shipped arm64-panel profile: plain NEON, no dot product, no i8mm, no fp16 arithmetic,
# so the runtimes take their baseline ARM64 kernels (see docs/TARGETS.md for what each model selects).
DEFAULT_CPU = "cortex-a72"
# An emulated instruction costs tens of host instructions: the runner's time limit scales by this.
TIMEOUT_FACTOR = 50
# Host gates: meaningless under emulation (QEMU's own translation costs time and memory).
HOST_GATES = ("max_first_token_ms", "max_token_ms", "max_example_ms", "max_peak_memory_mb")
NOT_MEASURED = "not measured"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str        # platform.machine() spelling, as targets.ARCHES
    debian: str      # Debian architecture of the guest root
    qemu: str        # QEMU user-mode binary
    wheel: str       # manylinux platform suffix


ARCHES = {"aarch64": Arch("aarch64", "arm64", "qemu-aarch64", "aarch64")}
HOST_DEBIAN = {"x86_64": "amd64"}  # hosts whose QEMU binary setup can fetch


def setup_command(arch: str = "aarch64") -> str:
    return "sieve-edge emulator setup" + ("" if arch == "aarch64" else f" --arch {arch}")


def emulator_dir(arch: str = "aarch64") -> Path:
    """``$SIEVE_EDGE_CACHE/emulator/<arch>``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``sieve-edge/emulator/<arch>``."""
    if os.environ.get("SIEVE_EDGE_CACHE"):
        root = Path(os.environ["SIEVE_EDGE_CACHE"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sieve-edge"
    return root / "emulator" / arch


def _arch(arch: str) -> Arch:
    if arch not in ARCHES:
        raise InputError(f"no emulator for architecture '{arch}'; supported: {', '.join(ARCHES)}")
    return ARCHES[arch]


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


# ---------------------------------------------------------------- what is installed


def load_emulator(arch: str = "aarch64") -> dict:
    """The installed emulator's ``emulator.json`` (with ``dir``), or ``EmulatorError`` naming the setup command."""
    _arch(arch)
    folder = emulator_dir(arch)
    info_path = folder / "emulator.json"
    if not folder.is_dir():
        raise EmulatorError(f"the {arch} emulator is not set up ({folder} does not exist); build it once with "
                            f"`{setup_command(arch)}` (downloads ~155 MB: QEMU, a Debian {ARCHES[arch].debian} "
                            "Python, the runtimes' wheels)")
    if not info_path.is_file():
        raise EmulatorError(f"the {arch} emulator in {folder} is incomplete (no emulator.json: setup was "
                            f"interrupted or failed); rebuild it with `{setup_command(arch)} --force`")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EmulatorError(f"{info_path}: not valid JSON ({e}); rebuild with `{setup_command(arch)} --force`") from None
    info["dir"] = str(folder)
    for key in ("qemu", "python"):
        if not (folder / info[key]).is_file():
            raise EmulatorError(f"the {arch} emulator in {folder} is missing {info[key]}; rebuild it with "
                                f"`{setup_command(arch)} --force`")
    return info


def emulator_status(arch: str = "aarch64") -> dict:
    """What ``emulator status`` shows: installed or not, where, how big, which versions."""
    folder = emulator_dir(arch)
    try:
        info = load_emulator(arch)
    except EmulatorError as e:
        return {"arch": arch, "installed": False, "dir": str(folder), "problem": str(e)}
    host = host_versions(info.get("runtimes", RUNTIMES))
    stale = {k: {"emulator": info["versions"].get(k), "host": v} for k, v in host.items()
             if v is not None and info["versions"].get(k) != v}
    return {"arch": arch, "installed": True, "dir": str(folder), "bytes": dir_bytes(folder),
            "suite": info.get("suite"), "python": info.get("python_version"), "qemu_version": info.get("qemu_version"),
            "versions": info.get("versions"), "default_cpu": DEFAULT_CPU, "cpus": info.get("cpus"),
            "created_at": info.get("created_at"), "stale": stale}


def remove_emulator(arch: str = "aarch64") -> int:
    """Delete the emulator folder (and any unfinished setup); return the bytes freed."""
    folder = emulator_dir(arch)
    freed = 0
    for p in [folder, *folder.parent.glob(f"{arch}.partial-*"), *folder.parent.glob(f"{arch}.old-*")]:
        if p.is_dir():
            freed += dir_bytes(p)
            shutil.rmtree(p)
    return freed


def host_versions(names=RUNTIMES + BASE_WHEELS) -> dict:
    """Installed versions of these distributions on this host (None when absent)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- Debian packages


def _fetch(url: str, dest: Path | None = None, sha256: str | None = None,
           tries: int = 3) -> bytes | None:
    """Download ``url`` (into ``dest``, else return the bytes), checking its SHA-256 when given."""
    last = None
    for attempt in range(tries):
        try:
            h = hashlib.sha256()
            buf = io.BytesIO()
            with urllib.request.urlopen(url, timeout=60) as r:
                out = open(dest, "wb") if dest is not None else buf
                try:
                    while True:
                        chunk = r.read(1 << 20)
                        if not chunk:
                            break
                        h.update(chunk)
                        out.write(chunk)
                finally:
                    if dest is not None:
                        out.close()
            if sha256 is not None and h.hexdigest() != sha256:
                raise EmulatorError(f"{url}: SHA-256 {h.hexdigest()} does not match the signed index ({sha256}); "
                                    "the mirror may be mid-update: rerun setup, or pass --mirror")
            return None if dest is not None else buf.getvalue()
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            last = e
            time.sleep(1 + 2 * attempt)
    raise EmulatorError(f"cannot download {url}: {last} (setup needs the network; pass --mirror for another "
                        "Debian mirror)")


def _verify_release(text: bytes, log) -> str:
    """Check ``InRelease``'s signature with gpgv and Debian's keyring when both exist here."""
    gpgv = shutil.which("gpgv")
    if not gpgv or not Path(KEYRING).is_file():
        log(f"emulator: note: {'gpgv' if not gpgv else KEYRING} is not on this host: the Debian index is "
            "trusted on HTTPS alone (every package is still checked against it by SHA-256)")
        return "not checked (no gpgv or Debian keyring on this host): HTTPS only"
    with tempfile.NamedTemporaryFile(suffix=".InRelease", delete=False) as f:
        f.write(text)
    try:
        proc = subprocess.run([gpgv, "--keyring", KEYRING, f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise EmulatorError(f"the Debian index's signature does not verify against {KEYRING}: "
                            + " | ".join(proc.stderr.strip().splitlines()[-2:]))
    return f"gpgv with {KEYRING}"


def _release_sha256(text: bytes) -> dict[str, tuple[str, int]]:
    """path -> (sha256, size) from the SHA256 section of a Release file."""
    out, inside = {}, False
    for line in text.decode("utf-8", "replace").splitlines():
        if line.startswith("SHA256:"):
            inside = True
            continue
        if inside:
            if not line.startswith(" "):
                break
            digest, size, path = line.split()
            out[path] = (digest, int(size))
    return out


def parse_packages(text: str) -> tuple[dict[str, dict], dict[str, str]]:
    """A Debian ``Packages`` index: name -> fields, and virtual name -> a package providing it."""
    packages, provides = {}, {}
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        name = fields.get("Package")
        if not name or name in packages:
            continue
        packages[name] = fields
        for p in fields.get("Provides", "").split(","):
            p = p.split("(")[0].strip()
            if p:
                provides.setdefault(p, name)
    return packages, provides


def resolve(packages: dict, provides: dict, wanted) -> list[dict]:
    """``wanted`` and everything they Depend / Pre-Depend on (the first alternative that exists)."""
    seen: dict[str, dict] = {}
    stack = list(wanted)
    while stack:
        name = stack.pop()
        fields = packages.get(name) or packages.get(provides.get(name, ""))
        if fields is None:
            raise EmulatorError(f"the Debian index has no package '{name}' (needed by the emulator's root)")
        if fields["Package"] in seen:
            continue
        seen[fields["Package"]] = fields
        for field in ("Pre-Depends", "Depends"):
            for clause in fields.get(field, "").split(","):
                if not clause.strip():
                    continue
                alternatives = [a.split("(")[0].strip().split(":")[0] for a in clause.split("|")]
                stack.append(next((a for a in alternatives if a in packages or a in provides), alternatives[0]))
    return [seen[k] for k in sorted(seen)]


def _deb_data(deb: Path) -> tuple[bytes, str]:
    """The ``data.tar.*`` member of a .deb (an ar archive) and its compression suffix."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise EmulatorError(f"{deb.name}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return data, name[len("data.tar"):]
    raise EmulatorError(f"{deb.name}: no data.tar member")


def _tar_mode(suffix: str, name: str) -> str:
    modes = {"": "", ".xz": "xz", ".gz": "gz", ".bz2": "bz2"}
    if suffix not in modes:
        raise EmulatorError(f"{name}: data.tar{suffix} compression is not supported (xz, gz, bz2); "
                            "use a Debian suite or mirror that ships xz packages")
    return modes[suffix]


def _member_name(name: str) -> str:
    """A tar member's path relative to the archive root ("./usr/x" and "/usr/x" -> "usr/x")."""
    return os.path.normpath(name.lstrip("/")) if name not in ("", ".", "./") else "."


def unpack_deb(deb: Path, root: Path) -> int:
    """Unpack a .deb's files into ``root`` without running its scripts; return the files written.

    Member names stay inside ``root``; absolute symlinks are made relative to ``root`` (so they
    point into it, not at this host); device nodes and FIFOs are skipped.
    """
    data, suffix = _deb_data(deb)
    root = root.resolve()
    n = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode=f"r:{_tar_mode(suffix, deb.name)}") as tar:
        members = []
        for m in tar.getmembers():
            name = _member_name(m.name)
            if name == "." or name == ".." or name.startswith("../"):
                continue
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                continue
            m.name = name
            if m.issym() and os.path.isabs(m.linkname):
                m.linkname = os.path.relpath(m.linkname.lstrip("/"), os.path.dirname(name) or ".")
            if m.islnk():
                m.linkname = _member_name(m.linkname)
            members.append(m)
            n += m.isfile()
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(root, members=members, **kwargs)
    return n


def _extract_one(deb: Path, member_names, dest: Path) -> str:
    """Stream a .deb's data.tar and write the first of ``member_names`` found to ``dest``."""
    data, suffix = _deb_data(deb)
    mode = _tar_mode(suffix, deb.name)
    wanted = {_member_name(n) for n in member_names}
    with tarfile.open(fileobj=io.BytesIO(data), mode=f"r|{mode}") as tar:
        for m in tar:
            if _member_name(m.name) in wanted and m.isfile():
                with tar.extractfile(m) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                dest.chmod(0o755)
                return _member_name(m.name)
    raise EmulatorError(f"{deb.name} holds none of {sorted(wanted)}")


class _Debian:
    """One suite of a Debian mirror: signed index, package lookup, verified downloads."""

    def __init__(self, mirror: str, suite: str, log):
        self.mirror, self.suite, self.log = mirror.rstrip("/"), suite, log
        release = _fetch(f"{self.mirror}/dists/{suite}/InRelease")
        self.signature = _verify_release(release, log)
        self.sums = _release_sha256(release)
        self.by_hash = b"Acquire-By-Hash: yes" in release
        self.indexes: dict[str, tuple[dict, dict]] = {}

    def index(self, debian_arch: str) -> tuple[dict, dict]:
        if debian_arch not in self.indexes:
            path = f"main/binary-{debian_arch}/Packages.xz"
            if path not in self.sums:
                raise EmulatorError(f"Debian {self.suite} at {self.mirror} has no {path}")
            digest, size = self.sums[path]
            url = (f"{self.mirror}/dists/{self.suite}/main/binary-{debian_arch}/by-hash/SHA256/{digest}"
                   if self.by_hash else f"{self.mirror}/dists/{self.suite}/{path}")
            self.log(f"emulator: Debian {self.suite} package index for {debian_arch} ({_mb(size)})")
            raw = _fetch(url, sha256=digest)
            self.indexes[debian_arch] = parse_packages(lzma.decompress(raw).decode("utf-8"))
        return self.indexes[debian_arch]

    def download(self, fields: dict, folder: Path) -> Path:
        dest = folder / Path(fields["Filename"]).name
        _fetch(f"{self.mirror}/{fields['Filename']}", dest, sha256=fields["SHA256"])
        return dest


# ---------------------------------------------------------------- setup


def _python_package(packages: dict) -> str:
    """The suite's default ``python3.X`` (what its ``python3`` package depends on)."""
    for clause in packages.get("python3", {}).get("Depends", "").split(","):
        name = clause.split("(")[0].strip()
        if re.fullmatch(r"python3\.\d+", name):
            return name
    raise EmulatorError("the Debian index's python3 package names no python3.X dependency")


def _glibc(packages: dict) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", packages.get("libc6", {}).get("Version", ""))
    if not m:
        raise EmulatorError("the Debian index has no libc6 version")
    return int(m.group(1)), int(m.group(2))


def _pip_install(target: Path, wheel_arch: str, py: str, glibc: tuple[int, int], pins: list[str], log) -> None:
    """aarch64 wheels into ``target``; every manylinux tag up to the root's glibc is acceptable."""
    platforms = [f"manylinux2014_{wheel_arch}"] + [f"manylinux_2_{minor}_{wheel_arch}"
                                                    for minor in range(17, glibc[1] + 1)]
    nodot = py.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--no-compile",
           "--target", str(target), "--python-version", py, "--implementation", "cp", "--abi", f"cp{nodot}",
           "--disable-pip-version-check", "--progress-bar", "off"]
    for p in platforms:
        cmd += ["--platform", p]
    cmd += pins
    log(f"emulator: pip install --platform ..{wheel_arch} --python-version {py} {' '.join(pins)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if "is ignored" not in ln][-4:]
        raise EmulatorError(f"pip could not install the {wheel_arch} wheels ({' '.join(pins)}) for Python {py}: "
                            + " | ".join(tail) + " (a version without an aarch64 wheel for this Python? "
                            "--suite bookworm gives Python 3.11)")


_PROBE = """
import json, sys, platform
out = {"python": platform.python_version(), "machine": platform.machine(), "versions": {}}
for name in sys.argv[1:]:
    mod = __import__(name)
    out["versions"][name] = mod.get_version().split("-")[0] if name == "openvino" else mod.__version__
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("Features"):
            out["features"] = line.split(":", 1)[1].split()
            break
except OSError:
    pass
print(json.dumps(out))
"""


def emulated_prefix(info: dict, cpu: str | None = None) -> list[str]:
    """The command that runs the emulated Python: ``qemu -L root -cpu MODEL root/usr/bin/python3.X``."""
    folder = Path(info["dir"])
    return [str(folder / info["qemu"]), "-L", str(folder / "root"), "-cpu", cpu or DEFAULT_CPU,
            str(folder / info["python"])]


def emulated_env(info: dict, base: dict | None = None) -> dict:
    """Environment of an emulated Python: its site folder only, no user site, no bytecode written."""
    env = dict(os.environ if base is None else base)
    for key in ("PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "QEMU_LD_PREFIX", "QEMU_CPU"):
        env.pop(key, None)
    env.update(PYTHONPATH=str(Path(info["dir"]) / "site"), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def probe(info: dict, cpu: str | None = None, timeout: float = 600) -> dict:
    """Import the runtimes in the emulated Python; return its versions and the CPU features it sees."""
    try:
        proc = subprocess.run(emulated_prefix(info, cpu) + ["-c", _PROBE, *BASE_WHEELS, *info["runtimes"]],
                              capture_output=True, text=True, env=emulated_env(info), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulatorError(f"the emulated Python in {info['dir']} did not import the runtimes within "
                            f"{timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise EmulatorError(f"the emulated Python in {info['dir']} failed (exit {proc.returncode}): "
                            + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def setup_emulator(arch: str = "aarch64", suite: str = DEFAULT_SUITE, mirror: str = DEFAULT_MIRROR,
                   runtimes=None, force: bool = False, log=None) -> dict:
    """Build the emulator folder for ``arch`` (see the module docstring); return its emulator.json.

    runtimes: which runtimes' wheels to install (default: those installed on this host).
    An existing complete emulator is kept unless ``force``; an incomplete one is replaced.
    """
    from .progress import progress_bar

    log = log or (lambda msg: None)
    spec = _arch(arch)
    host = platform.machine().lower()
    host = {"amd64": "x86_64", "arm64": "aarch64"}.get(host, host)
    if host == arch:
        raise InputError(f"this host is {arch}: nothing to emulate; validate {arch} targets without --emulate")
    if host not in HOST_DEBIAN or not sys.platform.startswith("linux"):
        raise EmulatorError(f"the emulator runs on Linux x86_64 hosts; this is {sys.platform} {host}")
    folder = emulator_dir(arch)
    if (folder / "emulator.json").is_file() and not force:
        info = load_emulator(arch)
        log(f"emulator: already set up in {folder} ({_mb(dir_bytes(folder))}); --force rebuilds it")
        return info
    versions = host_versions()
    runtimes = tuple(runtimes) if runtimes else tuple(r for r in RUNTIMES if versions.get(r))
    for r in runtimes:
        if r not in RUNTIMES:
            raise InputError(f"unknown runtime '{r}'; allowed: {', '.join(RUNTIMES)}")
        if not versions.get(r):
            raise InputError(f"runtime '{r}' is not installed on this host: the emulator installs the same "
                             f"version as the host's, so install it here first (pip install {r})")
    if not runtimes:
        raise InputError(f"neither {' nor '.join(RUNTIMES)} is installed on this host")
    missing = [b for b in BASE_WHEELS if not versions.get(b)]
    if missing:
        raise InputError(f"{', '.join(missing)} not installed on this host (the runner needs them)")

    t_start = time.perf_counter()
    timings = {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{arch}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    downloads = partial / "downloads"
    downloads.mkdir(parents=True)
    try:
        # 1. the signed Debian index
        t0 = time.perf_counter()
        debian = _Debian(mirror, suite, log)
        guest, _ = debian.index(spec.debian)
        py_pkg = _python_package(guest)
        glibc = _glibc(guest)
        # python3.X with its libraries, plus what the runtimes' wheels link against
        wanted = [py_pkg, "libstdc++6", "libgcc-s1", "libgomp1"]
        debs = resolve(*debian.index(spec.debian), wanted)
        timings["index_s"] = time.perf_counter() - t0

        # 2. the guest root: Debian arm64 packages unpacked, no scripts run
        t0 = time.perf_counter()
        root = partial / "root"
        root.mkdir()
        total = sum(int(d.get("Size", 0)) for d in debs)
        log(f"emulator: [1/4] {len(debs)} Debian {spec.debian} packages for {py_pkg} ({_mb(total)} to download)")
        for fields in progress_bar(debs, desc="debian packages"):
            deb = debian.download(fields, downloads)
            unpack_deb(deb, root)
            deb.unlink()
        for link in ("lib", "bin", "sbin"):  # merged /usr: the ELF interpreter is /lib/ld-linux-*.so.1
            if not (root / link).exists() and (root / "usr" / link).is_dir():
                (root / link).symlink_to(f"usr/{link}")
        python = Path("root/usr/bin") / py_pkg
        if not (partial / python).is_file():
            raise EmulatorError(f"{py_pkg} did not unpack to {python}")
        timings["root_s"] = time.perf_counter() - t0

        # 3. QEMU's user-mode emulator for this host (a static binary)
        t0 = time.perf_counter()
        host_index, _ = debian.index(HOST_DEBIAN[host])
        qemu_pkg = next((p for p in ("qemu-user", "qemu-user-static") if p in host_index
                         and int(host_index[p].get("Installed-Size", "0")) > 10_000), None)
        if qemu_pkg is None:
            raise EmulatorError(f"Debian {suite} has no qemu-user package with binaries for {HOST_DEBIAN[host]}")
        log(f"emulator: [2/4] {qemu_pkg} {host_index[qemu_pkg]['Version']} "
            f"({_mb(int(host_index[qemu_pkg]['Size']))} download, only {spec.qemu} is kept)")
        deb = debian.download(host_index[qemu_pkg], downloads)
        (partial / "qemu").mkdir()
        qemu = Path("qemu") / spec.qemu
        _extract_one(deb, [f"usr/bin/{spec.qemu}-static", f"usr/bin/{spec.qemu}"], partial / qemu)
        deb.unlink()
        shutil.rmtree(downloads)
        qemu_version = subprocess.run([str(partial / qemu), "-version"], capture_output=True,
                                      text=True).stdout.split("\n")[0].strip()
        cpus = _cpu_models(partial / qemu)
        timings["qemu_s"] = time.perf_counter() - t0

        # 4. the runtimes' wheels, at this host's versions
        t0 = time.perf_counter()
        py = py_pkg.removeprefix("python")
        pins = [f"{name}=={versions[name]}" for name in (*BASE_WHEELS, *runtimes)]
        log(f"emulator: [3/4] {spec.wheel} wheels for Python {py}: {', '.join(pins)}")
        _pip_install(partial / "site", spec.wheel, py, glibc, pins, log)
        timings["wheels_s"] = time.perf_counter() - t0

        info = {
            "format": "sieve-edge/emulator", "arch": arch, "suite": suite, "mirror": mirror,
            "index_signature": debian.signature, "debian_packages": {d["Package"]: d["Version"] for d in debs},
            "qemu_package": f"{qemu_pkg} {host_index[qemu_pkg]['Version']}", "qemu_version": qemu_version,
            "qemu": str(qemu), "python": str(python), "python_version": None, "glibc": ".".join(map(str, glibc)),
            "runtimes": list(runtimes), "versions": {k: versions[k] for k in (*BASE_WHEELS, *runtimes)},
            "cpus": cpus, "default_cpu": DEFAULT_CPU,
        }
        if folder.exists():  # an incomplete folder, or --force
            old = folder.with_name(f"{arch}.old-{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    # 5. in place: bytecode for the guest's stdlib and wheels (imports under emulation are slow
    # enough without compiling them on every run), then a probe of the runtimes; emulator.json last
    t0 = time.perf_counter()
    info["dir"] = str(folder)
    log(f"emulator: [4/4] compiling the emulated Python's modules and importing the runtimes under {spec.qemu}")
    prefix = emulated_prefix(info)
    env = emulated_env(info)
    env.pop("PYTHONDONTWRITEBYTECODE")
    # one process: an emulated Python cannot start another (the host kernel does not run ARM64
    # binaries without binfmt_misc), so no multiprocessing (-j)
    subprocess.run(prefix + ["-m", "compileall", "-q", "-x", r"[/\\](tests?|idlelib|turtledemo)[/\\]",
                             str(folder / "root" / "usr" / "lib" / py_pkg), str(folder / "site")],
                   capture_output=True, text=True, env=env)  # a file that does not compile is just not cached
    found = probe(info)
    wrong = {k: (v, found["versions"].get(k)) for k, v in info["versions"].items() if found["versions"].get(k) != v}
    if found.get("machine") != arch or wrong:
        raise EmulatorError(f"the emulated Python reports machine {found.get('machine')} and versions "
                            f"{found['versions']} (expected {arch}, {info['versions']})")
    timings["compile_probe_s"] = time.perf_counter() - t0
    info.update(python_version=found["python"], features_default_cpu=found.get("features"),
                timings=timings, seconds=time.perf_counter() - t_start, bytes=dir_bytes(folder),
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    info.pop("dir")
    tmp = folder / f"emulator.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "emulator.json")
    info["dir"] = str(folder)
    log(f"emulator: ready in {folder}: {_mb(info['bytes'])} on disk, set up in {info['seconds']:.0f} s "
        f"(Python {found['python']}, {qemu_version})")
    return info


def _cpu_models(qemu: Path) -> list[str]:
    out = subprocess.run([str(qemu), "-cpu", "help"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in out.splitlines()[1:] if line.startswith("  ") and line.split())


# ---------------------------------------------------------------- validate --emulate


def check_ready(info: dict, runtime: str, cpu: str | None) -> str:
    """The CPU model to emulate, after checking the emulator can run ``runtime`` at the host's version."""
    arch = info["arch"]
    if runtime not in info.get("runtimes", []):
        raise EmulatorError(f"the {arch} emulator was set up without {runtime}; rebuild it with "
                            f"`{setup_command(arch)} --force`")
    here = host_versions([runtime]).get(runtime)
    if here != info["versions"].get(runtime):
        raise EmulatorError(f"the {arch} emulator has {runtime} {info['versions'].get(runtime)}, this host "
                            f"{here}: the two runs must use one release; rebuild with `{setup_command(arch)} --force`")
    cpu = cpu or DEFAULT_CPU
    if info.get("cpus") and cpu not in info["cpus"]:
        raise InputError(f"--emulate-cpu '{cpu}' is not a CPU model of {info.get('qemu_version', 'QEMU')}; "
                         f"allowed: {', '.join(info['cpus'])}")
    return cpu


# The package's own runner: the bundle's runner.py is a copy of it, and a bundle under test is
# data, not code to execute.
RUNNER = Path(__file__).resolve().parent / "runtime.py"


def run_runner(prefix: list[str], env: dict, bundle: Path, profile, task, frame_file, limit, timeout,
               what: str, log) -> dict:
    """Run the package's runner (``RUNNER``) on ``bundle`` under ``prefix`` (a Python command) with ``--per-example``.

    The profile's threads and precision; no CPU pinning, warm-up or decode-step timing (time is
    not what is compared, and every emulated example costs a hundred native ones).
    Progress lines of the runner go to ``log``; the measurement JSON is returned.
    """
    with tempfile.TemporaryDirectory(prefix="sieve-edge-emulate-") as tmp:
        out = Path(tmp) / "measurement.json"
        cmd = prefix + [str(RUNNER), str(bundle), "--json", str(out), "--no-gates",
                        "--target", str(profile.path), "--threads", str(profile.threads),
                        "--precision", profile.inference_precision, "--cpu-affinity", "none",
                        "--per-example", "--progress",
                        # nothing is timed: no untimed warm-up, no extra decode steps for token latency
                        "--warmup", "0", "--decode-tokens", "0"]
        if limit:
            cmd += ["--limit", str(limit)]
        if task is not None:
            cmd += ["--task", str(task), "--prompt-frame", str(frame_file)]
        env = dict(env, OMP_NUM_THREADS=str(profile.threads))
        t0 = time.perf_counter()
        tail: list[str] = []
        last_log = 0.0
        stdout: list[str] = []
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            # stdout is read on a thread (the runner's table); stderr here, line by line, for progress
            reader = threading.Thread(target=lambda: stdout.extend(proc.stdout), daemon=True)
            reader.start()
            watchdog = threading.Timer(timeout, proc.kill) if timeout is not None else None
            if watchdog is not None:
                watchdog.start()
            try:
                for line in proc.stderr:
                    line = line.rstrip("\n")
                    if line.startswith("progress: "):
                        done, total = line.split()[1].split("/")
                        now = time.perf_counter()
                        if done == total or now - last_log > 30:
                            log(f"{what}: {done}/{total} examples, {now - t0:.0f} s")
                            last_log = now
                    elif line.strip():
                        tail = (tail + [line])[-5:]
                proc.wait()
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            reader.join()
        seconds = time.perf_counter() - t0
        if timeout is not None and seconds >= timeout and proc.returncode != 0:
            raise EmulatorError(f"the {what} run of the runner on {bundle} did not finish within {timeout:.0f} s")
        if proc.returncode != 0 or not out.is_file():
            lines = tail or "".join(stdout).strip().splitlines()[-5:]
            raise EmulatorError(f"the {what} run of the runner on {bundle} failed (exit {proc.returncode}): "
                                + " | ".join(lines))
        m = json.loads(out.read_text(encoding="utf-8"))
        m["wall_s"] = seconds
        return m


def compare_runs(x86: dict, arm: dict) -> dict:
    """Example-by-example comparison of two runs of one bundle (both with ``per_example``).

    Disagreements list index, both predictions and the largest difference of a label score
    (log-prob, or logit for a task-head export) between the runs; perplexity compares the
    per-token NLL of each example instead.
    """
    a, b = x86.get("per_example"), arm.get("per_example")
    if a is None or b is None or len(a) != len(b) or [e["index"] for e in a] != [e["index"] for e in b]:
        raise EmulatorError("the x86 and the emulated run did not score the same examples")
    kind = x86["kind"]
    diffs, disagreements = [], []
    for ea, eb in zip(a, b):
        if kind == "classification" and ea.get("scores") and eb.get("scores"):
            d = max(abs(ea["scores"][k] - eb["scores"][k]) for k in ea["scores"])
        elif kind == "perplexity" and ea.get("tokens"):
            d = abs(ea["nll"] - eb["nll"]) / ea["tokens"]
        else:
            d = None
        if d is not None:
            diffs.append(d)
        if kind != "perplexity" and ea["pred"] != eb["pred"]:
            disagreements.append({"index": ea["index"], "x86": ea["pred"], "arm64": eb["pred"],
                                  "max_logprob_diff": d})
    n = len(a)
    return {
        "n": n, "metric": x86["metric"], "x86": x86["value"], "arm64": arm["value"],
        "metric_diff": arm["value"] - x86["value"],
        "agreement": None if kind == "perplexity" else (n - len(disagreements)) / n if n else None,
        "disagreements": disagreements,
        "score": ("per-token NLL" if kind == "perplexity" else x86.get("scores_are", "label log-prob")),
        "max_logprob_diff": max(diffs) if diffs else None,
        "mean_logprob_diff": sum(diffs) / len(diffs) if diffs else None,
    }


def blank_host_measurements(m: dict) -> dict:
    """A copy of an emulated measurement without time or memory figures (they are QEMU's, not the device's)."""
    m = json.loads(json.dumps(m))
    empty = {"p50": None, "p90": None, "mean": None, "n": 0}
    emulated = {k: m["latency"].get(k) for k in ("first_token_ms", "token_ms", "example_ms")}
    m["latency"] = {**m["latency"], **{k: dict(empty) for k in emulated}}
    m["emulated"] = {"latency": emulated, "peak_rss_mb": m.get("peak_rss_mb"), "wall_s": m.get("wall_s"),
                     "note": "QEMU's timings and memory, not the device's: a correctness check, not a speed figure"}
    m["peak_rss_mb"] = None
    return m


def emulated_gates(gates: list[dict], profile, comparison: dict, cpu: str) -> tuple[list[dict], str]:
    """Host gates become "not measured"; an arm64-vs-x86 fidelity gate is added; the status is
    ``accuracy-only`` when every measured gate passed (``fail`` / ``not run`` as usual otherwise)."""
    why = "not measured (emulated): QEMU's time and memory are not the device's; run `python runner.py` on it"
    out = []
    for g in gates:
        if g["budget_key"] in HOST_GATES:
            g = dict(g, status=NOT_MEASURED, measured=None, detail=why)
        out.append(g)
    limit = profile.budget.max_metric_drop
    if limit is not None:
        diff = abs(comparison["metric_diff"])
        ok = diff <= limit + 1e-9
        flips = "" if comparison["agreement"] is None else \
            f"; {len(comparison['disagreements'])} of {comparison['n']} predictions differ"
        detail = (f"{comparison['metric']} {comparison['arm64']:.4f} on arm64 vs {comparison['x86']:.4f} on x86: "
                  f"difference {diff:.4f} " + (f"within {limit:g}" if ok else f"exceeds {limit:g}") + flips)
        out.append({"gate": "arm64 vs x86", "budget_key": "x86_fidelity", "measured": diff, "limit": limit,
                    "unit": comparison["metric"], "status": "pass" if ok else "fail", "detail": detail})
    statuses = {g["status"] for g in out}
    if "fail" in statuses:
        return out, "fail"
    if "not run" in statuses:
        return out, "not run"
    return out, "accuracy-only"


def measure_emulated(info: dict, bundle: Path, profile, task, frame_file, limit, timeout, cpu: str, log) -> tuple[dict, dict]:
    """The runner on ``bundle`` on x86 (natively) and on ARM64 (QEMU, CPU model ``cpu``), same examples.

    Returns the emulated measurement (time and memory blanked) and the ``emulation`` record
    for the report: emulator, CPU model and features, both runs' wall time, the comparison.
    """
    arch = info["arch"]
    log(f"running the runner on {bundle} on x86 (this host) for the comparison")
    x86 = run_runner([sys.executable], dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), bundle, profile, task,
                     frame_file, limit, timeout, "x86", log)
    log(f"running the runner on {bundle} on {arch} under QEMU (-cpu {cpu}); emulation is ~10-100x slower")
    arm = run_runner(emulated_prefix(info, cpu), emulated_env(info), bundle, profile, task, frame_file, limit,
                     None if timeout is None else timeout * TIMEOUT_FACTOR, arch, log)
    if arm.get("host", {}).get("machine") != arch:
        raise EmulatorError(f"the emulated runner reports machine {arm.get('host', {}).get('machine')}, not {arch}")
    comparison = compare_runs(x86, arm)
    host_cpu = x86.get("host", {}).get("processor")
    arm_features = _features(info, cpu)
    emulation = {
        "arch": arch, "cpu": cpu, "features": arm_features, "qemu": info.get("qemu_version"),
        "python": arm.get("host", {}).get("python"), "emulator_dir": info["dir"],
        "runtime": f"{arm['runtime']} {arm['runtime_version']}", "host_processor": host_cpu,
        # whole runs (interpreter start, imports, model load, warm-up, scoring) and one example end to end
        "x86_wall_s": x86["wall_s"], "arm64_wall_s": arm["wall_s"],
        "x86_s_per_example": _mean_example_s(x86), "arm64_s_per_example": _mean_example_s(arm),
        "x86_measurement": {k: x86[k] for k in ("metric", "value", "n_examples", "runtime", "runtime_version",
                                                 "host")},
        "comparison": comparison,
    }
    arm = blank_host_measurements(arm)
    arm["host"] = dict(arm.get("host", {}), processor=f"QEMU {cpu} (emulated {arch} on {host_cpu})")
    return arm, emulation


def _mean_example_s(m: dict) -> float | None:
    mean = ((m.get("latency") or {}).get("example_ms") or {}).get("mean")
    return None if mean is None else mean / 1e3


def _features(info: dict, cpu: str) -> list[str] | None:
    """The CPU features the emulated model reports (/proc/cpuinfo under QEMU)."""
    try:
        proc = subprocess.run(emulated_prefix(info, cpu) + ["-S", "-c", "print(open('/proc/cpuinfo').read())"],
                              capture_output=True, text=True, env=emulated_env(info), timeout=300)
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("Features"):
            return line.split(":", 1)[1].split()
    return None
