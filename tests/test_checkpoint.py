"""Checkpoint format: atomic writes, refusing foreign folders, clear errors on broken input."""
import json

import pytest

from sieve_edge.checkpoint import MANIFEST, build_manifest, load_checkpoint, read_manifest, save_checkpoint
from sieve_edge.errors import ArtifactError, ModelLoadError
from sieve_edge.plan import RankPlan
from sieve_edge.errors import InputError
from sieve_edge.factorize import linear_shapes
from tiny import make_factorized, make_model, make_tokenizer


def _save(model, out, **kw):
    return save_checkpoint(model, make_tokenizer(), out, build_manifest(model, base_model="tiny", method="svd",
                                                                         task=None), **kw)


def test_refuses_a_folder_holding_another_artifact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").write_text("{}")
    with pytest.raises(ArtifactError, match="already holds export"):
        _save(make_factorized("llama"), out)
    assert not any(p.name.startswith("out.partial") for p in tmp_path.iterdir())


def test_same_kind_needs_force(tmp_path):
    out = tmp_path / "ck"
    _save(make_factorized("llama"), out)
    with pytest.raises(ArtifactError, match="--force"):
        _save(make_factorized("llama", rank=16), out)
    _save(make_factorized("llama", rank=16), out, force=True)
    assert set(read_manifest(out)["ranks"].values()) == {16}


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = make_factorized("llama")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="not a sieve-edge checkpoint"):
        load_checkpoint(tmp_path)
    out = tmp_path / "ck"
    _save(make_factorized("llama"), out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_checkpoint(out)
    manifest["format_version"] = 1
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no model"):
        load_checkpoint(out)


def test_plan_round_trip_and_bad_plans(tmp_path):
    shapes = linear_shapes(make_model("llama"))
    plan = RankPlan.from_keep(shapes, 0.5, method="output")
    plan.to_json(tmp_path / "plan.json")
    again = RankPlan.from_json(tmp_path / "plan.json")
    assert again.ranks == plan.ranks and again.linear_param_reduction == pytest.approx(plan.linear_param_reduction)
    bad = plan.to_dict()
    bad["ranks"][next(iter(shapes))] = -3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="positive integer"):
        RankPlan.from_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="another model"):
        plan.check_model(linear_shapes(make_model("phi3")))
