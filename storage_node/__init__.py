"""DeepFS storage node: fragments on local disk, served over the framed protocol.

Layers, bottom up:

- ``payload_pool`` — reusable page-aligned buffers for fragment payloads and
  direct I/O;
- ``fragment_store`` — fragment files with per-block CRC32C, quarantine and
  space accounting, large ones written and read with O_DIRECT (synchronous,
  no I/O framework);
- ``data_server`` — the framed-protocol ops of docs/PROTOCOL.md over the store;
- ``identity`` and ``membership`` — persisted uuid, registration and
  heartbeats to the metadata server (gRPC);
- ``server`` — the process: ``serve_node`` and the ``main`` command line.
"""
