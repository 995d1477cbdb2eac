"""derd benchmarks. ``python -m bench`` (``--quick``) writes bench/results.md and bench/results.json.

Modules: timing (the shared timer, machine facts, matmul peak and the budget reference workload),
stage2 (DERD iterations built with the library: FLOPs, MFU, scaling, the passes audit), peers
(derd.attacks vs torchattacks, the AutoAttack adapter vs pyautoattack). The older single-purpose
scripts (bench_sga, bench_warmup, bench_attacks, bench_pipeline) run as ``python -m bench.<name>``.
``python -m bench.gpu`` is the device check before a first GPU run of the paper presets (bench/gpu.md, gpu.json);
synthetic makes their micro-scale projects (fake data in the real formats), for it and tests/test_presets.py.
"""
