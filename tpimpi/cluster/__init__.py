"""A cluster of hosts in one machine: Linux network namespaces joined by a bridge, each with its own
address, host name and disk, reached by Open MPI's launcher through an agent script; links shaped
with real packet delay (NFQUEUE) and bandwidth (tc). See `python -m tpimpi.cluster --help`."""
