"""The stage framework on toy stages (no model): keys, skipping, why, partial folders, the hash cache."""
from __future__ import annotations

import json
import os

import pytest

from sieve_edge import stages as S


class Copy(S.Stage):
    """Writes its input file's text (and its upstream's) into out.txt; counts its builds."""

    name = "copy"

    def __init__(self, slot, source, needs=(), factor=1, fail=False):
        super().__init__(slot=slot, config={"factor": factor}, inputs={"source": source}, needs=needs)
        self.source, self.fail, self.builds = source, fail, 0

    def build(self, ctx, out):
        self.builds += 1
        text = self.source.read_text() * self.config["factor"]
        for slot in self.needs:
            text += (ctx.output(slot) / "out.txt").read_text()
        if self.fail:
            raise RuntimeError("boom")
        (out / "out.txt").write_text(text)
        return {"detail": f"{len(text)} chars"}


def flow(tmp_path, stages, **kw):
    return S.Workflow(tmp_path / "work", stages, **kw)


def statuses(records):
    return {r.slot: (r.status, r.why) for r in records}


def test_skips_when_key_matches_and_output_verifies_and_says_why_otherwise(tmp_path):
    a_in, b_in = tmp_path / "a.txt", tmp_path / "b.txt"
    a_in.write_text("a")
    b_in.write_text("b")
    first = flow(tmp_path, [Copy("a", a_in), Copy("b", b_in, needs=("a",))]).run()
    assert [r.status for r in first] == ["ran", "ran"] and first[0].why == "output missing"
    assert (tmp_path / "work" / "b" / "out.txt").read_text() == "ba"
    record = json.loads((tmp_path / "work" / "a.stage.json").read_text())
    assert not (tmp_path / "work" / "a" / "stage.json").exists()    # outputs hold only what they are
    assert record["files"] == {"out.txt": 1} and record["key"] == first[0].key
    assert record["inputs"]["source"]["sha256"] and record["summary"]["detail"] == "1 chars"

    again = flow(tmp_path, [Copy("a", a_in), Copy("b", b_in, needs=("a",))]).run()
    assert [r.status for r in again] == ["skipped", "skipped"]

    # the content of an input, not its timestamp, makes the key
    os.utime(a_in, (1, 1))
    assert [r.status for r in flow(tmp_path, [Copy("a", a_in), Copy("b", b_in, needs=("a",))]).run()] == \
        ["skipped", "skipped"]
    a_in.write_text("A")
    changed = statuses(flow(tmp_path, [Copy("a", a_in), Copy("b", b_in, needs=("a",))]).run())
    assert changed["a"] == ("ran", f"key changed: input source {a_in} changed")
    assert changed["b"] == ("ran", "key changed: upstream a changed")

    # a config change names the key; an output that lost a file reruns, and so does what follows
    changed = statuses(flow(tmp_path, [Copy("a", a_in, factor=2), Copy("b", b_in, needs=("a",))]).run())
    assert changed["a"] == ("ran", "key changed: config factor 1 -> 2")
    (tmp_path / "work" / "a" / "out.txt").write_text("truncated!")
    changed = statuses(flow(tmp_path, [Copy("a", a_in, factor=2), Copy("b", b_in, needs=("a",))]).run())
    assert changed["a"] == ("ran", "output incomplete: out.txt missing or changed")
    assert changed["b"] == ("ran", "upstream a ran")
    forced = statuses(flow(tmp_path, [Copy("a", a_in, factor=2), Copy("b", b_in, needs=("a",))], force={"b"}).run())
    assert forced == {"a": ("skipped", "done (key matches, output verified)"), "b": ("ran", "forced")}


def test_why_runs_says_whether_a_stage_and_those_before_it_would_be_reused_without_running_anything(tmp_path):
    a_in, b_in = tmp_path / "a.txt", tmp_path / "b.txt"
    a_in.write_text("a")
    b_in.write_text("b")

    def two(factor=1):
        return [Copy("a", a_in, factor=factor), Copy("b", b_in, needs=("a",)), Copy("c", b_in, needs=("b",))]

    assert flow(tmp_path, two()).why_runs("b") == "a: output missing"
    stages = two()
    flow(tmp_path, stages[:2]).run()
    assert flow(tmp_path, two()).why_runs("b") is None
    assert flow(tmp_path, two()).why_runs("c") == "output missing"
    assert flow(tmp_path, two(factor=2)).why_runs("b") == "a: key changed: config factor 1 -> 2"
    assert [s.builds for s in stages] == [1, 1, 0] and not (tmp_path / "work" / "c").exists()
    with pytest.raises(ValueError, match="no stage in slot 'd'"):
        flow(tmp_path, two()).why_runs("d")


def test_a_failed_stage_leaves_no_output_and_the_log_says_failed(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("a")
    with pytest.raises(RuntimeError, match="boom"):
        flow(tmp_path, [Copy("a", src, fail=True)]).run()
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == [".cache", "run.json"]
    log = json.loads((work / "run.json").read_text())
    assert log["stages"][0]["status"] == "failed"


def test_leftover_partial_folders_of_dead_processes_are_removed(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("a")
    work = tmp_path / "work"
    dead = work / "a.partial-999999999"          # no such process
    dead.mkdir(parents=True)
    (dead / "out.txt").write_text("half")
    flow(tmp_path, [Copy("a", src)]).run()
    assert not dead.exists() and (work / "a" / "out.txt").read_text() == "a"


def test_stage_needing_a_stage_that_does_not_run_before_it_is_a_bug(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("a")
    with pytest.raises(ValueError, match="needs"):
        flow(tmp_path, [Copy("b", src, needs=("a",)), Copy("a", src)]).run()


class Holder(Copy):
    """Copy that holds a resource for the stage in slot ``until`` (released into ``freed``)."""

    def __init__(self, slot, source, until, freed, **kw):
        super().__init__(slot, source, **kw)
        self.until, self.freed = until, freed

    def build(self, ctx, out):
        summary = super().build(ctx, out)
        ctx.hold("res", f"from {self.slot}", lambda: self.freed.append(self.slot), until=self.until)
        return summary


class Taker(Copy):
    """Copy that claims the held resource (None when nothing is held) and records what it saw."""

    def __init__(self, slot, source, seen, **kw):
        super().__init__(slot, source, **kw)
        self.seen = seen

    def build(self, ctx, out):
        self.seen.append(ctx.claim("res"))
        return super().build(ctx, out)


def test_a_held_resource_goes_to_the_stage_that_claims_it_or_is_freed_after_that_stage(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("a")
    freed, seen = [], []
    # claimed: the taker owns it, nothing is released for it
    flow(tmp_path, [Holder("a", src, "b", freed), Taker("b", src, seen)]).run()
    assert seen == ["from a"] and freed == []
    # the stage it was held for is skipped (done): freed right after it, before the next stage runs
    out = tmp_path / "again"
    stages = [Holder("a", src, "b", freed), Copy("b", src), Taker("c", src, seen)]
    S.Workflow(out, stages[1:2]).run()                     # b done already
    S.Workflow(out, stages).run()
    assert freed == ["a"] and seen == ["from a", None]
    # a stage that fails after a hold: freed on the way out, the error is the stage's own
    freed.clear()
    with pytest.raises(RuntimeError, match="boom"):
        flow(tmp_path / "x", [Holder("a", src, "c", freed), Copy("b", src, fail=True), Taker("c", src, seen)]).run()
    assert freed == ["a"]
    # holding again under the same key frees the earlier value first
    ctx = S.StageContext(tmp_path, lambda m: None)
    ctx.hold("k", 1, lambda: freed.append("first"))
    ctx.hold("k", 2, lambda: freed.append("second"))
    assert freed == ["a", "first"] and ctx.claim("k") == 2 and ctx.claim("k") is None


def test_hash_cache_reads_a_file_once_per_change(tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    cache_file = tmp_path / "hashes.json"
    cache = S.HashCache(cache_file)
    first = cache.content(f)
    cache.save()
    opened = []
    real_open = open

    def counting_open(path, *a, **kw):
        opened.append(str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", counting_open)
    again = S.HashCache(cache_file)
    assert again.content(f) == first and str(f.resolve()) not in opened   # from the cache, unread
    f.write_bytes(b"y" * 1000)                                           # same size, new mtime
    assert again.content(f) != first and str(f.resolve()) in opened


def test_folder_hash_covers_names_and_contents_not_hidden_files(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "w.bin").write_bytes(b"1")
    cache = S.HashCache(None)
    h = cache.content(d)
    (d / ".stages").mkdir()
    (d / ".stages" / "noise").write_text("ignored")
    assert S.HashCache(None).content(d) == h
    (d / "w.bin").rename(d / "v.bin")
    assert S.HashCache(None).content(d) != h


def test_external_output_keeps_its_record_in_the_work_folder(tmp_path):
    class External(Copy):
        external = True

        def output(self, work):
            return tmp_path / "shipped"

        def record_path(self, work):
            return work / "shipped.stage.json"

        def build(self, ctx, out):
            out.mkdir(exist_ok=True)
            (out / "out.txt").write_text("x")
            return {}

    src = tmp_path / "a.txt"
    src.write_text("a")
    assert flow(tmp_path, [External("ship", src)]).run()[0].status == "ran"
    assert not (tmp_path / "shipped" / "stage.json").exists()
    assert (tmp_path / "work" / "shipped.stage.json").is_file()
    assert flow(tmp_path, [External("ship", src)]).run()[0].status == "skipped"
