"""The performance model against published NVIDIA H100 runs (hcx_megatron/perf/published_h100.yaml), FP8 and
overlap switches, uneven pipeline stages in the planner CLI."""

import dataclasses

import pytest

from hcx_megatron.perf import published as P
from hcx_megatron.perf.cluster import default_cluster
from hcx_megatron.perf.memory import layer_activation_bytes, peak_memory
from hcx_megatron.perf.timing import step_time

# held-out RMS bound per precision (summary key suffix); achieved 5.0 % all, 5.4 % FP8, 3.6 % BF16 (docs/perf.md);
# the goal is 10 %
HELD_OUT_RMS = {"": 0.06, "_fp8": 0.06, "_bf16": 0.05}
MIN_HELD_OUT = {"": 26, "_fp8": 20, "_bf16": 6}


@pytest.mark.timeout(60)
def test_held_out_rms_and_every_published_layout_fits():
    rows = P.load_rows()
    assert {r.split for r in rows} == {"fit", "holdout"} and all(r.source.startswith("https://") for r in rows)
    assert {r.workload.precision for r in rows} == {"fp8", "bf16"}
    res = P.evaluate(default_cluster(), rows)
    s = P.summary(res)
    for tag, bound in HELD_OUT_RMS.items():
        assert s[f"n_holdout{tag}"] >= MIN_HELD_OUT[tag], (tag, s)
        assert s[f"rms_holdout{tag}"] <= bound, (tag, s, P.table(res))
    # runs NVIDIA made on 80 GB GPUs, BF16 and FP8: the memory model must agree they fit
    assert sum(x.row.workload.precision == "bf16" for x in res) >= 12 and len(res) >= 41
    for x in res:
        assert x.fits, (x.row.id, x.memory_gib)


@pytest.mark.timeout(180)
def test_default_knobs_come_from_the_fit_rows_only():
    rows = P.load_rows()
    refit = P.fit_knobs(default_cluster(), rows)
    for k in P.FIT_KNOBS:
        assert getattr(refit.perf, k) == pytest.approx(getattr(default_cluster().perf, k), rel=0.02), k
    # moving a held-out row's published number (BF16 and FP8 alike) does not move the fitted knobs
    assert {r.workload.precision for r in rows if r.split == "holdout"} == {"fp8", "bf16"}
    bumped = [dataclasses.replace(r, tok_s_gpu=r.tok_s_gpu * 2) if r.split == "holdout" else r for r in rows]
    again = P.fit_knobs(default_cluster(), bumped)
    assert all(getattr(again.perf, k) == getattr(refit.perf, k) for k in P.FIT_KNOBS)
    # ... while the BF16 fit rows do: they are what separates the BF16 GEMM rate from fp8_speedup
    faster = [dataclasses.replace(r, tok_s_gpu=r.tok_s_gpu * 1.2)
              if r.split == "fit" and r.workload.precision == "bf16" else r for r in rows]
    moved = P.fit_knobs(default_cluster(), faster)
    assert moved.perf.matmul_efficiency > 1.1 * refit.perf.matmul_efficiency
    assert moved.perf.fp8_speedup < refit.perf.fp8_speedup


# published layouts the planner ranks more than 5 % below its best, each explained in docs/perf.md
PLANNER_EXPLAINED = ("bridge2509-llama3-70b", "dgxc-nemotron4-15b-16")


@pytest.mark.timeout(300)
def test_planner_ranks_published_bf16_recipes_near_its_best():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "perf.md").read_text()
    assert all(rid in doc for rid in PLANNER_EXPLAINED)
    rows = [r for r in P.recipes(P.load_rows()) if r.workload.precision == "bf16"]
    assert len(rows) == 6
    for r in rows:
        if r.id in PLANNER_EXPLAINED:
            continue
        c = P.planner_check(r)
        # the search covers the published layout (it cannot beat the best) and ranks it within 5 % of the best
        assert c.fitting > 10 and -0.05 <= c.gap <= 1e-9, (r.id, c.gap, c.best.layout.label(), c.rank)


@pytest.mark.timeout(20)
def test_optimizer_param_remainders_and_fp8_weights():
    rows = {x.id: x for x in P.load_rows()}
    f = rows["dgxc-fp8-llama31-70b-64"]  # NeMo fp8_params: FP8 weights, all-gathered in 1 byte
    assert f.layout.fp8_param_gather and not f.layout.optimizer_param_remainders
    bf16_weights = dataclasses.replace(f.layout, fp8_param_gather=False)
    c = default_cluster()
    # bf16 gradient reduce-scatter (2 bytes) + weight all-gather (1 byte, not 2): 3/4 of the DP bytes
    assert step_time(f.workload, f.layout, c).dp_comm_total_s == pytest.approx(
        0.75 * step_time(f.workload, bf16_weights, c).dp_comm_total_s, rel=1e-3)  # ring latency is fixed
    r = rows["dgxc-nemotron4-340b-128"]
    assert r.layout.optimizer_param_remainders and r.layout.recompute_granularity == "selective"
    c = default_cluster()
    twelve = dataclasses.replace(r.layout, optimizer_param_remainders=False)
    mem, mem12 = peak_memory(r.workload, r.layout, c), peak_memory(r.workload, twelve, c)
    shard = r.layout.dp * r.layout.cp
    assert mem.optimizer_bytes == pytest.approx(mem12.optimizer_bytes * 10 / 12)
    assert mem.optimizer_bytes == pytest.approx(10 * mem.params / shard)
    for lay in (r.layout, f.layout):
        with pytest.raises(ValueError, match="not exposed by the trainer"):
            lay.megatron_flags()


@pytest.mark.timeout(20)
def test_fp8_runs_linear_layers_faster_and_keeps_fp8_inputs():
    rows = {r.id: r for r in P.load_rows()}
    r = rows["bridge2509-llama3-70b"]
    c = default_cluster()
    bf16 = dataclasses.replace(r.workload, precision="bf16")
    assert step_time(r.workload, r.layout, c).compute_s < step_time(bf16, r.layout, c).compute_s
    assert layer_activation_bytes(r.workload, r.layout) < layer_activation_bytes(bf16, r.layout)
    cs = dataclasses.replace(r.workload, fp8_recipe="tensorwise")
    ds = dataclasses.replace(r.workload, fp8_recipe="delayed")
    assert step_time(cs, r.layout, c).compute_s > step_time(ds, r.layout, c).compute_s  # extra amax pass
    # TP communication overlap hides most of the TP collectives
    no = dataclasses.replace(r.layout, tp_comm_overlap=False)
    assert step_time(r.workload, r.layout, c).tp_comm_s < 0.5 * step_time(r.workload, no, c).tp_comm_s


@pytest.mark.timeout(20)
def test_uneven_405b_stages_and_fsdp_memory():
    r = {x.id: x for x in P.load_rows()}["bridge2509-llama31-405b"]
    assert r.model.num_layers == 126 and r.layout.pp == 8
    assert [sum(c) for c in r.layout.stage_layers(126)] == [15, 16, 16, 16, 16, 16, 16, 15]
    c = default_cluster()
    assert peak_memory(r.workload, r.layout, c).pp_rank in range(8)
    e = {x.id: x for x in P.load_rows()}["bridge2509-llama3-8b"]
    ddp = dataclasses.replace(e.layout, use_megatron_fsdp=False)
    assert peak_memory(e.workload, e.layout, c).weights_bytes < peak_memory(e.workload, ddp, c).weights_bytes


@pytest.mark.timeout(60)
def test_plan_cli_accepts_fp8_and_a_126_layer_model_at_pp8(tmp_path, capsys):
    from hcx_megatron.perf.plan_cli import main

    cfg = tmp_path / "l405.yaml"
    cfg.write_text("name: llama3.1-405b\nnum_layers: 126\nhidden_size: 16384\nffn_hidden_size: 53248\n"
                   "num_attention_heads: 128\nnum_query_groups: 8\nvocab_size: 128256\nmax_position_embeddings: 8192\n")
    rc = main(["--model-config", str(cfg), "--num-gpus", "1024", "--seq-length", "8192", "--global-batch-size", "512",
               "--precision", "fp8", "--fp8-recipe", "tensorwise", "--tp-comm-overlap", "--grad-reduce-in-bf16",
               "--layout", "tp=8,pp=8,vpp=8,cp=2,dp=8,mb=1,emb,loss"])
    out = capsys.readouterr().out
    assert rc == 0 and "yes" in out, out
    # the planner itself offers PP 8 for 126 layers (embedding + loss counted in the split)
    rc = main(["--model-config", str(cfg), "--num-gpus", "512", "--seq-length", "8192", "--global-batch-size", "512",
               "--precision", "fp8", "--micro-batch-sizes", "1", "--recompute", "none", "--max-cp", "2",
               "--top", "400"])
    out = capsys.readouterr().out
    assert rc == 0 and any(line.split()[2] == "8" for line in out.splitlines()[3:] if line[:1].isdigit()), out


@pytest.mark.timeout(60)
def test_fp8_sweep_passes_the_driver_its_fp8_flags(tmp_path):
    from hcx_megatron.perf import study_cli
    from hcx_megatron.perf.sweep import load_sweep

    d = tmp_path / "sweep"
    assert study_cli.main(["generate", "--out", str(d), "--model-preset", "hcx-s", "--seq-length", "4096",
                           "--global-batch-size", "64", "--layout", "tp=2,dp=4,mb=1", "--scaling", "layout",
                           "--precision", "fp8", "--fp8-recipe", "tensorwise"]) == 0
    sw = load_sweep(d)
    assert sw.workload(sw.runs[0]).fp8 and sw.workload(sw.runs[0]).fp8_recipe == "tensorwise"
    flags = (d / "tasks.tsv").read_text().split("\t")[-1].split()
    assert flags[flags.index("--fp8-format") + 1] == "hybrid" and flags[flags.index("--fp8-recipe") + 1] == "tensorwise"
