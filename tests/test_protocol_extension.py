"""A protocol version that extends an earlier one: more repeats, the shared ones unchanged down to their
seeds, and their finished runs reused instead of retrained."""
import json

import pytest

import bench.protocols as protocols
from bench.cli import main
from bench.cost import StepTimes, cell_costs
from bench.datasets.phantom import protocol_v3
from bench.protocols import Protocol, ProtocolError, make_protocol
from bench.runner import RunSpec, run
from bench.sweep import grid


def test_phantom_v3_is_v2_with_five_more_repeats():
    v2, v3 = Protocol.load("phantom", "v2"), Protocol.load("phantom")
    assert v3.version == "v3" and v3.extends == "v2" and v3.data == json.loads(json.dumps(protocol_v3()))
    assert (v2.n_repeats, v3.n_repeats) == (5, 10)
    assert v3.data["repeats"][:5] == v2.data["repeats"] and v3.test == v2.test and v3.pool == v2.pool
    assert [v3.seed_version(r) for r in range(10)] == ["v2"] * 5 + ["v3"] * 5
    # a shared repeat keeps its v2 seed (so its v2 runs are the same experiment); a new one gets its own
    shared = [RunSpec("full", repeat=r).resolved_seed() for r in (0, 4)]
    assert shared == [RunSpec("full", repeat=r, protocol_version="v2").resolved_seed() for r in (0, 4)]
    assert RunSpec("full", repeat=5).resolved_seed()[1] == "derived: sha256('phantom/v3/repeat5')[:4]"
    # each version's cell has its own id; what a shared repeat keeps is the experiment (split, seed)
    assert RunSpec("full", repeat=4).run_id() != RunSpec("full", repeat=4, protocol_version="v2").run_id()


def _write(folder, data):
    (folder / data["dataset"]).mkdir(parents=True, exist_ok=True)
    (folder / data["dataset"] / f"{data['version']}.json").write_text(json.dumps(data))


def test_an_extension_that_changes_its_parent_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(protocols, "PROTOCOL_DIR", tmp_path)
    pool, test = [f"p{i}" for i in range(12)], ["t0", "t1"]
    _write(tmp_path, make_protocol("x", "v1", pool, test, repeats=2, seed=3))
    _write(tmp_path, make_protocol("x", "v2", pool, test, repeats=4, seed=3, extends="v1"))
    assert Protocol.load("x").n_repeats == 4 and Protocol.load("x").seed_version(1) == "v1"
    _write(tmp_path, make_protocol("x", "v3", pool, test, repeats=4, seed=4, extends="v2"))   # other seed
    with pytest.raises(ProtocolError, match=r"v3\.json: version v3 extends v2 .* first 4 repeats differ"):
        Protocol.load("x", "v3")
    _write(tmp_path, make_protocol("x", "v4", pool, ["t0"], repeats=4, seed=3, extends="v2"))
    with pytest.raises(ProtocolError, match="its test differs"):
        Protocol.load("x", "v4")


def test_a_shared_repeat_reuses_the_earlier_versions_run_and_a_new_one_trains(bench_home, tiny_foundation):
    common = dict(shots=1, iterations=2, eval_every=1, foundation=str(tiny_foundation), device="cpu")
    first = run(RunSpec("full", repeat=4, protocol_version="v2", **common), log=lambda *_: None)
    (bench_home / "runs" / "phantom" / "full" / "shots1" / "repeat4" / first["run_id"] / "extra_eval.json") \
        .write_text('{"schema_version": 1, "sets": {}}')
    lines = []
    spec = RunSpec("full", repeat=4, **common)
    again = run(spec, log=lines.append)
    assert any(f"reusing run {first['run_id']} (1-shot, protocol v2): protocol v3 extends v2" in li for li in lines)
    assert again["reused_from"] == {"run_id": first["run_id"], "shots": 1, "protocol_version": "v2"}
    assert again["run_id"] == spec.run_id() != first["run_id"]
    assert again["spec"]["protocol_version"] == again["provenance"]["protocol"]["version"] == "v3"
    assert again["cases"] == first["cases"] and again["provenance"]["seed"] == first["provenance"]["seed"]
    folder = bench_home / "runs" / "phantom" / "full" / "shots1" / "repeat4" / spec.run_id()
    assert (folder / "model" / "plans.json").is_file() and (folder / "extra_eval.json").is_file()
    lines.clear()
    new = run(RunSpec("full", repeat=5, **common), log=lines.append)
    assert "reused_from" not in new and not any("reusing run" in li for li in lines)
    assert new["provenance"]["seed"]["source"] == "derived: sha256('phantom/v3/repeat5')[:4]"
    # the dry run prices the reused cell at nothing, the new one at its steps
    costs = cell_costs([RunSpec("full", repeat=r, **common) for r in (4, 5)], 0, 3, "cpu", StepTimes())
    assert costs[0].seconds == 0 and costs[0].source == "reused: its run of protocol v2"
    assert costs[1].seconds > 0
    from bench.cost import describe
    lines = describe(costs, [RunSpec("full", repeat=r, **common) for r in (4, 5)], 0, "cpu")
    assert any("1 cell(s) reuse a finished run" in li for li in lines)
    assert not any("step times from reused" in li for li in lines)


def test_a_sweep_covers_every_repeat_of_the_protocol_and_refuses_more(bench_home, capsys):
    assert sorted({s.repeat for s in grid(["full"], ["phantom"], [1])}) == list(range(10))
    assert sorted({s.repeat for s in grid(["full"], ["phantom"], [1], protocol_version="v2")}) == list(range(5))
    assert main(["sweep", "--methods", "full", "--repeats", "11", "--dry-run"]) != 0
    assert "--repeats 11, but protocol phantom/v3" in capsys.readouterr().err


def test_show_says_what_an_extension_shares(capsys):
    assert main(["protocols", "show", "phantom"]) == 0
    out = capsys.readouterr().out
    assert "extends v2: repeats 0-4 are v2's, with its seeds" in out and "repeat 9:" in out
