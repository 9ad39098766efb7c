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
        # the distributed optimizer's grad buffers (one per chunk and dtype) and its param shards
        buffers = [[b.numel for b in c.buffers] for c in built.chunks]
        optimizer, _ = build_optimizer(cfg, built.chunks)
        for c in built.chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()  # Adam creates its moments on the first step (zero gradients are fine)
        inner = getattr(optimizer, "chained_optimizers", [optimizer])
        state_elems = shard_elems = state_bytes = 0
        for opt in inner:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    shard_elems += p.numel()
                    st = opt.optimizer.state.get(p, {})
                    state_elems += sum(v.numel() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
                    state_bytes += sum(v.numel() * v.element_size() for k, v in st.items()
                                       if k in ("exp_avg", "exp_avg_sq"))
        results[name] = {
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
            "dp_rank": ps.get_data_parallel_rank(), "vpp": cfg.parallel.virtual_pipeline_model_parallel_size,
            "padded_vocab": cfg.padded_vocab_size, "chunks": chunks, "buffers": buffers,
            "shard_elems": shard_elems, "state_elems": state_elems, "state_bytes": state_bytes,
            "untie": cfg.model.untie_embeddings_and_output_weights,
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
        cfg = dataclasses.replace(get_preset("hcx-tiny"), vocab_size=VOCAB,
                                  untie_embeddings_and_output_weights=r["untie"])
        v = r["vpp"] or 1
        predicted = [chunk_params(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"], c) for c in range(v)]
        actual = [[tuple(x) for x in c] for c in r["chunks"]]
        # exact: same parameter names, same order, same element counts on every rank
        assert predicted == actual, f"rank {rank} {layout}"
        assert params_per_rank(cfg, r["tp"], r["pp"], r["pp_rank"], r["vpp"]) == sum(n for c in actual for _, n in c)
        assert r["padded_vocab"] == cfg.padded_vocab_size(r["tp"])
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
        w = Workload(model=cfg, seq_length=64, global_batch_size=8, precision="fp32")
        per_param = bytes_per_param(w, Layout(tp=r["tp"], pp=r["pp"], dp=r["dp"]))[2] * r["dp"]
        assert r["state_bytes"] == per_param * owned == 8 * owned
