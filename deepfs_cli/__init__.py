"""The ``deepfs`` command: the top of the import graph.

Every other package is a layer below this one: ``deepfs`` (the shared core
and the client library), the three services ``metadata``, ``storage_node``
and ``fuse_client``, and ``bench``. This package may import all of them and
none of them imports it (``tests/test_layering.py`` checks both), so a
command line can grow without pulling the services into the library.

Modules, one job each:
- ``main``: the ``click`` group that ``deepfs`` runs and the list of commands;
- ``cluster``: ``up``, ``down``, ``status`` and ``run`` over a local cluster;
- ``dev_session``: ``deepfs run`` (``make run``), a cluster in the foreground until Ctrl-C;
- ``status_view``: ``deepfs status`` as rich tables;
- ``nodes``: ``node list``, ``node drain``, ``node remove`` (the operator's side of membership);
- ``fsck``: ``deepfs fsck [--repair]``, with exit statuses for scripts;
- ``keys``: ``keys create`` and ``keys show`` (key files, docs/SECURITY.md);
- ``processes``: ``mount``, ``umount``, ``meta serve``, ``node serve``, handing over to each package's own entry point;
- ``common``: the options (finding a cluster) and the failure rule the commands share.

``deepfs bench`` is ``bench.command``: the benchmark owns its options so that
``python -m bench`` works without this package.
"""
