"""--offload: candidate scoring with the matrices and their search bases on disk (accelerate's
offload hooks) computes what the in-memory scoring computes, one matrix in memory at a time;
a whole search gives the same plan; the scratch folder never costs the user a file."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

from sieve_edge import factorize
from sieve_edge.calibrate import DecompositionFiles, decompose_all, save_decompositions
from sieve_edge.cli import main
from sieve_edge.errors import InputError
from sieve_edge.evaluate import make_scorer
from sieve_edge.factorize import SearchLinear, attach_search_, detach_search_, set_ranks_, simulate_int8_
from sieve_edge.lowrank import Decomposition
from sieve_edge.offload import MARKER, OffloadedSearch, check_offload_dir, skeleton_with_resident_weights
from sieve_edge.search import search_plan
from sieve_edge.sensitivity import task_costs
from sieve_edge.tasks import calibration_batches, load_task
from test_search import load_tuned, small_config, tuned, write_task  # noqa: F401 (fixture)
from tiny import make_model, make_tokenizer


def _setup(tmp_path):
    task = load_task(write_task(tmp_path / "task"))
    model, tok = make_model("llama"), make_tokenizer()
    batches = list(calibration_batches(task, tok, 16, 8))
    decs, _ = decompose_all(model, batches, "output", max_rank=lambda name, m, n: 12)
    # float32 bases, as the calibrate stage stores them
    decs = {k: Decomposition(d.left.float(), d.right.float(), d.energy, d.total, d.method) for k, d in decs.items()}
    scorer = make_scorer(tok, task, "validation", batch_size=64, model=model)
    return task, model, tok, decs, scorer


PLANS = [{}, "all8", "mixed"]


def _ranks(plan, names):
    if plan == "all8":
        return {n: 8 for n in names}
    if plan == "mixed":
        return {n: (4, None, 12)[i % 3] for i, n in enumerate(names)}
    return {}


def _watch_resident(model, seen: list) -> None:
    """Record, each time an offload hook has read a module's tensors, how many SearchLinear
    modules hold real tensors."""
    mods = [m for m in model.modules() if isinstance(m, SearchLinear)]

    def real(m):
        return any(t.device.type != "meta" for t in [*m.parameters(), *m.buffers()])

    for m in mods:
        def pre(module, *args, _original=m._hf_hook.pre_forward, **kwargs):
            out = _original(module, *args, **kwargs)
            seen.append(sum(real(x) for x in mods))
            return out

        m._hf_hook.pre_forward = pre


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_offloaded_scoring_equals_in_memory(weights, tmp_path):
    task, model, tok, decs, scorer = _setup(tmp_path)
    other = copy.deepcopy(model)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    attach_search_(model, decs)
    off = OffloadedSearch(tmp_path / "off")
    off.attach(other, decs)
    files = {p.name for p in (tmp_path / "off").iterdir()}
    assert MARKER in files and "model.layers.0.self_attn.q_proj.A.dat" in files
    assert "model.layers.1.mlp.down_proj.dense.weight.dat" in files and "model.layers.0.mlp.up_proj.Bt.dat" in files
    searched = [m for m in other.modules() if isinstance(m, SearchLinear)]
    assert len(searched) == len(decs)
    assert all(t.device.type == "meta" for m in searched for t in [*m.parameters(), *m.buffers()])
    assert other.get_input_embeddings().weight.device.type == "cpu"   # the embedding (tied head) stays

    undo = [simulate_int8_(model), simulate_int8_(other)] if weights == "int8" else []
    seen: list[int] = []
    _watch_resident(other, seen)
    for plan in PLANS:
        ranks = _ranks(plan, list(decs))
        set_ranks_(model, ranks)
        set_ranks_(other, ranks)
        want, got = scorer.label_logprobs(model), scorer.label_logprobs(other)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert scorer.metric(other) == scorer.metric(model)
    assert seen and max(seen) == 1   # one matrix (and its bases) in memory at a time
    assert all(not m._qcache for m in searched)   # no int8 codes kept between calls
    for u in undo:
        u()
    off.detach(other)
    assert not (tmp_path / "off").exists()    # made here, so removed
    assert not any(isinstance(m, SearchLinear) for m in other.modules())
    after = other.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())   # the dense model restored exactly
    detach_search_(model)


def test_offloaded_skeleton_and_sensitivity_match(tmp_path, monkeypatch):
    """A model read from its safetensors folder without its matrices scores and measures the
    label-Fisher sensitivity as the in-memory model does, with the decompositions read lazily."""
    task, model, tok, decs, scorer = _setup(tmp_path)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    (tmp_path / "decs").mkdir()
    save_decompositions(tmp_path / "decs", [(0, decs, 16)])
    files = DecompositionFiles(tmp_path / "decs")
    assert set(files) == set(decs) and files.method == "output"
    assert torch.equal(files["model.layers.1.mlp.gate_proj"].right, decs["model.layers.1.mlp.gate_proj"].right)

    lazy = skeleton_with_resident_weights(tmp_path / "model")
    skeleton = lazy.model
    assert skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight   # tied again
    off = OffloadedSearch(tmp_path / "off", weights=lazy)
    off.attach(skeleton, files)
    attach_search_(model, decs)
    ranks = {n: [None, 4, 8] for n in decs}
    want = task_costs(model, scorer, ranks, 8)
    read_back = []
    backward = factorize._ReadBackLinear.backward
    monkeypatch.setattr(factorize._ReadBackLinear, "backward",
                        staticmethod(lambda ctx, grad: read_back.append(1) or backward(ctx, grad)))
    got = task_costs(skeleton, scorer, ranks, 8)
    assert read_back   # the backward read the offloaded weights back instead of autograd keeping them
    for name in decs:
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), rtol=1e-6, atol=1e-12)
    set_ranks_(model, _ranks("mixed", list(decs)))
    set_ranks_(skeleton, _ranks("mixed", list(decs)))
    torch.testing.assert_close(scorer.label_logprobs(skeleton), scorer.label_logprobs(model), rtol=1e-6, atol=1e-6)
    off.detach(skeleton)
    assert not (tmp_path / "off").exists()


def test_search_plan_with_offload_gives_the_same_plan(tuned, tmp_path):  # noqa: F811
    root, task_path = tuned
    task = load_task(task_path)
    config = small_config(generations=1, population=4, weights="int8")
    model, tok = load_tuned(root)
    decs = decompose_all(model, list(calibration_batches(task, tok, config.n_calibration, config.calibration_batch)),
                         "output", max_rank=lambda name, m, n: min(m, n))
    results = []
    for offload in (None, tmp_path / "off"):
        model, tok = load_tuned(root)
        res = search_plan(model, tok, task, config, offload=offload, decompositions=decs)
        results.append(res)
        assert all(type(m).__name__ != "SearchLinear" for m in model.modules())
    a, b = results
    assert a.plan.ranks == b.plan.ranks and a.metric == b.metric and a.evaluations == b.evaluations
    assert a.frontier == b.frontier
    # the plan's factors are gathered in memory only when not offloaded (they are the plan's size)
    assert set(a.factors) == {n for n, r in a.plan.ranks.items() if r is not None} and b.factors == {}
    assert not (tmp_path / "off").exists()


def test_cli_search_with_offload_gives_the_same_plan(tuned, tmp_path, monkeypatch):  # noqa: F811
    import accelerate.utils

    root, task_path = tuned
    plans = []
    written = []  # every tensor offload_weight writes: the sensitivity and search stages share one offload
    original = accelerate.utils.offload_weight
    monkeypatch.setattr(accelerate.utils, "offload_weight",
                        lambda weight, name, *a, **kw: (written.append(name), original(weight, name, *a, **kw))[1])
    for name, extra in (("mem", []), ("off", ["--offload", str(tmp_path / "scratch")])):
        out = tmp_path / name
        res = CliRunner().invoke(main, ["search", "--model", str(root / "model"), "--task", str(task_path),
                                        "--tolerance", "0.05", "--method", "output", "--calibration", "32",
                                        "--population", "6", "--generations", "1", "--race", "12",
                                        "--ladder", "1.0,0.7,0.4", "--out", str(out), *extra])
        assert res.exit_code == 0, (res.output[-3000:], repr(res.exception))
        plans.append(json.loads((out / "plan.json").read_text()))
        if extra:
            assert "[sensitivity] running" in res.output and "offloaded in" in res.output
            assert written and len(written) == len(set(written))  # each tensor written once, not once per stage
    assert plans[0]["ranks"] == plans[1]["ranks"]
    assert plans[0]["meta"]["validation_metric"] == plans[1]["meta"]["validation_metric"]
    assert not (tmp_path / "scratch").exists()


def test_offload_folder_is_scratch_but_never_the_users(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and sieve-edge did not make it"):
        check_offload_dir(mine)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a folder"):
        check_offload_dir(tmp_path / "file")
    # an empty folder of the user's is used and left (empty) in place
    empty = tmp_path / "empty"
    empty.mkdir()
    model, decs = make_model("llama"), None
    decs = {n: Decomposition(torch.randn(m.weight.shape[0], 4), torch.randn(4, m.weight.shape[1]), torch.ones(4),
                             4.0, "svd")
            for n, m in model.named_modules() if n.endswith(("_proj",))}
    off = OffloadedSearch(empty)
    off.attach(model, decs)
    off.detach(model)
    assert empty.is_dir() and not any(empty.iterdir())
    # a killed run's leftovers (the mark, .dat files) are ours: reused; a user file beside them survives
    left = tmp_path / "left"
    left.mkdir()
    (left / MARKER).write_text(json.dumps({"created": True}))
    (left / "old.dat").write_text("x")
    check_offload_dir(left)
    off = OffloadedSearch(left)
    off.attach(model, decs)
    assert not (left / "old.dat").exists()
    (left / "user.txt").write_text("mine")
    off.detach(model)
    assert (left / "user.txt").read_text() == "mine" and not (left / MARKER).exists()


def test_cli_refuses_offload_with_workers(tmp_path):
    for extra in (["--workers", "2"], ["--ray", "auto"]):
        for command in (["search", "--tolerance", "0.01"], ["run", "--target", "factory-pc"]):
            res = CliRunner().invoke(main, [*command, "--model", "m", "--task", "sst2", "--out", str(tmp_path / "o"),
                                            "--offload", str(tmp_path / "scratch"), *extra])
            assert res.exit_code == 1, res.output
            assert "--offload and --workers/--ray do not go together" in res.output
            assert "each Ray actor loads the whole model" in res.output
    with pytest.raises(InputError, match="do not go together"):
        search_plan(None, None, load_task(write_task(tmp_path / "task")), small_config(), offload=tmp_path / "x",
                    workers=object())


def test_offload_is_not_part_of_any_stage_key(tmp_path):
    from sieve_edge.search.stage import search_stages
    from sieve_edge.stages import model_ref

    task = load_task(write_task(tmp_path / "task"))
    ref = model_ref("tiny", make_model("llama"), make_tokenizer())
    plain = search_stages(ref, task, small_config(), budget_minutes=None, test_limit=None)
    offloaded = search_stages(ref, task, small_config(), budget_minutes=None, test_limit=None,
                              offload=tmp_path / "scratch")
    assert [(s.slot, s.config, s.inputs, s.needs) for s in plain] == \
           [(s.slot, s.config, s.inputs, s.needs) for s in offloaded]
    assert [s.slot for s in offloaded if getattr(s, "offload", None)] == ["sensitivity", "search"]
