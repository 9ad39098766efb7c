"""Launch glue: turn a Slurm step, an `mpirun` rank or a single node into the drivers' distributed start-up.

`python -m launch.run [--dry-run] -- hcx_megatron.pretrain <flags>` resolves rank/world/local rank and
the rendezvous address (hcx_megatron.distributed.env), exports them as torchrun would, and runs the
driver module in this process (so signals from srun reach the driver directly, and mpi4py's
MPI_Finalize runs at exit). See docs/slurm.md.
"""
