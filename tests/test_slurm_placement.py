"""Where ranks land on nodes (launch/layout.py), in-process: tensor-parallel groups never span nodes for the
shipped layouts, a layout that would split them is flagged, and the 16-node plan prints hosts, ranks and the
TP/PP/DP placement. The job scripts' own dry runs assert the same placement line (test_slurm_scripts.py)."""

from __future__ import annotations

import pytest

from launch.layout import (ParallelLayout, format_layout, groups_spanning_nodes, parallel_layout_from_argv,
                           rank_coordinates, simulated_hosts)

# The shipped allocations (#SBATCH --nodes / --ntasks-per-node) and default layouts of slurm/*.sh.
SHIPPED = [
    # script, nodes, tasks per node, driver flags (the layout part the script builds)
    ("pretrain_hcx_l.sh", 16, 8, ["--model-preset", "hcx-l", "--tensor-model-parallel-size", "8",
                                  "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "5",
                                  "--sequence-parallel", "--use-distributed-optimizer", "--global-batch-size", "1024"]),
    ("pretrain_hcx_s.sh", 4, 8, ["--model-preset", "hcx-s", "--tensor-model-parallel-size", "2",
                                 "--sequence-parallel", "--use-distributed-optimizer", "--global-batch-size", "512"]),
    ("sft_hcx.sh (hcx-s)", 2, 8, ["--model-preset", "hcx-s", "--tensor-model-parallel-size", "2",
                                  "--sequence-parallel", "--global-batch-size", "128"]),
    ("rlhf_hcx.sh (hcx-s)", 4, 8, ["--model-preset", "hcx-s", "--tensor-model-parallel-size", "2",
                                   "--sequence-parallel", "--global-batch-size", "128"]),
]


def layout_for(nodes: int, tasks: int, flags: list[str]) -> ParallelLayout:
    return parallel_layout_from_argv([*flags, "--seq-length", "4096", "--mock-data", "--device", "cuda", "--bf16"],
                                     nodes * tasks)


@pytest.mark.parametrize("script,nodes,tasks,flags", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_shipped_layouts_keep_tp_inside_a_node(script, nodes, tasks, flags):
    hosts = simulated_hosts(nodes, tasks)
    layout = layout_for(nodes, tasks, flags)
    assert groups_spanning_nodes(hosts, layout, "tp") == []
    # Not vacuous: with more than one node some group does cross nodes (PP or DP).
    assert groups_spanning_nodes(hosts, layout, "pp") or groups_spanning_nodes(hosts, layout, "dp")


def test_a_tp_group_wider_than_a_node_is_flagged():
    hosts = simulated_hosts(4, 4)  # TP8 on 4-task nodes: every TP group covers two nodes
    layout = layout_for(4, 4, ["--model-preset", "hcx-l", "--tensor-model-parallel-size", "8",
                               "--pipeline-model-parallel-size", "2", "--global-batch-size", "8"])
    spanning = groups_spanning_nodes(hosts, layout, "tp")
    assert spanning and spanning[0] == list(range(8))
    text = format_layout(hosts, layout)
    assert "WARNING: 2 TP group(s) span nodes (first: ranks 0-7)" in text
    assert "placement: every TP group inside one node" not in text


def test_sixteen_node_plan_prints_hosts_ranks_and_placement():
    hosts = simulated_hosts(16, 8)
    layout = layout_for(16, 8, SHIPPED[0][3])
    text = format_layout(hosts, layout)
    assert "job: 16 node(s) x 8 task(s) = 128 ranks; master node001" in text
    assert "TP8 x PP4 VPP4 x CP1 x DP4" in text and "placement: every TP group inside one node" in text
    # Rank order is tp-cp-dp-pp: node001 holds ranks 0-7 = one TP group of PP stage 0, DP replica 0; the 32 ranks
    # of a stage are nodes 1-4, so stage 3 is on nodes 13-16.
    assert "  node001: ranks 0-7 | pp stage 0 | tp 0-7 | dp 0 | cp 0" in text
    assert "  node016: ranks 120-127 | pp stage 3 | tp 0-7 | dp 3 | cp 0" in text
    coords = rank_coordinates(layout)
    assert {coords[r]["pp"] for r in range(96, 128)} == {3}
