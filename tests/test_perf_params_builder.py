"""Predicted per-rank parameters and distributed-optimizer shards vs the megatron model the project
builds (hcx_megatron.model.build_model, CPU mode), in a real 4-process gloo world.

Each layout is built in the same spawned world (parallel_state is re-initialised between layouts to
save process start-up); every rank writes what it built to a JSON file and the test compares.
"""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import bytes_per_param
from hcx_megatron.perf.params import (chunk_params, distributed_optimizer_shards, params_per_rank,
                                      shared_embedding_names)

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
    # Megatron-FSDP: weights, gradients and optimizer state sharded over DP 4
    "dp4_fsdp": ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    # dp4_fsdp only builds the model and its optimizer (no backward, where Megatron-FSDP's gloo abort happens)
    os.environ["HCX_CPU_MEGATRON_FSDP"] = "1"
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
            "fsdp": cfg.parallel.use_megatron_fsdp,
        }
        del optimizer, built
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


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
            # Megatron-FSDP: the DP ranks' optimizer shards partition this rank's parameters exactly (every element
            # owned once); each holds 8 fp32 bytes of Adam state per owned element, as the memory model says
            # (its per-GPU figure is params / DP: each shard is within the padding of one FSDP unit of that).
            total = params_per_rank(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"], layers_on_rank=sum(stage))
            group = [res2[layout] for res2 in built if res2[layout]["pp_rank"] == r["pp_rank"]]
            assert sum(g["shard_elems"] for g in group) == total, f"{layout}: shards do not partition the params"
            assert r["state_elems"] == 2 * r["shard_elems"] and r["state_bytes"] == 8 * r["shard_elems"]
            per_param = bytes_per_param(w, Layout(tp=r["tp"], pp=r["pp"], dp=r["dp"], use_megatron_fsdp=True))[2]
            assert per_param * r["dp"] == 8
            assert abs(r["shard_elems"] - total / r["dp"]) <= max(n for c in actual for _, n in c), r["shard_elems"]
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
