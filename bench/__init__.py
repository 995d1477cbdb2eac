"""derd benchmarks. ``python -m bench`` (``--quick``) writes bench/results.md and bench/results.json.

Modules: timing (the shared timer, machine facts, matmul peak and the budget reference workload),
stage2 (DERD iterations built with the library: FLOPs, MFU, scaling, the passes audit), peers
(derd.attacks vs torchattacks, the AutoAttack adapter vs pyautoattack). The older single-purpose
scripts (bench_sga, bench_warmup, bench_attacks, bench_pipeline) run as ``python -m bench.<name>``.
"""
