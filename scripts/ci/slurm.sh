#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its real single-node SLURM cluster: Debian's
# slurmctld, slurmd, slurm-client and munge (~15 s). Idempotent: does nothing when they are
# already there. Run as root (or with sudo) on a Debian/Ubuntu machine:
#
#   bash scripts/ci/slurm.sh
#
# No accounting daemon (slurmdbd) is installed: the tests read job states with squeue /
# scontrol and never need sacct. The cluster itself is started by scripts/slurm/local_cluster.sh.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "slurm: already installed (${packages[*]})"
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
echo "slurm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}"
}
# Try the package lists already on the machine first (fast); refresh them only if that fails.
if ! apt_install; then
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt_install
fi
# The packages' own services are not used (local_cluster.sh starts the daemons by hand); on
# machines with systemd they may have been started: leave them, local_cluster.sh uses its own
# config, ports and pid files.
for tool in slurmctld slurmd sbatch squeue scontrol sinfo munged; do
  command -v "$tool" >/dev/null || { echo "slurm: $tool missing after install" >&2; exit 1; }
done
echo "slurm: installed slurm $(dpkg-query -W -f='${Version}' slurmctld)"
