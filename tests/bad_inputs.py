"""Bad and hostile inputs a user can give sieve-edge, each a real file or folder, and what must happen.

Shared by ``tests/test_bad_input.py`` (in process, click's CliRunner) and
``benchmarks/robustness.py`` (every case as a subprocess). ``build_cases(root)`` writes every
fixture under ``root`` (tiny random models, built offline) and returns the cases. Each case
must end with exit code ``exit_code`` (1 for an error, 3 for a failed gate), exactly one
stderr line starting ``error:`` (the last one) that contains every string of ``names`` (the
file, key or row at fault), no traceback, and none of ``outputs`` left behind (nor an
``OUT.partial-*`` / ``OUT.final-*`` / ``OUT.old-*`` beside it).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROWS = [
    ("a charming and moving film", "positive"), ("a dull , boring and tedious mess", "negative"),
    ("the movie was great", "positive"), ("boring", "negative"), ("a great film , charming", "positive"),
    ("a tedious mess", "negative"), ("moving and great", "positive"), ("dull", "negative"),
]
TASK_TOML = """name = "tiny"
kind = "classification"
prompt = "Review: {text}\\nSentiment:"
chat_template = false

[labels]
negative = " negative"
positive = " positive"

[data]
train = "train.jsonl"
validation = "validation.jsonl"
test = "test.jsonl"
"""
PROFILE_TOML = """schema_version = 1
name = "tiny-onnx"
runtime = "onnxruntime"
weights = "fp32"
threads = 1

[budget]
max_metric_drop = 0.05
max_size_mb = 100.0
"""


@dataclass
class Case:
    id: str
    group: str                      # task | data | profile | model | plan | bundle | runner | output | leftover | gate
    argv: list[str]                 # after `sieve-edge` (tool "cli") or `python -m sieve_edge.runtime` ("runner")
    names: tuple[str, ...]          # the error line must contain each of these
    exit_code: int = 1
    outputs: tuple[str, ...] = ()   # paths that must not exist afterwards
    unchanged: tuple[str, ...] = () # folders whose file list must be the same afterwards
    tool: str = "cli"               # cli | runner (python -m sieve_edge.runtime) | bundle-runner (python B/runner.py)
    patch: str | None = None        # in-process only: "full_disk" (the free-space probe says 0 bytes)



def rerecord_export(folder: Path) -> None:
    """Make an edited export folder's export.json list its files as they now are."""
    manifest = json.loads((folder / "export.json").read_text())
    manifest["files"] = {f.name: f.stat().st_size for f in sorted(folder.iterdir())
                         if f.is_file() and f.name != "export.json"}
    (folder / "export.json").write_text(json.dumps(manifest))

def dead_pid() -> int:
    """The pid of a process that has exited (reused only after the kernel wraps around)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- fixtures


def write_task(folder: Path, toml: str = TASK_TOML, rows: dict[str, str] | None = None) -> Path:
    """A tiny classification task: train/validation/test JSON Lines of ROWS (or the given raw texts)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    for split in ("train", "validation", "test"):
        text = (rows or {}).get(split, good)
        (folder / f"{split}.jsonl").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    (folder / "tiny.toml").write_bytes(toml.encode("utf-8") if isinstance(toml, str) else toml)
    return folder / "tiny.toml"


def write_model(folder: Path, arch: str = "llama") -> Path:
    from tiny import make_model, make_tokenizer

    make_model(arch).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_checkpoint(folder: Path) -> Path:
    from sieve_edge.checkpoint import build_manifest, save_checkpoint
    from tiny import make_factorized, make_tokenizer

    model = make_factorized("llama", rank=8)
    save_checkpoint(model, make_tokenizer(), folder, build_manifest(model, base_model="tiny", method="svd", task=None))
    return folder


def write_gguf(path: Path, tensor_mb: float = 2.0) -> Path:
    """A structurally valid GGUF (a few keys, one float32 tensor of ``tensor_mb``): enough to cut."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((int(tensor_mb * 2**20) // 128, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_auto_map(folder: Path, file: str = "config.json", marker: Path | None = None) -> Path:
    """Name custom code in ``file``'s auto_map; the module writes ``marker`` when imported."""
    data = json.loads((folder / file).read_text())
    cls = "AutoConfig" if file == "config.json" else "AutoTokenizer"
    data["auto_map"] = {cls: "custom_code.CustomThing" if cls == "AutoConfig" else ["custom_code.CustomThing", None]}
    if cls == "AutoConfig":
        # a model type transformers does not know: only the folder's code can build its config
        # (for a known type transformers would quietly use its own class and never ask)
        data["model_type"] = "sieve_custom"
    (folder / file).write_text(json.dumps(data))
    marker = marker or folder / "CUSTOM_CODE_RAN"
    (folder / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the folder code ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomThing(LlamaConfig):\n    model_type = 'sieve_custom'\n")
    return marker


def rehash(bundle: Path) -> None:
    """Record the bundle's current files in bundle.json (as if the bundle had been built around them)."""
    from sieve_edge.runtime import BUNDLE_MUTABLE, file_sha256

    manifest = json.loads((bundle / "bundle.json").read_text())
    files = [f for f in sorted(bundle.rglob("*")) if f.is_file() and f.name != "bundle.json"
             and not f.relative_to(bundle).as_posix().startswith("reports/")]
    manifest["files"] = {f.relative_to(bundle).as_posix(): f.stat().st_size for f in files}
    manifest["sha256"] = {f.relative_to(bundle).as_posix(): file_sha256(f) for f in files
                          if f.relative_to(bundle).as_posix() not in BUNDLE_MUTABLE}
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=2))


def flip_bit(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- the cases


def build_cases(root: Path, bundles: dict[str, Path] | None = None, export: Path | None = None) -> list[Case]:
    """Write every fixture under ``root`` and return the cases.

    bundles: {"onnx": BUNDLE, "openvino": BUNDLE} of tiny dense exports to copy and damage
    (built with ``test_bundle.tiny_bundle`` when not given); export: a tiny ONNX export folder.
    """
    import test_bundle

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    bundles = bundles or {fmt: test_bundle.tiny_bundle(fmt) for fmt in ("onnx", "openvino")}
    export = export or test_bundle.tiny_export("onnx")
    model = write_model(root / "model")
    ckpt = write_checkpoint(root / "ckpt")
    task = write_task(root / "task")
    profile = root / "profile.toml"
    profile.write_text(PROFILE_TOML)
    cases: list[Case] = []

    def add(id, group, argv, names, **kw):
        cases.append(Case(id, group, [str(a) for a in argv], tuple(str(n) for n in names), **kw))

    def out(name):
        return root / "out" / name

    (root / "out").mkdir(exist_ok=True)

    def eval_(model_path, task_path, *extra):
        return ["eval", "--model", model_path, "--task", task_path, "--limit", "2", *extra]

    # --- task TOML (eval fails on the task before a model is loaded)
    t = root / "tasks"
    add("task-missing", "task", eval_(model, t / "nope.toml"), ["nope.toml"])
    add("task-malformed-toml", "task", eval_(model, write_task(t / "malformed", "name = \"tiny\nkind =")),
        ["malformed/tiny.toml", "TOML"])
    add("task-typo-key", "task", eval_(model, write_task(t / "typo", TASK_TOML.replace("prompt =", "promt ="))),
        ["typo/tiny.toml", "promt"])
    add("task-wrong-type", "task", eval_(model, write_task(t / "type", TASK_TOML.replace(
        'chat_template = false', 'chat_template = "no"'))), ["type/tiny.toml", "chat_template"])
    add("task-not-utf8", "task", eval_(model, write_task(t / "latin1", TASK_TOML.replace(
        '"tiny"', '"tiny caf\xe9"').encode("latin-1"))), ["latin1/tiny.toml", "UTF-8"])
    add("task-empty", "task", eval_(model, write_task(t / "empty", "")), ["empty/tiny.toml"])

    # --- JSON Lines data (eval reads the test split after loading the model)
    d = root / "data"
    good = "".join(json.dumps({"text": x, "label": y}) + "\n" for x, y in ROWS)
    add("data-truncated-last-line", "data", eval_(model, write_task(d / "cut", rows={"test": good[:-20]}),
                                                   "--limit", "20"), ["cut/test.jsonl:8"])
    add("data-row-not-object", "data", eval_(model, write_task(d / "list", rows={"test": good + '["a", "b"]\n'}),
                                              "--limit", "20"), ["list/test.jsonl:9", "object"])
    add("data-missing-field", "data", eval_(model, write_task(d / "nofield", rows={
        "test": '{"body": "a film", "label": "positive"}\n'})), ["nofield/test.jsonl:1", "text"])
    add("data-wrong-type", "data", eval_(model, write_task(d / "number", rows={
        "test": '{"text": ["a", "film"], "label": "positive"}\n'})), ["number/test.jsonl:1", "text"])
    add("data-empty-file", "data", eval_(model, write_task(d / "empty", rows={"test": ""})), ["empty/test.jsonl"])
    add("data-undeclared-label", "data", eval_(model, write_task(d / "label", rows={
        "test": '{"text": "a film", "label": "neutral"}\n'})), ["label/test.jsonl:1", "neutral"])
    add("data-not-utf8", "data", eval_(model, write_task(d / "latin1", rows={
        "test": b'{"text": "caf\xe9", "label": "positive"}\n'})), ["latin1/test.jsonl", "UTF-8"])

    # --- target profiles (bundle reads the profile before anything heavy)
    p = root / "profiles"
    p.mkdir()

    def profile_case(id, text, names):
        f = p / f"{id}.toml"
        f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        add(f"profile-{id}", "profile", ["bundle", "--export", export, "--task", task, "--target", f,
                                        "--out", out(f"bundle-{id}")], [f.name, *names], outputs=(out(f"bundle-{id}"),))

    add("profile-missing", "profile", ["bundle", "--export", export, "--task", task, "--target", p / "nope.toml",
                                       "--out", out("bundle-nope")], ["nope.toml"], outputs=(out("bundle-nope"),))
    profile_case("malformed", "schema_version = 1\nname = ", ["TOML"])
    profile_case("typo-key", PROFILE_TOML.replace("threads", "thread"), ["thread"])
    profile_case("wrong-type", PROFILE_TOML.replace("threads = 1", 'threads = "two"'), ["threads"])
    profile_case("not-utf8", PROFILE_TOML.replace('"tiny-onnx"', '"caf\xe9"').encode("latin-1"), ["UTF-8"])
    profile_case("empty", "", ["missing required key"])
    f = p / "run-not-utf8.toml"
    f.write_bytes(PROFILE_TOML.replace('"tiny-onnx"', '"caf\xe9"').encode("latin-1"))
    add("profile-not-utf8-run", "profile", ["run", "--model", model, "--task", task, "--target", f,
                                             "--out", out("run-latin1")], [f.name, "UTF-8"],
        outputs=(out("run-latin1"), out("run-latin1.work")))

    # --- models
    m = root / "models"
    add("model-missing", "model", eval_(m / "nope", task), ["nope"])
    (m / "notes").mkdir(parents=True)
    (m / "notes" / "README.txt").write_text("not a model")
    add("model-not-a-model", "model", eval_(m / "notes", task), ["notes", "config.json"])
    bert = m / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64}))
    shutil.copy2(model / "tokenizer.json", bert / "tokenizer.json")
    shutil.copy2(model / "tokenizer_config.json", bert / "tokenizer_config.json")
    add("model-unsupported-architecture", "model", eval_(bert, task), ["bert"])
    cut = shutil.copytree(model, m / "cut-safetensors")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    add("model-truncated-safetensors", "model", eval_(cut, task), ["model.safetensors", "truncated"])
    garbage = shutil.copytree(model, m / "garbage-header")
    data = bytearray((garbage / "model.safetensors").read_bytes())
    data[8:40] = b"\xff\xfe" * 16  # the header's first bytes: not UTF-8
    (garbage / "model.safetensors").write_bytes(bytes(data))
    add("model-garbage-safetensors-header", "model", eval_(garbage, task), ["model.safetensors", "header"])
    ckpt_cut = shutil.copytree(ckpt, m / "ckpt-cut")
    data = (ckpt_cut / "model.safetensors").read_bytes()
    (ckpt_cut / "model.safetensors").write_bytes(data[:len(data) - 100])
    add("checkpoint-truncated-safetensors", "model", eval_(ckpt_cut, task), ["ckpt-cut/model.safetensors"])
    (m / "empty.gguf").write_bytes(b"")
    add("gguf-empty", "model", eval_(m / "empty.gguf", task), ["empty.gguf"])
    whole = write_gguf(m / "whole.gguf").read_bytes()
    (m / "cut30.gguf").write_bytes(whole[:30])
    add("gguf-cut-30-bytes", "model", eval_(m / "cut30.gguf", task), ["cut30.gguf", "30 bytes"])
    (m / "cut1mb.gguf").write_bytes(whole[:2**20])
    add("gguf-cut-1-mb", "model", eval_(m / "cut1mb.gguf", task), ["cut1mb.gguf", "token_embd.weight"])
    (m / "whole.gguf").unlink()
    custom = shutil.copytree(model, m / "custom-folder")
    marker = add_auto_map(custom)
    add("auto-map-plain-folder", "model", eval_(custom, task), ["custom-folder/config.json", "auto_map",
                                                               "custom_code.CustomThing", "--trust-remote-code"],
        outputs=(marker,))
    custom_ckpt = shutil.copytree(ckpt, m / "custom-ckpt")
    marker = add_auto_map(custom_ckpt)
    add("auto-map-checkpoint", "model", eval_(custom_ckpt, task), ["custom-ckpt/config.json", "auto_map"],
        outputs=(marker,))
    custom_export = shutil.copytree(export, m / "custom-export")
    marker = add_auto_map(custom_export, "tokenizer_config.json")
    rerecord_export(custom_export)  # as exported with that tokenizer
    add("auto-map-export-tokenizer", "model", ["bundle", "--export", custom_export, "--task", task, "--target", profile,
                                               "--out", out("bundle-custom")],
        ["custom-export/tokenizer_config.json", "auto_map"], outputs=(marker, out("bundle-custom")))

    broken = shutil.copytree(export, m / "corrupt-export")
    (broken / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph" * 10)
    rerecord_export(broken)  # sizes as if exported so
    add("export-corrupt-model-onnx", "model", ["bundle", "--export", broken, "--task", task, "--target", profile,
                                               "--out", out("bundle-corrupt")],
        ["corrupt-export/model.onnx", "onnxruntime cannot load"], outputs=(out("bundle-corrupt"),))

    # --- plans (prune --plan)
    pl = root / "plans"
    pl.mkdir()
    from sieve_edge.factorize import linear_shapes
    from sieve_edge.plan import RankPlan
    from tiny import make_model

    shapes = linear_shapes(make_model("llama"))
    plan = RankPlan.from_keep(shapes, 0.5).to_dict()
    first = next(iter(shapes))

    def plan_case(id, content, names):
        f = pl / f"{id}.json"
        f.write_bytes(content if isinstance(content, bytes) else
                      (content if isinstance(content, str) else json.dumps(content)).encode("utf-8"))
        add(f"plan-{id}", "plan", ["prune", "--model", model, "--task", task, "--plan", f, "--calibration", "4",
                                  "--out", out(f"pruned-{id}")], [f.name, *names], outputs=(out(f"pruned-{id}"),))

    plan_case("list", [plan], ["object"])
    plan_case("shapes-as-strings", {**plan, "shapes": {n: f"{a}x{b}" for n, (a, b) in shapes.items()}},
              ["shapes", first])
    plan_case("rank-too-large", {**plan, "ranks": {**plan["ranks"], first: 10_000}}, [first, "10000"])
    plan_case("keep-above-one", {**plan, "keep": {**plan["keep"], first: 1.7}}, [first, "1.7", "(0, 1]"])
    plan_case("keep-zero", {**plan, "keep": {**plan["keep"], first: 0}}, [first, "(0, 1]"])
    other = {"model.layers.9.mlp.up_proj" if k == first else k: v for k, v in plan["shapes"].items()}
    plan_case("unknown-matrix", {**plan, "shapes": other, "ranks": {("model.layers.9.mlp.up_proj" if k == first else k): v
                                                                     for k, v in plan["ranks"].items()}, "keep": {}},
              ["model.layers.9.mlp.up_proj"])
    plan_case("malformed-json", json.dumps(plan)[:-10], ["JSON"])
    plan_case("not-utf8", b'{"format": "sieve-edge/plan", "x": "\xe9"}', ["UTF-8"])

    # --- bundles (validate, and the runner on its own)
    b = root / "bundles"
    b.mkdir()

    def bundle_copy(name, fmt="onnx"):
        return shutil.copytree(bundles[fmt], b / name)

    def validate_case(id, bundle, names, target=profile, exit_code=1):
        add(f"bundle-{id}", "bundle", ["validate", "--bundle", bundle, "--target", target], names,
            exit_code=exit_code, outputs=(bundle / "reports",))

    prof_ov = root / "profile-ov.toml"
    prof_ov.write_text(PROFILE_TOML.replace('"onnxruntime"', '"openvino"').replace('"tiny-onnx"', '"tiny-openvino"'))
    x = bundle_copy("deleted")
    (x / "prompt.json").unlink()
    validate_case("file-deleted", x, ["prompt.json", "missing"])
    x = bundle_copy("flipped-bit")
    flip_bit(x / "model" / "model.onnx")
    validate_case("model-bit-flipped", x, ["model/model.onnx", "modified"])
    x = bundle_copy("runner-edited")
    text = (x / "runner.py").read_text()
    (x / "runner.py").write_text(text.replace("EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 1, 3",
                                              "EXIT_OK, EXIT_ERROR, EXIT_GATE = 0, 0, 0"))  # same size
    validate_case("runner-edited-same-size", x, ["runner.py", "modified"])
    x = bundle_copy("extra-file")
    (x / "model" / "model.onnx_data").write_bytes(b"\0" * 64)
    validate_case("extra-model-file", x, ["model/model.onnx_data", "not part of the bundle"])
    (b / "not-a-bundle").mkdir()
    (b / "not-a-bundle" / "model.onnx").write_bytes(b"\0")
    validate_case("not-a-bundle", b / "not-a-bundle", ["not-a-bundle", "bundle.json"])
    x = bundle_copy("corrupt-manifest")
    (x / "bundle.json").write_text('{"format": "sieve-edge/bundle", "files": {')
    validate_case("corrupt-bundle-json", x, ["bundle.json", "JSON"])
    x = bundle_copy("corrupt-onnx")
    (x / "model" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf graph" * 10)
    rehash(x)  # as if the bundle had been built from a corrupt export
    validate_case("corrupt-model-onnx", x, ["model/model.onnx", "onnxruntime cannot load"])
    x = bundle_copy("corrupt-ir", "openvino")
    (x / "model" / "openvino_model.xml").write_text("<net name='broken'><layers><layer id='0'")
    rehash(x)
    validate_case("corrupt-openvino-ir", x, ["model/openvino_model.xml", "openvino cannot load"], target=prof_ov)
    x = bundle_copy("data-latin1")
    (x / "task" / "test.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "positive"}\n')
    rehash(x)
    validate_case("test-data-not-utf8", x, ["task/test.jsonl:1", "UTF-8"])
    add("runner-test-data-not-utf8", "runner", [x], ["task/test.jsonl:1", "UTF-8"], tool="runner")
    x = bundle_copy("custom-tokenizer")
    marker = add_auto_map(x / "model", "tokenizer_config.json", marker=root / "BUNDLE_CUSTOM_CODE_RAN")
    rehash(x)  # as if the bundle had been built from such an export
    add("bundle-auto-map-validate-task", "bundle", ["validate", "--bundle", x, "--target", profile, "--task", task,
                                                    "--out", root / "out" / "reports-custom"],
        ["model/tokenizer_config.json", "auto_map"], outputs=(marker, root / "out" / "reports-custom"))
    x = bundle_copy("runner-flipped")
    flip_bit(x / "model" / "model.onnx")
    add("runner-model-bit-flipped", "runner", [x], ["model/model.onnx", "modified"], tool="runner")
    x = bundle_copy("runner-shadow")
    (x / "numpy.py").write_text("raise SystemExit('the bundle folder was imported from')\n")
    add("runner-module-dropped-in", "runner", [x], ["numpy.py", "not part of the bundle"], tool="runner")
    # `python BUNDLE/runner.py`: Python would import the bundle's numpy.py before any check ran
    add("bundle-runner-module-dropped-in", "runner", [x], ["numpy.py", "not part of the bundle"],
        tool="bundle-runner")

    # --- outputs
    (root / "a-file").write_text("a regular file")
    add("out-existing-file", "output", ["prune", "--model", model, "--task", task, "--keep", "0.5",
                                        "--out", root / "a-file"], ["a-file", "not a folder"])
    add("out-under-a-file", "output", ["tune", "--model", model, "--task", task, "--steps", "1",
                                       "--out", root / "a-file" / "tuned"], ["a-file", "is a file"])
    busy = root / "out" / "busy"
    busy.mkdir()
    (busy / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    add("out-folder-of-other-things", "output", ["export", "--model", ckpt, "--format", "onnx", "--no-check",
                                                 "--out", busy], ["busy", "other files"], unchanged=(busy,))
    add("out-validate-reports-under-a-file", "output", ["validate", "--bundle", bundles["onnx"], "--target", profile,
                                                        "--out", root / "a-file" / "reports"], ["a-file"])
    ro = read_only_folder()
    if ro is not None:
        add("out-read-only-filesystem", "output", ["tune", "--model", model, "--task", task, "--steps", "1",
                                                   "--out", ro / "tuned"], [str(ro)])
    add("out-disk-full", "output", ["tune", "--model", model, "--task", task, "--steps", "1",
                                    "--out", out("tuned-full")], ["tuned-full", "MB free"],
        outputs=(out("tuned-full"),), patch="full_disk")

    # --- leftovers of a killed write, given as inputs
    pid = dead_pid()
    left = shutil.copytree(model, m / f"tuned.partial-{pid}")
    add("leftover-partial-as-model", "leftover", eval_(left, task), [left.name, "unfinished write"])
    left = shutil.copytree(ckpt, m / f"search.final-{pid}")
    add("leftover-final-as-export-source", "leftover", ["export", "--model", left, "--format", "onnx", "--no-check",
                                                        "--out", out("export-left")], [left.name],
        outputs=(out("export-left"),))
    left = shutil.copytree(export, m / f"export.partial-{pid}")
    add("leftover-partial-as-bundle-source", "leftover", ["bundle", "--export", left, "--task", task,
                                                          "--target", profile, "--out", out("bundle-left")],
        [left.name], outputs=(out("bundle-left"),))

    # --- a gate that cannot pass exits 3 with one error line
    tight = root / "tight.toml"
    tight.write_text(PROFILE_TOML.replace("max_size_mb = 100.0", "max_size_mb = 0.001").replace(
        '"tiny-onnx"', '"tight"'))
    x = bundle_copy("gate")
    add("gate-impossible-size-budget", "gate", ["validate", "--bundle", x, "--target", tight, "--out",
                                                 root / "out" / "gate-reports"], ["size on disk FAIL"], exit_code=3)
    return cases


def read_only_folder() -> Path | None:
    """A folder that even root cannot write into (sysfs refuses mkdir), or None when there is none.

    Tests run as root here, and root passes every permission check of an ordinary folder
    (chmod 0555 stops nobody), so an unwritable --out is simulated with /sys/fs.
    """
    import os
    import tempfile

    p = Path("/sys/fs")
    if not p.is_dir():
        return None
    try:
        made = tempfile.mkdtemp(dir=p)
    except OSError:
        return p
    os.rmdir(made)  # writable after all: no such case on this machine
    return None


# ---------------------------------------------------------------- checking an outcome


def leftovers_of(path: Path) -> list[Path]:
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir()
            if p.name.startswith(path.name + ".") and p.name.rsplit("-", 1)[-1].isdigit()
            and p.name[len(path.name) + 1:].split("-")[0] in ("partial", "final", "old")]


def problems(case: Case, exit_code: int, stderr: str, before: dict[str, list[str]] | None = None) -> list[str]:
    """What is wrong with an outcome (empty when the case behaved)."""
    found = []
    if exit_code != case.exit_code:
        found.append(f"exit code {exit_code}, expected {case.exit_code}")
    if "Traceback" in stderr:
        found.append("a traceback on stderr")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if len(errors) != 1:
        found.append(f"{len(errors)} lines start with 'error:' (expected one)")
    elif lines[-1] != errors[0]:
        found.append(f"the error line is not the last stderr line (last: {lines[-1][:120]!r})")
    line = errors[0] if errors else ""
    missing = [n for n in case.names if n not in line]
    if missing:
        found.append(f"the error line does not name {missing}: {line[:300]!r}")
    for p in case.outputs:
        if Path(p).exists():
            found.append(f"left {p}")
        found += [f"left {q}" for q in leftovers_of(Path(p))]
    for p in case.unchanged:
        now = sorted(q.name for q in Path(p).iterdir())
        if before is not None and now != before.get(str(p)):
            found.append(f"{p} changed: {before.get(str(p))} -> {now}")
    return found


def snapshot(case: Case) -> dict[str, list[str]]:
    return {str(p): sorted(q.name for q in Path(p).iterdir()) for p in case.unchanged}
