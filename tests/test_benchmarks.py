"""The benchmark scripts keep running and keep printing what the README's Speed section reads.

Structure only, tiny shapes: no test here looks at a timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_engine_speed_prints_rows_and_summary(capsys):
    import engine_speed

    from csm_engine.quantize import resolve_precision

    result = engine_speed.main(["--flavor", "tiny", "--frames", "3", "--reply-frames", "2", "--context-tokens", "200",
                                "--dtype", "auto,float32", "--no-transformers",
                                "--threads", str(torch.get_num_threads())])  # leave the session's setting alone
    rows = result["rows"]
    assert [r["dtype"] for r in rows] == [resolve_precision("auto"), "float32"]
    for key in ("frames_per_s", "rtf", "first_chunk_ms", "peak_rss_mb", "bound_frames_per_s"):
        assert all(r[key] > 0 for r in rows), key
    # The long conversation's second turn prefilled far fewer rows than its prompt holds.
    assert rows[0]["first_chunk_long_prefill_rows"] < rows[0]["first_chunk_long_prompt_rows"] / 2
    assert set(result["summary"]) >= {"speedup_vs_transformers", "fraction_of_bandwidth_bound",
                                      "first_chunk_long_over_short"}
    assert '"summary"' in capsys.readouterr().out


def test_quant_error_reports_every_precision():
    import quant_error

    result = quant_error.main(["--flavors", "tiny", "--dtype", "bfloat16,int8"])
    errors = result["flavors"]["tiny"]
    assert set(errors) == {"bfloat16", "int8"}
    assert all(0 < e["decoder_rel_rms"] < 0.05 for e in errors.values())


def test_train_speed_prints_a_row_per_mode():
    import train_speed

    result = train_speed.main(["--steps", "1", "--warmup", "0", "--seq-len", "48", "--target-frames", "8",
                               "--threads", str(torch.get_num_threads())])
    rows = result["rows"]
    assert [r["mode"] for r in rows] == ["lora", "full"]
    assert all(r["steps_per_s"] > 0 and r["peak_rss_mb"] > 0 and r["target_frames_per_s"] > 0 for r in rows)
    assert 0 < rows[0]["trainable_params"] < rows[1]["trainable_params"] == rows[1]["params"]


@pytest.mark.slow
def test_turn_model_benchmark_prints_decision_times(capsys):
    import turn_model

    result = turn_model.main(["--repeats", "1", "--threads", "1,2", "--no-judgements"])
    times = [result[key] for key in ("features", "decision", "decision_cpu")]
    assert set(result["model"]) == {"default_1_thread", "default_2_threads", "reference_1_thread"}
    times += [runtime[kind] for runtime in result["model"].values() for kind in ("wall", "cpu")]
    assert all(t["n"] == len(result["input_s"]) and 0 < t["median_ms"] <= t["p95_ms"] for t in times)
    assert max(result["input_s"]) > 8  # one input longer than the model's 8 s window
    assert '"decision"' in capsys.readouterr().out


@pytest.mark.slow
def test_serve_load_prints_rows_per_client_count(capsys):
    import serve_load

    result = serve_load.main(["--flavor", "tiny", "--clients", "1,2", "--seconds", "3", "--ramp-s", "1",
                              "--frames", "3", "--client-procs", "1"])
    rows = result["rows"]
    assert [r["clients"] for r in rows] == [1, 2]
    for row in rows:
        assert row["requests"] >= row["clients"] and row["errors"] == 0
        assert row["first_chunk_ms"]["p95"] > 0 and row["rtf"]["p50"] > 0 and row["aggregate_frames_per_s"] > 0
    assert set(result["summary"]["aggregate_vs_batch1"]) == {1, 2} and result["summary"]["engine_failures"] == 0
    assert '"summary"' in capsys.readouterr().out


@pytest.mark.slow
def test_turn_model_routes_benchmark_compares_every_route_with_the_reference():
    import turn_model_routes

    result = turn_model_routes.main(["--streams", "1"])
    assert result["calls"] >= 1 and result["float32_floor"]["floor_ms"] > 0
    assert result["default"]["bit_identical"] and result["default"]["verdicts_flipped"] == 0
    for route in ("enable_all_int8", "enable_all_fp32_fusions", "input_noise_1e-7", "float_graph"):
        assert "skipped" in result[route] or 0 <= result[route]["median_abs_diff"] <= result[route]["max_abs_diff"]


def test_llama_repack_prints_on_and_off_for_both_quantizations(capsys):
    import llama_repack

    result = llama_repack.main(["--repeats", "1", "--prompt-tokens", "16", "--gen-tokens", "2"])
    rows = result["rows"]
    assert [(r["model"][:4], r["extra_bufts"]) for r in rows] == [("Q4_1", True), ("Q4_1", False),
                                                                  ("Q4_0", True), ("Q4_0", False)]
    assert all(r["prompt_tok_s"] > 0 and r["gen_tok_s"] > 0 for r in rows)
    assert all(r["repacked_mib"] == 0 for r in rows if not r["extra_bufts"])  # off: nothing repacked
    assert set(result["provenance"]) >= {"cpu", "date", "commit"}
    assert "prompt tok/s" in capsys.readouterr().out
