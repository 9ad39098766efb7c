#!/usr/bin/env bash
# System packages the test suite needs on a Debian machine (CI runs this as root through `make install`):
#   slurm-wlm + munge   real single-node Slurm for tests/test_slurm*.py (slurmctld, slurmd, sbatch, scontrol)
#   openmpi-bin + libopenmpi-dev + mpi4py   `mpirun -np 2` launch test (tests/test_mpi*.py)
#   the shellcheck linter: lint test over slurm/*.sh and tools/*.sh
#   iproute2            `ip netns` / veth / bridge: the 2-node test cluster (tests/test_slurm_multinode.py)
# Idempotent and quiet: packages already present are not touched, so a second run is a few dpkg queries.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev shellcheck iproute2)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query prints "install ok installed" only for a fully installed package.
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_system_deps: apt-get not found; install ${missing[*]} by hand (Slurm/MPI tests will skip)" >&2
        exit 0
    fi
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
            echo "install_system_deps: not root and no sudo; missing ${missing[*]} (Slurm/MPI tests will skip)" >&2
            exit 0
        fi
    fi
    echo "install_system_deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Other processes may hold the dpkg lock for a while; wait for it instead of failing.
    apt_opts=(-q -o DPkg::Lock::Timeout=600 -o Dpkg::Use-Pty=0)
    log="$(mktemp)"
    # Package scripts chatter on stderr (invoke-rc.d, useradd); keep it in a log shown only on failure.
    # Their daemons are not started (no init system here): the tests start their own munged/slurmd.
    if ! { "${SUDO[@]}" apt-get "${apt_opts[@]}" update &&
           "${SUDO[@]}" apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install_system_deps: apt-get failed for ${missing[*]}" >&2
        exit 1
    fi
    rm -f "$log"
fi

if ! "$PYTHON" -c "import mpi4py" >/dev/null 2>&1; then
    if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        # Where pip has to build mpi4py from source it needs a C compiler (mpicc wraps it).
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 install -y --no-install-recommends gcc libc6-dev >/dev/null 2>&1 || true
    fi
    echo "install_system_deps: pip install mpi4py"
    # mpi4py builds against libopenmpi-dev's mpicc; a wheel from PyPI is used when one matches.
    "$PYTHON" -m pip install -q --disable-pip-version-check mpi4py 2>&1 | grep -v -e "^WARNING: Running pip as" -e "is ignored: it is neither" >&2 || true
    "$PYTHON" -c "import mpi4py" || { echo "install_system_deps: mpi4py install failed" >&2; exit 1; }
fi
