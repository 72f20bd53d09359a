"""`sieve-edge prune` → checkpoint → `sieve-edge eval` / `load_model`, and its input errors."""
import json

import torch
from click.testing import CliRunner

import sieve_edge
from sieve_edge.cli import main
from sieve_edge.factorize import LowRankLinear
from test_search import write_task
from tiny import make_model, make_tokenizer


def test_prune_writes_a_checkpoint_that_loads_and_evaluates(tmp_path):
    model_dir = tmp_path / "model"
    make_model("qwen2").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    task = write_task(tmp_path / "task")
    out = tmp_path / "pruned"
    runner = CliRunner()
    res = runner.invoke(main, ["prune", "--model", str(model_dir), "--task", str(task), "--method", "sieve",
                               "--keep", "0.5", "--calibration", "16", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "sieve_edge.json").read_text())
    assert manifest["method"] == "sieve" and manifest["base_model"] == str(model_dir)
    assert 0.3 < manifest["linear_param_reduction"] < 0.7 and manifest["ranks"]
    loaded = sieve_edge.load_model(out)
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(manifest["ranks"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, sieve_edge.load_model(out)(ids).logits)
    res = runner.invoke(main, ["eval", "--model", str(out), "--task", str(task), "--json"])
    assert res.exit_code == 0, res.output
    assert {"task", "split", "metric", "value", "n"} <= set(json.loads(res.output))  # + which rows, how cut
    # a second prune into the same folder is refused without --force, and leaves it intact
    res = runner.invoke(main, ["prune", "--model", str(model_dir), "--task", str(task), "--keep", "0.5",
                               "--out", str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    assert (out / "sieve_edge.json").is_file()


def test_prune_input_errors(tmp_path):
    task = write_task(tmp_path / "task")
    runner = CliRunner()
    res = runner.invoke(main, ["prune", "--model", str(tmp_path / "nope"), "--task", str(task), "--keep", "0.5",
                               "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope" in res.output
    res = runner.invoke(main, ["prune", "--model", "x", "--task", str(task), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "exactly one of --keep" in res.output
    res = runner.invoke(main, ["prune", "--model", "x", "--task", str(task), "--keep", "1.5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "(0, 1]" in res.output
    assert not (tmp_path / "o").exists()


def test_prune_reuses_a_calibrate_stage_of_the_same_model_and_task(tmp_path):
    from sieve_edge.search import SearchConfig
    from sieve_edge.search.stage import CalibrateStage
    from sieve_edge.stages import Workflow, model_ref
    from sieve_edge.tasks import load_task

    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    task = write_task(tmp_path / "task")
    cfg = SearchConfig(n_calibration=16, multiple=2)
    Workflow(tmp_path / "work", [CalibrateStage(model_ref(str(model_dir)), load_task(task), cfg)]).run()
    calib = tmp_path / "work" / "calibrate"
    runner = CliRunner()
    common = ["prune", "--model", str(model_dir), "--task", str(task), "--method", "output", "--keep", "0.5",
              "--calibration", "16", "--json"]
    res = runner.invoke(main, common + ["--out", str(tmp_path / "fresh")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, common + ["--decompositions", str(calib), "--out", str(tmp_path / "reused")])
    assert res.exit_code == 0, res.output
    fresh, reused = sieve_edge.load_model(tmp_path / "fresh"), sieve_edge.load_model(tmp_path / "reused")
    assert json.loads((tmp_path / "fresh" / "sieve_edge.json").read_text())["ranks"] == \
        json.loads((tmp_path / "reused" / "sieve_edge.json").read_text())["ranks"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, reused(ids).logits, atol=1e-4)

    # another model, other settings, or the sequential method: refused, saying what to do
    other = tmp_path / "other"
    make_model("llama", seed=1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    for args, expected in ((["--model", str(other)], "calibrated on another model"),
                           (["--calibration", "32"], "pass --calibration 16"),
                           (["--method", "sieve"], "method 'sieve' refits sequentially")):
        cmd = common + ["--decompositions", str(calib), "--out", str(tmp_path / "x")]
        for flag, value in zip(args[::2], args[1::2]):
            cmd[cmd.index(flag) + 1] = value
        res = runner.invoke(main, cmd)
        assert res.exit_code == 1 and expected in res.output, (args, res.output)
    assert not (tmp_path / "x").exists()
