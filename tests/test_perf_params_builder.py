"""Predicted per-rank parameters, distributed-optimizer shards and Megatron-FSDP buffers vs the megatron model
the project builds (hcx_megatron.model.build_model, CPU mode), in a real 4-process gloo world.

Each layout is built in the same spawned world (parallel_state is re-initialised between layouts to
save process start-up); every rank writes what it built to a JSON file and the test compares.
"""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.cluster import default_cluster
from hcx_megatron.perf.memory import bytes_per_param, megatron_fsdp_memory, stage_memory
from hcx_megatron.perf.params import (chunk_param_shapes, chunk_params, distributed_optimizer_shards,
                                      megatron_fsdp_shards, params_per_rank, shared_embedding_names)

pytestmark = pytest.mark.dist  # starts processes; not in `make test-fast`

WORLD = 4
VOCAB = 5003  # not a multiple of 128: exercises Megatron's padding to 128 x TP
LAYOUTS = {  # name -> driver flags (hcx-tiny: 4 layers, 4 heads, 2 KV groups)
    "tp2_dp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp2_dp2": ["--pipeline-model-parallel-size", "2"],
    "tp2_pp2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "pp2_vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2"],
    "dp4_tied": ["--tie-embeddings-and-output-weights"],
    "pp2_tied": ["--pipeline-model-parallel-size", "2", "--tie-embeddings-and-output-weights"],
    # uneven pipeline stages: layers 0-2 | 3, and 6 layers with embedding and loss counted as layers (1|2|2|1)
    "pp2_first3_dp2": ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "3"],
    "pp4_embedding_loss": ["--pipeline-model-parallel-size", "4", "--num-layers", "6",
                           "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"],
    # Megatron-FSDP over DP 4: weights, gradients and optimizer state sharded (a group per layer); gradients and
    # optimizer state (one group for the whole model, tied embeddings); optimizer state only. (DP 2 needs TP 2,
    # which Megatron-FSDP's adapter allows only with Transformer Engine, or CP 2, GPU-only here; no_shard fails
    # in megatron-core 0.16.1's optimizer step: start_param_sync gathers a model-weight buffer it never made.)
    "dp4_fsdp": ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params"],
    "dp4_fsdp_optim_grads_tied": ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads",
                                  "--tie-embeddings-and-output-weights"],
    "dp4_fsdp_optim": ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    import torch
    from megatron.core import parallel_state as ps

    from hcx_megatron.config.args import parse_config
    from hcx_megatron.distributed.initialize import initialize_distributed
    from hcx_megatron.model.builder import build_model, unwrap
    from hcx_megatron.training.optimizer import build_optimizer

    torch.set_num_threads(1)
    results = {}
    for name, flags in LAYOUTS.items():
        argv = ["--model-preset", "hcx-tiny", "--vocab-size", str(VOCAB), "--device", "cpu", "--mock-data",
                "--seq-length", "64", "--global-batch-size", "8", "--use-distributed-optimizer"] + flags
        cfg, _ = parse_config(argv, world_size=WORLD)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        initialize_distributed(cfg)
        built = build_model(cfg, "cpu")
        chunks = [[(n, p.numel()) for n, p in unwrap(c).named_parameters()] for c in built.chunks]
        # the distributed optimizer's grad buffers (one per chunk and dtype) and its param shards (Megatron-FSDP
        # keeps its own buffers)
        buffers = [[] if cfg.parallel.use_megatron_fsdp else [b.numel for b in c.buffers] for c in built.chunks]
        fsdp_groups = [_fsdp_groups(c) for c in built.chunks] if cfg.parallel.use_megatron_fsdp else []
        optimizer, _ = build_optimizer(cfg, built.chunks)
        for c in built.chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()  # Adam creates its moments on the first step (zero gradients are fine)
        inner = getattr(optimizer, "chained_optimizers", [optimizer])
        state_elems = shard_elems = state_bytes = 0
        for opt in inner:
            if cfg.parallel.use_megatron_fsdp and not opt.optimizer.state:
                # a step without a backward leaves Megatron-FSDP's main params without grads, so Adam skipped
                # them: megatron's own state initialiser (its checkpoint-load path) creates the moments
                opt._init_optimizer_states_with_dummy_values()
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    # Megatron-FSDP's main params are DTensors; numel() would be the global size
                    shard_elems += (p.to_local() if hasattr(p, "to_local") else p).numel()
                    st = {k: (v.to_local() if hasattr(v, "to_local") else v)
                          for k, v in opt.optimizer.state.get(p, {}).items() if k in ("exp_avg", "exp_avg_sq")}
                    state_elems += sum(v.numel() for v in st.values())
                    state_bytes += sum(v.numel() * v.element_size() for v in st.values())
        results[name] = {
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
            "dp_rank": ps.get_data_parallel_rank(), "vpp": cfg.parallel.virtual_pipeline_model_parallel_size,
            "cp": ps.get_context_parallel_world_size(),
            "dp_cp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
            "padded_vocab": cfg.padded_vocab_size, "chunks": chunks, "buffers": buffers,
            "shard_elems": shard_elems, "state_elems": state_elems, "state_bytes": state_bytes,
            "untie": cfg.model.untie_embeddings_and_output_weights, "num_layers": cfg.model.num_layers,
            "stage_layers": Layout(pp=cfg.parallel.pipeline_model_parallel_size, vpp=cfg.parallel.
                                   virtual_pipeline_model_parallel_size,
                                   num_layers_in_first_pipeline_stage=cfg.parallel.decoder_first_pipeline_num_layers,
                                   account_for_embedding_in_pipeline_split=cfg.parallel.
                                   account_for_embedding_in_pipeline_split,
                                   account_for_loss_in_pipeline_split=cfg.parallel.account_for_loss_in_pipeline_split,
                                   ).stage_layers(cfg.model.num_layers),
            "fsdp": cfg.parallel.use_megatron_fsdp, "fsdp_strategy": cfg.parallel.data_parallel_sharding_strategy,
            "fsdp_groups": fsdp_groups,
        }
        del optimizer, built
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _fsdp_groups(chunk) -> list[dict]:
    """What megatron-fsdp built for one chunk: per parameter group its items (name, offset, numel), alignment
    grid and padded size, and the tensors it allocated on this rank (elements, bytes per element)."""
    buf = chunk.param_and_grad_buffer
    out = []
    for g in buf.parameter_groups:
        index = g.main_weight_buffer.item_index_map
        out.append({
            "items": [[buf.param_to_name[p], index[i].global_data_index, index[i].size]
                      for i, p in enumerate(g.params)],
            "grid": g.chunk_size_factor, "numel": g.main_weight_buffer.bucket_index.size,
            **{key: ([b.data.numel(), b.data.element_size()] if b is not None else None)
               for key, b in (("weights", g.model_weight_buffer), ("main_weights", g.main_weight_buffer),
                              ("grads", g.main_grad_buffer))},
        })
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf_builder")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_param_counts_and_optimizer_shards_match_built_model(built, layout):
    import dataclasses

    from hcx_megatron.config.model import get_preset

    for rank, res in enumerate(built):
        r = res[layout]
        cfg = dataclasses.replace(get_preset("hcx-tiny"), vocab_size=VOCAB, num_layers=r["num_layers"],
                                  untie_embeddings_and_output_weights=r["untie"])
        v = r["vpp"] or 1
        stage = r["stage_layers"][r["pp_rank"]]  # the one split rule (config/layout_rules.py)
        predicted = [chunk_params(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"], c, layers_in_chunk=stage[c])
                     for c in range(v)]
        actual = [[tuple(x) for x in c] for c in r["chunks"]]
        # exact: same parameter names, same order, same element counts on every rank
        assert predicted == actual, f"rank {rank} {layout}"
        assert params_per_rank(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"], layers_on_rank=sum(stage)) == \
            sum(n for c in actual for _, n in c)
        assert r["padded_vocab"] == cfg.padded_vocab_size(r["tp"])
        w = Workload(model=cfg, seq_length=64, global_batch_size=8, precision="fp32")
        if r["fsdp"]:
            _check_megatron_fsdp(cfg, r, stage, rank, layout, [res2[layout] for res2 in built])
            continue
        # distributed optimizer: padded buffer size per chunk, and this DP rank's shard = Adam state size
        owned = 0
        for c, chunk in enumerate(predicted):
            shards = distributed_optimizer_shards(chunk, r["dp"],
                                                  shared_embedding_names=shared_embedding_names(cfg, r["pp"]))
            assert r["buffers"][c] == [shards.buffer_numel], f"rank {rank} {layout} chunk {c}"
            owned += shards.param_elements_per_dp_rank[r["dp_rank"]]
        assert owned > 0 and r["shard_elems"] == owned, f"rank {rank} {layout}"
        assert r["state_elems"] == 2 * owned  # exp_avg + exp_avg_sq
        # fp32 run: the memory model's optimizer bytes (8 per parameter, sharded) on the exact shard
        per_param = bytes_per_param(w, Layout(tp=r["tp"], pp=r["pp"], dp=r["dp"]))[2] * r["dp"]
        assert r["state_bytes"] == per_param * owned == 8 * owned


def _check_megatron_fsdp(cfg, r, stage, rank, layout, all_ranks):
    """Megatron-FSDP: megatron_fsdp_shards reproduces every parameter group megatron-fsdp built (items, offsets,
    grid, padded size), this rank's allocated buffers and optimizer shard, and megatron_fsdp_memory their bytes."""
    group = r["dp"] * r["cp"]
    shapes = chunk_param_shapes(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"], 0, layers_in_chunk=stage[0])
    pred = megatron_fsdp_shards(shapes, group, r["fsdp_strategy"])
    real = r["fsdp_groups"][0]
    assert [[list(item) for item in b.items] for b in pred.buckets] == [g["items"] for g in real], f"{layout}"
    assert [(b.chunk_size_factor, b.numel) for b in pred.buckets] == [(g["grid"], g["numel"]) for g in real]
    assert any(b.numel > sum(k for _, _, k in b.items) for b in pred.buckets)  # padding is exercised

    def allocated(key):
        return sum(g[key][0] for g in real if g[key]), sum(g[key][0] * g[key][1] for g in real if g[key])

    assert allocated("weights")[0] == pred.model_weight_elements, f"{layout} rank {rank}"
    assert allocated("main_weights")[0] == pred.main_weight_elements
    assert allocated("grads")[0] == pred.main_grad_elements
    owned = pred.optimizer_elements_per_dp_rank[r["dp_cp_rank"]]
    assert r["shard_elems"] == owned and r["state_elems"] == 2 * owned, (r["shard_elems"], owned)
    # the memory model's terms (stage_memory) are these allocations, byte for byte: fp32 run; the optimizer of
    # the DP rank that owns the most real elements; weights beside the transient gathered buckets
    lay = Layout(tp=r["tp"], pp=r["pp"], dp=r["dp"], cp=r["cp"], use_megatron_fsdp=True,
                 data_parallel_sharding_strategy=r["fsdp_strategy"])
    w = Workload(model=cfg, seq_length=64, global_batch_size=8, precision="fp32")
    mem = stage_memory(w, lay, default_cluster(), r["pp_rank"])
    assert mem.weights_bytes - megatron_fsdp_memory(w, lay).gathered_bytes == allocated("weights")[1]
    assert mem.grads_bytes == allocated("grads")[1]
    assert mem.optimizer_bytes == allocated("main_weights")[1] + max(x["state_bytes"] for x in all_ranks)
