"""DeepFS benchmarks: fio job set, small files, checkpoints, degraded mode, beside local disk, bindfs and GlusterFS.

``deepfs bench`` (``make bench``) runs them; ``deepfs bench --quick`` is the
harness's own smoke test. Modules, one job each:
- ``command``: the command-line options (``deepfs bench``, ``python -m bench``);
- ``targets``: the systems compared, started/stopped as context managers (one module per family);
- ``fio_runner``: the job specs, running ``jobs/*.fio``, reading fio's JSON;
- ``pyio``: the same jobs through ``deepfs.Client``;
- ``smallfiles``, ``checkpoint``, ``degraded``: the other suites;
- ``runner``: orchestration, repetitions, cleanup; ``report``: JSON, Markdown, PNGs;
- ``stats``: samples, median and spread; ``system``: machine facts, page cache.
"""
