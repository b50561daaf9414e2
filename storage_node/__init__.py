"""DeepFS storage node: fragments on local disk, served over the framed protocol.

Layers, bottom up:

- ``fragment_store`` — fragment files with per-block CRC32C, quarantine and
  space accounting (synchronous, no I/O framework);
- ``payload_pool`` — reusable receive buffers for fragment payloads;
- ``data_server`` — the framed-protocol ops of docs/PROTOCOL.md over the store;
- ``identity`` and ``membership`` — persisted uuid, registration and
  heartbeats to the metadata server (gRPC);
- ``server`` — the process: ``serve_node`` and the ``main`` command line.
"""
