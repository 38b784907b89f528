"""Training benchmarks: ``sgtm bench`` (strategy overhead, TP, the reference harness, profile, GPU).

Every measured configuration runs in its own process (tree), so peak memory is that process's
own maximum resident set size; repetitions are interleaved across configurations so that drift
on a shared machine hits all of them alike.
"""
