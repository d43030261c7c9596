"""Planning for unequal devices: a profile of the cluster, a cost model, and the search over devices,
shares, memory modes and allreduce algorithms (EdgeShard's question, for tensor parallelism).

    devices.py    what a profile says about one device, and the cluster's JSON profile
    costmodel.py  predicted time and memory of one configuration (pure functions)
    search.py     the exact search over devices and shares, and a greedy cross-check
    planfile.py   the plan file: written by tpimpi.plan, applied by generate, bench, convert and serve
"""
