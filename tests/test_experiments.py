"""The experiment driver: every point a real (tiny) training run, resumable, summarised."""

import json

import pytest

from moe.experiments import main, points


def test_the_points_hold_the_active_width():
    found = points("small")  # d_ff 512, top-2: 1,024 hidden units a token everywhere
    assert found["dense"] == ["model.n_experts=1", "model.top_k=1", "model.d_ff=1024"]
    assert found["e64-top8"] == ["model.n_experts=64", "model.top_k=8", "model.d_ff=128"]
    assert found["e16-top1"] == ["model.n_experts=16", "model.top_k=1", "model.d_ff=1024"]
    assert [found[f"e{n}"][0] for n in (8, 16, 32, 64)] == [f"model.n_experts={n}" for n in (8, 16, 32, 64)]
    with pytest.raises(ValueError, match="needs a top-2 MoE base"):
        points("dense_small")


def test_the_experts_experiment_writes_a_table_and_a_plot_and_skips_what_is_done(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    args = ["experts", "--config", "tiny", "--steps", "2", "--eval-every", "1", "--out", str(tmp_path / "x"),
            "--only", "dense,e8,e64-top8", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            "data.sources={docs = 1}", "train.eval_batches=1"]
    main(args)
    result = json.loads((tmp_path / "x" / "results.json").read_text())
    assert [r["run"] for r in result["rows"]] == ["dense", "e8", "e64-top8"]
    assert all(r["tokens"] == result["rows"][0]["tokens"] > 0 for r in result["rows"])  # equal tokens
    assert result["rows"][0]["expert_cv"] == 0 and result["rows"][1]["expert_cv"] > 0
    assert (tmp_path / "x" / "validation.png").read_bytes()[:4] == b"\x89PNG"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "x").rglob("*.safetensors")}
    capsys.readouterr()
    main(args)  # again: every point is finished
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "x").rglob("*.safetensors")} == before


def test_a_point_stopped_after_its_first_evaluation_starts_over(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    point = tmp_path / "x" / "dense"
    point.mkdir(parents=True)  # killed after the step-0 evaluation: no training record, no checkpoint
    (point / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 0, "val_loss": 6.0, "val_bpb": 4.0}) + "\n")
    main(["experts", "--config", "tiny", "--steps", "2", "--eval-every", "1", "--out", str(tmp_path / "x"),
          "--only", "dense", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "data.sources={docs = 1}",
          "train.eval_batches=1"])
    records = [json.loads(line) for line in (point / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 1, 2] and records[-1]["type"] == "summary"
