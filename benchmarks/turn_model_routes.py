"""Faster ways to run Smart Turn on this CPU, and whether they still decide the same.

    python benchmarks/turn_model_routes.py [--streams N]

Every question the end-of-turn judge asks on the test suite's espeak streams (20 questions, 8
paused sentences, 4 bare clauses; real Silero VAD) is answered by the reference graph (the
int8 QDQ model at ORT_ENABLE_BASIC, weights dequantized on every run) and by each route:

- ``default``: the agent's runtime (``TurnRuntime()``: weights dequantized once at load);
- ``enable_all_int8``: ONNX Runtime's fused u8 x s8 kernels (ORT_ENABLE_ALL);
- ``enable_all_fp32_fusions``: ORT_ENABLE_ALL with QDQ fusion off (float fusions, fake quant kept);
- ``float_graph``: weights dequantized into float32 initializers and every activation
  Quantize/Dequantize pair removed, at ORT_ENABLE_ALL (needs ``pip install onnx``);
- ``input_noise_1e-7``: the reference graph on features plus Gaussian noise of sd 1e-7 (about
  one float32 step of a feature): how far last-bit differences alone move this model.

For each: CPU ms per call (median; one thread), max and median |P - P_reference| and how
many done/not-done verdicts (threshold 0.5) differ. Also the float32 floor: the model's
multiply-adds per call against this core's measured float32 matrix-multiply rate. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from provenance import provenance  # noqa: E402

from agent.embedded import smart_turn_onnx  # noqa: E402
from agent.listen.end_of_turn import EndOfTurnJudge, TurnSettings  # noqa: E402
from agent.listen.turn_model import N_FRAMES, N_MELS, TurnRuntime, load_turn_model, session_options  # noqa: E402
from agent.listen.vad import load_silero_model  # noqa: E402

# Multiply-adds of one call (Whisper-tiny encoder on 800 frames: d 384, 4 layers, 6 heads, MLP 1536).
D, T, LAYERS, MLP = 384, 400, 4, 1536
MACS = 800 * D * N_MELS * 3 + T * D * D * 3 + LAYERS * (4 * T * D * D + 2 * T * T * D + 2 * T * D * MLP)


def float32_floor() -> dict:
    """About the least CPU time one core spends on MACS float32 multiply-adds: at the rate of a tuned
    BLAS (numpy's matmul on the MLP's shape, one thread, best of 5)."""
    from threadpoolctl import threadpool_limits  # comes with scikit-learn (librosa's dependency)

    a, b = np.ones((T, D), np.float32), np.ones((D, MLP), np.float32)
    rates = []
    with threadpool_limits(1):
        for _ in range(5):
            c = time.process_time()
            for _ in range(10):
                a @ b
            rates.append(10 * 2 * T * D * MLP / (time.process_time() - c))
    best = max(rates)
    return {"gflop_per_call": round(2 * MACS / 1e9, 2), "sgemm_gflop_per_s_one_core": round(best / 1e9, 1),
            "floor_ms": round(2 * MACS / best * 1000)}


def judge_features(directory: Path, limit: int | None = None) -> list[np.ndarray]:
    """The features of every model call the judge makes on the test suite's streams (the first ``limit``)."""
    import test_end_of_turn as suite
    from test_turn_model import UNFINISHED_CLAUSES, RecordingModel

    def espeak_wav(text: str) -> Path:
        path = directory / f"{abs(hash(text))}.wav"
        if not path.exists():
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True)
        return path

    recorder, silero = RecordingModel(load_turn_model()), load_silero_model()
    judge = EndOfTurnJudge(TurnSettings(), recorder)
    streams = [suite.question_stream(espeak_wav, text)[0] for text in suite.QUESTIONS]
    streams += [suite.paused_stream(espeak_wav, i)[0] for i in range(len(suite.PAUSED_SENTENCES))]
    streams += [np.concatenate([suite.silence(suite.LEAD_S), suite.speech_only(suite.load_audio(espeak_wav(t))),
                                suite.silence(0.5)]) for t in UNFINISHED_CLAUSES]
    for audio in streams[:limit]:
        suite.run_stream(audio, silero, judge)
    return recorder.features


def float_graph() -> bytes:
    """The QDQ model as a float32 graph: constant weights dequantized, activation Q/DQ pairs removed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(smart_turn_onnx()))
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}
    folded, renamed, dropped = [], {}, set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if node.input[0] in constants:  # a weight: (q - zero point) * scale, per channel along ``axis``
            q, scale, zero = (constants[name] for name in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.size > 1:
                shape = [1] * q.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            value = (q.astype(np.int32) - zero.astype(np.int32)).astype(np.float32) * scale.astype(np.float32)
            folded.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
            dropped.add(id(node))
        elif made_by.get(node.input[0]) is not None and made_by[node.input[0]].op_type == "QuantizeLinear":
            quantize = made_by[node.input[0]]
            renamed[node.output[0]] = quantize.input[0]
            dropped.update((id(node), id(quantize)))
    kept = [node for node in graph.node if id(node) not in dropped]
    for node in kept:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    used = {name for node in kept for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used] + [t for t in folded if t.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(kept)
    graph.initializer.extend(initializers)
    return model.SerializeToString()


def session(model: bytes | str, level: str, config: dict[str, str] | None = None):
    import onnxruntime

    options = session_options(TurnRuntime(fold_weights=False))
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def answers(routes: dict, features: list[np.ndarray]) -> dict[str, tuple[np.ndarray, list[float]]]:
    """Each route's P(done) for each feature array and the CPU seconds of each call; the routes take
    turns on each input, so a change in the shared machine's load hits them alike."""
    out = {name: ([], []) for name in routes}
    for x in features:
        for name, run in routes.items():
            c = time.process_time()
            out[name][0].append(run(x))
            out[name][1].append(time.process_time() - c)
    return {name: (np.asarray(p), cpu) for name, (p, cpu) in out.items()}


def compare(p: np.ndarray, reference: np.ndarray, cpu: list[float]) -> dict:
    d = np.abs(p - reference)
    return {"cpu_median_ms": round(float(np.median(cpu)) * 1000, 1), "max_abs_diff": round(float(d.max()), 4),
            "median_abs_diff": round(float(np.median(d)), 4), "bit_identical": bool((d == 0).all()),
            "verdicts_flipped": int(((p >= 0.5) != (reference >= 0.5)).sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=None, help="only the first N of the 32 streams (default all)")
    args = parser.parse_args(argv)
    if args.streams is not None and args.streams < 1:
        parser.error("--streams must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        features = judge_features(Path(tmp), args.streams)
    path = str(smart_turn_onnx())
    feed = lambda s: lambda x: float(s.run(None, {"input_features": x.reshape(1, N_MELS, N_FRAMES)})[0].reshape(-1)[0])  # noqa: E731
    reference_session = session(path, "ORT_ENABLE_BASIC")
    noise = np.random.default_rng(0)
    routes = {
        "reference": feed(reference_session),
        "default": load_turn_model().probability_of_features,
        "enable_all_int8": feed(session(path, "ORT_ENABLE_ALL")),
        "enable_all_fp32_fusions": feed(session(path, "ORT_ENABLE_ALL", {"session.disable_quant_qdq": "1"})),
        "input_noise_1e-7": lambda x: feed(reference_session)(x + noise.normal(0, 1e-7, x.shape).astype(np.float32)),
    }
    try:
        routes["float_graph"] = feed(session(float_graph(), "ORT_ENABLE_ALL"))
    except ImportError:
        pass
    load_before = os.getloadavg()[0]
    results = answers(routes, features)
    reference, reference_cpu = results.pop("reference")
    result = {"float32_floor": float32_floor(), "calls": len(features),
              "done_verdicts_reference": int((reference >= 0.5).sum()),
              "reference": {"cpu_median_ms": round(float(np.median(reference_cpu)) * 1000, 1)},
              **{name: compare(p, reference, cpu) for name, (p, cpu) in results.items()}}
    if "float_graph" not in results:
        result["float_graph"] = {"skipped": "pip install onnx to build the float graph"}
    result["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["provenance"] = provenance()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
