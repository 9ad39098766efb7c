"""Memory, parameter, step-time and calibration formulas against hand-computed and published numbers."""

import dataclasses

import pytest

from hcx_megatron.config.model import count_parameters, get_preset
from hcx_megatron.perf import narayanan as N
from hcx_megatron.perf.calibrate import Measurement, fit
from hcx_megatron.perf.cluster import default_cluster
from hcx_megatron.perf.layout import Layout, Workload, parse_layout
from hcx_megatron.perf.memory import (GIB, bytes_per_param, inflight_chunk_microbatches, layer_activation_bytes,
                                      peak_memory, stage_activation_bytes)
from hcx_megatron.perf.params import (chunk_params, distributed_optimizer_shards, params_per_rank,
                                      total_unique_params)
from hcx_megatron.perf.timing import step_time


def _gpt_workload(h=4096, heads=32, layers=8, s=2048):
    row = N.PaperRow(0, heads, h, layers, 1, 1, 8, 8, 0, 0)
    return Workload(model=N.gpt_model(row), seq_length=s, global_batch_size=8, flash_attention=False,
                    hidden_dropout=0.1, attention_dropout=0.1)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("t", [1, 2, 8])
def test_activations_equal_korthikanti_closed_forms(t):
    w = _gpt_workload()
    s, b, h, a = 2048, 2, 4096, 32
    no_sp = Layout(tp=t, micro_batch_size=b)
    assert layer_activation_bytes(w, no_sp) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    if t > 1:
        sp = Layout(tp=t, micro_batch_size=b, sequence_parallel=True)
        assert layer_activation_bytes(w, sp) == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
        # selective recompute with SP: 34·s·b·h/t (Korthikanti Table 2)
        assert layer_activation_bytes(w, sp, drop_attention_scores=True) == pytest.approx(34 * s * b * h / t)


@pytest.mark.timeout(10)
def test_hand_computed_gqa_swiglu_flash_layer():
    # hcx-tiny: h=128, a=4, g=2, d=32, f=352; s=64, b=2, TP=2 with SP, bf16, fused attention, no dropout.
    w = Workload(model=get_preset("hcx-tiny"), seq_length=64, global_batch_size=4)
    lay = Layout(tp=2, micro_batch_size=2, sequence_parallel=True)
    s, b = 64, 2
    replicated = 4 * 2 * s * b * 128 / 2
    qkv = 2 * s * b * (4 * 32 + 2 * 2 * 32)
    proj_in = 2 * s * b * 4 * 32
    mlp = 2 * s * b * (2 * 352 + 352)
    stats = 4 * 4 * s * b
    assert layer_activation_bytes(w, lay) == replicated + (qkv + proj_in + mlp + stats) / 2


@pytest.mark.timeout(10)
def test_inflight_microbatches_and_interleaved_factor():
    lay = Layout(pp=4, dp=1, micro_batch_size=1)
    assert [inflight_chunk_microbatches(lay, 16, r) for r in range(4)] == [4, 3, 2, 1]
    assert inflight_chunk_microbatches(lay, 2, 0) == 2  # fewer micro-batches than stages
    # Interleaved: the first stage holds L·(1 + (p−1)/(p·v)) layers' worth (Korthikanti eq. 5).
    p, v, layers = 4, 2, 16
    il = Layout(pp=p, vpp=v, micro_batch_size=1)
    chunks = inflight_chunk_microbatches(il, 64, 0)
    assert chunks * layers / (p * v) == pytest.approx(layers * (1 + (p - 1) / (p * v)))
    # and the stage memory scales by exactly that factor vs. one stage's layers x p micro-batches
    w = dataclasses.replace(_gpt_workload(layers=16), global_batch_size=64)
    plain = stage_activation_bytes(w, Layout(pp=p, micro_batch_size=1), 0)
    inter = stage_activation_bytes(w, il, 0)
    assert inter / plain == pytest.approx(1 + (p - 1) / (p * v))


@pytest.mark.timeout(10)
def test_full_recompute_keeps_layer_inputs():
    w = _gpt_workload(layers=8)
    lay = Layout(tp=2, pp=2, micro_batch_size=1, sequence_parallel=True, recompute_granularity="full",
                 recompute_method="uniform", recompute_num_layers=1)
    s, h = 2048, 4096
    per_input = 2 * s * h / 2
    expected = 2 * 4 * per_input + layer_activation_bytes(w, lay)  # 2 in flight x 4 layers + working layer
    assert stage_activation_bytes(w, lay, 0) == pytest.approx(expected)


@pytest.mark.timeout(10)
def test_distributed_optimizer_bytes_per_param():
    w = Workload(model=get_preset("hcx-s"), seq_length=4096, global_batch_size=64)
    assert bytes_per_param(w, Layout(dp=8)) == (2.0, 4.0, 12.0 / 8)
    assert bytes_per_param(w, Layout(dp=8, use_distributed_optimizer=False)) == (2.0, 4.0, 12.0)
    assert bytes_per_param(w, Layout(dp=4, cp=2)) == (2.0, 4.0, 12.0 / 8)
    # hcx-s on TP2 x PP1 x DP8: 18 bytes/param would be 72 GB of states; sharded it is 6 + 1.5.
    n = params_per_rank(w.model, 2, 1, 0)
    mem = peak_memory(w, Layout(tp=2, dp=8, sequence_parallel=True), default_cluster())
    assert mem.weights_bytes + mem.grads_bytes + mem.optimizer_bytes == pytest.approx(n * 7.5)


@pytest.mark.timeout(10)
def test_param_counts_match_config_and_paper():
    for name in ("hcx-tiny", "hcx-s", "hcx-l"):
        cfg = get_preset(name)
        assert total_unique_params(cfg) == count_parameters(cfg)
        # TP shards sum back to the total (norms replicated, so subtract their copies)
        for tp in (2, 4):
            if cfg.num_query_groups % tp:
                continue
            norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
            v = cfg.padded_vocab_size(tp)
            assert tp * (params_per_rank(cfg, tp, 1, 0, padded_vocab=v) - norms) + norms == count_parameters(cfg, v)
    # Narayanan et al. Table 1 prints parameter counts in billions to one decimal.
    for row in N.TABLE1:
        assert round(total_unique_params(N.gpt_model(row)) / 1e9, 1) == pytest.approx(row.params_b, abs=0.051)


@pytest.mark.timeout(10)
def test_pipeline_ranks_hold_embedding_and_head():
    cfg = get_preset("hcx-tiny")  # 4 layers, untied
    names0 = [n for n, _ in chunk_params(cfg, 1, 2, 0)]
    names1 = [n for n, _ in chunk_params(cfg, 1, 2, 1)]
    assert names0[0] == "embedding.word_embeddings.weight" and "output_layer.weight" not in names0
    assert names1[-1] == "output_layer.weight" and "decoder.layers.1.input_layernorm.weight" in names1
    assert "decoder.layers.2.input_layernorm.weight" not in names1  # 2 layers per stage, numbered locally
    # interleaved: each of stage 0's two chunks holds one layer
    il0 = [n for c in range(2) for n, _ in chunk_params(cfg, 1, 2, 0, 2, c) if n.endswith("input_layernorm.weight")]
    assert il0 == ["decoder.layers.0.input_layernorm.weight"] * 2
    tied = dataclasses.replace(cfg, untie_embeddings_and_output_weights=False)
    assert "output_layer.weight" not in [n for n, _ in chunk_params(tied, 1, 1, 0)]
    assert "output_layer.weight" in [n for n, _ in chunk_params(tied, 1, 2, 1)]


@pytest.mark.timeout(10)
def test_distributed_optimizer_shard_layout_by_hand():
    # Two params of 100 and 30 elements, DP 2: reversed order -> [30 @0, 100 @64]; end 164 padded to 256.
    lay = distributed_optimizer_shards([("a", 100), ("b", 30)], dp=2)
    assert lay.buffer_numel == 256 and lay.shard_numel == 128
    # rank 0 owns [0,128): 30 of b + 64 of a (64..128); rank 1 owns [128,256): the other 36 of a
    assert lay.param_elements_per_dp_rank == (94, 36)
    assert sum(distributed_optimizer_shards([("x", 1000)] * 7, dp=3).param_elements_per_dp_rank) == 7000


@pytest.mark.timeout(20)
def test_step_time_bubble_and_comm_behave():
    w = Workload(model=get_preset("hcx-l"), seq_length=4096, global_batch_size=512)
    c = default_cluster()
    a = step_time(w, parse_layout("tp=8,pp=4,dp=2,mb=1"), c)
    b = step_time(w, parse_layout("tp=8,pp=4,vpp=5,dp=2,mb=1"), c)
    assert a.bubble_fraction == pytest.approx(3 / 256) and b.bubble_fraction == pytest.approx(3 / (256 * 5))
    assert b.bubble_s < a.bubble_s
    # the interleaved schedule sends v times as much; overlapped (Megatron's default) only latency is exposed
    b_no = step_time(w, dataclasses.replace(parse_layout("tp=8,pp=4,vpp=5,dp=2,mb=1"), overlap_p2p_comm=False), c)
    assert b_no.pp_comm_s > a.pp_comm_s > b.pp_comm_s
    # TP across nodes (4-GPU nodes) is far slower than inside one 8-GPU node
    x = step_time(w, parse_layout("tp=8,pp=8,dp=1,mb=1"), c)
    y = step_time(w, parse_layout("tp=8,pp=8,dp=1,mb=1"), dataclasses.replace(c, gpus_per_node=4))
    assert 0 < x.tp_comm_s and y.tp_comm_s > 2 * x.tp_comm_s  # 4 NICs per node (multi-rail) vs NVLink
    assert x.compute_s == y.compute_s
    # the MFU and token rate are consistent with each other
    assert a.mfu == pytest.approx(a.tflops_per_gpu / c.peak_tflops)
    assert a.tokens_per_sec_per_gpu * a.total_s * 64 == pytest.approx(512 * 4096)


@pytest.mark.timeout(30)
def test_calibration_recovers_known_parameters():
    truth = default_cluster().with_perf(matmul_efficiency=0.55, nvlink_efficiency=0.6, step_overhead_s=0.3)
    w = Workload(model=get_preset("hcx-s"), seq_length=4096, global_batch_size=64)
    layouts = ["tp=1,dp=8,mb=1", "tp=2,dp=4,mb=1", "tp=4,dp=2,mb=2", "tp=8,dp=1,mb=1", "tp=2,pp=2,dp=2,mb=1"]
    data = [Measurement(w, parse_layout(s), step_time(w, parse_layout(s), truth).total_s) for s in layouts]
    res = fit(default_cluster(), data, knobs=("matmul_efficiency", "nvlink_efficiency", "step_overhead_s"),
              prior_weight=0.0)
    assert res.rms_rel_error_before > 0.05
    assert res.rms_rel_error_after < 1e-3
    assert res.fitted["matmul_efficiency"] == pytest.approx(0.55, rel=0.02)
    assert res.fitted["nvlink_efficiency"] == pytest.approx(0.6, rel=0.05)
    with pytest.raises(ValueError, match="not a calibratable knob"):
        fit(default_cluster(), data, knobs=("bogus",))


NARAYANAN_TOLERANCE = 0.15  # |predicted − published| / published TFLOP/s per GPU, every row


@pytest.mark.timeout(60)
def test_narayanan_table1_within_tolerance():
    data = [N.row_measurement(r) for r in N.TABLE1]
    res = fit(N.selene_cluster(), data)
    for row, err in zip(N.TABLE1, res.rel_errors):
        # step-time error e -> TFLOP/s error 1/(1+e) − 1
        tflops_err = 1 / (1 + err) - 1
        assert abs(tflops_err) < NARAYANAN_TOLERANCE, (row.params_b, tflops_err)
    assert res.rms_rel_error_after < 0.08
    one_t = step_time(*N.row_case(N.TABLE1[-1]), res.cluster)
    assert one_t.hardware_tflops_per_gpu / 312.0 == pytest.approx(0.52, abs=0.52 * NARAYANAN_TOLERANCE)
    # Narayanan's training-time estimates: GPT-3 175B, 300B tokens, 1024 GPUs at 140 TFLOP/s ~ 34 days;
    # 1T, 450B tokens, 3072 GPUs at 163 TFLOP/s ~ 84 days.
    assert N.training_days(175e9, 300e9, 1024, 140) == pytest.approx(34, abs=1)
    assert N.training_days(1e12, 450e9, 3072, 163) == pytest.approx(84, abs=1)
    # the memory model agrees that every published layout fits an 80 GB A100
    for row in N.TABLE1:
        w, lay = N.row_case(row)
        assert peak_memory(w, lay, res.cluster).total_bytes < 80 * GIB


@pytest.mark.timeout(10)
def test_fast_param_count_equals_listing():
    for cfg in (get_preset("hcx-tiny"), get_preset("hcx-l"), N.gpt_model(N.TABLE1[4]),
                dataclasses.replace(get_preset("hcx-tiny"), untie_embeddings_and_output_weights=False)):
        for tp, pp, vpp in ((1, 1, None), (2, 2, None), (2, 2, 2), (1, 4, None)):
            for r in range(pp):
                listed = sum(n for c in range(vpp or 1) for _, n in chunk_params(cfg, tp, pp, r, vpp, c))
                assert params_per_rank(cfg, tp, pp, r, vpp) == listed


@pytest.mark.timeout(10)
def test_cluster_yaml_files_load_and_h100_is_the_default(tmp_path):
    from hcx_megatron.perf.cluster import load_cluster, save_cluster

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert load_cluster(repo / "examples/clusters/h100.yaml") == default_cluster() == load_cluster(None)
    selene = load_cluster(repo / "examples/clusters/a100_selene.yaml")
    assert selene.peak_tflops == 312.0 and selene.perf.internode_efficiency == pytest.approx(0.54, abs=0.01)
    assert load_cluster(repo / "examples/clusters/cpu_local.yaml").gpu == "cpu-process"
    save_cluster(selene, tmp_path / "c.yaml")
    assert load_cluster(tmp_path / "c.yaml") == selene
    (tmp_path / "bad.yaml").write_text("gpus_per_node: 0\n")
    with pytest.raises(ValueError, match="gpus_per_node must be > 0"):
        load_cluster(tmp_path / "bad.yaml")


@pytest.mark.timeout(10)
def test_context_parallel_splits_work_and_memory():
    w = Workload(model=get_preset("hcx-l"), seq_length=32768, global_batch_size=32)
    c = default_cluster()
    base = parse_layout("tp=8,pp=4,dp=2,mb=1")
    cp = parse_layout("tp=8,pp=4,cp=2,dp=1,mb=1")
    flat = c.with_perf(attention_half_length=0.0)  # attention rate independent of the block length
    t0, t1 = step_time(w, base, flat), step_time(w, cp, flat)
    # same GPUs: CP halves the tokens per GPU per micro-batch but DP=1 doubles the micro-batches
    assert t1.compute_s == pytest.approx(t0.compute_s, rel=1e-9)
    assert t1.num_microbatches == 2 * t0.num_microbatches
    # with the H100 default the shorter (s/CP) attention blocks run slower
    assert step_time(w, cp, c).compute_s > step_time(w, base, c).compute_s
    m0, m1 = peak_memory(w, base, c), peak_memory(w, cp, c)
    assert m1.activations_bytes < m0.activations_bytes
    # the distributed optimizer shards over DP x CP, so optimizer bytes are unchanged
    assert m1.optimizer_bytes == pytest.approx(m0.optimizer_bytes)
    with pytest.raises(ValueError, match="cannot run"):
        step_time(w, parse_layout("tp=3,dp=1"), c)


@pytest.mark.timeout(30)
def test_megatron_fsdp_shards_partition_every_element_once():
    """Megatron-FSDP layout rule on an 8B-class model (the built-model test checks it exactly on hcx-tiny):
    groups padded to DP x grid, items inside their group without overlap, every real element optimized by one DP
    rank, and each strategy's per-rank buffers."""
    import math

    from hcx_megatron.perf.params import chunk_param_shapes, megatron_fsdp_shards

    cfg = get_preset("hcx-s")
    shapes = chunk_param_shapes(cfg, 1, 1, 0)
    total = sum(math.prod(s) for _, s in shapes)
    for dp in (2, 8, 64):
        s = megatron_fsdp_shards(shapes, dp)
        assert len(s.buckets) == cfg.num_layers + 1  # a group per layer, one for embeddings / norm / output
        assert sum(s.optimizer_elements_per_dp_rank) == total
        padded = sum(b.numel for b in s.buckets)
        assert s.model_weight_elements == s.main_weight_elements == s.main_grad_elements == padded // dp
        for b in s.buckets:
            assert b.numel % (dp * b.chunk_size_factor) == 0
            spans = sorted((o, o + k) for _, o, k in b.items)
            assert all(e <= s2 for (_, e), (s2, _) in zip(spans, spans[1:])) and spans[-1][1] <= b.numel
        assert 0 < padded - total < dp * len(s.buckets) * max(b.chunk_size_factor for b in s.buckets)
    optim = megatron_fsdp_shards(shapes, 8, "optim")
    assert len(optim.buckets) == 1  # no FSDP units: one group for the whole model
    assert optim.model_weight_elements == optim.main_grad_elements == optim.buckets[0].numel
    assert optim.main_weight_elements == optim.buckets[0].numel // 8
    grads = megatron_fsdp_shards(shapes, 8, "optim_grads")
    assert grads.model_weight_elements == grads.buckets[0].numel
    assert grads.main_grad_elements == grads.buckets[0].numel // 8
    # --ddp-bucket-size splits the non-unit group; a tied embedding split over PP gets a group of its own
    split = megatron_fsdp_shards(shapes, 8, bucket_size=1)
    assert sum(b.unit is None for b in split.buckets) == 3
    tied = dataclasses.replace(cfg, untie_embeddings_and_output_weights=False)
    last = chunk_param_shapes(tied, 1, 2, 1, layers_in_chunk=16)
    shared = megatron_fsdp_shards(last, 8, shared_embedding_names=frozenset({"output_layer.weight"}))
    assert [[n for n, _, _ in b.items] for b in shared.buckets if b.unit is None] == \
        [["decoder.final_layernorm.weight"], ["output_layer.weight"]]
    with pytest.raises(ValueError, match="data_parallel_sharding_strategy"):
        megatron_fsdp_shards(shapes, 8, "zero3")


@pytest.mark.timeout(30)
def test_megatron_fsdp_memory_terms_and_flags():
    from hcx_megatron.config.args import build_parser, config_from_args, validate_config
    from hcx_megatron.perf.memory import megatron_fsdp_memory, stage_memory
    from hcx_megatron.perf.params import layer_params

    w = Workload(model=get_preset("hcx-s"), seq_length=4096, global_batch_size=64)
    c = default_cluster()
    n = params_per_rank(w.model, 1, 1, 0)
    full = Layout(dp=8, use_megatron_fsdp=True, use_distributed_optimizer=False)
    f = megatron_fsdp_memory(w, full)
    # bf16: 2-byte weight and 4-byte gradient shards, fp32 main weights + Adam m, v: 18 bytes / 8, plus padding
    assert 18 * n / 8 < f.weights_bytes + f.grads_bytes + f.optimizer_bytes < 18 * n / 8 * 1.001
    # in flight: the embedding/output group (weights + grads) and at least two layers
    per_layer = sum(k for _, k in layer_params(w.model, 1))
    outside = n - w.model.num_layers * per_layer
    assert f.gathered_bytes >= outside * 6 + 2 * per_layer * 6
    m = stage_memory(w, full, c, 0)
    assert m.weights_bytes == f.weights_bytes + f.gathered_bytes and m.optimizer_bytes == f.optimizer_bytes
    # weights replicated under optim_grads, weights and gradients under optim
    og = megatron_fsdp_memory(w, dataclasses.replace(full, data_parallel_sharding_strategy="optim_grads"))
    assert og.weights_bytes > 7 * f.weights_bytes and og.grads_bytes == pytest.approx(f.grads_bytes, rel=1e-3)
    bad = dataclasses.replace(full, data_parallel_sharding_strategy="zero3")
    assert any("data_parallel_sharding_strategy" in e for e in bad.check(w))
    # the trainer takes the strategy the perf model assumed
    flags = parse_layout("dp=8,fsdp,fsdp_shard=optim_grads").megatron_flags()
    a = build_parser().parse_args(["--model-preset", "hcx-s", "--seq-length", "4096", "--global-batch-size", "64",
                                   "--mock-data", "--device", "cuda", "--bf16"] + flags)
    cfg = config_from_args(a, world_size=8)
    validate_config(cfg)
    assert cfg.parallel.use_megatron_fsdp and cfg.parallel.data_parallel_sharding_strategy == "optim_grads"
