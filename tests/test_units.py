"""Fast unit tests (CPU, well under a minute): losses, the Datum convention, loss masks
through the real local backend, rendering, the artifact store, dataset validation,
schedules, batching and evaluation helpers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crucible_assets.base import build_tiny_llama, train_tokenizer
from crucible_assets.evaluation import bootstrap_ci
from crucible_assets.rendering import render
from crucible_assets.train.loop import TrainConfig, batch_indices, learning_rate
from resources.store.artifact_store import ArtifactStore, IntegrityError, fingerprint
from resources.datasets.sources import DatasetConfig, DatasetError, load_records
from resources.backends.local.backend import LocalTorchBackend
from resources.backends.local.losses import cross_entropy, importance_sampling, ppo
from resources.backends.types import AdamParams, Datum


# ---------------------------------------------------------------------------------------
# 1. losses, against hand-computed numbers
# ---------------------------------------------------------------------------------------

LP = [[-0.5, -1.0, -2.0], [-0.25, -3.0, 0.0]]  # second row: last position is padding


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_cross_entropy_is_weighted_sum():
    w = [[1.0, 0.0, 0.5], [2.0, 1.0, 0.0]]
    expected = -((1.0 * -0.5) + (0.0 * -1.0) + (0.5 * -2.0) + (2.0 * -0.25) + (1.0 * -3.0))
    assert expected == pytest.approx(5.0)
    loss, metrics = cross_entropy(_t(LP), {"weights": _t(w)}, {})
    assert loss.item() == pytest.approx(expected)
    assert metrics["loss:sum"] == pytest.approx(expected)


def test_importance_sampling_hand_computed():
    old = [[-0.5, -1.5, -2.0], [-0.25, -2.0, 0.0]]
    adv = [[1.0, 2.0, -1.0], [0.5, -1.0, 0.0]]
    expected = 0.0
    for r in range(2):
        for c in range(3):
            expected -= math.exp(LP[r][c] - old[r][c]) * adv[r][c]
    loss, metrics = importance_sampling(_t(LP), {"logprobs": _t(old), "advantages": _t(adv)}, {})
    assert loss.item() == pytest.approx(expected)
    assert metrics["loss:sum"] == pytest.approx(expected)


def test_ppo_clips_and_reports_clip_fraction():
    # ratios: 1.0 (inside), 1.5 (clipped, A>0), 0.5 (clipped, A<0 -> min keeps clipped),
    #         0.5 (clipped, A>0 -> min keeps unclipped); last position is padding with ratio 3.
    new = [[0.0, math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(3.0), 0.0]]
    old = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    adv = [[2.0, 1.0, -1.0], [1.0, 0.0, 0.0]]
    mask = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    # surrogate = min(r*A, clip(r)*A)
    s = [
        min(1.0 * 2.0, 1.0 * 2.0),  # 2.0
        min(1.5 * 1.0, 1.2 * 1.0),  # 1.2
        min(0.5 * -1.0, 0.8 * -1.0),  # -0.8
        min(0.5 * 1.0, 0.8 * 1.0),  # 0.5
        0.0,  # ratio 3 but advantage 0
        0.0,
    ]
    expected = -sum(s)
    assert expected == pytest.approx(-(2.0 + 1.2 - 0.8 + 0.5))
    loss, metrics = ppo(_t(new), {"logprobs": _t(old), "advantages": _t(adv), "mask": _t(mask)}, {})
    assert loss.item() == pytest.approx(expected)
    assert metrics["loss:sum"] == pytest.approx(expected)
    # clipped among the 4 unmasked positions: ratios 1.5, 0.5, 0.5 -> 3/4 (ratio 3 is masked)
    assert metrics["clip_fraction"] == pytest.approx(3 / 4)


def test_ppo_custom_thresholds():
    new = [[math.log(1.5)]]
    inputs = {"logprobs": _t([[0.0]]), "advantages": _t([[1.0]]), "mask": _t([[1.0]])}
    loss, metrics = ppo(_t(new), inputs, {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    assert loss.item() == pytest.approx(-1.5)
    assert metrics["clip_fraction"] == 0.0


# ---------------------------------------------------------------------------------------
# 2. Datum.from_sequence
# ---------------------------------------------------------------------------------------


def test_datum_from_sequence_shifts_by_one():
    d = Datum.from_sequence([10, 11, 12, 13], [0.0, 0.0, 1.0, 0.5], advantages=[9.0, 1.0, 2.0, 3.0])
    assert d.model_input == [10, 11, 12]
    assert d.loss_fn_inputs["target_tokens"] == [11, 12, 13]
    assert d.loss_fn_inputs["weights"] == [0.0, 1.0, 0.5]
    assert d.loss_fn_inputs["advantages"] == [1.0, 2.0, 3.0]


def test_datum_from_sequence_errors():
    with pytest.raises(ValueError, match="length"):
        Datum.from_sequence([1, 2, 3], [1.0, 1.0])
    with pytest.raises(ValueError, match="two tokens"):
        Datum.from_sequence([1], [1.0])
    with pytest.raises(ValueError):
        Datum.from_sequence([], [])
    with pytest.raises(ValueError):
        Datum.from_sequence([1, 2, 3], [1.0, 1.0, 1.0], advantages=[1.0, 2.0])
    with pytest.raises(ValueError):
        Datum(model_input=[1, 2], loss_fn_inputs={"weights": [1.0]})


# ---------------------------------------------------------------------------------------
# 3. loss masks and state through the real local backend
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tok_dir, model_dir = root / "tok", root / "model"
    tok = train_tokenizer(tok_dir, 1024, 0)
    build_tiny_llama(tok_dir, model_dir, 32, 1, 2, 64, 64, 0)
    return tok, model_dir


def _client(model_dir):
    return LocalTorchBackend(device="cpu", precision="fp32").create_training_client(model_dir, 0, 0)


SEQ_A = [5, 17, 42, 99, 7, 300, 12, 64]
W_A = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0]
SEQ_B = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
W_B = [1.0] * len(SEQ_B)


def test_cross_entropy_loss_matches_logprobs(tiny):
    _, model_dir = tiny
    client = _client(model_dir)
    lps = client.compute_logprobs([SEQ_A])[0]
    assert len(lps) == len(SEQ_A) - 1
    expected = -sum(w * lp for w, lp in zip(W_A[1:], lps))
    fb = client.forward_backward([Datum.from_sequence(SEQ_A, W_A)], "cross_entropy")
    assert fb.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert torch.allclose(fb.loss_fn_outputs[0]["logprobs"], torch.tensor(lps), atol=1e-5)


def test_zero_weight_target_does_not_change_loss(tiny):
    _, model_dir = tiny
    client = _client(model_dir)
    base = client.forward_backward([Datum.from_sequence(SEQ_A, W_A)], "cross_entropy").metrics["loss:sum"]
    # position 4 of the sequence has weight 0; it is the target of model_input[3] only
    d = Datum.from_sequence(SEQ_A, W_A)
    assert d.loss_fn_inputs["weights"][3] == 0.0
    d.loss_fn_inputs["target_tokens"][3] = 250
    changed = client.forward_backward([d], "cross_entropy").metrics["loss:sum"]
    assert changed == pytest.approx(base, abs=1e-6)
    # sanity: changing a weighted target does change it
    d2 = Datum.from_sequence(SEQ_A, W_A)
    d2.loss_fn_inputs["target_tokens"][2] = 250
    assert client.forward_backward([d2], "cross_entropy").metrics["loss:sum"] != pytest.approx(base, abs=1e-6)


def test_right_padding_leaves_logprobs_unchanged(tiny):
    _, model_dir = tiny
    client = _client(model_dir)
    alone = client.forward_backward([Datum.from_sequence(SEQ_A, W_A)], "cross_entropy")
    batched = client.forward_backward(
        [Datum.from_sequence(SEQ_A, W_A), Datum.from_sequence(SEQ_B, W_B)], "cross_entropy"
    )
    a, b = alone.loss_fn_outputs[0]["logprobs"], batched.loss_fn_outputs[0]["logprobs"]
    assert a.shape == b.shape == (len(SEQ_A) - 1,)
    assert torch.allclose(a, b, atol=1e-5)
    assert batched.loss_fn_outputs[1]["logprobs"].shape == (len(SEQ_B) - 1,)
    # compute_logprobs pads the same way
    lp_alone = client.compute_logprobs([SEQ_A])[0]
    lp_batch = client.compute_logprobs([SEQ_A, SEQ_B])[0]
    assert np.allclose(lp_alone, lp_batch, atol=1e-5)


def _train_steps(client, n):
    data = [Datum.from_sequence(SEQ_A, W_A), Datum.from_sequence(SEQ_B, W_B)]
    losses = []
    for _ in range(n):
        losses.append(client.forward_backward(data, "cross_entropy").metrics["loss:sum"])
        client.optim_step(AdamParams(learning_rate=1e-2))
    return losses


def test_optim_steps_reduce_loss(tiny):
    _, model_dir = tiny
    client = _client(model_dir)
    losses = _train_steps(client, 6)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_save_load_state_round_trip_is_bit_identical(tiny, tmp_path):
    _, model_dir = tiny
    a = _client(model_dir)
    _train_steps(a, 2)
    a.save_state(tmp_path / "A")
    _train_steps(a, 2)

    b = _client(model_dir)
    b.load_state(tmp_path / "A")
    _train_steps(b, 2)

    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


# ---------------------------------------------------------------------------------------
# 4. rendering
# ---------------------------------------------------------------------------------------


def _ids(enc):
    return enc["input_ids"] if not isinstance(enc, list) else enc


def test_render_matches_chat_template_and_weights_assistant(tiny):
    tok, _ = tiny
    messages = [
        {"role": "system", "content": "You add numbers."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7"},
    ]
    ids, weights = render(tok, {"messages": messages})
    assert ids == _ids(tok.apply_chat_template(messages, tokenize=True))
    assert len(weights) == len(ids)
    assert set(weights) <= {0.0, 1.0}
    weighted = [t for t, w in zip(ids, weights) if w == 1.0]
    assert tok.decode(weighted) == "3 + 4 = 7<|im_end|>"
    # weighted tokens are one contiguous run
    first, last = weights.index(1.0), len(weights) - 1 - weights[::-1].index(1.0)
    assert all(w == 1.0 for w in weights[first : last + 1])


def test_render_last_assistant_message_only(tiny):
    tok, _ = tiny
    messages = [
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "1 + 1 = 2"},
        {"role": "user", "content": "And 3 + 4?"},
        {"role": "assistant", "content": "3 + 4 = 7"},
    ]
    ids_all, w_all = render(tok, {"messages": messages}, "all_assistant_messages")
    ids_last, w_last = render(tok, {"messages": messages}, "last_assistant_message")
    assert ids_all == ids_last == _ids(tok.apply_chat_template(messages, tokenize=True))
    assert tok.decode([t for t, w in zip(ids_last, w_last) if w]) == "3 + 4 = 7<|im_end|>"
    assert tok.decode([t for t, w in zip(ids_all, w_all) if w]) == "1 + 1 = 2<|im_end|>3 + 4 = 7<|im_end|>"


# ---------------------------------------------------------------------------------------
# 5. artifact store
# ---------------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive():
    a = fingerprint(code="v1", config={"lr": 1e-3, "steps": 10}, upstream=["x", "y"], backend={"d": "cpu"})
    b = fingerprint(backend={"d": "cpu"}, upstream=["x", "y"], config={"steps": 10, "lr": 1e-3}, code="v1")
    assert a == b
    variants = [
        fingerprint(code="v2", config={"lr": 1e-3, "steps": 10}, upstream=["x", "y"], backend={"d": "cpu"}),
        fingerprint(code="v1", config={"lr": 2e-3, "steps": 10}, upstream=["x", "y"], backend={"d": "cpu"}),
        fingerprint(code="v1", config={"lr": 1e-3, "steps": 10}, upstream=["x", "z"], backend={"d": "cpu"}),
        fingerprint(code="v1", config={"lr": 1e-3, "steps": 10}, upstream=["x", "y"], backend={"d": "cuda"}),
    ]
    assert len({a, *variants}) == 5


def _build(d: Path):
    (d / "sub").mkdir()
    (d / "a.txt").write_text("hello")
    (d / "sub" / "b.bin").write_bytes(bytes(range(32)))
    return {"n": 2}


def test_store_write_lookup_verify(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    fp = fingerprint(x=1)
    assert store.lookup(fp) is None
    ref = store.write("r/stage", fp, _build, {"config": {"x": 1}})
    assert ref.dir == tmp_path / "store" / "objects" / ref.content_hash
    assert (ref.dir / "a.txt").read_text() == "hello"
    assert store.lookup(fp) == ref
    assert store.lookup(fp) == store.lookup(fp)
    assert store.manifest(fp)["summary"] == {"n": 2}
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    assert store.verify(ref) == []
    assert store.open_verified(ref) == ref.dir

    # flip one byte
    p = ref.dir / "sub" / "b.bin"
    data = bytearray(p.read_bytes())
    data[5] ^= 0xFF
    p.write_bytes(bytes(data))
    assert store.verify(ref) == ["sub/b.bin"]
    with pytest.raises(IntegrityError, match="sub/b.bin"):
        store.open_verified(ref)


def test_store_failed_build_leaves_nothing(tmp_path):
    store = ArtifactStore(root=str(tmp_path / "store"))
    fp = fingerprint(x=2)

    def bad(d: Path):
        (d / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.write("r/stage", fp, bad, {})
    base = tmp_path / "store"
    assert not (base / "objects").exists() or list((base / "objects").iterdir()) == []
    assert store.lookup(fp) is None
    assert not (base / "manifests" / f"{fp}.json").exists()
    assert list((base / "tmp").iterdir()) == []


def test_build_once_leaves_no_work_behind(tmp_path):
    """A published build removes its resumable work dir and its lock file; a failed one keeps
    both, so a re-run resumes and a concurrent one still waits."""
    store = ArtifactStore(root=str(tmp_path / "store"))
    work = tmp_path / "store" / "work"
    ref, built = store.build_once("r/stage", fingerprint(x=3), lambda out, w: _build(out), {})
    assert built and list(work.iterdir()) == []
    assert store.build_once("r/stage", fingerprint(x=3), lambda out, w: _build(out), {}) == (ref, False)

    def crash(out: Path, w: Path):
        (w / "step_0000001").mkdir()
        raise RuntimeError("killed")

    fp = fingerprint(x=4)
    with pytest.raises(RuntimeError, match="killed"):
        store.build_once("r/stage", fp, crash, {})
    assert sorted(p.name for p in work.iterdir()) == sorted([fp, f"{fp}.lock"])


# ---------------------------------------------------------------------------------------
# 6. dataset sources
# ---------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path: Path, lines: list[str]) -> DatasetConfig:
    path.write_text("".join(line + "\n" for line in lines))
    return DatasetConfig(source="jsonl", path=str(path))


def test_jsonl_valid(tmp_path):
    cfg = _jsonl(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({"text": "a doc"})])
    assert load_records(cfg) == [GOOD, {"text": "a doc"}]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    cfg = _jsonl(p, [json.dumps(GOOD), json.dumps(GOOD), '{"messages": [', json.dumps(GOOD)])
    with pytest.raises(DatasetError) as e:
        load_records(cfg)
    assert str(p) in str(e.value) and "line 3" in str(e.value)


def test_jsonl_bad_field_named(tmp_path):
    p = tmp_path / "f.jsonl"
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 7}]}
    with pytest.raises(DatasetError) as e:
        load_records(_jsonl(p, [json.dumps(GOOD), json.dumps(rec)]))
    msg = str(e.value)
    assert str(p) in msg and "'messages[1].content'" in msg and "line 2" in msg


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages[0].role"),
        ({"prompt": "x", "completion": "y"}, "'messages' or 'text'"),
    ],
)
def test_jsonl_invalid_records(tmp_path, record, needle):
    p = tmp_path / "r.jsonl"
    with pytest.raises(DatasetError) as e:
        load_records(_jsonl(p, [json.dumps(record)]))
    assert str(p) in str(e.value) and needle in str(e.value)


def test_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DatasetError, match="no records") as e:
        load_records(DatasetConfig(source="jsonl", path=str(p)))
    assert str(p) in str(e.value)


def test_jsonl_not_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as e:
        load_records(DatasetConfig(source="jsonl", path=str(p)))
    assert str(p) in str(e.value) and "line 2" in str(e.value) and "UTF-8" in str(e.value)


def test_jsonl_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError) as e:
        load_records(DatasetConfig(source="jsonl", path=str(p)))
    assert str(p) in str(e.value)


def test_parquet_valid(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), p)
    assert load_records(DatasetConfig(source="parquet", path=str(p))) == [GOOD, GOOD]


def test_parquet_corrupt(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not a parquet file at all")
    with pytest.raises(DatasetError) as e:
        load_records(DatasetConfig(source="parquet", path=str(p)))
    assert str(p) in str(e.value)


def test_hf_json_builder_local_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    cfg = DatasetConfig(source="hf", path="json", data_files=[str(p)])
    assert load_records(cfg) == [GOOD, GOOD]


# ---------------------------------------------------------------------------------------
# 7. schedules and batching
# ---------------------------------------------------------------------------------------


def test_learning_rate_schedules():
    peak, total, warm = 1e-3, 110, 10
    assert learning_rate(0, total, peak, "cosine", warm) == pytest.approx(peak / 10)
    assert learning_rate(4, total, peak, "linear", warm) == pytest.approx(peak * 5 / 10)
    assert learning_rate(9, total, peak, "constant", warm) == pytest.approx(peak)
    # after warmup
    assert learning_rate(warm, total, peak, "linear", warm) == pytest.approx(peak)
    assert learning_rate(total - 1, total, peak, "linear", warm) == pytest.approx(peak / 100)
    assert learning_rate(total - 1, total, peak, "linear", warm) < 0.02 * peak
    assert learning_rate(warm + 50, total, peak, "cosine", warm) == pytest.approx(peak / 2)
    assert learning_rate(warm, total, peak, "cosine", warm) == pytest.approx(peak)
    for s in range(total):
        assert learning_rate(s, total, peak, "constant", 0) == peak
    with pytest.raises(ValueError):
        learning_rate(20, total, peak, "step", warm)


def test_batch_indices_cover_each_index_once_per_epoch():
    n, bs, seed = 23, 5, 3
    per_epoch = -(-n // bs)
    epochs = []
    for e in range(3):
        order = []
        for i in range(per_epoch):
            batch = batch_indices(e * per_epoch + i, n, bs, seed)
            assert 1 <= len(batch) <= bs
            order += batch
        assert sorted(order) == list(range(n))
        epochs.append(order)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert batch_indices(0, n, bs, seed) == batch_indices(0, n, bs, seed)
    assert batch_indices(0, n, bs, seed) != batch_indices(0, n, bs, seed + 1)


# ---------------------------------------------------------------------------------------
# 8. evaluation helpers
# ---------------------------------------------------------------------------------------


def test_conversation_grader():
    from resources.datasets.graders import grade_conversation

    def correct(completion, reference):
        return grade_conversation(completion, reference)[0]

    assert correct("3 + 4 = 7", "7")
    assert correct("the answer is 12", "3 * 4 = 12")
    assert correct("5 - 8 = -3", "-3")
    assert not correct("3 + 4 = 8", "3 + 4 = 7")
    assert not correct("no numbers here", "7")
    assert not correct("7 is not it, 70 is", "7")
    assert correct("I say yes.", "yes")
    assert not correct("I say no.", "yes")


def test_bootstrap_ci_contains_mean():
    rng = np.random.default_rng(0)
    x = 2.0 + 0.01 * rng.standard_normal(50)
    lo, hi = bootstrap_ci(lambda idx: x[idx].mean(), len(x), 500, 0)
    assert lo <= x.mean() <= hi
    assert hi - lo < 0.02
    assert bootstrap_ci(lambda idx: x[idx].mean(), len(x), 500, 0) == (lo, hi)
    c = np.full(10, 4.0)
    assert bootstrap_ci(lambda idx: c[idx].mean(), 10, 100, 1) == (4.0, 4.0)


def test_a_start_model_worse_than_uniform_is_called_out():
    from crucible_assets.eval_report import worse_than_uniform

    warning = worse_than_uniform({"start/test/nll": 13.9}, 1024, "chat_sl")
    assert "worse than a uniform guess" in warning and "(6.93)" in warning and "chat_sl__base_model" in warning
    assert worse_than_uniform({"start/test/nll": 6.2}, 1024, "sl_basic") is None  # the embedded default's own data
    assert worse_than_uniform({"test/accuracy": 0.5}, 1024, "math_rl") is None  # no NLL, no claim


def test_steps_far_beyond_the_data_are_called_out():
    from crucible_assets.train.checkpoint import too_many_epochs

    assert too_many_epochs(TrainConfig(max_steps=300, batch_size=32), 18) == (
        "300 steps of batch_size 32 make 533 passes over the 18 training examples (max_steps overrides num_epochs): "
        "more data, or fewer steps?")
    assert too_many_epochs(TrainConfig(max_steps=300, batch_size=32), 1800) is None  # sl_basic's default: 5 passes
    assert too_many_epochs(TrainConfig(num_epochs=3, batch_size=32), 18) is None  # asked for by epochs


def test_ratio_report_is_a_ratio_of_sums_with_paired_cis():
    from crucible_assets.evaluation import EvalConfig, ratio_report

    trained, start, tokens = np.array([1.0, 3.0, 2.0]), np.array([4.0, 4.0, 4.0]), np.array([1.0, 2.0, 1.0])
    r = ratio_report("test/nll", trained, start, tokens, EvalConfig(bootstrap_samples=200))
    assert r["test/nll"] == 6 / 4 and r["start/test/nll"] == 12 / 4 and r["test/nll_delta"] == 6 / 4 - 12 / 4
    lo, hi = r["test/nll_delta_ci"]
    assert lo <= r["test/nll_delta"] <= hi < 0  # every resample of these three examples gains


def test_gate_needs_the_primary_gain_and_no_guard_regression():
    from crucible_assets.gate import Gate, Guard

    gate = Gate("test/sample_accuracy", higher_is_better=True, guards=(Guard("test/accuracy", margin=0.02),))
    report = {"test/sample_accuracy_delta": 0.07, "test/sample_accuracy_delta_ci": [0.05, 0.09],
              "test/accuracy_delta": -0.01, "test/accuracy_delta_ci": [-0.019, 0.0]}
    assert gate.judge(report)[0]  # a gain, and a guard within its margin
    regressed = report | {"test/accuracy_delta": -0.05, "test/accuracy_delta_ci": [-0.09, -0.015]}
    passed, lines = gate.judge(regressed)  # the math_rl case: greedy 0.94 -> 0.89
    assert not passed and lines[1] == "guard test/accuracy_delta -0.05, 95% CI [-0.09, -0.015]: worse than -0.02: a regression"
    assert not gate.judge(report | {"test/sample_accuracy_delta_ci": [-0.01, 0.09]})[0]  # no primary gain
    nll = Gate("test/nll", higher_is_better=False)
    assert nll.judge({"test/nll_delta": -1.0, "test/nll_delta_ci": [-1.2, -0.8]})[0]
    assert "above zero; test/accuracy_delta's CI no worse than -0.02" in gate.describe()
